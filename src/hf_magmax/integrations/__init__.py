# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""hf_magmax on top of other libraries' trainers, outside the merge core.

- [`hf_magmax.integrations.trl`]: continual supervised fine-tuning with TRL: [`MagMaxSFTConfig`] +
  [`MagMaxSFTTrainer`] (TRL's `SFTTrainer` with the MagMax task loop), `pip install "hf_magmax[trl]"`.

The core never imports this package (it imports `trl` when loaded); `from hf_magmax import MagMaxSFTTrainer` loads it
on first access.
"""
