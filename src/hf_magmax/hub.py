# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads, shared by the checkpoint merge, the LoRA merger and the Trainer.

- [`build_model_card`]: THE model-card builder. The streaming merge (`hf-magmax merge`), the LoRA merger
  (`hf-magmax merge-lora`) and `MagMaxTrainer` all call it, so every card has the same tag set ([`model_card_tags`]),
  `base_model` only when it is a Hub id, the merge configuration as YAML (to re-run the merge), the framework
  versions and the MagMax citation, once. It returns a `huggingface_hub.ModelCard` whose metadata went through
  `ModelCardData` (validated as TRL's cards are).
- [`render_model_card`] / [`write_model_card`] / [`parse_model_card`]: a `README.md` with YAML metadata.
- [`MAGMAX_CITATION`]: the BibTeX entry of the MagMax paper.
- [`push_to_hub`]: create the repo (if needed) and upload a folder through `huggingface_hub` (to `main` or a branch).
- [`publishable_files`]: what a push publishes of a folder (local paths replaced by public names; a file that would
  still publish one, or a link out of the folder, refused). [`upload_public_folder`]: `HfApi.upload_folder` through
  those rules, what the Trainer's pushes call; [`public_training_args`]: `training_args.bin` without local paths or
  tokens.
- [`push_release`]: one revision of a continual release: the folder becomes `main`'s new commit and a branch
  (`after-task-<k>`) points at that very commit; [`hub_branches`] lists a repo's branches and their commits.
- [`check_branch_name`], [`check_revision_pattern`], [`format_revision`]: valid git branch names, and the
  `hub_revision_pattern` of a continual release (`"after-task-{k}"`).

`huggingface_hub` and `yaml` are imported inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard


logger = logging.getLogger(__name__)

__all__ = [
    "MAGMAX_CITATION",
    "MAGMAX_TAGS",
    "REVISION_FIELDS",
    "HubPushError",
    "build_model_card",
    "check_branch_name",
    "check_revision_pattern",
    "format_revision",
    "hub_branches",
    "library_versions",
    "model_card_tags",
    "model_card_text",
    "parse_model_card",
    "public_training_args",
    "publishable_files",
    "push_release",
    "push_to_hub",
    "render_model_card",
    "upload_public_folder",
    "write_model_card",
]

#: BibTeX of the MagMax paper (Marczak, Twardowski, Trzciński, Cygert; ECCV 2024; arXiv:2407.06322).
MAGMAX_CITATION = """\
@inproceedings{marczak2024magmax,
  title     = {MagMax: Leveraging Model Merging for Seamless Continual Learning},
  author    = {Marczak, Daniel and Twardowski, Bart{\\l}omiej and Trzci{\\'n}ski, Tomasz and Cygert, Sebastian},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024},
  eprint    = {2407.06322},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2407.06322}
}
"""


#: Tags of every hf_magmax card (`lora` and `continual-learning` are added where they apply).
MAGMAX_TAGS: tuple[str, ...] = ("hf_magmax", "magmax", "model-merging")

#: `base_model_relation` values the Hub understands (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
_BASE_MODEL_RELATIONS = ("adapter", "merge", "finetune", "quantized")
#: Packages whose versions a card records (read from their installed metadata: nothing is imported).
_VERSIONED_PACKAGES = ("hf_magmax", "transformers", "peft", "torch", "huggingface_hub")


def model_card_tags(
    method: str | None = None, lora: bool = False, continual: bool = False, extra: Sequence[str] = ()
) -> list[str]:
    """The tags of an hf_magmax model card: [`MAGMAX_TAGS`], then `lora`, `continual-learning`, the merge method when
    it is not MagMax, and `extra` (duplicates and empty strings dropped, order kept).

    Example:

    ```python
    >>> from hf_magmax.hub import model_card_tags
    >>> model_card_tags("ties", lora=True)
    ['hf_magmax', 'magmax', 'model-merging', 'lora', 'ties']
    ```
    """
    tags = [*MAGMAX_TAGS, *(["lora"] if lora else []), *(["continual-learning"] if continual else [])]
    tags += [method] if method and method != "magmax" else []
    return list(dict.fromkeys(t for t in [*tags, *extra] if t))


def library_versions() -> dict[str, str]:
    """Installed versions of hf_magmax and the libraries a merged model depends on, from `importlib.metadata`
    (packages that are not installed are left out; nothing is imported)."""
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _hub_base_model(base_model: str | os.PathLike | None) -> str | None:
    """`base_model` for the card metadata: a Hub repo id, never a local path (the Hub links the card to it)."""
    from .io import is_hub_id

    if base_model is None:
        return None
    name = os.fspath(base_model)
    if not name or not is_hub_id(name) or os.path.exists(name):
        return None
    return name


def build_model_card(
    title: str, summary: str, sections: Mapping[str, str] | Sequence[tuple[str, str]] = (), **options: Any
) -> ModelCard:
    """The model card of [`model_card_text`] (same arguments) as a `huggingface_hub.ModelCard`.

    Returns:
        `huggingface_hub.ModelCard`: `str(card)` is the `README.md` text; `card.save(path)` writes it;
        [`write_model_card`]`(folder, card)` writes `folder/README.md`.

    Example:

    ```python
    >>> from hf_magmax.hub import build_model_card
    >>> card = build_model_card(
    ...     "my-merge",
    ...     "A MagMax merge of 2 fine-tuned models of `org/base`.",
    ...     {"Models merged (task order)": "1. `org/task-1`, 2. `org/task-2`"},
    ...     base_model="org/base",
    ...     base_model_relation="merge",
    ...     method="magmax",
    ...     merge_config={"base": "org/base", "models": ["org/task-1", "org/task-2"], "method": "magmax"},
    ...     config_file="magmax_config.yaml",
    ...     rerun_command="hf-magmax merge magmax_config.yaml",
    ... )
    >>> card.data.base_model, card.data.tags
    ('org/base', ['hf_magmax', 'magmax', 'model-merging'])
    ```
    """
    from huggingface_hub import ModelCard

    return ModelCard(model_card_text(title, summary, sections, **options))


def model_card_text(
    title: str,
    summary: str,
    sections: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    *,
    base_model: str | os.PathLike | None = None,
    base_model_relation: str | None = None,
    library_name: str = "transformers",
    method: str | None = None,
    lora: bool = False,
    continual: bool = False,
    tags: Sequence[str] = (),
    merge_config: Mapping[str, Any] | str | None = None,
    config_file: str | None = None,
    rerun_command: str | None = None,
    **metadata: Any,
) -> str:
    """The `README.md` text of the model card of a merged model, a merged LoRA adapter or a `MagMaxTrainer` run.

    The card is, in this order: the YAML metadata (validated by `huggingface_hub.ModelCardData`), `# title`, the
    `summary` paragraph, each of `sections` as `## heading`, `## Merge configuration` (the `merge_config` YAML and how
    to re-run it), `## Framework versions` and `## Citation` (the MagMax BibTeX, once).

    Args:
        title (`str`):
            The card's `#` heading (usually the output directory's or the repo's name).
        summary (`str`):
            One paragraph: what this model is and how it was made.
        sections (`Mapping[str, str]` or `Sequence[tuple[str, str]]`, *optional*):
            Further sections, heading → Markdown (merged models, accuracy matrices, reconstruction errors, usage).
            Do not add a citation: the builder does.
        base_model (`str` or `os.PathLike`, *optional*):
            The base model θ_0. Recorded in the metadata only when it is a Hub repo id (a local directory is
            dropped there; name it in `summary`).
        base_model_relation (`str`, *optional*):
            `"merge"`, `"adapter"`, `"finetune"` or `"quantized"`; recorded only with a Hub `base_model`.
        library_name (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"` for a full model, `"peft"` for an adapter.
        method (`str`, *optional*):
            The merge method; a method other than MagMax is added to the tags.
        lora (`bool`, *optional*, defaults to `False`):
            Add the `lora` tag (a LoRA merge or a LoRA run).
        continual (`bool`, *optional*, defaults to `False`):
            Add the `continual-learning` tag (a `MagMaxTrainer` run).
        tags (`Sequence[str]`, *optional*):
            More tags (e.g. the Trainer's `tags` argument), after the hf_magmax ones.
        merge_config (`Mapping[str, Any]` or `str`, *optional*):
            The merge configuration (what `magmax_config.yaml` holds), embedded as YAML so the merge can be re-run;
            a string is embedded verbatim (e.g. `MergeConfig.to_yaml()`, the very text of the file).
        config_file (`str`, *optional*):
            The name of the configuration file saved beside the weights (e.g. `"magmax_config.yaml"`).
        rerun_command (`str`, *optional*):
            The command that re-runs the merge from that file (e.g. `"hf-magmax merge magmax_config.yaml"`).
        **metadata:
            Further `ModelCardData` fields: `license`, `language`, `datasets`, `pipeline_tag`, `model_name`, ...

    Returns:
        `str`: the card's text. It imports only `huggingface_hub.repocard_data` (~30 ms), not
        `huggingface_hub.repocard` (~0.25 s): the streaming merge writes this text. [`build_model_card`] wraps it
        in a `huggingface_hub.ModelCard`.

    Raises:
        `ValueError` for an unknown `base_model_relation` or `library_name`, or metadata `ModelCardData` refuses.
    """
    import yaml
    from huggingface_hub.repocard_data import ModelCardData

    if library_name not in ("transformers", "peft"):
        raise ValueError(
            f"`library_name={library_name!r}` must be 'transformers' (a full model) or 'peft' (an adapter)."
        )
    if base_model_relation is not None and base_model_relation not in _BASE_MODEL_RELATIONS:
        raise ValueError(
            f"`base_model_relation={base_model_relation!r}` must be one of {list(_BASE_MODEL_RELATIONS)}."
        )
    hub_base = _hub_base_model(base_model)
    fields: dict[str, Any] = {"library_name": library_name, "tags": model_card_tags(method, lora, continual, tags)}
    if hub_base is not None:
        fields["base_model"] = hub_base
        if base_model_relation is not None:
            fields["base_model_relation"] = base_model_relation
    fields.update({key: value for key, value in metadata.items() if value is not None})
    try:
        card_data = ModelCardData(**fields)
    except Exception as err:  # huggingface_hub raises ValueError / its own errors for inconsistent metadata
        raise ValueError(f"invalid model card metadata ({err}); fix the argument it names.") from err

    parts = [f"# {title.strip()}", summary.strip()]
    items = sections.items() if isinstance(sections, Mapping) else sections
    for heading, text in items:
        if MAGMAX_CITATION.strip() in text:
            raise ValueError(f"section {heading!r} holds the MagMax citation: the builder adds it once, at the end.")
        parts.append(f"## {heading}\n\n{text.strip()}")
    if merge_config is not None:
        where = f" (also saved beside the weights as `{config_file}`)" if config_file else ""
        how = f"Re-run it with `{rerun_command}`{where}:" if rerun_command else f"The merge configuration{where}:"
        if isinstance(merge_config, str):
            config_yaml = merge_config.rstrip()
        else:
            config_yaml = yaml.safe_dump(dict(merge_config), sort_keys=False, allow_unicode=True).rstrip()
        parts.append(f"## Merge configuration\n\n{how}\n\n```yaml\n{config_yaml}\n```")
    versions = "\n".join(f"- {name}: {version}" for name, version in library_versions().items())
    parts.append(f"## Framework versions\n\n{versions}")
    parts.append(f"## Citation\n\n```bibtex\n{MAGMAX_CITATION.strip()}\n```")
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n"


class HubPushError(RuntimeError):
    """An upload to the Hub failed. The local folder is untouched; `folder` says where it is."""

    def __init__(self, message: str, folder: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.folder = None if folder is None else Path(folder)


def render_model_card(metadata: dict[str, Any], body: str) -> str:
    """A model card: YAML metadata between `---` lines, then the Markdown `body`.

    Example:

    ```python
    >>> from hf_magmax.hub import render_model_card
    >>> print(render_model_card({"library_name": "transformers", "tags": ["merge"]}, "# My model"))
    ---
    library_name: transformers
    tags:
    - merge
    ---
    <BLANKLINE>
    # My model
    <BLANKLINE>
    ```
    """
    import yaml

    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip()
    return f"---\n{front}\n---\n\n{body.strip()}\n"


def parse_model_card(text: str) -> tuple[dict[str, Any], str]:
    """Split a model card into its YAML metadata (a dict, empty if none) and its Markdown body."""
    import yaml

    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end == -1:
        raise ValueError("model card: the YAML metadata block opened by '---' is never closed.")
    metadata = yaml.safe_load(text[4:end]) or {}
    if not isinstance(metadata, dict):
        raise ValueError("model card: the YAML metadata block is not a mapping.")
    return metadata, text[end + 5 :].lstrip("\n")


def write_model_card(
    folder: str | os.PathLike, metadata: dict[str, Any] | ModelCard | str, body: str | None = None
) -> Path:
    """Write `README.md` into `folder` and return its path.

    `metadata` is either a card from [`build_model_card`] or its text ([`model_card_text`]) (then `body` is not
    given), or a metadata dict with its Markdown `body` (see [`render_model_card`]).
    """
    path = Path(folder) / "README.md"
    if isinstance(metadata, Mapping):
        if body is None:
            raise TypeError("write_model_card(folder, metadata, body): `body` is missing for a metadata dict.")
        text = render_model_card(dict(metadata), body)
    else:
        if body is not None:
            raise TypeError("write_model_card(folder, card): a ModelCard already holds its body; drop `body`.")
        text = str(metadata)
    path.write_text(text, encoding="utf-8")
    return path


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload `folder` (a merged model with its card) to the Hub repo `repo_id`, creating the repo if needed.

    What is uploaded is [`publishable_files`]`(folder)`; the `output_dir` of a continual run (`MagMaxTrainer`,
    `MagMaxCallback`) is pushed without the run's own folders ([`~hf_magmax.io.continual_run_folders`]: per-task
    checkpoints, θ_0, kept revision folders), as `trainer.push_to_hub()` pushes it.

    Uses `HfApi.create_repo(exist_ok=True)` and `HfApi.upload_folder`; the endpoint is `HF_ENDPOINT` (read when this
    function runs) or huggingface_hub's default.

    Args:
        folder (`str` or `os.PathLike`):
            The local directory to upload.
        repo_id (`str`):
            `"user/name"` or `"name"` (in the token owner's namespace).
        private (`bool`, *optional*, defaults to `False`):
            Create the repo as private (an existing repo keeps its visibility).
        token (`str` or `bool`, *optional*):
            Hub token; defaults to `HF_TOKEN` or the saved login.
        commit_message (`str`, *optional*):
            Defaults to `"Upload with hf_magmax"`.
        revision (`str`, *optional*):
            Branch to push to; defaults to the main branch. An existing branch gets one commit on its head
            (`parent_commit`: a branch moved meanwhile refuses the commit). A missing branch is created only *after*
            the upload, at the new commit: the files are committed on a temporary branch
            `hf-magmax-upload-<random>` started from `main`, then `revision` is created at that commit and the
            temporary branch deleted. A refused or interrupted upload therefore never leaves `revision` serving
            another model (at worst a temporary branch, named in the log, is left behind). `main` is not changed.

    Returns:
        `str`: the URL of the commit.

    Raises:
        `ValueError` for an invalid repo id or branch name (before any request); [`HubPushError`] if anything fails
        (the local folder is never modified).

    Example:

    ```python
    >>> from hf_magmax.hub import push_to_hub
    >>> push_to_hub("merged", "me/my-merged-model", private=True)  # doctest: +SKIP
    'https://huggingface.co/me/my-merged-model/commit/...'
    ```
    """
    folder = _check_folder(folder)
    check_repo_id(repo_id)
    if revision is not None:
        check_branch_name(revision)
    operations = _publishable(folder, repo_id)  # before any request: a local path or a link out refuses the push
    message = commit_message or "Upload with hf_magmax"
    with _hub_api(folder, repo_id, token, revision) as (api, constants):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is None or revision == constants.DEFAULT_REVISION:
            commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=message)
        else:
            commit = _commit_to_branch(api, repo_id, revision, operations, message)
    logger.info("pushed %s to %s", folder, commit.commit_url)
    return str(commit.commit_url)


def _commit_to_branch(api: Any, repo_id: str, branch: str, operations: list[Any], message: str) -> Any:
    """One commit of `operations` on `branch`; a missing branch is created at the new commit, after the upload."""
    import uuid

    heads = _branch_heads(api, repo_id)
    if branch in heads:
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=message,
            revision=branch,
            parent_commit=heads[branch],
        )
    upload = f"hf-magmax-upload-{uuid.uuid4().hex[:12]}"
    api.create_branch(repo_id, branch=upload, revision=heads.get("main"), exist_ok=False)
    try:
        commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=message, revision=upload)
        api.create_branch(repo_id, branch=branch, revision=commit.oid, exist_ok=False)
    finally:
        try:
            api.delete_branch(repo_id, branch=upload)
        except Exception as err:  # noqa: BLE001 - the push itself is done or already failing
            logger.warning("could not delete the temporary branch %r of %s: %s", upload, repo_id, err)
    return commit


@contextlib.contextmanager
def interrupted_push(folder: str | os.PathLike, repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Around the push of a finished output: Ctrl-C, SIGTERM or SIGHUP raise [`~hf_magmax.io.Terminated`] whose
    `outcome` says the truth, that the output is complete at `folder` and how to push it (a Hub commit is all or
    nothing: the repo holds the new commit or not, a branch is created only after it)."""
    from .io.output import Terminated, terminate_as_interrupt

    try:
        with terminate_as_interrupt():
            yield
    except KeyboardInterrupt as err:
        outcome = (
            f"the merge is complete at {folder}, but its push to the Hub repo {repo_id!r} was interrupted (a Hub "
            f"commit is all or nothing; check the repo, and push it with: {push_command(folder, repo_id, revision)})"
        )
        raise Terminated(getattr(err, "signum", 2), outcome) from None


def push_command(folder: str | os.PathLike, repo_id: str, revision: str | None = None) -> str:
    """The `hf-magmax push` command line that uploads `folder` to `repo_id` (on `revision`)."""
    import shlex

    branch = f" --revision {shlex.quote(revision)}" if revision and revision != "main" else ""
    return f"hf-magmax push {shlex.quote(os.fspath(folder))} --to-hub {shlex.quote(repo_id)}{branch}"


def check_repo_id(repo_id: Any, option: str = "push_to_hub") -> str:
    """`repo_id` if it is a valid Hub repo id (`name` or `namespace/name`, huggingface_hub's `validate_repo_id`),
    else a `ValueError` naming `option`: checked before a merge, not after it.

    Example:

    ```python
    >>> from hf_magmax.hub import check_repo_id
    >>> check_repo_id("me/my-merge")
    'me/my-merge'
    ```
    """
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"`{option}` must be a Hub repo id such as 'me/my-merge', got {repo_id!r}.")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:  # HFValidationError
        reason = " ".join(str(err).split())
        raise ValueError(f"`{option}` = {repo_id!r} is not a valid Hub repo id ({reason}).") from None
    return repo_id


#: The line of a release commit's description that names its branch (a resumed run finds the commit by it).
RELEASE_MARKER = "hf_magmax-release-branch: "


def find_release_commit(repo_id: str, branch: str, token: str | bool | None = None) -> str | None:
    """The oid of `main`'s head commit if it is the release commit of `branch` ([`push_release`] marks its
    description with the branch name) whose branch was never created (a kill between the commit and the branch),
    else `None`.

    Raises:
        [`HubPushError`] if the Hub cannot be asked.
    """
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    with _hub_api(None, repo_id, token) as (api, _):
        try:
            commits = api.list_repo_commits(repo_id, revision="main")
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None
    if commits and f"{RELEASE_MARKER}{branch}" in (commits[0].message or "").splitlines():
        return commits[0].commit_id
    return None


def create_release_branch(repo_id: str, branch: str, commit: str, token: str | bool | None = None) -> None:
    """Create `branch` at `commit` (the second half of [`push_release`], for a release whose commit is on `main`)."""
    with _hub_api(None, repo_id, token) as (api, _):
        api.create_branch(repo_id, branch=branch, revision=commit, exist_ok=False)


def push_release(
    folder: str | os.PathLike,
    repo_id: str,
    branch: str,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> dict[str, str]:
    """Publish `folder` as one revision of a continual release: `main`'s new commit, and the branch `branch` at it.

    The folder is uploaded once, as a commit on `main` (so `main` always holds the latest model), then `branch` is
    created at that very commit: `branch` and `main` then hold the same files, and the branch keeps them when `main`
    moves on to the next release. The branch must not exist yet (list them with [`hub_branches`]).

    Args:
        folder (`str` or `os.PathLike`):
            The local directory to upload (a `save_pretrained` folder with its card).
        repo_id (`str`):
            `"user/name"` or `"name"` (in the token owner's namespace); created if needed.
        branch (`str`):
            The branch of this revision, e.g. `"after-task-2"` (a valid git branch name, not `main`).
        private (`bool`, *optional*, defaults to `False`):
            Create the repo as private (an existing repo keeps its visibility).
        token (`str` or `bool`, *optional*):
            Hub token; defaults to `HF_TOKEN` or the saved login.
        commit_message (`str`, *optional*):
            Defaults to `"Upload <branch> with hf_magmax"`.

    Returns:
        `dict[str, str]`: `repo_id` (with its namespace), `branch`, `commit` (the commit oid) and `url` (its URL).

    Raises:
        `ValueError` for an invalid branch name; [`HubPushError`] if anything fails (the local folder is never
        modified; if the branch could not be created after the commit, `main` already holds the new commit and the
        error says so).

    Example:

    ```python
    >>> from hf_magmax.hub import push_release
    >>> push_release("releases/after-task-2", "me/continual-model", "after-task-2")  # doctest: +SKIP
    {'repo_id': 'me/continual-model', 'branch': 'after-task-2', 'commit': '...', 'url': '...'}
    ```
    """
    folder = _check_folder(folder)
    branch = check_branch_name(branch, "branch")
    if branch == "main":
        raise ValueError("`branch` must not be 'main': push_release always updates main; name the revision's branch.")
    operations = _publishable(folder, repo_id)  # before any request: a local path or a link out refuses the push
    with _hub_api(folder, repo_id, token) as (api, _):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        commit = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {branch} with hf_magmax",
            commit_description=f"{RELEASE_MARKER}{branch}",  # found by a resumed run if the branch is missing
            revision="main",
        )
        try:
            api.create_branch(repo_id, branch=branch, revision=commit.oid, exist_ok=False)
        except Exception as err:
            raise RuntimeError(
                f"main holds the new commit {commit.oid}, but creating the branch failed: {err}"
            ) from err
    logger.info("pushed %s to %s (branch %s)", folder, commit.commit_url, branch)
    return {"repo_id": repo_id, "branch": branch, "commit": str(commit.oid), "url": str(commit.commit_url)}


def hub_branches(repo_id: str, token: str | bool | None = None) -> dict[str, str] | None:
    """The branches of a Hub repo and their head commits (`list_repo_refs`), or `None` if the repo does not exist.

    Raises:
        [`HubPushError`] if the Hub cannot be asked (offline mode, network, permissions).
    """
    from huggingface_hub.errors import RepositoryNotFoundError

    with _hub_api(None, repo_id, token) as (api, _):
        try:
            return _branch_heads(api, repo_id)
        except RepositoryNotFoundError:
            return None


def _branch_heads(api: Any, repo_id: str) -> dict[str, str]:
    """The branches of `repo_id` and their head commits (`list_repo_refs`)."""
    return {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}


#: Keys whose values are local paths in files that transformers, PEFT, hf_magmax and the recipes write beside the
#: weights (at any depth of a JSON/YAML file: `trainer_state.json`'s `best_model_checkpoint`, a recipe's
#: `results.json` with the `TrainingArguments` and script arguments, ...).
_PATH_KEYS = {
    "_name_or_path",
    "name_or_path",
    "base_model_name_or_path",
    "model_name_or_path",
    "base",
    "models",
    "adapters",
    "output_dir",
    "logging_dir",
    "best_model_checkpoint",
    "resume_from_checkpoint",
    "deepspeed",
    "dataset",
    "data_path",
}
_TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".txt", ".jinja", ".py", ".cfg", ".csv", ".tsv")
#: The pickle of `TrainingArguments` that `Trainer` writes beside the weights and pushes (`output_dir`, `hub_token`,
#: the DeepSpeed config path...): published only as [`public_training_args`] re-serializes it.
TRAINING_ARGS_NAME = "training_args.bin"


def publishable_files(
    folder: str | os.PathLike,
    *,
    path_in_repo: str = "",
    allow_patterns: str | Sequence[str] | None = None,
    ignore_patterns: str | Sequence[str] | None = None,
    training_args: bytes | None = None,
) -> list[Any]:
    """The files of `folder` as they are published: `huggingface_hub.CommitOperationAdd`s, with every local path in
    the configs that transformers, PEFT and hf_magmax write (`config.json`'s `_name_or_path`, `adapter_config.json`'s
    `base_model_name_or_path`, a tokenizer's `name_or_path`, `magmax_config.yaml`'s inputs and `output_dir`,
    `trainer_state.json`'s `best_model_checkpoint`) replaced by its last component ([`~hf_magmax.io.public_name`]).
    The folder itself is not changed (its `magmax_config.yaml` still re-runs the merge here).

    Skipped as `upload_folder` skips them: `.git/` and `.cache/huggingface/`, and what `allow_patterns` /
    `ignore_patterns` leave out (matched on the path relative to `folder`, as `upload_folder` matches them).
    `training_args.bin` (a pickle of `TrainingArguments`, which cannot be checked as text) is published as the bytes
    `training_args` (see [`public_training_args`]), or left out with one log line when they are not given or still
    hold a local path.

    Args:
        folder (`str` or `os.PathLike`): the local directory.
        path_in_repo (`str`, *optional*): the folder in the repo the files go to (defaults to the repo's root).
        allow_patterns, ignore_patterns (`str` or `list[str]`, *optional*): as in `HfApi.upload_folder`.
        training_args (`bytes`, *optional*): the public `training_args.bin`.

    Raises:
        `ValueError` when a file still holds a local path after that (the folder, its parent, the current or the home
        directory: the push would publish it), naming the file; or for a symbolic link out of `folder`.
    """
    contents = _public_contents(Path(folder), allow_patterns, ignore_patterns, training_args)
    return _commit_operations(contents, path_in_repo)


def _commit_operations(contents: list[tuple[str, bytes | Path]], path_in_repo: str | None = "") -> list[Any]:
    """The `CommitOperationAdd`s of [`_public_contents`] under `path_in_repo` (each hashes its content)."""
    from huggingface_hub import CommitOperationAdd

    folder = (path_in_repo or "").strip("/")
    prefix = f"{folder}/" if folder else ""
    return [CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=content) for name, content in contents]


def _public_contents(
    folder: Path,
    allow_patterns: str | Sequence[str] | None = None,
    ignore_patterns: str | Sequence[str] | None = None,
    training_args: bytes | None = None,
    local_paths: Sequence[str | os.PathLike] = (),
) -> list[tuple[str, bytes | Path]]:
    """The checked, rewritten files of [`publishable_files`]: (path relative to `folder`, bytes or the file), before
    anything is hashed. `local_paths`: more local folders that no file may name (e.g. the model's)."""
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS  # what `upload_folder` never uploads
    from huggingface_hub.utils import filter_repo_objects

    from .io import link_roots, resolve_inside

    roots = link_roots(folder)
    markers = _local_path_markers(folder, local_paths)
    listed = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if not p.is_dir()}
    ignored = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
    kept = filter_repo_objects(
        listed, allow_patterns=allow_patterns, ignore_patterns=[*ignored, *DEFAULT_IGNORE_PATTERNS]
    )
    contents: list[tuple[str, bytes | Path]] = []
    for rel in kept:
        path = listed[rel]
        if ".git" in path.relative_to(folder).parts:
            continue
        resolved = resolve_inside(path, folder, roots)
        content: bytes | Path = resolved
        if path.name == TRAINING_ARGS_NAME:
            content = _public_training_args_file(path, training_args, markers)
            if content is None:
                continue
        elif path.suffix in _TEXT_SUFFIXES and resolved.stat().st_size < 64 * 2**20:
            text = resolved.read_text(encoding="utf-8", errors="replace")
            public = _public_text(text, path.suffix, folder)
            for local, marker in markers:
                if marker.search(public):
                    raise ValueError(
                        f"{path} holds the local path {local!r}: "
                        "hf_magmax never publishes a local path. Remove it from the file (or name the Hub id) and "
                        "push again."
                    )
            if public != text:
                content = public.encode("utf-8")
        contents.append((rel, content))
    return contents


def _public_training_args_file(
    path: Path, training_args: bytes | None, markers: list[tuple[str, re.Pattern]]
) -> bytes | None:
    """What is published of the `training_args.bin` at `path`: `training_args`, or `None` (left out, one log line)
    when they are not given or still hold a local path (in an attribute [`public_training_args`] does not rewrite:
    the model does not need the file, so it is left out rather than refusing the push)."""
    if training_args is None:
        logger.info(
            "%s is left out of the push: a pickle of the TrainingArguments (output_dir, hub_token, ...) cannot be "
            "checked for local paths.",
            path,
        )
        return None
    for local, _ in markers:
        if re.search(re.escape(local.encode()) + rb"(?![\w.-])", training_args):
            logger.warning(
                "%s is left out of the push: re-serialized with public names, the TrainingArguments still hold the "
                "local path %r (in an attribute hf_magmax does not rewrite).",
                path,
                local,
            )
            return None
    return training_args


def public_training_args(args: Any) -> bytes:
    """`training_args.bin` as it is published: `torch.save` of a copy of the `TrainingArguments` `args` whose local
    paths (`output_dir`, a DeepSpeed config file, `resume_from_checkpoint`, ... in any attribute, lists and dicts
    included) are replaced by their last component ([`~hf_magmax.io.public_name`]) and whose tokens (`hub_token`,
    any `*_token`) are `None`. `args` itself is not changed; `torch.load(..., weights_only=False)` reads the copy as
    `Trainer` reads its own.
    """
    import copy
    import io

    import torch

    public = copy.copy(args)
    for key, value in vars(args).items():
        public.__dict__[key] = None if key.endswith("_token") else _public_deep(value)
    buffer = io.BytesIO()
    torch.save(public, buffer)
    return buffer.getvalue()


def _public_deep(value: Any) -> Any:
    """`value` with every local path in it (strings, in lists, tuples and dict values) replaced by its public name."""
    if isinstance(value, str):
        public = _public_value(value)
        return value if public == value else public  # an enum that is a `str` stays the enum
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_public_deep(v) for v in value)
    if isinstance(value, dict):
        return {key: _public_deep(v) for key, v in value.items()}
    return value


def upload_public_folder(
    api: Any,
    *,
    repo_id: str,
    folder_path: str | os.PathLike,
    path_in_repo: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool | None = None,
    parent_commit: str | None = None,
    allow_patterns: str | Sequence[str] | None = None,
    ignore_patterns: str | Sequence[str] | None = None,
    run_as_future: bool = False,
    repo_type: str | None = None,
    training_args: bytes | None = None,
    local_paths: Sequence[str | os.PathLike] = (),
) -> Any:
    """`HfApi.upload_folder` (same arguments, on `api`), through the rules of [`publishable_files`]: local paths
    rewritten to public names, `training_args.bin` published as `training_args` (or left out), and a file that still
    holds a local path (of `folder_path`, its parent, the current or home directory, or one of `local_paths`, e.g.
    the folder the model was loaded from) or a link out of `folder_path` refused *before any request*. What
    `Trainer.push_to_hub` and the Trainer's checkpoint pushes call, within
    [`hf_magmax.trainer.trainer.public_hub_uploads`].

    The files are listed, checked and read (text files) when this function is called; with `run_as_future=True` only
    the hashing and the commit run in the background, as `upload_folder` runs them.

    Returns:
        The `CommitInfo` of the commit, or with `run_as_future=True` a `concurrent.futures.Future` of it.

    Raises:
        [`HubPushError`] naming the file that refused the push (nothing was uploaded); errors of the commit itself as
        `upload_folder` raises them.
    """
    folder = _check_folder(folder_path)
    contents = _public_or_refused(folder, repo_id, allow_patterns, ignore_patterns, training_args, local_paths)

    def commit() -> Any:
        return api.create_commit(
            repo_id=repo_id,
            operations=_commit_operations(contents, path_in_repo),
            commit_message=commit_message or "Upload folder using huggingface_hub",
            commit_description=commit_description,
            token=token,
            repo_type=repo_type,
            revision=revision,
            create_pr=create_pr,
            parent_commit=parent_commit,
        )

    return api.run_as_future(commit) if run_as_future else commit()


def _publishable(folder: Path, repo_id: str) -> list[Any]:
    from .io import continual_run_folders

    run_folders = continual_run_folders(folder)
    if run_folders:
        logger.info(
            "%s is the output_dir of a continual run: its own folders (%s) are left out of the push, as "
            "`MagMaxTrainer.push_to_hub` leaves them out.",
            folder,
            ", ".join(f"{name}/" for name in run_folders),
        )
    return _commit_operations(_public_or_refused(folder, repo_id, ignore_patterns=[f"{n}/*" for n in run_folders]))


def _public_or_refused(folder: Path, repo_id: str, *args: Any, **kwargs: Any) -> list[tuple[str, bytes | Path]]:
    """[`_public_contents`]`(folder, ...)`, its refusal (a local path, a link out) raised as one [`HubPushError`]
    naming `repo_id` and the folder that is kept."""
    try:
        return _public_contents(folder, *args, **kwargs)
    except ValueError as err:
        message = f"nothing was pushed to {repo_id!r}: {err} The local output is kept at {folder}."
        raise HubPushError(message, folder) from None


def _local_path_markers(folder: Path, local_paths: Sequence[str | os.PathLike] = ()) -> list[tuple[str, re.Pattern]]:
    """Local paths that must not appear in a published file: the folder, its parent, the current and home dirs and
    `local_paths` (each only when it is at least two levels deep, or the home directory of a named user)."""
    candidates = {folder.resolve(), folder.resolve().parent, Path.cwd().resolve(), Path.home()}
    candidates |= {Path(path).expanduser().resolve() for path in local_paths}
    markers = []
    for path in sorted(candidates, key=lambda p: -len(str(p))):
        text = str(path)
        if len(path.parts) < 3 and path != Path.home():
            continue
        if path == Path.home() and text in ("/", ""):
            continue
        markers.append((text, re.compile(re.escape(text) + r"(?![\w.-])")))
    return markers


def _public_text(text: str, suffix: str, folder: Path | None = None) -> str:
    """`text` of a `.json` or `.yaml` file with the local paths under `_PATH_KEYS` (at any depth) replaced by their
    last component and, in any other string, a path inside `folder` named from the folder's name
    (`/home/alice/runs/out/magmax_releases/after-task-1` -> `out/magmax_releases/after-task-1`); rewritten only when
    something is replaced. Any other text as it is."""
    inside = _inside_folder(folder) if folder is not None else None
    if suffix == ".json":
        import json

        try:
            public = _public_mapping(json.loads(text), inside)
        except ValueError:
            return text
        return text if public is None else json.dumps(public, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if suffix in (".yaml", ".yml"):
        import yaml

        from .config import PUBLIC_CONFIG_NOTE

        try:
            public = _public_mapping(yaml.safe_load(text), inside)
        except yaml.YAMLError:
            return text
        return (
            text
            if public is None
            else PUBLIC_CONFIG_NOTE + yaml.safe_dump(public, sort_keys=False, allow_unicode=True)
        )
    return text


def _inside_folder(folder: Path) -> Callable[[str], str]:
    """A function that names the paths inside `folder` in a string from the folder's name (its last component)."""
    from .io import public_name

    roots = sorted({str(folder.absolute()), str(folder.resolve())}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(root) for root in roots) + r"(?![\w.-])")
    name = public_name(roots[0])
    return lambda text: pattern.sub(lambda _: name, text)


def _public_mapping(data: Any, inside: Callable[[str], str] | None = None) -> dict[str, Any] | None:
    """`data` (a parsed config) made public as [`_public_text`] says, or `None` when nothing changes."""
    if not isinstance(data, dict):
        return None
    public = _public_tree(data, inside)
    return None if public == data else public


def _public_tree(value: Any, inside: Callable[[str], str] | None = None) -> Any:
    """`value` (nested dicts and lists) with the values under `_PATH_KEYS` replaced by their public names, and the
    paths inside the pushed folder in other strings named by `inside`."""
    if isinstance(value, dict):
        return {
            key: _public_value(v, inside) if key in _PATH_KEYS else _public_tree(v, inside) for key, v in value.items()
        }
    if isinstance(value, list):
        return [_public_tree(v, inside) for v in value]
    if isinstance(value, str) and inside is not None:
        return inside(value)
    return value


def _public_value(value: Any, inside: Callable[[str], str] | None = None) -> Any:
    from .io import public_name

    if isinstance(value, str):
        local = os.path.expanduser(value)
        if os.path.isabs(local) or value.startswith(("./", "../", "~")) or os.path.exists(local):
            return public_name(value)
        return value
    if isinstance(value, list):
        return [_public_value(v, inside) for v in value]
    return _public_tree(value, inside)


def _check_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot push {folder} to the Hub: it is not a directory.")
    return folder


@contextlib.contextmanager
def _hub_api(
    folder: Path | None, repo_id: str, token: str | bool | None, revision: str | None = None
) -> Iterator[tuple[Any, Any]]:
    """An `HfApi` on `HF_ENDPOINT` (read now) and huggingface_hub's constants; any error in the block becomes one
    [`HubPushError`] naming the repo, the reason and (for a push) the local folder that is kept and the command that
    pushes it."""
    from huggingface_hub import HfApi, constants

    where = ""
    if folder is not None:
        where = f"; the local output is kept at {folder} (push it with: {push_command(folder, repo_id, revision)})"
    if constants.is_offline_mode():
        fix = "push it then" if folder is not None else "try again"
        raise HubPushError(
            f"cannot reach the Hub repo {repo_id!r}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1){where}. "
            f"Unset HF_HUB_OFFLINE and {fix}.",
            folder,
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        yield api, constants
    except Exception as err:
        logger.error("Hub request for %s (%s) failed: %s", repo_id, folder or "no upload", err)
        reason = " ".join(str(err).split())
        action = "push to" if folder is not None else "request to"
        raise HubPushError(f"{action} the Hub repo {repo_id!r} failed ({reason}){where}.", folder) from err


#: The fields a `hub_revision_pattern` may use: `{k}` (the 1-based task index, required) and `{name}` (the task name).
REVISION_FIELDS = ("k", "name")
_BAD_BRANCH_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_branch_name(name: Any, option: str = "revision") -> str:
    """`name` if it is a valid git branch name (`git check-ref-format --branch`), else a `ValueError` naming `option`.

    Refused: empty names, spaces, control characters and any of `~ ^ : ? * [ \\`, `..`, `@{`, `//`, a leading or
    trailing `/`, a trailing `.` or `.lock`, a component starting with `.`, the name `@`, and `refs/...` names.

    Example:

    ```python
    >>> from hf_magmax.hub import check_branch_name
    >>> check_branch_name("after-task-1")
    'after-task-1'
    ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`{option}` must be a non-empty git branch name, got {name!r}.")
    problems = _branch_problems(name)
    if problems:
        raise ValueError(f"`{option}` = {name!r} is not a valid git branch name ({problems}): {_BRANCH_FIX}.")
    return name


_BRANCH_FIX = "use letters, digits, '-', '_', '.' and '/', e.g. 'after-task-1'"


def _branch_problems(name: str) -> str:
    """Why `name` is not a valid git branch name ('' if it is one)."""
    problems = []
    if _BAD_BRANCH_CHARS.search(name):
        problems.append("spaces, control characters and ~ ^ : ? * [ \\ are not allowed")
    if ".." in name or "@{" in name or "//" in name:
        problems.append("'..', '@{' and '//' are not allowed")
    if name.startswith("/") or name.endswith("/") or name.endswith(".") or name.endswith(".lock"):
        problems.append("it must not start or end with '/' nor end with '.' or '.lock'")
    if any(part.startswith(".") for part in name.split("/")) or name in ("@", "HEAD") or name.startswith("refs/"):
        problems.append("no component may start with '.', and '@', 'HEAD', 'refs/...' are reserved")
    return "; ".join(problems)


def check_revision_pattern(pattern: Any, option: str = "hub_revision_pattern") -> str:
    """Validate a revision pattern such as `"after-task-{k}"` or `"v1-task{k:02d}"`: it must use `{k}` (the 1-based
    task index; `{name}`, the task name, is optional) and give a valid git branch name other than `main`.

    Raises:
        `ValueError` naming `option` and the fix.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f'`{option}` must be a string with `{{k}}`, e.g. "after-task-{{k}}", got {pattern!r}.')
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as err:
        raise ValueError(
            f"`{option}` = {pattern!r} is not a format string ({err}): write e.g. 'after-task-{{k}}'."
        ) from None
    unknown = sorted(fields - set(REVISION_FIELDS))
    if unknown or "k" not in fields:
        raise ValueError(
            f"`{option}` = {pattern!r} must contain `{{k}}` (the 1-based task index) and may use `{{name}}` (the task "
            f"name), nothing else{f' (it uses {unknown})' if unknown else ''}: e.g. 'after-task-{{k}}'."
        )
    for k in (1, 12):
        format_revision(pattern, k, "task", option)
    return pattern


def format_revision(pattern: str, k: int, name: str = "", option: str = "hub_revision_pattern") -> str:
    """The branch of task `k` (1-based) named `name` under `pattern`, checked ([`check_branch_name`], not `main`)."""
    try:
        branch = pattern.format(k=k, name=name)
    except (ValueError, KeyError, IndexError) as err:
        raise ValueError(
            f"`{option}` = {pattern!r} cannot be formatted ({err}): write e.g. 'after-task-{{k}}'."
        ) from None
    problems = _branch_problems(branch) if branch else "it is empty"
    if problems:
        raise ValueError(
            f"`{option}` = {pattern!r} gives {branch!r} for task {k}{f' ({name!r})' if name else ''}, which is not a "
            f"valid git branch name ({problems}): {_BRANCH_FIX}."
        )
    if branch == "main":
        raise ValueError(f"`{option}` = {pattern!r} gives 'main' for task {k}: main holds the latest release already.")
    return branch
