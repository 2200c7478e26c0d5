# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads, shared by the checkpoint merge, the LoRA merger and the Trainer.

- [`build_model_card`]: THE model-card builder. The streaming merge (`hf-magmax merge`), the LoRA merger
  (`hf-magmax merge-lora`) and `MagMaxTrainer` all call it, so every card has the same tag set ([`model_card_tags`]),
  `base_model` only when it is a Hub id, the merge configuration as YAML (to re-run the merge), the framework
  versions and the MagMax citation, once. It returns a `huggingface_hub.ModelCard` whose metadata went through
  `ModelCardData` (validated as TRL's cards are).
- [`render_model_card`] / [`write_model_card`] / [`parse_model_card`]: a `README.md` with YAML metadata.
- [`MAGMAX_CITATION`]: the BibTeX entry of the MagMax paper.
- [`push_to_hub`]: create the repo (if needed) and upload a folder through `huggingface_hub`.

`huggingface_hub` and `yaml` are imported inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard


logger = logging.getLogger(__name__)

__all__ = [
    "MAGMAX_CITATION",
    "MAGMAX_TAGS",
    "HubPushError",
    "build_model_card",
    "library_versions",
    "model_card_tags",
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
) -> ModelCard:
    """Build the model card of a merged model, a merged LoRA adapter or a `MagMaxTrainer` run.

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
        `huggingface_hub.ModelCard`: `str(card)` is the `README.md` text; `card.save(path)` writes it;
        [`write_model_card`]`(folder, card)` writes `folder/README.md`.

    Raises:
        `ValueError` for an unknown `base_model_relation` or `library_name`, or metadata `ModelCardData` refuses.

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
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

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
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")


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


def write_model_card(folder: str | os.PathLike, metadata: dict[str, Any] | ModelCard, body: str | None = None) -> Path:
    """Write `README.md` into `folder` and return its path.

    `metadata` is either a card from [`build_model_card`] (then `body` is not given) or a metadata dict with its
    Markdown `body` (see [`render_model_card`]).
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
