"""Worker of tests/test_trainer_fsdp.py: MagMaxTrainer under Accelerate's FSDP2 on CPU (torchrun, 2 processes, gloo).

Accelerate picks FSDP only on accelerators: on CPU (`MULTI_CPU`) it silently keeps DDP, whatever the FSDP config says
(`AcceleratorState.__init__`). Everything after that choice runs on CPU, so this worker makes it: once the Trainer has
built its Accelerator, the state is switched to `DistributedType.FSDP` with an FSDP2 plugin (`fsdp_version=2`,
`BertLayer` wrapped, full state dict for saving), and Accelerate's own `fsdp2_prepare_model` then shards the model
with `fully_shard` when each task's training starts, as it does on GPUs.

For each method the worker trains 2 tiny tasks with a checkpoint at the end of each, records each task's θ_t (whole,
`full_tensor()`, for the check only, and this rank's DTensor shards), resumes a fresh trainer from the first task's
checkpoint, and writes `result-<method>-rank<r>.json` and, on rank 0, the final weights saved by
`trainer.save_model` (the one gather). Without torchrun (one process, no FSDP)
it writes the reference `final-<method>-single.safetensors`.

    torchrun --nproc_per_node 2 tests/scripts/trainer_fsdp.py --output_dir OUT --per_device_train_batch_size 2
    python tests/scripts/trainer_fsdp.py --output_dir OUT --per_device_train_batch_size 4
"""

import argparse
import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for tiny_tasks
from tiny_tasks import classification_tasks, close_process_group, tiny_bert  # noqa: E402

from hf_magmax import MagMaxConfig, MagMaxTrainer  # noqa: E402
from hf_magmax.merging import MergeSpec  # noqa: E402
from hf_magmax.trainer import MergeState  # noqa: E402
from hf_magmax.trainer.run import ContinualRun  # noqa: E402


METHODS = ("magmax", "ties")
SCALING_COEF = 0.7


def whole(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Record(TrainerCallback):
    """At the end of each task's training (before MagMax folds it): θ_t whole and as this rank holds it."""

    def __init__(self):
        self.whole, self.local = [], []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        state_dict = model.state_dict()
        self.whole.append({name: whole(t).detach().clone() for name, t in state_dict.items()})
        self.local.append({name: t.detach().clone() for name, t in state_dict.items()})


def force_fsdp2(trainer):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["BertLayer"],
        state_dict_type="FULL_STATE_DICT",
    )
    from accelerate import PartialState

    # both shared states: TrainingArguments re-reads PartialState's, which would otherwise turn it back to MULTI_CPU
    PartialState().distributed_type = DistributedType.FSDP
    trainer.accelerator.state.distributed_type = DistributedType.FSDP
    trainer.accelerator.state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def make_trainer(method, cli, fsdp, callbacks=()):
    out = os.path.join(cli.output_dir, method)
    train, evaluation = classification_tasks(num_examples=16, eval_examples=8)
    train = dict(list(train.items())[:2])
    evaluation = dict(list(evaluation.items())[:2])
    args = MagMaxConfig(
        output_dir=out,
        merge_method=method,
        scaling_coef=SCALING_COEF,
        max_steps=3,
        per_device_train_batch_size=cli.per_device_train_batch_size,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        optim="adamw_torch",
        report_to="none",
        use_cpu=True,
        save_strategy="steps",
        save_steps=3,
        disable_tqdm=True,
        seed=0,
        average_tokens_across_devices=False,
        ddp_backend="gloo" if fsdp else None,
    )
    trainer = MagMaxTrainer(
        tiny_bert(), args, train_datasets=train, eval_datasets=evaluation, callbacks=list(callbacks)
    )
    if fsdp:
        force_fsdp2(trainer)
    return trainer, out, train


def run(method, cli, fsdp):
    record = Record()
    trainer, out, train = make_trainer(method, cli, fsdp, [record])
    theta_0 = {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}
    trainer.train()
    rank = trainer.args.process_index
    final = {name: whole(t).detach().contiguous().clone() for name, t in trainer.model.state_dict().items()}
    if not fsdp:
        save_file(final, os.path.join(cli.output_dir, f"final-{method}-single.safetensors"))
        return
    state = trainer._magmax.state
    # the reference: one whole-tensor merge state fed the gathered θ_0 and θ_t
    reference = MergeState(MergeSpec(method, scaling_coef=SCALING_COEF))
    reference.snapshot(theta_0)
    for task, theta in enumerate(record.whole):
        reference.fold(theta, task=str(task))
    merged_equal = all(
        torch.equal(final[name], reference.merged_tensor(name, SCALING_COEF)) for name in reference.base
    )
    # the final save gathers the shards once (rank 0 writes)
    trainer.save_model(os.path.join(out, "final"))
    # resume: a fresh run loads this rank's merge state from the last task's checkpoint, folds the last θ_t (this
    # rank's shards) and must hold what the trained run holds
    checkpoints = sorted(glob.glob(os.path.join(out, "task-*", "checkpoint-*")))
    resumed = ContinualRun(trainer.args, list(train), [], None)
    task = resumed.load(checkpoints[-1])
    resumed.state.fold(record.local[-1], task="last")
    resume_equal = all(
        torch.equal(resumed.state.merged_tensor(name, SCALING_COEF), state.merged_tensor(name, SCALING_COEF))
        for name in state.base
    )
    # the Trainer's own resume (model, optimizer and this rank's merge state) from the end of each task: task 1's
    # checkpoint holds the whole θ_0 state (nothing folded yet), task 2's one merge-state file per rank
    trainer_resume_equal = []
    for checkpoint in checkpoints:
        again, _, _ = make_trainer(method, cli, fsdp)
        again.train(resume_from_checkpoint=checkpoint)
        resumed = {name: whole(t).detach() for name, t in again.model.state_dict().items()}
        trainer_resume_equal.append(all(torch.equal(resumed[name], final[name]) for name in final))
    one = reference.resident_bytes()
    result = {
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "param_class": type(next(trainer.model.parameters())).__name__,
        "sharded": state.sharded,
        "merged_equal_reference": merged_equal,
        "rank_merge_bytes": state.resident_bytes()["merge"],
        "rank_base_private_bytes": state.resident_bytes()["base"],
        "one_process_merge_bytes": one["merge"],
        "params": sum(t.numel() for t in reference.base.values()),
        "checkpoint_files": [sorted(os.listdir(c)) for c in checkpoints],
        "resumed_task": task,
        "resume_equal": resume_equal,
        "trainer_resume_equal": trainer_resume_equal,
    }
    if rank == 0:
        saved = load_file(os.path.join(out, "final", "model.safetensors"))
        result["saved_equal_gathered"] = all(torch.equal(saved[name], final[name]) for name in saved)
        save_file(final, os.path.join(cli.output_dir, f"final-{method}-fsdp.safetensors"))
    with open(os.path.join(cli.output_dir, f"result-{method}-rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    fsdp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for method in METHODS:
        run(method, cli, fsdp)
    close_process_group()


if __name__ == "__main__":
    main()
