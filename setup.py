# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Build of the optional C merge kernels (`src/hf_magmax/merging/_fold.c`); everything else is in `setup.cfg`.

The library is plain C loaded with `ctypes` (no Python C-API). It is optional: when it cannot be built (no compiler,
an odd platform) the install goes on with a warning and the merge runs its torch path, with the same bits. On x86-64
with GCC or Clang the same source is also built for AVX2 and AVX-512 (`_fold_avx2`, `_fold_avx512`, each optional
too); `hf_magmax.merging.kernels` loads the best one the CPU runs (torch's CPU capability), so a wheel built here runs
on any x86-64.
"""

import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


_SOURCE = "src/hf_magmax/merging/_fold.c"
# IEEE arithmetic exactly as written (no FMA contraction, no fast-math); -fno-trapping-math only lets the compiler
# vectorize selects (no result changes)
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-fast-math"]
_ISA_FLAGS = {
    "hf_magmax.merging._fold": [],
    "hf_magmax.merging._fold_avx2": ["-mavx2"],
    "hf_magmax.merging._fold_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}


class _BuildFold(build_ext):
    """Compiler flags by compiler and ISA variant, and no Python module init symbol to export (ctypes loads it)."""

    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        if msvc:  # the baseline build only
            self.extensions = [e for e in self.extensions if not _ISA_FLAGS[e.name]]
        for extension in self.extensions:
            extension.extra_compile_args = ["/O2", "/fp:precise"] if msvc else _FLAGS + _ISA_FLAGS[extension.name]
        self.parallel = False  # the builds share one source, hence one object file path: one at a time
        super().build_extensions()

    def get_export_symbols(self, ext):
        return []  # not a Python module: nothing named PyInit_*


_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
setup(
    ext_modules=[
        Extension(name, sources=[_SOURCE], optional=True) for name, isa in _ISA_FLAGS.items() if _X86_64 or not isa
    ],
    cmdclass={"build_ext": _BuildFold},
)
