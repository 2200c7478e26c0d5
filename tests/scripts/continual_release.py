"""Run MagMaxTrainer on tiny tasks with `push_every_task=True` and checkpoints every 2 steps (used by
tests/test_hub_revisions.py to kill a run between a task's commit and its branch, then resume it).

    HF_ENDPOINT=http://127.0.0.1:PORT HF_TOKEN=... python tests/scripts/continual_release.py OUT REPO_ID
"""

import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for tiny_tasks
from tiny_tasks import classification_task, tiny_bert, tiny_config  # noqa: E402

from hf_magmax import MagMaxTrainer  # noqa: E402


def main() -> None:
    output_dir, repo_id = sys.argv[1:3]
    torch.set_num_threads(1)
    classes = [[0, 1], [2, 3], [0, 3]]
    train = {n: classification_task(c, 16, seed=1 + i) for i, (n, c) in enumerate(zip("abc", classes))}
    evaluation = {n: classification_task(c, 8, seed=10 + i) for i, (n, c) in enumerate(zip("abc", classes))}
    args = tiny_config(output_dir, save_strategy="steps", save_steps=2, push_every_task=True, hub_model_id=repo_id)
    MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation).train()


if __name__ == "__main__":
    main()
