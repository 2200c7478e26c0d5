"""Tiny models and task sequences shared by the trainer tests and the two-process script (offline, seeded)."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, TrainerCallback


NUM_LABELS = 4
SEQ_LEN = 8


def tiny_config(output_dir, **kwargs):
    """The `MagMaxConfig` of the tiny trainer tests: 4 steps per task of batch 4, a checkpoint every 2 steps, CPU,
    seeded, no reports; `kwargs` override any field."""
    from hf_magmax import MagMaxConfig

    defaults = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return MagMaxConfig(**{**defaults, **kwargs})


def tiny_bert(num_labels: int = NUM_LABELS, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=48,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def classification_task(classes: list[int], num_examples: int = 16, seed: int = 0, offset: int = 0) -> Dataset:
    """Class c is signalled by token 1 + 4c (plus noise tokens); `offset` shifts the example ids."""
    generator = torch.Generator().manual_seed(seed)
    labels = [classes[i % len(classes)] for i in range(num_examples)]
    input_ids = [
        [1 + 4 * label + int(torch.randint(0, 3, (1,), generator=generator))]
        + torch.randint(20, 48, (SEQ_LEN - 1,), generator=generator).tolist()
        for label in labels
    ]
    return Dataset.from_dict(
        {
            "input_ids": input_ids,
            "attention_mask": [[1] * SEQ_LEN] * num_examples,
            "labels": labels,
            "example_id": list(range(offset, offset + num_examples)),
        }
    )


def classification_tasks(num_examples: int = 16, eval_examples: int = 8) -> tuple[dict, dict]:
    """Two class-incremental tasks over 4 classes: (train_datasets, eval_datasets)."""
    train = {
        "a": classification_task([0, 1], num_examples, seed=1, offset=0),
        "b": classification_task([2, 3], num_examples, seed=2, offset=1000),
    }
    evaluation = {
        "a": classification_task([0, 1], eval_examples, seed=11, offset=5000),
        "b": classification_task([2, 3], eval_examples, seed=12, offset=6000),
    }
    return train, evaluation


def lm_task(token: int, num_examples: int = 8, seed: int = 0) -> Dataset:
    """Sequences that repeat a task-specific token pattern, labels = input ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = [
        [token, token + 1] * (SEQ_LEN // 2)
        if i % 2
        else torch.randint(2, 32, (SEQ_LEN,), generator=generator).tolist()
        for i in range(num_examples)
    ]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * SEQ_LEN] * num_examples, "labels": ids})


class Crash(TrainerCallback):
    """Simulates a crash in the middle of task `task` at step `step` (after the checkpoint of that step)."""

    def __init__(self, task, step):
        self.task, self.step, self.seen = task, step, -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.seen == self.task and state.global_step == self.step + 1:
            raise KeyboardInterrupt("simulated crash")
