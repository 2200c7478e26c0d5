# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark: could OPCM's SVD be replaced by an eigendecomposition of the Gram matrix, without losing accuracy?

OPCM projects every task vector in the singular basis of the merged task vector `S` (`opcm_project`: LAPACK's
`gesdd` through `torch.linalg.svd`, fp32 for fp32/bf16 inputs). A cheaper route to the same basis is the
eigendecomposition of `G = Sᵀ S` (`torch.linalg.eigh`; then `U = S V / σ`), in fp32 or in fp64. It squares the
condition number, so its singular vectors of small `σ` are worse, and OPCM removes the component of the new task
vector along *every* `u_i v_iᵀ`. This measures, on the weights of `benchmarks/opcm_merge.py`'s inputs (`S` = the task
vector of task 0, the new one that of task 1, per 2-D weight), the projection computed four ways against the same
projection with an fp64 SVD:

- `svd fp32`: what `opcm_project` does (the reference for "exact to fp32 rounding");
- `gram+eigh fp32`, `gram+eigh fp64` (its factors cast to fp32): the candidates;

each decomposition's factors then projecting the fp32 task vector in fp32 (as `opcm_project` does),

and the CPU time of each decomposition (one thread). A candidate is only worth it if its error is no larger than
fp32 `gesdd`'s on every weight.

    python benchmarks/opcm_decomposition_accuracy.py --work-dir benchmarks/_work/merge_checkpoints --size 100m

(the inputs must exist: `benchmarks/opcm_merge.py` builds them; `--limit N` measures the first N weights only).
"""

import argparse
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def project(u, s, vh, task_vector, alpha: float):
    """`opcm_project`'s removal, given the thin SVD of the (tall) merged task vector."""
    split = int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax())
    left = u.T @ task_vector
    diagonal = (left * vh).sum(dim=1)
    out = task_vector - u[:, :split] @ ((left[:split] @ vh[:split].T) @ vh[:split])
    return out - (u[:, split:] * diagonal[split:]) @ vh[split:]


def svd(merged):
    import torch

    return torch.linalg.svd(merged, full_matrices=False)


def gram_eigh(merged):
    """Thin SVD from the eigendecomposition of `Sᵀ S` (eigenvalues ascending: flipped)."""
    import torch

    eigenvalues, v = torch.linalg.eigh(merged.T @ merged)
    eigenvalues, v = eigenvalues.flip(0), v.flip(1)
    s = eigenvalues.clamp_min(0).sqrt()
    u = (merged @ v) / s.clamp_min(torch.finfo(s.dtype).tiny)
    return u, s, v.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "merge_checkpoints")
    parser.add_argument("--size", default="100m", help="the preset of benchmarks/opcm_merge.py's inputs")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--limit", type=int, help="only the first N projected weights")
    args = parser.parse_args()

    import torch
    from safetensors import safe_open

    from hf_magmax.merging import opcm_projects

    torch.set_num_threads(1)
    root = args.work_dir / f"ckpts-{args.size}"
    files = [root / name / "model.safetensors" for name in ("base", "task0", "task1")]
    handles = [safe_open(file, framework="pt") for file in files]
    names = [n for n in handles[0].keys() if opcm_projects(n, handles[0].get_slice(n).get_shape())]
    names = names[: args.limit] if args.limit else names
    ways = {
        "svd fp32": (svd, torch.float32),
        "gram+eigh fp32": (gram_eigh, torch.float32),
        "gram+eigh fp64": (gram_eigh, torch.float64),
    }
    worst = dict.fromkeys(ways, 0.0)
    seconds = dict.fromkeys(ways, 0.0)
    for name in names:
        base, first, second = (h.get_tensor(name).double() for h in handles)
        merged, task_vector = first - base, second - base
        if merged.shape[0] < merged.shape[1]:
            merged, task_vector = merged.T.contiguous(), task_vector.T.contiguous()
        reference = project(*svd(merged), task_vector, args.alpha)
        scale = float(reference.norm())
        for way, (decompose, dtype) in ways.items():
            m, t = merged.to(dtype), task_vector.to(dtype)
            start = time.process_time()
            factors = decompose(m)
            seconds[way] += time.process_time() - start
            out = project(*(f.float() for f in factors), t.float(), args.alpha).double()  # projected in fp32
            worst[way] = max(worst[way], float((out - reference).norm()) / scale)
    print(
        f"{len(names)} weights of {root} (alpha {args.alpha}); error: max over the weights of "
        "‖projection − fp64-SVD projection‖_F / ‖fp64-SVD projection‖_F; CPU time of the decompositions, 1 thread"
    )
    print("| decomposition | max relative error | CPU time (s) |")
    print("|---|---:|---:|")
    for way in ways:
        print(f"| {way} | {worst[way]:.3g} | {seconds[way]:.2f} |")


if __name__ == "__main__":
    main()
