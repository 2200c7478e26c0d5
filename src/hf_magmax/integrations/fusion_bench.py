# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""hf_magmax's merges as a FusionBench algorithm: [`HfMagMaxAlgorithm`], usable as a config `_target_`.

FusionBench (`pip install fusion-bench`) runs a merge as an algorithm object with a `run(modelpool)` method, built
from the `method:` section of its YAML config:

```yaml
method:
  _target_: hf_magmax.integrations.fusion_bench.HfMagMaxAlgorithm
  method: magmax        # or opcm, random_mix, ties, task_arithmetic, average
  scaling_coef: 0.5     # λ; FusionBench's name `scaling_factor` is an alias; null: the method's default
```

`run` merges the pool's regular models (in the pool's order: MagMax gives ties to the later task, OPCM is
order-dependent) into its `_pretrained_` model with hf_magmax's online fold: θ_0 and the running merge stay in memory,
and the fine-tunes are loaded one at a time and folded in tensor by tensor (`τ = θ_t − θ_0` in fp32 for half weights,
[`~hf_magmax.task_vectors.subtract`], into the method's accumulator, [`~hf_magmax.merging.MergeSpec.accumulator`]),
then written into θ_0 with [`~hf_magmax.merging.apply_merged`]. The merged model is therefore
bit for bit `hf-magmax merge` of the same checkpoints, for every method, fp32 and bf16; and, where the definitions
agree (MagMax on fp32 checkpoints), FusionBench's own `MagMaxAlgorithm` too. (In bf16 FusionBench computes τ and
θ_0 + λ·τ in bf16 and its results differ by bf16 roundings: see benchmarks/README.md.)

The pool's models are `nn.Module`s, pre-instantiated or loaded from their configs (FusionBench's lazy loading,
`enable_lazy_loading: true`, is not supported: with transformers 5 FusionBench 0.2.33 cannot build its `LazyStateDict`s
anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from copy import deepcopy
from typing import Any


try:
    from fusion_bench.method.base_algorithm import BaseAlgorithm
    from fusion_bench.mixins import auto_register_config
    from fusion_bench.modelpool import BaseModelPool
except ImportError as err:  # pragma: no cover - exercised only without fusion-bench
    raise ImportError(
        'hf_magmax.integrations.fusion_bench needs FusionBench: pip install "hf_magmax[fusion-bench]"'
    ) from err

from ..merging import MergeSpec
from ..task_vectors import TaskVector, shared_tensor_groups, subtract


logger = logging.getLogger(__name__)

__all__ = ["HfMagMaxAlgorithm"]


@auto_register_config
class HfMagMaxAlgorithm(BaseAlgorithm):
    """Merge a FusionBench model pool with hf_magmax (MagMax, OPCM and the baselines), one fine-tune in memory at a time.

    Args:
        method (`str`, *optional*, defaults to `"magmax"`):
            One of `magmax`, `opcm`, `random_mix`, `ties`, `task_arithmetic`, `average` ([`hf_magmax.merging`]).
        scaling_coef (`float`, *optional*):
            λ. Defaults to the method's default (0.5 for magmax and random_mix, 1.0 for opcm, ties and average, 0.3
            for task_arithmetic).
        scaling_factor (`float`, *optional*):
            FusionBench's name for λ (its `MagMaxAlgorithm` takes it): an alias of `scaling_coef`.
        density (`float`, *optional*): `ties` only: the fraction of each task vector kept (default 0.2).
        seed (`int`, *optional*): `random_mix` only: the seed (default 0).
        alpha (`float`, *optional*): `opcm` only: the share of singular-value mass projected off (default 0.5).
        device (`str`, *optional*, defaults to `"cpu"`): where the task vectors and the running merge live.
        inplace (`bool`, *optional*, defaults to `True`):
            Write the merge into the loaded `_pretrained_` model (as FusionBench's `MagMaxAlgorithm` does); `False`
            merges into a copy.

    Example:

    ```python
    >>> from hf_magmax.integrations.fusion_bench import HfMagMaxAlgorithm
    >>> algorithm = HfMagMaxAlgorithm(method="magmax", scaling_coef=0.5)  # doctest: +SKIP
    >>> merged = algorithm.run({"_pretrained_": base, "task1": model_1, "task2": model_2})  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        method: str = "magmax",
        scaling_coef: float | None = None,
        scaling_factor: float | None = None,
        density: float | None = None,
        seed: int | None = None,
        alpha: float | None = None,
        device: str = "cpu",
        inplace: bool = True,
        **kwargs: Any,
    ) -> None:
        if scaling_coef is not None and scaling_factor is not None and scaling_coef != scaling_factor:
            raise ValueError(
                f"got both `scaling_coef={scaling_coef}` and `scaling_factor={scaling_factor}` (its FusionBench "
                "alias): give one of them."
            )
        coef = scaling_coef if scaling_coef is not None else scaling_factor
        # validated here, when FusionBench builds the algorithm from its config, before any model is loaded
        self.spec = MergeSpec(method, coef, density=density, seed=seed, alpha=alpha)
        super().__init__(**kwargs)  # the arguments are attributes and config entries (`auto_register_config`)

    def run(self, modelpool: BaseModelPool | Mapping[str, Any]):
        """Merge the pool's models into its `_pretrained_` model; returns the merged model."""
        import torch

        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(dict(modelpool))
        if not modelpool.has_pretrained:
            raise ValueError("the model pool has no `_pretrained_` model (θ_0): add it to the pool's `models`.")
        names = modelpool.model_names
        if not names:
            raise ValueError("the model pool has no fine-tuned models besides `_pretrained_`: add at least one.")
        logger.info("merging %d model(s) with hf_magmax: %s", len(names), self.spec.describe())
        with torch.no_grad():
            pretrained = modelpool.load_pretrained_model()
            base_state = _state_dict(pretrained, "_pretrained_")
            # one accumulator per floating tensor, tied names folded once (as `hf-magmax merge` reads them once)
            first = shared_tensor_groups(base_state)
            folded = [n for n, t in base_state.items() if t.is_floating_point() and first[n] == n]
            accumulators = {n: self.spec.accumulator(n) for n in folded}
            for name in names:  # one fine-tune in memory at a time, one τ tensor at a time (fp32 for half weights)
                state = _state_dict(modelpool.load_model(name), name)
                _check_same_tensors(base_state, state, folded, name)
                for n in folded:
                    accumulators[n].update(subtract(state[n], base_state[n], device=self.device))
                del state
            scale = self.spec.model_scale(accumulators.values())  # opcm: the model-wide rescale; 1.0 for the others
            model = pretrained if self.inplace else deepcopy(pretrained)
            for n in folded:  # θ_0 + λ·merge with `apply_merged`, tensor by tensor (tied tensors share the storage)
                merged = TaskVector({n: accumulators.pop(n).result(model_scale=scale)})
                merged.apply_to_model(model, scaling_coef=self.spec.coef)
            return model


def _check_same_tensors(base_state: Mapping[str, Any], state: Mapping[str, Any], names: list[str], model: str) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(
            f"model {model!r} of the pool lacks {len(missing)} tensor(s) of `_pretrained_`, e.g. {missing[0]!r}."
        )
    for n in names:
        if state[n].shape != base_state[n].shape:
            raise ValueError(
                f"tensor {n!r} has shape {tuple(state[n].shape)} in model {model!r} but {tuple(base_state[n].shape)} in "
                "`_pretrained_`: the pool's models must share one architecture."
            )


def _state_dict(model: Any, name: str) -> Mapping[str, Any]:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model {name!r} of the pool loaded as a {type(model).__name__}, not a torch module: HfMagMaxAlgorithm "
            "merges modules (a pool with `enable_lazy_loading: true` gives LazyStateDicts: turn it off)."
        )
    return model.state_dict()
