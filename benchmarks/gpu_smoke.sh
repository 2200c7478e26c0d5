#!/usr/bin/env bash
# GPU smoke test of continual fine-tuning with MagMax (issue 13): the tiny TRACE and image recipes in bf16 under DDP,
# FSDP2 and DeepSpeed ZeRO-3 through `accelerate launch`, one line each:
#   mode recipe ok | max |Δ| of the merged weights vs DDP | peak GPU memory per rank | merge-state bytes per rank
# Never run by CI. Usage (a machine with >= 2 CUDA GPUs; ZeRO-3 needs `pip install deepspeed`, skipped otherwise):
#   bash benchmarks/gpu_smoke.sh [NUM_GPUS]
# SMOKE_CPU=1 runs the DDP lines only, on 2 CPU processes (checks the plumbing on a machine without a GPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NGPU="${1:-2}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/magmax_gpu_smoke.XXXXXX")"
export PYTHONPATH="$ROOT/src:$ROOT/tests:$ROOT/recipes${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

python - "$WORK" <<'PY'
import sys
from recipe_utils import make_image_dataset, make_tiny_llama, make_tiny_vit, make_trace_dir
root = sys.argv[1]
make_trace_dir(f"{root}/TRACE"), make_tiny_llama(f"{root}/llama")
make_image_dataset(f"{root}/cifar"), make_tiny_vit(f"{root}/vit")
PY

# the driver: runs a recipe's main() and records peak GPU memory and the merge state's bytes on this rank
cat > "$WORK/driver.py" <<'PY'
import importlib.util, json, math, os, sys
import torch
from hf_magmax.trainer import MagMaxTrainer
recipe, out = sys.argv[1], sys.argv[2]
record = {}
train = MagMaxTrainer.train
def recorded(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    record["state_bytes"] = self._magmax.state.resident_bytes()
    record["params"] = sum(t.numel() for t in self._magmax.state.base.values())  # held by this rank
    record["params_total"] = sum(math.prod(s) for s in self._magmax.state.shapes.values())  # the whole model's
    return result
MagMaxTrainer.train = recorded
spec = importlib.util.spec_from_file_location(f"_recipe_{recipe}", os.path.join(os.environ["RECIPES"], f"{recipe}.py"))
module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module; spec.loader.exec_module(module)
module.main(sys.argv[3:])
rank = int(os.environ.get("RANK", 0))
record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
with open(os.path.join(out, f"smoke_rank{rank}.json"), "w") as f:
    json.dump(record, f)
PY
export RECIPES="$ROOT/recipes"

if [[ "${SMOKE_CPU:-0}" == 1 ]]; then
  MODES=(ddp); NGPU=2; DEVICE=(--use_cpu true); LAUNCH_EXTRA=(--cpu)
else
  MODES=(ddp fsdp2 zero3); DEVICE=(--use_cpu false --bf16 true); LAUNCH_EXTRA=(--mixed_precision bf16)
fi

config_of() {
  case "$1" in
    ddp) echo "$ROOT/recipes/accelerate_configs/multi_gpu.yaml" ;;
    fsdp2) echo "$ROOT/recipes/accelerate_configs/fsdp.yaml" ;;
    zero3) echo "$ROOT/recipes/accelerate_configs/deepspeed_zero3.yaml" ;;
  esac
}

run() {  # mode recipe args...
  local mode="$1" recipe="$2"; shift 2
  local out="$WORK/$mode-$recipe"
  mkdir -p "$out"
  if [[ "$mode" == zero3 ]] && ! python -c "import deepspeed" 2>/dev/null; then
    echo "$mode $recipe SKIPPED (deepspeed not installed)"; return
  fi
  local port; port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  if accelerate launch --config_file "$(config_of "$mode")" --num_processes "$NGPU" --main_process_port "$port" \
      "${LAUNCH_EXTRA[@]}" "$WORK/driver.py" "$recipe" "$out" "$@" "${DEVICE[@]}" --output_dir "$out" \
      >"$out/log.txt" 2>&1; then
    python - "$WORK" "$mode" "$recipe" "$NGPU" <<'PY'
import glob, json, os, sys
from safetensors.torch import load_file
work, mode, recipe, ngpu = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = os.path.join(work, f"{mode}-{recipe}")
ranks = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(out, "smoke_rank*.json")))]
delta = "n/a"
reference = os.path.join(work, f"ddp-{recipe}", "model.safetensors")
if mode != "ddp" and os.path.isfile(reference):
    ours, theirs = load_file(os.path.join(out, "model.safetensors")), load_file(reference)
    delta = f"{max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs):.3g}"
peak = max(r["peak_gpu_bytes"] for r in ranks) / 2**20
state = [r["state_bytes"]["total"] / max(r.get("params_total", r["params"]), 1) for r in ranks]
print(f"{mode} {recipe} ok ({len(ranks)} ranks) | max|Δ| vs ddp {delta} | peak GPU {peak:.0f} MiB/rank | "
      f"merge state {max(state):.2f} B per model param per rank ({ranks[0]['params']:,} of "
      f"{ranks[0].get('params_total', ranks[0]['params']):,} params held on rank 0)")
PY
  else
    echo "$mode $recipe FAILED (log: $out/log.txt)"; tail -5 "$out/log.txt"
  fi
}

for mode in "${MODES[@]}"; do
  run "$mode" trace --config "$ROOT/recipes/configs/tiny_trace.yaml" --model_name_or_path "$WORK/llama" \
    --data_path "$WORK/TRACE" --tasks C-STANCE FOMC --num_train_epochs_per_task 2 1
  run "$mode" continual_image_classification --config "$ROOT/recipes/configs/tiny_image_vit.yaml" \
    --model_name_or_path "$WORK/vit" --dataset_name "$WORK/cifar"
done
echo "work dir: $WORK"
