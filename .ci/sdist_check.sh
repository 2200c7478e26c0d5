#!/usr/bin/env bash
# CI check of the source distribution: build the sdist, unpack it into a temporary directory, and check that it is a
# tree a user can test from: every tracked file of the checkout is in it (when run from a git checkout), the whole
# test suite COLLECTS there with its helpers (conftest.py, builders.py, tests/scripts/, ...), the package under test
# is the unpacked one, and a quick subset of the tests passes from the unpacked tree. About 30 s of CPU time
# (collection imports transformers); without the C kernels built there, test_kernels.py collects fewer variants.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# 1. build (the `build` frontend when installed, else setuptools directly; both read MANIFEST.in)
if python -c "import build" 2>/dev/null; then
    python -m build --sdist --no-isolation --outdir "$scratch/dist" . >"$scratch/build.log" 2>&1 || { cat "$scratch/build.log"; exit 1; }
else
    python setup.py -q sdist -d "$scratch/dist" >"$scratch/build.log" 2>&1 || { cat "$scratch/build.log"; exit 1; }
fi
if grep -i "deprecat" "$scratch/build.log"; then
    echo "sdist_check: the build warns about a deprecation (above): fix the packaging metadata" >&2
    exit 1
fi
tar -xzf "$scratch"/dist/*.tar.gz -C "$scratch"
tree="$(find "$scratch" -mindepth 1 -maxdepth 1 -type d -name 'hf_magmax-*')"

# 2. every tracked file is shipped
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    missing="$(git ls-files | while read -r f; do [ -e "$tree/$f" ] || echo "$f"; done)"
    if [ -n "$missing" ]; then
        echo "sdist_check: tracked files missing from the sdist (add them to MANIFEST.in):" >&2
        echo "$missing" >&2
        exit 1
    fi
fi

# 3. the tests collect in the unpacked tree, against the unpacked package
cd "$tree"
unpacked="$(PYTHONPATH=src python -c 'import hf_magmax, os; print(os.path.realpath(hf_magmax.__file__))')"
case "$unpacked" in
    "$(realpath "$tree")"/src/*) ;;
    *) echo "sdist_check: the tests would import hf_magmax from $unpacked, not from the unpacked sdist" >&2; exit 1 ;;
esac
python -m pytest --collect-only -q -p no:cacheprovider >"$scratch/collect.log" 2>&1 || {
    tail -n 40 "$scratch/collect.log"
    echo "sdist_check: the tests of the unpacked sdist do not collect (above)" >&2
    exit 1
}
tail -n 1 "$scratch/collect.log"

# 4. a quick subset passes there (packaging files, the docs' links, the README/CI command, the merge core)
python -m pytest -q -p no:cacheprovider -x tests/test_package.py tests/test_merging.py | tail -n 1
