# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""hf_magmax's merges inside other merge tools, on top of the core (which never imports this package).

- [`hf_magmax.integrations.mergekit`]: `import hf_magmax.integrations.mergekit` registers `magmax` and `random_mix` in
  mergekit's method registry, so that a mergekit YAML with `merge_method: magmax` runs through mergekit's own
  `run_merge` / `mergekit-yaml` and gives the same bits as `hf-magmax merge`. `hf-magmax mergekit-yaml CONFIG OUT` is
  mergekit's command line with these methods registered. Needs `pip install "hf_magmax[mergekit]"`; mergekit is
  LGPL-3.0 and stays an optional dependency.
- [`hf_magmax.integrations.fusion_bench`]: `HfMagMaxAlgorithm`, a FusionBench algorithm (usable as a config
  `_target_`) that merges a FusionBench model pool with hf_magmax's online fold (MagMax, OPCM and the baselines).
  Needs `pip install "hf_magmax[fusion-bench]"`.

Each module imports its tool when it is imported, and says which package to install when the tool is missing.
"""
