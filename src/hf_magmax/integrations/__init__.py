# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""hf_magmax on top of other libraries (trainers and merge tools), outside the merge core.

- [`hf_magmax.integrations.trl`]: continual supervised fine-tuning with TRL: [`MagMaxSFTConfig`] +
  [`MagMaxSFTTrainer`] (TRL's `SFTTrainer` with the MagMax task loop), `pip install "hf_magmax[trl]"`.
- [`hf_magmax.integrations.mergekit`]: `import hf_magmax.integrations.mergekit` registers `magmax` and `random_mix` in
  mergekit's method registry, so that a mergekit YAML with `merge_method: magmax` runs through mergekit's own
  `run_merge` / `mergekit-yaml` and gives the same bits as `hf-magmax merge`. `hf-magmax mergekit-yaml CONFIG OUT` is
  mergekit's command line with these methods registered. `pip install "hf_magmax[mergekit]"`; mergekit is LGPL-3.0
  and stays an optional dependency.
- [`hf_magmax.integrations.fusion_bench`]: `HfMagMaxAlgorithm`, a FusionBench algorithm (usable as a config
  `_target_`) that merges a FusionBench model pool with hf_magmax's online fold (MagMax, OPCM and the baselines).
  `pip install "hf_magmax[fusion-bench]"`.

The core never imports this package. Each module imports its library when it is loaded, and says which extra to
install when the library is missing; `from hf_magmax import MagMaxSFTTrainer` loads the TRL one on first access.
"""
