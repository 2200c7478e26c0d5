"""Tiny models and task sequences shared by the trainer tests and the two-process script (offline, seeded)."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, TrainerCallback


NUM_LABELS = 4
SEQ_LEN = 8


def tiny_config(output_dir, config_class=None, **kwargs):
    """The `MagMaxConfig` of the tiny trainer tests: 4 steps per task of batch 4, a checkpoint every 2 steps, CPU,
    seeded, no reports; `kwargs` override any field. `config_class`: another arguments class (`TrainingArguments`,
    `MagMaxSFTConfig`) with the same values."""
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
    return (config_class or MagMaxConfig)(**{**defaults, **kwargs})


def close_process_group() -> None:
    """The end of a torchrun worker script: every rank done, then the process group destroyed. A gloo group left to
    the interpreter's exit can abort a rank after all its work (`terminate called without an active exception`,
    exit code -6, seen once in CI on the ZeRO-2 launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


# -- SFT (TRL) -----------------------------------------------------------------------------------------------------

SFT_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "->"]
SFT_WORDS_PER_TASK = 6
#: a chat template in the spirit of ChatML, with `{% generation %}` markers for `assistant_only_loss`
SFT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|> {% generation %}{{ message['content'] }} <|end|>"
    "{% endgeneration %} {% else %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def sft_word(task: int, i: int) -> str:
    return f"t{task}w{i}"


def tiny_sft_tokenizer(num_tasks: int = 3):
    """A word-level tokenizer made in code: the special/chat tokens, then `SFT_WORDS_PER_TASK` words per task (task
    k's words have ids in their own band), a chat template; pad `<pad>`, EOS `</s>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [sft_word(t, i) for t in range(num_tasks) for i in range(SFT_WORDS_PER_TASK)]
    vocab = {token: i for i, token in enumerate(SFT_SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = SFT_CHAT_TEMPLATE
    return tokenizer


def sft_task_band(tokenizer, task: int) -> set[int]:
    """The token ids of task `task`'s words."""
    return {tokenizer.convert_tokens_to_ids(sft_word(task, i)) for i in range(SFT_WORDS_PER_TASK)}


def tiny_sft_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def sft_task(task: int, fmt: str, num_examples: int = 8, seed: int = 0) -> Dataset:
    """Task `task`: reverse three of its words. `fmt`: `"prompt_completion"` (standard), `"conversational"`
    (prompt/completion as messages), `"messages"` (conversational language modeling) or `"text"`."""
    generator = torch.Generator().manual_seed(1000 * task + seed)
    rows = []
    for _ in range(num_examples):
        picks = torch.randint(0, SFT_WORDS_PER_TASK, (3,), generator=generator).tolist()
        prompt = " ".join(sft_word(task, i) for i in picks)
        answer = " ".join(sft_word(task, i) for i in reversed(picks))
        rows.append((prompt, answer))
    if fmt == "prompt_completion":
        return Dataset.from_dict({"prompt": [p + " ->" for p, _ in rows], "completion": [" " + a for _, a in rows]})
    if fmt == "conversational":
        return Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": p}] for p, _ in rows],
                "completion": [[{"role": "assistant", "content": a}] for _, a in rows],
            }
        )
    if fmt == "messages":
        return Dataset.from_dict(
            {"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in rows]}
        )
    if fmt == "text":
        return Dataset.from_dict({"text": [f"{p} -> {a}" for p, a in rows]})
    raise ValueError(fmt)


def sft_tasks(fmt: str, num_tasks: int = 2, num_examples: int = 8, eval_examples: int = 4) -> tuple[dict, dict]:
    """`num_tasks` SFT tasks in format `fmt`: (train_datasets, eval_datasets), named a, b, c, …"""
    names = "abcdefgh"[:num_tasks]
    train = {n: sft_task(t, fmt, num_examples, seed=0) for t, n in enumerate(names)}
    evaluation = {n: sft_task(t, fmt, eval_examples, seed=1) for t, n in enumerate(names)}
    return train, evaluation


def tiny_sft_config(output_dir, **kwargs):
    """The `MagMaxSFTConfig` of the tiny SFT tests: 4 steps per task of batch 4, a checkpoint every 2 steps, CPU, fp32,
    no gradient checkpointing, seeded, no reports; `kwargs` override any field."""
    from hf_magmax import MagMaxSFTConfig

    defaults = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        logging_steps=2,
        max_length=32,
        seed=0,
        scaling_coef=0.5,
    )
    return MagMaxSFTConfig(**{**defaults, **kwargs})
