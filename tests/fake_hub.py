# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""A fake Hugging Face Hub: a standard-library HTTP server on 127.0.0.1 that speaks enough of the Hub API for
`huggingface_hub` to create repos, upload folders and download them again, and that records what it received.

Endpoints (as `huggingface_hub` 1.x/2.x calls them):

- `POST /api/repos/create`                               create a repo (409 if it exists: `exist_ok=True` passes)
- `POST /api/validate-yaml`                              the model card's metadata must be a YAML mapping
- `GET  /api/models/{repo}[/revision/{rev}]`             repo info with `siblings` (snapshot_download, repo_info)
- `GET  /api/models/{repo}/tree/{rev}[/{path}]`          file listing (snapshot_download)
- `POST /api/models/{repo}/branch/{branch}`              create a branch (at `startingPoint`: a branch or a commit oid;
                                                         default main), 409 if it exists
- `DELETE /api/models/{repo}/branch/{branch}`            delete a branch
- `GET  /api/models/{repo}/commits/{rev}`                the commits made on a branch, newest first (`list_repo_commits`)
- `GET  /api/models/{repo}/refs`                         the branches and their head commits (`list_repo_refs`)
- `POST /api/models/{repo}/preupload/{rev}`              upload modes: `regular` (inline in the commit) by default,
                                                         `lfs` for files of at least `lfs_threshold` bytes
- `POST /{repo}.git/info/lfs/objects/batch`              LFS batch API ("basic" transfer, with a verify action)
- `PUT  /_lfs/{oid}`, `POST /_lfs/{oid}/verify`          LFS upload target and verification (sha256 checked)
- `POST /api/models/{repo}/commit/{rev}`                 the NDJSON commit (header, file, lfsFile, deletedFile)
- `GET|HEAD /{repo}/resolve/{rev}/{path}`                file download (with HTTP Range support)

Large files: the real Hub answers `lfs` for big/binary files, and `huggingface_hub` then uploads them through
Xet when `hf_xet` is installed, which needs a content-addressed store this fake does not implement. So by default
every file is `regular` (base64 inside the commit, which `huggingface_hub` supports for any file). Pass
`lfs_threshold=N` and disable Xet (`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`) to exercise the classic
LFS "basic" transfer.

Use it as a context manager, or through the `fake_hub` pytest fixture (import it into a test module or a
conftest): the fixture points `HF_ENDPOINT` / `huggingface_hub.constants.ENDPOINT` at the server, sets a fake
`HF_TOKEN`, and lifts offline mode for the test.

```python
from fake_hub import FakeHub

def test_push(fake_hub, tmp_path):
    ...  # push with huggingface_hub / hf_magmax.hub.push_to_hub
    repo = fake_hub.repos["user/model"]
    assert repo.private is False
    assert repo.files["README.md"].startswith(b"---")
    assert repo.commits[-1].message == "Upload with hf_magmax"
```
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


FAKE_TOKEN = "hf_fake_token_for_tests"
FAKE_USER = "fake-user"


@dataclass
class FakeCommit:
    """One commit received by the fake Hub."""

    oid: str
    message: str
    description: str
    revision: str
    files: dict[str, bytes]  # files added or changed by this commit
    deleted: list[str]
    lfs_files: list[str]  # paths committed as LFS pointers (uploaded through the LFS batch API)


@dataclass
class FakeRepo:
    """A repo on the fake Hub: its visibility, its files on `main` (path -> bytes) and its commits."""

    repo_id: str
    private: bool
    repo_type: str = "model"
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[FakeCommit] = field(default_factory=list)
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)  # branch other than main -> its files
    heads: dict[str, str] = field(default_factory=dict)  # branch (main included) -> its head commit oid
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> every file at that commit

    @property
    def sha(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40

    def head(self, revision: str = "main") -> str:
        """The head commit of a branch (`main`: the last commit on main, or the repo's last commit if none)."""
        return self.heads.get(revision) or self.sha

    def commits_on(self, revision: str) -> list[FakeCommit]:
        """The commits made on `revision` (a branch name), oldest first."""
        return [c for c in self.commits if c.revision == revision]

    def files_at(self, revision: str) -> dict[str, bytes] | None:
        """The files of a branch (`main` included) or of a commit oid; None if it is neither."""
        if revision == "main" or revision == self.heads.get("main"):
            return self.files
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.snapshots:
            return self.snapshots[revision]
        if revision == self.sha:
            return self.files
        return None


class FakeHub:
    """A fake Hub server on 127.0.0.1 (a free port). See the module docstring.

    Args:
        token (`str`, *optional*): the only token the server accepts for writes.
        lfs_threshold (`int`, *optional*): files of at least this many bytes get upload mode `lfs` (default: never).
        fail_commits (`bool`, *optional*): answer every commit with HTTP `fail_status` (to test failed pushes).
        fail_status (`int`, *optional*, defaults to 403): the status of refused commits. (`huggingface_hub` retries
            a commit answered 5xx for ~25 s: for a quick server error use `outage`.)
        outage (`int`, *optional*): answer *every* request with this HTTP status (e.g. 500: the Hub is down).
        user (`str`, *optional*): the namespace of repos created without one.
    """

    def __init__(
        self,
        token: str = FAKE_TOKEN,
        lfs_threshold: int | None = None,
        fail_commits: bool = False,
        user: str = FAKE_USER,
        fail_status: int = 403,
        outage: int | None = None,
    ) -> None:
        self.outage = outage
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.fail_commits = fail_commits
        self.fail_status = fail_status
        self.user = user
        self.repos: dict[str, FakeRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        #: requests to stall (a process killed mid-request): "commit" or "branch" (POST); while the name is here, such
        #: a request sets `stalled` and waits, then is answered 503 without any effect
        self.stall: set[str] = set()
        self.stalled = threading.Event()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.downloads: list[tuple[str, str | None]] = []  # (path, Range header or None) of every file GET
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Hub is not running: use it as a context manager or call `start()`.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests --------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> FakeRepo:
        """Create a repo holding `files` (one commit), e.g. to serve downloads."""
        repo = FakeRepo(repo_id, private)
        repo.files.update(files)
        repo.commits.append(FakeCommit(_oid(repo_id, len(files)), "initial commit", "", "main", dict(files), [], []))
        self.repos[repo_id] = repo
        return repo

    def _repo_id(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.user}/{repo_id}"


def _oid(*parts) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()


_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing -----------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, payload=None, headers: dict[str, str] | None = None, body: bytes | None = None):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.fake_hub.token}"

    def _route(self):
        hub = self.fake_hub
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        with hub._lock:
            hub.requests.append((self.command, path))
        if hub.outage is not None:
            self._body()
            return self._error(hub.outage, f"fake Hub: outage (HTTP {hub.outage})")
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", self._branch),
            ("DELETE", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", self._delete_branch),
            ("GET", rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)", self._commits),
            ("GET", rf"/api/models/{_REPO}/refs", self._refs),
            ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", self._repo_info),
            ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<prefix>.*))?", self._tree),
            ("GET", rf"/api/models/{_REPO}", self._repo_info),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", self._lfs_verify),
            ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                if handler.__name__.lstrip("_") in hub.stall:
                    return self._stall(handler.__name__.lstrip("_"))
                return handler(query=query, **match.groupdict())
        self._body()
        return self._error(404, f"fake Hub: no route for {self.command} {path}")

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = lambda self: self._route()  # noqa: E731

    def _stall(self, name: str):
        self._body()
        hub = self.fake_hub
        hub.stalled.set()
        deadline = time.monotonic() + 60
        while name in hub.stall and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            self._error(503, f"fake Hub: {name} stalled")
        except OSError:  # the client is gone (killed)
            pass

    def _get_repo(self, repo: str) -> FakeRepo | None:
        found = self.fake_hub.repos.get(repo)
        if found is None:
            self._error(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
        return found

    # -- endpoints ----------------------------------------------------------------------------------------------------

    def _create_repo(self, query):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else f"{self.fake_hub.user}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.fake_hub._lock:
            if repo_id in self.fake_hub.repos:  # the Hub's 409 carries the url (create_repo(exist_ok=True) reads it)
                message = "You already created this model repo"
                url = f"{self.fake_hub.url}/{repo_id}"
                return self._send(409, {"error": message, "url": url}, {"X-Error-Message": message})
            self.fake_hub.repos[repo_id] = FakeRepo(repo_id, private, payload.get("type") or "model")
        self._send(200, {"url": f"{self.fake_hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, query):
        import yaml

        content = json.loads(self._body() or b"{}").get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            try:
                metadata = yaml.safe_load(content[3:end] if end != -1 else "")
                if end == -1 or not isinstance(metadata, dict):
                    errors.append({"message": "metadata is not a YAML mapping closed by '---'"})
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML: {err}"})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _branch(self, repo, rev, query):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        found = self._get_repo(repo)
        if found is None:
            return
        with self.fake_hub._lock:
            if rev in found.branches or rev == "main":
                return self._error(409, f"Branch {rev} already exists")
            start = payload.get("startingPoint") or "main"
            files = found.files_at(start)
            if files is None:
                return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
            found.branches[rev] = dict(files)
            found.heads[rev] = found.heads.get(start) or (start if start in found.snapshots else found.head())
        self._send(200, {})

    def _delete_branch(self, repo, rev, query):
        self._body()
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        found = self._get_repo(repo)
        if found is None:
            return
        with self.fake_hub._lock:
            if unquote(rev) not in found.branches:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            del found.branches[unquote(rev)]
            found.heads.pop(unquote(rev), None)
        self._send(200, {})

    def _commits(self, repo, rev, query):
        """The commits of a branch, newest first (one page), as `list_repo_commits` reads them."""
        found = self._get_repo(repo)
        if found is None:
            return
        revision = unquote(rev)
        if revision != "main" and revision not in found.branches:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        commits = [
            {"id": c.oid, "authors": [{"user": self.fake_hub.user}], "date": "2026-01-01T00:00:00.000Z",
             "title": c.message, "message": c.description}
            for c in reversed(found.commits_on(revision))
        ]  # fmt: skip
        self._send(200, commits)

    def _refs(self, repo, query):
        found = self._get_repo(repo)
        if found is None:
            return
        names = ["main", *found.branches]
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": found.head(n)} for n in names]
        self._send(200, {"branches": branches, "converts": [], "tags": []})

    def _repo_info(self, repo, query, rev="main"):
        found = self._get_repo(repo)
        if found is None:
            return
        files = self._files_at(found, rev)
        siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())]
        sha = found.head(rev) if rev in found.heads else found.sha
        self._send(
            200,
            {"id": repo, "modelId": repo, "sha": sha, "private": found.private, "siblings": siblings},
        )

    def _files_at(self, found: FakeRepo, rev: str) -> dict[str, bytes]:
        files = found.files_at(unquote(rev))
        return {} if files is None else files

    def _tree(self, repo, rev, query, prefix=None):
        found = self._get_repo(repo)
        if found is None:
            return
        prefix = (prefix or "").strip("/")
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(self._files_at(found, rev).items())
            if not prefix or name.startswith(prefix + "/")
        ]
        self._send(200, entries)

    def _preupload(self, repo, rev, query):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        if self._get_repo(repo) is None:
            return
        threshold = self.fake_hub.lfs_threshold
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if threshold is not None and f["size"] >= threshold else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in payload["files"]
        ]
        self._send(200, {"files": files, "commitOid": self.fake_hub.repos[repo].sha})

    def _lfs_batch(self, repo, query):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        if "basic" not in payload.get("transfers", ["basic"]):
            return self._error(400, "fake Hub: only the LFS 'basic' transfer is implemented")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.fake_hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.fake_hub.url}/_lfs/{oid}"},
                    "verify": {"href": f"{self.fake_hub.url}/_lfs/{oid}/verify"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid, query):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "fake Hub: uploaded content does not match its sha256")
        self.fake_hub.lfs_objects[oid] = data
        self._send(200, {})

    def _lfs_verify(self, oid, query):
        payload = json.loads(self._body() or b"{}")
        data = self.fake_hub.lfs_objects.get(oid)
        if data is None or len(data) != payload.get("size"):
            return self._error(404, f"fake Hub: LFS object {oid} was not uploaded")
        self._send(200, {})

    def _commit(self, repo, rev, query):
        body = self._body()
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        found = self._get_repo(repo)
        if found is None:
            return
        if self.fake_hub.fail_commits:
            status = self.fake_hub.fail_status
            return self._error(status, f"fake Hub: commits are refused (fail_commits=True, HTTP {status})")
        header, files, deleted, lfs_files = {}, {}, [], []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.fake_hub.lfs_objects.get(value["oid"])
                if data is None:
                    return self._error(422, f"fake Hub: LFS object of {value['path']} was never uploaded")
                files[value["path"]] = data
                lfs_files.append(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        revision = unquote(rev)
        with self.fake_hub._lock:
            oid = _oid(repo, len(found.commits), header.get("summary"))
            target = found.files if revision == "main" else found.branches.setdefault(revision, dict(found.files))
            for path in deleted:
                for name in [n for n in target if n == path or n.startswith(path.rstrip("/") + "/")]:
                    del target[name]
            target.update(files)
            found.heads[revision] = oid
            found.snapshots[oid] = dict(target)
            found.commits.append(
                FakeCommit(
                    oid, header.get("summary", ""), header.get("description", ""), revision, files, deleted, lfs_files
                )
            )
        self._send(
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.fake_hub.url}/{repo}/commit/{oid}",
                "pullRequestUrl": None,
            },
        )

    def _resolve(self, repo, rev, file, query):
        found = self._get_repo(repo)
        if found is None:
            return
        files = self._files_at(found, rev)
        if file not in files:
            return self._error(404, f"Entry Not Found for url: {self.path}.", "EntryNotFound")
        data = files[file]
        if self.command == "GET":
            self.fake_hub.downloads.append((urlsplit(self.path).path, self.headers.get("Range")))
        commit = found.head(unquote(rev)) if unquote(rev) in found.heads else found.sha
        if unquote(rev) in found.snapshots:
            commit = unquote(rev)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start, end = int(match.group(1)), int(match.group(2) or len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, headers=headers, body=data)


try:  # the pytest fixture (pytest is optional for the class itself)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_hub(monkeypatch):
        """A running [`FakeHub`], with `HF_ENDPOINT`/`HF_TOKEN` pointing at it and offline mode lifted."""
        from huggingface_hub import constants

        with FakeHub() as hub:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            monkeypatch.setenv("HF_TOKEN", hub.token)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setattr(constants, "ENDPOINT", hub.url)
            monkeypatch.setattr(
                constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
            )
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
            # transformers shares one HfApi, whose endpoint is fixed when it is first built: a Trainer push in an
            # earlier test would otherwise keep talking to that test's (stopped) server.
            try:
                import transformers.utils.hub as transformers_hub
            except ImportError:  # pragma: no cover
                transformers_hub = None
            if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
                monkeypatch.setattr(transformers_hub, "_hf_api", None)
            yield hub
