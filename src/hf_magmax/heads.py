# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Kept import path: the module lives in [`hf_magmax.extras.heads`] (outside the merge core).

`import hf_magmax.heads` and `hf_magmax.extras.heads` are the same module object, so monkeypatching either patches both.
"""

import importlib
import sys


sys.modules[__name__] = importlib.import_module("hf_magmax.extras.heads")
