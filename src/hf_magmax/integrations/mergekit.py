# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""MagMax inside mergekit: `import hf_magmax.integrations.mergekit` registers `magmax` and `random_mix`.

mergekit (>= 0.1.5) has a public method registry (`mergekit.merge_methods.register`). Importing this module adds
hf_magmax's `magmax` and `random_mix` to it, so a mergekit YAML such as

```yaml
merge_method: magmax
base_model: ckpt/base
models:
  - model: ckpt/task1
  - model: ckpt/task2
parameters:
  scaling_coef: 0.5   # λ (`lambda` is an alias); leave it out for the method's default (0.5)
```

runs through mergekit's own `run_merge` (or `hf-magmax mergekit-yaml CONFIG OUT`, which is mergekit's `mergekit-yaml`
with these methods registered) and writes the same bits as `hf-magmax merge` on the same checkpoints, fp32 and bf16:
each tensor is merged with hf_magmax's own pieces, `τ_t = θ_t − θ_0` with [`~hf_magmax.task_vectors.subtract`] (fp32
for half weights), the method's accumulator ([`~hf_magmax.merging.MergeSpec.accumulator`], seeded by the tensor's name
for random_mix) and [`~hf_magmax.merging.apply_merged`] (one rounding to θ_0's dtype), in row blocks of the tensor
as `hf-magmax merge` does. Task order is the order of `models:` (MagMax gives ties to the later task); the base is
`base_model`.

What mergekit adds around it is mergekit's: loading (its architecture definitions decide which tensors are written),
`tokenizer_source`, slices, `--cuda`. mergekit's dtypes: `dtype:` is the dtype the *inputs* are cast to before the
merge: unset, or wider than the checkpoints (`dtype: float32` for bf16 checkpoints gives `hf-magmax merge --dtype
float32`, bit for bit), never narrower (that rounds θ_t before τ is taken). `out_dtype:` casts the result: narrower
than the checkpoints it gives `hf-magmax merge --dtype` of that width (one rounding of the fp32 result either way);
wider, it only widens the already rounded result. A λ that varies over tensors (mergekit's filters or gradients) is
honoured tensor by tensor, which `hf-magmax merge` does not do. Unlike `hf-magmax merge`, NaN/Inf inputs are not
refused.

Not registered: `opcm` rescales the merged task vector by one factor computed from *every* tensor of the model
(`needs_model_stats`), and mergekit merges one tensor at a time with no model-wide pass, so it cannot be expressed as a
mergekit method (use `hf-magmax merge --method opcm`). `ties`, `task_arithmetic` and `linear` are mergekit's own
(their definitions differ slightly from hf_magmax's: see benchmarks/README.md). Per-model `weight`s are not part of
MagMax and are not taken.

mergekit is licensed LGPL-3.0; it is an optional dependency of hf_magmax (`pip install "hf_magmax[mergekit]"`), and
only this module imports it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any


try:
    import mergekit.merge_methods as _mergekit_methods
    from mergekit.merge_methods.base import (
        BasePolicy,
        GroupMergeMethod,
        InputContract,
        MergeMethodSpec,
        ParameterScope,
        ParameterSpec,
        TensorGroup,
    )
except ImportError as err:  # pragma: no cover - exercised only without mergekit
    raise ImportError(
        "hf_magmax.integrations.mergekit needs mergekit >= 0.1.5 (its public method registry): pip install "
        '"hf_magmax[mergekit]"'
    ) from err
if not hasattr(_mergekit_methods, "register"):  # pragma: no cover - older mergekit
    raise ImportError(
        "hf_magmax.integrations.mergekit needs mergekit >= 0.1.5 (`mergekit.merge_methods.register`): "
        'pip install -U "hf_magmax[mergekit]"'
    )

from pydantic import AfterValidator

from ..merging import ONLINE_MERGES, MergeSpec, apply_merged, compute_dtype
from ..task_vectors import subtract


if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "HfMagMaxMethod", "main", "merge_tensor", "register_methods"]

#: The hf_magmax methods this module registers in mergekit.
METHODS: tuple[str, ...] = ("magmax", "random_mix")

_REFERENCES = {
    "magmax": ("MagMax (hf_magmax)", "https://arxiv.org/abs/2407.06322"),
    "random_mix": ("Random mix (hf_magmax)", "https://arxiv.org/abs/2407.06322"),
}

# Elements per row block (4 MiB of fp32), as `hf-magmax merge` streams: the fp32 copies stay small whatever the tensor.
_BLOCK_ELEMENTS = 1 << 20


def merge_tensor(spec: MergeSpec, name: str, theta_0: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """`θ_0 + λ · merge(θ_1 − θ_0, …, θ_T − θ_0)` for one tensor, with the bits of `hf-magmax merge`.

    Args:
        spec ([`~hf_magmax.merging.MergeSpec`]): the merge (a blockwise method without whole-tensor statistics).
        name (`str`): the tensor's name (random_mix seeds its draws by it).
        theta_0 (`torch.Tensor`): the base tensor (floating).
        finetuned (`list[torch.Tensor]`): θ_1..θ_T, same shape, in task order.

    Returns:
        `torch.Tensor`: a new tensor in θ_0's dtype, on θ_0's device.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import MergeSpec
    >>> from hf_magmax.integrations.mergekit import merge_tensor
    >>> theta_0 = torch.zeros(2)
    >>> merge_tensor(MergeSpec("magmax", 0.5), "w", theta_0, [torch.tensor([1.0, -3.0]), torch.tensor([-2.0, 1.0])])
    tensor([-1.0000, -1.5000])
    ```
    """
    import torch

    out = torch.empty_like(theta_0)
    row = math.prod(theta_0.shape[1:])
    if theta_0.dim() == 0 or row == 0:
        blocks = [(Ellipsis, 0)]
    else:
        step = max(1, _BLOCK_ELEMENTS // row)
        blocks = [(slice(i, i + step), i * row) for i in range(0, theta_0.shape[0], step)]
    with torch.no_grad():
        for index, offset in blocks:
            base = theta_0[index].to(compute_dtype(theta_0.dtype))  # once per block: subtract finds it widened
            accumulator = spec.accumulator(name, offset=offset)
            for tensor in finetuned:
                accumulator.update(subtract(tensor[index], base))
            out[index] = apply_merged(base, accumulator.result(), spec.coef, dtype=theta_0.dtype)
    return out


def _validated(method: str, option: str):
    """A pydantic validator that checks `option` with hf_magmax's own rule (`MergeSpec`), at mergekit's planning."""

    def check(value: Any) -> Any:
        spec = (
            MergeSpec(method, scaling_coef=value) if option == "scaling_coef" else MergeSpec(method, **{option: value})
        )
        return spec.coef if option == "scaling_coef" else getattr(spec, option)

    return AfterValidator(check)


class HfMagMaxMethod(GroupMergeMethod):
    """One hf_magmax merge method as a mergekit method: one output tensor at a time (mergekit's `GroupMergeMethod`).

    Parameters (mergekit's top-level or per-tensor `parameters:`): `scaling_coef` (λ; `lambda` is an alias, the name
    mergekit's task arithmetic uses), and the method's options (`seed` for random_mix). Unset values take the
    method's defaults from [`hf_magmax.merging`]. The base model is required, and at least one other model.

    Args:
        method (`str`): an hf_magmax method that merges each tensor on its own (`magmax`, `random_mix`, `average`,
            `task_arithmetic`); `opcm` and `ties` are refused (model-wide rescale; whole-tensor trim threshold).
        name (`str`, *optional*): the name to register it under in mergekit; defaults to `method`.

    Example:

    ```python
    >>> import torch
    >>> from mergekit.merge_methods import merge_tensors
    >>> from hf_magmax.integrations.mergekit import HfMagMaxMethod
    >>> average = HfMagMaxMethod("average", name="hf_magmax_average")  # mergekit's `merge_tensors` takes it unregistered
    >>> merge_tensors([torch.zeros(2), torch.tensor([1.0, -3.0]), torch.tensor([-2.0, 1.0])], average, base_index=0)
    tensor([-0.5000, -1.0000])
    ```
    """

    def __init__(self, method: str, name: str | None = None) -> None:
        fit = [
            n for n, c in ONLINE_MERGES.items() if c.blockwise and not (c.needs_tensor_stats or c.needs_model_stats)
        ]
        if method not in fit:
            raise ValueError(
                f"`{method}` cannot be a mergekit method: mergekit merges one tensor at a time, with no whole-tensor "
                f"or model-wide pass; choose one of {', '.join(fit)}."
            )
        cls = ONLINE_MERGES[method]
        self.method = method
        coef = Annotated[float, _validated(method, "scaling_coef")] | None
        default = f"defaults to {cls.default_scaling_coef:g}"
        parameters = [
            ParameterSpec("scaling_coef", coef, ParameterScope.SHARED, default=None, description=f"λ ({default})"),
            ParameterSpec("lambda", coef, ParameterScope.SHARED, default=None, description="alias of scaling_coef"),
        ]
        for option, value in cls.options.items():
            kind = Annotated[type(value), _validated(method, option)] | None
            parameters.append(ParameterSpec(option, kind, ParameterScope.SHARED, default=None))
        pretty_name, url = _REFERENCES.get(method, (f"{method} (hf_magmax)", None))
        self.spec = MergeMethodSpec(
            name=name or method,
            parameters=tuple(parameters),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
            pretty_name=pretty_name,
            reference_url=url,
        )

    def merge_spec(self, **parameters: Any) -> MergeSpec:
        """The [`~hf_magmax.merging.MergeSpec`] of mergekit's resolved parameters for one tensor."""
        coef, alias = parameters.pop("scaling_coef", None), parameters.pop("lambda", None)
        if coef is not None and alias is not None and coef != alias:
            raise ValueError(
                f"`{self.spec.name}` got both `scaling_coef: {coef:g}` and `lambda: {alias:g}`: give one of them."
            )
        options = {k: v for k, v in parameters.items() if v is not None}
        return MergeSpec(self.method, coef if coef is not None else alias, **options)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        spec = self.merge_spec(**parameters)
        name = group.metadata.name or ""
        return merge_tensor(spec, name, group.base.tensor, [entry.tensor for entry in group.non_base])


def register_methods(methods: Sequence[str] = METHODS) -> list[str]:
    """Register hf_magmax's `methods` in mergekit's registry (done on import, for [`METHODS`]); idempotent.

    A name that mergekit already has for a method of its own is left to mergekit, with a warning.

    Returns:
        `list[str]`: the names that now point at hf_magmax's methods.
    """
    done = []
    for method in methods:
        try:
            existing = _mergekit_methods.get(method)
        except RuntimeError:  # mergekit's "Unimplemented merge method"
            existing = None
        if existing is None:
            _mergekit_methods.register(HfMagMaxMethod(method))
        elif not isinstance(existing, HfMagMaxMethod):
            warnings.warn(
                f"mergekit already has a merge method named {method!r}; hf_magmax's is not registered over it.",
                stacklevel=2,
            )
            continue
        done.append(method)
    return done


def main(args: Sequence[str] | None = None) -> int:
    """`mergekit-yaml CONFIG OUT [OPTIONS]` (mergekit's command line) with hf_magmax's methods registered.

    Returns the exit code: 0 on success, 2 on a usage error (as click reports it).
    """
    import click
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    try:
        mergekit_yaml.main(args=list(args) if args is not None else None, prog_name="hf-magmax mergekit-yaml",
                           standalone_mode=False)  # fmt: skip
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    return 0


register_methods()
