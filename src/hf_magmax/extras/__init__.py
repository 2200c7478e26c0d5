# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Support for the paper's set-ups and the benchmarks, outside the merge core.

- [`hf_magmax.extras.heads`]: zero-shot / label-embedding classification heads (CLIP and sentence encoders), so a
  class-incremental run can freeze its head as the MagMax paper does.
- [`hf_magmax.extras.trace`]: the TRACE continual-learning benchmark for LLMs (data loading, generation, its metrics).
- [`hf_magmax.extras.llm_cl`]: the O-LoRA-lineage LLM benchmarks (Standard CL, Long-15, SuperNI-15): their layouts,
  task orders, prompts, exact match / ROUGE-L, and the published numbers to compare with.
- [`hf_magmax.extras.generation`]: `GenerationMagMaxTrainer` and `run_continual_generation`, continual instruction
  tuning of a causal LM scored by generation (used by the TRACE and `llm_continual` recipes).

The core (`merging`, `task_vectors`, `checkpoints`, `peft`, `trainer`, `cli`) never imports this package. The old
paths `hf_magmax.heads` and `hf_magmax.trace` re-export these modules, and `from hf_magmax import
attach_label_embedding_head` keeps working.
"""
