"""Run MagMaxTrainer on two tiny tasks and save every rank's final weights (used by tests/test_trainer_ddp.py).

Launch (two CPU processes; `accelerate launch --cpu --num_processes 2` would silently run one):

    torchrun --nproc_per_node 2 tests/scripts/ddp_magmax.py --output_dir OUT --per_device_train_batch_size 2
    python tests/scripts/ddp_magmax.py --output_dir OUT --per_device_train_batch_size 4
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for tiny_tasks
from tiny_tasks import classification_tasks, tiny_bert  # noqa: E402

from hf_magmax import MagMaxConfig, MagMaxTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--train_sampling_strategy", default="random")
    parser.add_argument("--push_every_task_to", default=None, help="a Hub repo: push_every_task=True to it")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    train, evaluation = classification_tasks(num_examples=16, eval_examples=8)
    args = MagMaxConfig(
        output_dir=cli.output_dir,
        max_steps=3,
        per_device_train_batch_size=cli.per_device_train_batch_size,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        optim=cli.optim,
        train_sampling_strategy=cli.train_sampling_strategy,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        average_tokens_across_devices=False,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        push_every_task=cli.push_every_task_to is not None,
        hub_model_id=cli.push_every_task_to,
    )
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    rank = trainer.args.process_index
    state = {k: v.detach().contiguous().clone() for k, v in trainer.model.state_dict().items()}
    save_file(state, os.path.join(cli.output_dir, f"final_rank{rank}.safetensors"))
    with open(os.path.join(cli.output_dir, f"info_rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "results": trainer.continual_results}, f)


if __name__ == "__main__":
    main()
