"""MagMax inside TRL's SFTTrainer: MagMaxSFTTrainer and MagMaxCallback on a plain SFTTrainer, plain and LoRA, with
TRL's dataset formats (prompt/completion, conversational, messages), completion-only loss, packing and resume."""

import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_tasks import (
    Crash,
    sft_task,
    sft_task_band,
    sft_tasks,
    tiny_sft_config,
    tiny_sft_llama,
    tiny_sft_tokenizer,
)
from trl import SFTConfig, SFTTrainer

from hf_magmax import MagMaxCallback, MagMaxConfig, MagMaxSFTConfig, MagMaxSFTTrainer, TaskVector, merge_task_vectors


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def _lora():
    return peft.LoraConfig(**LORA)


def _results(directory):
    return json.loads((directory / "continual_results.json").read_text())


def _sections(card):
    return re.findall(r"^## .*$", card, flags=re.M)


def _checkpoints(out):
    return sorted(str(p.relative_to(out)) for p in out.glob("**/checkpoint-*") if p.is_dir())


def _sft_args_for_callback(output_dir):
    """The plain SFTConfig with the same training options as `tiny_sft_config` (no MagMax fields)."""
    args = tiny_sft_config(output_dir)
    values = {k: getattr(args, k) for k in SFTConfig.__dataclass_fields__ if k in args.__dict__}
    values.update(output_dir=str(output_dir))
    return SFTConfig(**{k: v for k, v in values.items() if SFTConfig.__dataclass_fields__[k].init})


def _run_callback(tmp_path, fmt, num_tasks, peft_config=None):
    """An existing SFT script: one SFTTrainer, `train_dataset` set per task (raw, as TRL takes it), MagMaxCallback."""
    tokenizer = tiny_sft_tokenizer()
    train, evaluation = sft_tasks(fmt, num_tasks)
    trainer = SFTTrainer(
        tiny_sft_llama(tokenizer),
        _sft_args_for_callback(tmp_path / "out"),
        train_dataset=train["a"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    callback = MagMaxCallback(trainer, eval_datasets=evaluation, scaling_coef=0.5)
    for dataset in train.values():
        trainer.train_dataset = dataset
        trainer.train()
    return trainer, callback


def _run_trainer(tmp_path, fmt, num_tasks, peft_config=None, callbacks=None, **config):
    tokenizer = tiny_sft_tokenizer()
    train, evaluation = sft_tasks(fmt, num_tasks)
    trainer = MagMaxSFTTrainer(
        tiny_sft_llama(tokenizer),
        tiny_sft_config(tmp_path / "out", **config),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        train_datasets=train,
        eval_datasets=evaluation,
    )
    return trainer


def _expected_merge(out, task_dirs, coef=0.5):
    """θ_0 + λ · magmax(θ_k − θ_0) from the run's θ_0 file and the last checkpoint of every task (the engine)."""
    base = load_file(str(out / "magmax_base" / "model.safetensors"))
    tuned = [load_file(str(out / task_dir)) for task_dir in task_dirs]
    vectors = [TaskVector.from_state_dicts(base, {k: t[k] for k in base}) for t in tuned]
    return merge_task_vectors(vectors, method="magmax", scaling_coef=coef).apply_to(base)


@pytest.mark.parametrize("fmt", ["prompt_completion", "conversational"])
def test_sft_trainer_and_callback_in_sft_trainer_write_the_same_run(tmp_path, fmt):
    ours = _run_trainer(tmp_path / "t", fmt, 2)
    # completion-only loss (TRL's default for prompt-completion data): the prompt tokens carry no label
    first = ours.train_datasets[1][0]
    assert first["labels"][0] == -100 and first["labels"][-1] == first["input_ids"][-1]
    ours.train()
    plain, callback = _run_callback(tmp_path / "c", fmt, 2)

    t_out, c_out = tmp_path / "t" / "out", tmp_path / "c" / "out"
    # the same final weights, results file, checkpoint layout and card sections on both paths
    expected = ours.model.state_dict()
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    results = _results(t_out)
    assert _results(c_out) == results == callback.results
    assert results["metric"] == "mean_token_accuracy" and results["task_names"] == ["a", "b"]
    for row in results["sequential"]["matrix"] + results["merged"]["matrix"]:
        assert all(0.0 <= v <= 1.0 for v in row)
    layout = ["task-00-a/checkpoint-2", "task-00-a/checkpoint-4", "task-01-b/checkpoint-2", "task-01-b/checkpoint-4"]
    assert _checkpoints(t_out) == _checkpoints(c_out) == layout
    ours.save_model(str(tmp_path / "t-model"))
    plain.save_model(str(tmp_path / "c-model"))
    card = (tmp_path / "t-model" / "README.md").read_text()
    assert "## Merged (magmax): mean_token_accuracy matrix" in card and "- trl" in card and "- magmax" in card
    assert _sections(card) == _sections((tmp_path / "c-model" / "README.md").read_text())

    # the matrices hold SFTTrainer's own token accuracy: its `evaluate()` of the final (merged) model gives the last row
    for i, dataset in enumerate(ours.eval_datasets):
        logged = ours.evaluate(dataset)["eval_mean_token_accuracy"]
        assert logged == pytest.approx(results["merged"]["matrix"][-1][i], abs=1e-6)

    # the merged model is the engine's MagMax of the tasks' last checkpoints (the merge state is exact)
    merged = _expected_merge(t_out, [f"{d}/model.safetensors" for d in layout[1::2]])
    final = load_file(str(tmp_path / "t-model" / "model.safetensors"))
    for name, value in merged.items():
        assert torch.equal(final[name], value), name


def test_sft_trainer_matches_magmax_trainer_on_the_prepared_data(tmp_path):
    """The plain-Trainer path: MagMaxTrainer on the datasets SFTTrainer prepared, with TRL's collator, gives the same
    run up to the fused-loss rounding (SFTTrainer computes the NLL chunk-wise from `lm_head.weight`)."""
    from tiny_tasks import tiny_config
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from hf_magmax import MagMaxTrainer
    from hf_magmax.trainer import MergeState

    ours = _run_trainer(tmp_path / "sft", "prompt_completion", 2, continual_metric="neg_loss")
    columns = ["input_ids", "labels"]
    train = {n: ds.select_columns(columns) for n, ds in zip(ours.task_names, ours.train_datasets)}
    evaluation = {n: ds.select_columns(columns) for n, ds in zip(ours.task_names, ours.eval_datasets)}
    ours.train()
    tokenizer = tiny_sft_tokenizer()
    args = tiny_config(
        tmp_path / "plain" / "out",
        per_device_eval_batch_size=4,
        logging_steps=2,
        scaling_coef=0.5,
        continual_metric="neg_loss",
    )
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    plain = MagMaxTrainer(
        tiny_sft_llama(tokenizer), args, data_collator=collator, train_datasets=train, eval_datasets=evaluation
    )
    plain.train()

    expected = plain.model.state_dict()
    for name, value in ours.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5)
    mine, theirs = _results(tmp_path / "sft" / "out"), _results(tmp_path / "plain" / "out")
    assert mine.keys() == theirs.keys()
    for kind in ("sequential", "merged"):
        assert mine[kind]["matrix"] == [pytest.approx(row, abs=1e-5) for row in theirs[kind]["matrix"]]
    assert {k: v for k, v in mine.items() if k not in ("sequential", "merged")} == {
        k: v for k, v in theirs.items() if k not in ("sequential", "merged")
    }
    assert _checkpoints(tmp_path / "sft" / "out") == _checkpoints(tmp_path / "plain" / "out")
    checkpoint = "task-01-b/checkpoint-2"  # the merge state in the middle of task 2: θ_best after task 1
    mine = MergeState.read(str(tmp_path / "sft" / "out" / checkpoint))
    theirs = MergeState.read(str(tmp_path / "plain" / "out" / checkpoint))
    tensors = {k for k, v in mine.items() if isinstance(v, torch.Tensor | dict)}
    assert {k: v for k, v in mine.items() if k not in tensors} == {k: v for k, v in theirs.items() if k not in tensors}
    torch.testing.assert_close({k: mine[k] for k in tensors}, {k: theirs[k] for k in tensors}, rtol=0, atol=1e-5)
    ours.save_model(str(tmp_path / "sft-model"))
    plain.save_model(str(tmp_path / "plain-model"))
    card = (tmp_path / "sft-model" / "README.md").read_text()
    assert _sections(card) == _sections((tmp_path / "plain-model" / "README.md").read_text())


def test_sft_lora_messages_three_tasks_trainer_equals_callback(tmp_path):
    ours = _run_trainer(tmp_path / "t", "messages", 3, peft_config=_lora())
    ours.train()
    plain, callback = _run_callback(tmp_path / "c", "messages", 3, peft_config=_lora())
    # both end with the base + merged ΔW folded in (lora_output="merged"): a plain transformers model
    assert not hasattr(ours.model, "peft_config") and not hasattr(plain.model, "peft_config")
    expected = ours.model.state_dict()
    assert plain.model.state_dict().keys() == expected.keys()
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    results = _results(tmp_path / "t" / "out")
    assert results == _results(tmp_path / "c" / "out") == callback.results
    assert results["lora"] == {"output": "merged"} and len(results["merged"]["matrix"]) == 4
    # only the adapted weights moved: the embeddings are the base model's
    base = tiny_sft_llama(tiny_sft_tokenizer())
    assert torch.equal(expected["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])
    assert not torch.equal(
        expected["model.layers.0.self_attn.q_proj.weight"], base.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_resume_is_bit_identical(tmp_path, lora):
    peft_config = _lora if lora else (lambda: None)
    full = _run_trainer(tmp_path / "full", "prompt_completion", 2, peft_config=peft_config())
    full.train()
    crashed = _run_trainer(
        tmp_path / "resumed", "prompt_completion", 2, peft_config=peft_config(), callbacks=[Crash(1, 2)]
    )
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = _run_trainer(tmp_path / "resumed", "prompt_completion", 2, peft_config=peft_config())
    resumed.train(resume_from_checkpoint=True)
    expected = full.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert _results(tmp_path / "resumed" / "out") == _results(tmp_path / "full" / "out")


def test_sft_packing_packs_each_task_on_its_own(tmp_path):
    tokenizer = tiny_sft_tokenizer()
    train, evaluation = sft_tasks("text", 2, num_examples=12)
    trainer = MagMaxSFTTrainer(
        tiny_sft_llama(tokenizer),
        tiny_sft_config(tmp_path / "out", packing=True, max_length=24, max_steps=2),
        processing_class=tokenizer,
        train_datasets=train,
        eval_datasets=evaluation,
    )
    for task, (dataset, ev) in enumerate(zip(trainer.train_datasets, trainer.eval_datasets)):
        assert "seq_lengths" in dataset.column_names  # packed
        assert any(len(lengths) > 1 for lengths in dataset["seq_lengths"])  # several examples per row
        other = sft_task_band(tokenizer, 1 - task)
        for ids in list(dataset["input_ids"]) + list(ev["input_ids"]):  # no row holds a token of the other task
            assert not other & set(ids)
    trainer.train()
    assert _results(tmp_path / "out")["num_tasks_done"] == 2


def test_sft_refuses_tasks_in_different_formats_before_training(tmp_path):
    tokenizer = tiny_sft_tokenizer()
    train = {"a": sft_task(0, "messages"), "b": sft_task(1, "prompt_completion")}
    with pytest.raises(ValueError, match=r"task 'b' of `train_datasets` is standard prompt-completion but task 'a'"):
        MagMaxSFTTrainer(
            tiny_sft_llama(tokenizer), tiny_sft_config(tmp_path), processing_class=tokenizer, train_datasets=train
        )
    evaluation = {"a": sft_task(0, "messages"), "b": sft_task(1, "text")}
    with pytest.raises(ValueError, match=r"task 'b' of `eval_datasets` is standard language modeling \(text\)"):
        MagMaxSFTTrainer(
            tiny_sft_llama(tokenizer),
            tiny_sft_config(tmp_path),
            processing_class=tokenizer,
            train_datasets={"a": sft_task(0, "messages"), "b": sft_task(1, "messages")},
            eval_datasets=evaluation,
        )
    assert not (tmp_path / "continual_results.json").exists()


def test_sft_config_and_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="`restrict_loss_to_task_classes`"):
        tiny_sft_config(tmp_path, restrict_loss_to_task_classes=True)
    tokenizer = tiny_sft_tokenizer()
    train, _ = sft_tasks("text", 2)
    with pytest.raises(TypeError, match="`args` must be a MagMaxSFTConfig"):
        MagMaxSFTTrainer(
            tiny_sft_llama(tokenizer),
            SFTConfig(str(tmp_path), use_cpu=True),
            processing_class=tokenizer,
            train_datasets=train,
        )
    with pytest.raises(ValueError, match="`optimizers` is not supported"):
        model = tiny_sft_llama(tokenizer)
        MagMaxSFTTrainer(
            model,
            tiny_sft_config(tmp_path),
            processing_class=tokenizer,
            train_datasets=train,
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
    # the MagMax options and checks of MagMaxConfig, with SFTConfig's defaults
    config = MagMaxSFTConfig(str(tmp_path), use_cpu=True, merge_method="ties", lora_output="adapter", lora_rank=2)
    assert config.learning_rate == 2e-5 and config.gradient_checkpointing and config.logging_steps == 10
    assert config.merge_spec() == MagMaxConfig(str(tmp_path), merge_method="ties").merge_spec()
    assert (config.scaling_coef, config.lora_output, config.lora_rank) == (1.0, "adapter", 2)
    with pytest.raises(ValueError, match="`lora_rank` must be a positive integer"):
        tiny_sft_config(tmp_path, lora_rank=0)


def test_callback_refuses_a_new_model_between_tasks(tmp_path):
    """A new SFTTrainer with `peft_config` per task wraps a new adapter: the task vectors would not share θ_0."""
    tokenizer = tiny_sft_tokenizer()
    train, evaluation = sft_tasks("prompt_completion", 2)
    base = tiny_sft_llama(tokenizer)
    callback = MagMaxCallback(eval_datasets=evaluation, scaling_coef=0.5)
    for task, dataset in enumerate(train.values()):
        trainer = SFTTrainer(
            base,
            _sft_args_for_callback(tmp_path / "out"),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora(),
        )
        callback.attach(trainer)
        if task == 0:
            trainer.train()
            base = trainer.model.get_base_model()
        else:
            with pytest.raises(ValueError, match="task 2 trains another model object than task 1"):
                trainer.train()


def test_token_accuracy_needs_an_sft_trainer(tmp_path):
    from tiny_tasks import lm_task, tiny_llama
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(tiny_llama(), args, train_dataset=lm_task(4))
    MagMaxCallback(trainer, eval_datasets={"a": lm_task(4, seed=1)}, continual_metric="mean_token_accuracy")
    with pytest.raises(ValueError, match="`continual_metric='mean_token_accuracy'` is the token accuracy TRL"):
        trainer.train()


def test_sft_assistant_only_loss_applies_to_every_task(tmp_path):
    """Every task is prepared with the first task's options: the later tasks' user turns carry no label either."""
    tokenizer = tiny_sft_tokenizer()
    train, evaluation = sft_tasks("messages", 3)
    trainer = MagMaxSFTTrainer(
        tiny_sft_llama(tokenizer),
        tiny_sft_config(tmp_path, assistant_only_loss=True),
        processing_class=tokenizer,
        train_datasets=train,
        eval_datasets=evaluation,
    )
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for task, dataset in enumerate([*trainer.train_datasets, *trainer.eval_datasets]):
        for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
            start = ids.index(assistant) + 1  # the assistant's content starts after its role token
            assert all(label == -100 for label in labels[:start]), task
            assert labels[start:] == ids[start : len(labels)] and labels[start] != -100, task
