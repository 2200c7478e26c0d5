# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads, shared by the checkpoint merge, the LoRA merger and the Trainer.

- [`render_model_card`] / [`write_model_card`] / [`parse_model_card`]: a `README.md` with YAML metadata.
- [`MAGMAX_CITATION`]: the BibTeX entry of the MagMax paper, for every card.
- [`push_to_hub`]: create the repo (if needed) and upload a folder through `huggingface_hub`.

`huggingface_hub` is imported inside [`push_to_hub`] only, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

__all__ = [
    "MAGMAX_CITATION",
    "HubPushError",
    "parse_model_card",
    "push_to_hub",
    "render_model_card",
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


def write_model_card(folder: str | os.PathLike, metadata: dict[str, Any], body: str) -> Path:
    """Write `README.md` (see [`render_model_card`]) into `folder` and return its path."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(metadata, body), encoding="utf-8")
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
            Branch to push to (created if missing); defaults to the main branch.

    Returns:
        `str`: the URL of the commit.

    Raises:
        [`HubPushError`] if anything fails; the local folder is never modified.

    Example:

    ```python
    >>> from hf_magmax.hub import push_to_hub
    >>> push_to_hub("merged", "me/my-merged-model", private=True)  # doctest: +SKIP
    'https://huggingface.co/me/my-merged-model/commit/...'
    ```
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot push {folder} to the Hub: it is not a directory.")
    from huggingface_hub import HfApi, constants

    where = f"the local output is kept at {folder}"
    if constants.is_offline_mode():
        raise HubPushError(
            f"cannot push to {repo_id!r}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1); {where}. Unset "
            "HF_HUB_OFFLINE and push again with `hf_magmax.hub.push_to_hub`.",
            folder,
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = repo_url.repo_id
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload with hf_magmax",
            revision=revision,
        )
    except Exception as err:
        logger.error("push of %s to %s failed: %s", folder, repo_id, err)
        reason = " ".join(str(err).split())
        raise HubPushError(f"push to the Hub repo {repo_id!r} failed ({reason}); {where}.", folder) from err
    logger.info("pushed %s to %s", folder, commit.commit_url)
    return str(commit.commit_url)
