"""Worker of tests/test_trainer_zero3.py: MagMaxTrainer, MagMaxSFTTrainer and MagMaxCallback under DeepSpeed ZeRO-3 /
ZeRO-2 on CPU (torchrun, 2 processes, gloo, `DS_ACCELERATOR=cpu`), against one process without DeepSpeed.

The DeepSpeed config goes through `TrainingArguments(deepspeed=...)`, as `--deepspeed ds.json` does; Accelerate builds
one engine per task (`hf_magmax.trainer.deepspeed.fresh_engine`). `stage3_param_persistence_threshold: 100` keeps the
small tensors (biases, LayerNorms, the head) gathered on every rank and partitions the matrices, so both kinds are
written by the merge. The model is built before the config, so θ_0 is taken whole and cut down to each rank's
partition at the first fold (a model that `from_pretrained` loads under `zero.Init` is partitioned from the start:
tests/test_recipes_launch.py runs that path through the TRACE and Standard CL recipes).

`--parts` chooses the runs (one launch, one process group, for all of them):

- `magmax`: MagMaxTrainer on 2 tiny classification tasks (a checkpoint at the end of each), each task's θ_t recorded
  gathered (for the check only), the final model saved (`save_model`: the one consolidation; with `--push_to` also
  `push_to_hub`); under ZeRO-3 a fresh trainer resumed from each checkpoint and the refusals; then the same tasks with
  a plain `Trainer` + `MagMaxCallback`. Writes `result-rank<r>.json` and, on rank 0, `final-zero<stage>.safetensors`
  / `final-callback-zero<stage>.safetensors`;
- `sft`: MagMaxSFTTrainer (TRL's SFTTrainer) on 2 prompt-completion tasks of the tiny Llama, θ_t recorded gathered,
  the final model saved, then the same tasks with a plain `SFTTrainer` + `MagMaxCallback`; writes `result-sft-rank<r>.json`, `final-sft-zero<stage>.safetensors` and `sft/`;
- `lora`: MagMaxTrainer with LoRA on 2 language-modelling tasks of the tiny Llama (ZeRO-2), each task's ΔW recorded,
  the merged plain model saved and evaluated, then the same with a plain `Trainer` + `MagMaxCallback`; writes
  `result-lora-rank<r>.json`, `final-lora-zero<stage>.safetensors` and `lora/`.

Without torchrun each part writes its one-process reference `final[-sft|-lora]-single.safetensors`.

    torchrun --nproc_per_node 2 tests/scripts/trainer_zero3.py --output_dir OUT --stage 3 --parts magmax sft
    torchrun --nproc_per_node 2 tests/scripts/trainer_zero3.py --output_dir OUT --stage 2 --parts magmax lora
    python tests/scripts/trainer_zero3.py --output_dir OUT --parts magmax sft lora
"""

import argparse
import glob
import json
import os
import resource
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for tiny_tasks
from tiny_tasks import classification_tasks, close_process_group, tiny_bert  # noqa: E402

from hf_magmax import MagMaxCallback, MagMaxConfig, MagMaxTrainer  # noqa: E402
from hf_magmax.merging import MergeSpec  # noqa: E402
from hf_magmax.trainer import MergeState  # noqa: E402


METHOD = os.environ.get("MAGMAX_METHOD", "magmax")  # the tests use magmax; `ties` by hand (all-reduced histograms)
SCALING_COEF = 0.7


def ds_config(stage):
    return {
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 100,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def whole(model):
    """The model's state dict, whole (ZeRO-3 parameters gathered for the check; collective)."""
    params = list(model.parameters())
    if any(getattr(p, "ds_tensor", None) is not None for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {name: t.detach().clone() for name, t in model.state_dict().items()}
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


class Record(TrainerCallback):
    """θ_t, whole, at the end of each task's training (before MagMax folds it)."""

    def __init__(self):
        self.thetas = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.thetas.append(whole(model))


def training_args(cli, out, config_class=MagMaxConfig, **kwargs):
    distributed = cli.stage is not None
    kwargs.setdefault("deepspeed", ds_config(cli.stage) if distributed else None)
    return config_class(
        output_dir=out,
        max_steps=3,
        per_device_train_batch_size=2 if distributed else 4,
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
        **kwargs,
    )


def make_trainer(cli, out, callbacks=()):
    train, evaluation = classification_tasks(num_examples=16, eval_examples=8)
    model = tiny_bert()
    args = training_args(cli, out, merge_method=METHOD, scaling_coef=SCALING_COEF)
    return MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation, callbacks=list(callbacks))


def run_callback(cli, out):
    """The same tasks with a plain Trainer and MagMaxCallback (one `train()` per task)."""
    train, evaluation = classification_tasks(num_examples=16, eval_examples=8)
    model = tiny_bert()
    args = training_args(cli, out, config_class=TrainingArguments)
    args.save_strategy = "no"
    trainer = Trainer(model, args, train_dataset=train["a"])
    callback = MagMaxCallback(trainer, eval_datasets=evaluation, merge_method=METHOD, scaling_coef=SCALING_COEF)
    for dataset in train.values():
        trainer.train_dataset = dataset
        trainer.train()
    return trainer, callback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--stage", type=int, default=None, help="the ZeRO stage (torchrun); none: one process")
    parser.add_argument("--push_to", default=None, help="a Hub repo: push the final model (`push_to_hub`)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["magmax"], help="the runs, in this order")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    for part in cli.parts:
        PARTS[part](cli)
    close_process_group()


def run_magmax(cli):
    """MagMaxTrainer (full fine-tuning of the tiny BERT), its checkpoints and resume, MagMaxCallback, the refusals."""
    out = os.path.join(cli.output_dir, "magmax")
    if cli.stage is None:
        trainer = make_trainer(cli, out)
        trainer.train()
        save_file(whole(trainer.model), os.path.join(cli.output_dir, "final-single.safetensors"))
        return

    start = time.perf_counter()
    record = Record()
    trainer = make_trainer(cli, out, [record])
    rank = trainer.args.process_index
    model = trainer.model
    partitioned_at_start = any(getattr(p, "ds_tensor", None) is not None for p in model.parameters())
    theta_0 = whole(model)
    trainer.train()
    train_seconds = time.perf_counter() - start
    state = trainer._magmax.state
    final = whole(trainer.model)
    reference = MergeState(MergeSpec(METHOD, scaling_coef=SCALING_COEF))
    reference.snapshot(theta_0)
    for task, theta in enumerate(record.thetas):
        reference.fold(theta, task=str(task))
    merged_equal = all(
        torch.equal(final[name], reference.merged_tensor(name, SCALING_COEF)) for name in reference.base
    )
    sequential_differs = any(not torch.equal(final[name], record.thetas[-1][name]) for name in reference.base)
    trainer.save_model(os.path.join(out, "final"))  # the one consolidation (rank 0 writes)
    if cli.push_to:  # the same consolidation, then rank 0 uploads (the fake Hub of the test)
        trainer.args.hub_model_id = cli.push_to
        trainer.push_to_hub()
    result = {
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "partitioned": any(getattr(p, "ds_tensor", None) is not None for p in trainer.model.parameters()),
        "partitioned_at_start": partitioned_at_start,
        "sharded": state.sharded,
        "merged_equal_reference": merged_equal,
        "sequential_differs": sequential_differs,
        "rank_merge_bytes": state.resident_bytes()["merge"],
        "rank_base_private_bytes": state.resident_bytes()["base"],
        "one_process_merge_bytes": reference.resident_bytes()["merge"],
        "params": sum(t.numel() for t in reference.base.values()),
        "train_seconds": train_seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if rank == 0:
        saved = load_file(os.path.join(out, "final", "model.safetensors"))
        result["saved_equal_gathered"] = saved.keys() <= final.keys() and all(
            torch.equal(saved[name], final[name]) for name in saved
        )
        save_file(final, os.path.join(cli.output_dir, f"final-zero{cli.stage}.safetensors"))
    checkpoints = sorted(glob.glob(os.path.join(out, "task-*", "checkpoint-*")))
    result["checkpoint_files"] = [sorted(os.listdir(c)) for c in checkpoints]
    if cli.stage == 3:
        # `train(resume_from_checkpoint=)` from the end of task 1 (the state not folded yet: one file) and of task 2
        # (one merge-state file per rank): the same final weights, bit for bit
        result["resume_equal"] = []
        for checkpoint in checkpoints:
            again = make_trainer(cli, out)
            again.train(resume_from_checkpoint=checkpoint)
            resumed = whole(again.model)
            result["resume_equal"].append(all(torch.equal(resumed[name], final[name]) for name in final))
    callback_trainer, callback = run_callback(cli, os.path.join(cli.output_dir, "callback"))
    callback_final = whole(callback_trainer.model)
    result["callback_max_diff"] = max((callback_final[n] - final[n]).abs().max().item() for n in final)
    result["callback_rank_merge_bytes"] = callback._run.state.resident_bytes()["merge"]
    result["callback_sharded"] = callback._run.state.sharded
    if rank == 0:
        save_file(callback_final, os.path.join(cli.output_dir, f"final-callback-zero{cli.stage}.safetensors"))
    if cli.stage == 3:
        result["refused"] = refused(cli, os.path.join(cli.output_dir, "refused"))
    with open(os.path.join(cli.output_dir, f"result-rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


def reference_merge(theta_0, thetas):
    """The whole-tensor MagMax of the gathered θ_0 and θ_t: one process's merge state, fed in task order."""
    reference = MergeState(MergeSpec(METHOD, scaling_coef=SCALING_COEF))
    reference.snapshot(theta_0)
    for task, theta in enumerate(thetas):
        reference.fold(theta, task=str(task))
    return {name: reference.merged_tensor(name, SCALING_COEF) for name in reference.base}


def run_sft(cli):
    """MagMaxSFTTrainer (TRL's SFTTrainer: prompt-completion data, completion-only loss, its fused LM head and token
    accuracy) on the tiny Llama, 2 tasks; under ZeRO-3 (the LM head and the matrices partitioned) or in one process.

    Under DDP/ZeRO each rank's batch is padded on its own and holds another number of completion tokens:
    `average_tokens_across_devices=True` (SFTConfig's default) divides every rank's loss by the tokens of the global
    batch, so the gradient is the one process's over the same 4 examples."""
    from tiny_tasks import sft_tasks, tiny_sft_config, tiny_sft_llama, tiny_sft_tokenizer

    from hf_magmax import MagMaxSFTTrainer

    distributed = cli.stage is not None
    out = os.path.join(cli.output_dir, "sft")
    tokenizer = tiny_sft_tokenizer()
    train, evaluation = sft_tasks("prompt_completion", 2)
    record = Record()

    def make_sft_trainer(callbacks=()):
        args = tiny_sft_config(
            out,
            per_device_train_batch_size=2 if distributed else 4,
            per_device_eval_batch_size=2 if distributed else 4,
            deepspeed=ds_config(cli.stage) if distributed else None,
            average_tokens_across_devices=True,
            save_steps=4,  # a checkpoint at the end of each task
            merge_method=METHOD,
            scaling_coef=SCALING_COEF,
        )
        return MagMaxSFTTrainer(
            tiny_sft_llama(tokenizer),
            args,
            processing_class=tokenizer,
            train_datasets=train,
            eval_datasets=evaluation,
            callbacks=list(callbacks),
        )

    trainer = make_sft_trainer([record])
    args = trainer.args
    theta_0 = whole(trainer.model)
    trainer.train()
    final = whole(trainer.model)
    trainer.save_model(os.path.join(out, "final"))  # under ZeRO-3: the one consolidation (rank 0 writes)
    rank = trainer.args.process_index
    if not distributed:
        save_file(final, os.path.join(cli.output_dir, "final-sft-single.safetensors"))
        return
    reference = reference_merge(theta_0, record.thetas)
    result = {
        "world_size": trainer.args.world_size,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "partitioned": {
            name: getattr(p, "ds_tensor", None) is not None for name, p in trainer.model.named_parameters()
        },
        "sharded": trainer._magmax.state.sharded,
        "tasks_recorded": len(record.thetas),
        "merged_equal_reference": all(torch.equal(final[name], reference[name]) for name in reference),
        "sequential_differs": any(not torch.equal(final[n], record.thetas[-1][n]) for n in reference),
        "tasks_differ": any(not torch.equal(record.thetas[0][n], record.thetas[1][n]) for n in reference),
    }
    # `train(resume_from_checkpoint=)` from the end of task 1 and of task 2 (one merge-state file per rank): the same
    # final weights and results, bit for bit
    checkpoints = sorted(glob.glob(os.path.join(out, "task-*", "checkpoint-*")))
    result["checkpoint_files"] = [sorted(os.listdir(c)) for c in checkpoints]
    result["resume_equal"] = []
    for checkpoint in checkpoints:
        again = make_sft_trainer()
        again.train(resume_from_checkpoint=checkpoint)
        resumed = whole(again.model)
        result["resume_equal"].append(
            all(torch.equal(resumed[name], final[name]) for name in final)
            and again.continual_results == trainer.continual_results
        )
    # the same tasks with TRL's own SFTTrainer and MagMaxCallback (each task's raw `train_dataset` prepared by it)
    from trl import SFTConfig, SFTTrainer

    fields = SFTConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if fields[k].init and k in args.__dict__}
    plain = SFTTrainer(
        tiny_sft_llama(tokenizer),
        SFTConfig(**{**values, "output_dir": os.path.join(out, "callback")}),
        train_dataset=train["a"],
        processing_class=tokenizer,
    )
    callback = MagMaxCallback(plain, eval_datasets=evaluation, merge_method=METHOD, scaling_coef=SCALING_COEF)
    for dataset in train.values():
        plain.train_dataset = dataset
        plain.train()
    callback_final = whole(plain.model)
    result["callback_equal"] = all(torch.equal(callback_final[name], final[name]) for name in final)
    result["callback_results_equal"] = callback.results == trainer.continual_results
    result["callback_sharded"] = callback._run.state.sharded
    if rank == 0:
        saved = load_file(os.path.join(out, "final", "model.safetensors"))
        result["saved_names_missing"] = sorted(set(final) - set(saved))
        result["saved_equal_gathered"] = all(
            saved[name].shape == final[name].shape and torch.equal(saved[name], final[name]) for name in saved
        )
        save_file(final, os.path.join(cli.output_dir, f"final-sft-zero{cli.stage}.safetensors"))
    with open(os.path.join(cli.output_dir, f"result-sft-rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


class RecordDeltas(TrainerCallback):
    """The LoRA adapter's ΔW (whole: ZeRO-2 keeps the parameters whole) at the end of each task's training."""

    def __init__(self):
        self.deltas = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from hf_magmax.peft import lora_delta_state_dict

        self.deltas.append({name: t.detach().clone() for name, t in lora_delta_state_dict(model).items()})


def run_lora(cli):
    """MagMaxTrainer with `peft_config` (LoRA r 2 on q_proj/v_proj of the tiny Llama), 2 tasks; under ZeRO-2 (the
    optimizer states and gradients of the adapter partitioned, its weights whole on every rank) or in one process.
    The run ends with the base model and the merged ΔW folded in (`lora_output="merged"`)."""
    from peft import LoraConfig
    from tiny_tasks import lm_task, tiny_llama

    from hf_magmax import TaskVector, merge_task_vectors
    from hf_magmax.peft import fold_deltas_into_base

    distributed = cli.stage is not None
    out = os.path.join(cli.output_dir, "lora")
    record = RecordDeltas()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = training_args(cli, out, merge_method=METHOD, scaling_coef=SCALING_COEF)
    args.save_strategy, args.learning_rate = "no", 5e-2
    train = {"x": lm_task(4, seed=1), "y": lm_task(10, seed=2)}
    evaluation = {"x": lm_task(4, seed=3), "y": lm_task(10, seed=4)}
    model = tiny_llama()
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    trainer = MagMaxTrainer(
        model, args, train_datasets=train, eval_datasets=evaluation, callbacks=[record], peft_config=lora
    )
    trainer.train()
    final = {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}
    trainer.save_model(os.path.join(out, "final"))
    loss = trainer.evaluate(evaluation["y"])["eval_loss"]  # the merged model, as the last row of the matrix scored it
    rank = trainer.args.process_index
    if not distributed:
        save_file(final, os.path.join(cli.output_dir, "final-lora-single.safetensors"))
        return
    # the reference: θ_0 + λ · magmax(ΔW_t) (B starts at 0: ΔW at the start is 0, τ_t = ΔW_t), folded into the base
    start = {name: torch.zeros_like(t) for name, t in record.deltas[0].items()}
    vectors = [TaskVector.from_state_dicts(start, deltas) for deltas in record.deltas]
    expected = tiny_llama()
    expected.load_state_dict(base)
    fold_deltas_into_base(expected, merge_task_vectors(vectors, METHOD, scaling_coef=SCALING_COEF).apply_to(start))
    expected = expected.state_dict()
    result = {
        "world_size": trainer.args.world_size,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "model_class": type(trainer.model).__name__,
        "tasks_recorded": len(record.deltas),
        "adapted": sorted(record.deltas[0]),
        "merged_equal_reference": final.keys() == expected.keys()
        and all(torch.equal(final[name], expected[name]) for name in expected),
        "base_moved": sorted(name for name in base if not torch.equal(final[name], base[name])),
        "continual_results": trainer.continual_results,
        "eval_loss_after": loss,
    }
    # the same tasks with a plain Trainer around the PeftModel and MagMaxCallback, saved the same way
    from peft import get_peft_model

    args = training_args(cli, os.path.join(out, "callback"), config_class=TrainingArguments)
    args.save_strategy, args.learning_rate = "no", 5e-2
    plain = Trainer(get_peft_model(tiny_llama(), lora), args, train_dataset=train["x"])
    callback = MagMaxCallback(plain, eval_datasets=evaluation, merge_method=METHOD, scaling_coef=SCALING_COEF)
    for dataset in train.values():
        plain.train_dataset = dataset
        plain.train()
    callback_final = plain.model.state_dict()
    result["callback_equal"] = callback_final.keys() == final.keys() and all(
        torch.equal(callback_final[name], final[name]) for name in final
    )
    result["callback_results_equal"] = callback.results == trainer.continual_results
    plain.save_model(os.path.join(out, "final-callback"))
    if rank == 0:
        saved = load_file(os.path.join(out, "final-callback", "model.safetensors"))
        result["callback_saved_equal_model"] = saved.keys() == final.keys() and all(
            torch.equal(saved[name], final[name]) for name in saved
        )
        saved = load_file(os.path.join(out, "final", "model.safetensors"))
        result["saved_equal_model"] = saved.keys() == final.keys() and all(
            torch.equal(saved[name], final[name]) for name in saved
        )
        save_file(final, os.path.join(cli.output_dir, f"final-lora-zero{cli.stage}.safetensors"))
    with open(os.path.join(cli.output_dir, f"result-lora-rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


def refused(cli, out):
    """What is refused before any training under ZeRO-3 (the error message of each case; None: accepted)."""
    from peft import LoraConfig

    train, evaluation = classification_tasks(num_examples=16, eval_examples=8)
    no_gather = ds_config(3)
    no_gather["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    cases = {
        "no_gather_merged": ({"deepspeed": no_gather}, {}),
        "no_gather_sequential": ({"deepspeed": no_gather, "final_model": "sequential"}, {}),
        "lora": ({}, {"peft_config": LoraConfig(r=2, target_modules=["query", "value"])}),
        "provenance": ({"save_provenance": True}, {}),
        "opcm": ({"merge_method": "opcm"}, {}),
        "push_every_task": ({"push_every_task": True, "hub_model_id": "me/model"}, {}),
        "merge_device_cuda": ({"merge_device": "cuda"}, {}),
    }
    messages = {}
    for case, (options, trainer_kwargs) in cases.items():
        try:
            args = training_args(cli, out, **{"merge_method": METHOD, **options})
            MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation, **trainer_kwargs)
            messages[case] = None
        except ValueError as err:
            messages[case] = str(err)
    args = training_args(cli, out, config_class=TrainingArguments, deepspeed=no_gather)
    try:
        MagMaxCallback(Trainer(tiny_bert(), args, train_dataset=train["a"]), eval_datasets=evaluation)
        messages["callback_no_gather"] = None
    except ValueError as err:
        messages["callback_no_gather"] = str(err)
    return messages


PARTS = {"magmax": run_magmax, "sft": run_sft, "lora": run_lora}


if __name__ == "__main__":
    main()
