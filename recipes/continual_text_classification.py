# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual text classification with MagMax: any sequence of Hub (or local) text-classification datasets.

Each entry of `tasks` is one dataset (one task), learned in the listed order, e.g. the 15-task "long sequence"
benchmark of O-LoRA (`recipes/configs/text_long_sequence.yaml`). All tasks share one label space: the union of their
label names (a name used by several tasks, e.g. "positive", is one class, so a zero-shot head sees it once); each task
trains on its own classes (`task_classes`). Full fine-tuning, or LoRA with `use_peft: true`.

A task entry (YAML mapping):

    - name: sst2                  # task name in the results
      dataset: nyu-mll/glue       # Hub id, `save_to_disk` folder, or a csv/json/parquet file
      config: sst2                # dataset configuration (optional)
      text_columns: [sentence]    # one or two columns (two: a sentence pair), or more (joined with a space)
      label_column: label
      train_split: train
      eval_split: validation
      label_names: [negative, positive]   # optional; defaults to the ClassLabel names
      max_train_samples: 1000     # optional caps
      max_eval_samples: 500

Launch:

    python recipes/continual_text_classification.py --config recipes/configs/text_long_sequence.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/continual_text_classification.py --config recipes/configs/text_long_sequence.yaml
    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero2.yaml \
        recipes/continual_text_classification.py --config recipes/configs/text_long_sequence.yaml --use_peft true

Resume with `--resume_from_checkpoint true`; push with `--push_to_hub true --hub_model_id you/name`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from recipe_common import (
    check_columns,
    check_launch,
    dataset_features,
    end_launch,
    finish_run,
    load_split,
    parse_json_list,
    parse_recipe_args,
    resume_argument,
    setup_logging,
)
from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding, set_seed

from hf_magmax.metrics import accuracy_compute_metrics
from hf_magmax.trainer import MagMaxConfig, MagMaxTrainer


logger = logging.getLogger(__name__)

_TASK_KEYS = {
    "name",
    "dataset",
    "config",
    "text_columns",
    "label_column",
    "train_split",
    "eval_split",
    "label_names",
    "max_train_samples",
    "max_eval_samples",
}


@dataclass
class ScriptArguments:
    """Tasks and model arguments of the text recipe (training hyperparameters live in `MagMaxConfig`)."""

    model_name_or_path: str = field(
        default="bert-base-uncased", metadata={"help": "Hub id or local folder of the model θ_0."}
    )
    tasks: str | None = field(
        default=None,
        metadata={"help": "The task list (YAML list of mappings, or a JSON string); see the module docstring."},
    )
    head: str = field(
        default="linear",
        metadata={
            "help": "`linear`: AutoModelForSequenceClassification over the union of labels. `zero_shot`: a frozen head "
            "of sentence embeddings of the label names on the encoder (mean pooling)."
        },
    )
    max_length: int = field(default=256, metadata={"help": "Maximum tokens per example."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: PEFT's choice for the architecture)."}
    )

    def __post_init__(self):
        if self.head not in ("linear", "zero_shot"):
            raise ValueError(f"`head` must be 'linear' or 'zero_shot', got {self.head!r}.")
        specs = parse_json_list(self.tasks, "tasks")
        if not specs:
            raise ValueError(
                "`tasks` is empty: list at least one task (a mapping with `dataset`, `text_columns`, ...)."
            )
        self.task_specs: list[dict[str, Any]] = []
        names = set()
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or "dataset" not in spec:
                raise ValueError(f"`tasks[{i}]` must be a mapping with at least `dataset`, got {spec!r}.")
            unknown = sorted(set(spec) - _TASK_KEYS)
            if unknown:
                raise ValueError(
                    f"`tasks[{i}]` has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TASK_KEYS))}."
                )
            spec = {
                "name": spec.get("name") or f"{spec['dataset']}{'/' + spec['config'] if spec.get('config') else ''}",
                "config": None,
                "text_columns": ["text"],
                "label_column": "label",
                "train_split": "train",
                "eval_split": "test",
                "label_names": None,
                "max_train_samples": None,
                "max_eval_samples": None,
                **{k: v for k, v in spec.items() if v is not None or k == "config"},
            }
            if isinstance(spec["text_columns"], str):
                spec["text_columns"] = [spec["text_columns"]]
            if not spec["text_columns"]:
                raise ValueError(f"`tasks[{i}].text_columns` is empty: name the text column(s).")
            if spec["name"] in names:
                raise ValueError(
                    f"task name {spec['name']!r} is used twice in `tasks`; give each task a unique `name`."
                )
            names.add(spec["name"])
            self.task_specs.append(spec)


def load_tasks(args: ScriptArguments, training_args):
    """Load and check every task; return `[(spec, train, test, label_names)]`."""
    # cheap checks first (Hub metadata only), so a typo fails before any data is downloaded
    for i, spec in enumerate(args.task_specs):
        features = dataset_features(spec["dataset"], spec["config"])
        if features is not None:
            required = {f"tasks[{i}].text_columns": c for c in spec["text_columns"]}
            check_columns(features, {**required, f"tasks[{i}].label_column": spec["label_column"]}, spec["name"])
    loaded = []
    for i, spec in enumerate(args.task_specs):
        with training_args.main_process_first(desc=f"loading {spec['name']}"):
            train = load_split(spec["dataset"], spec["train_split"], spec["config"])
            test = load_split(spec["dataset"], spec["eval_split"], spec["config"])
        for split, ds in (("train", train), ("eval", test)):
            required = {f"tasks[{i}].text_columns": c for c in spec["text_columns"]}
            required[f"tasks[{i}].label_column"] = spec["label_column"]
            for argument, column in required.items():
                check_columns(ds.column_names, {argument: column}, f"task {spec['name']!r} ({split} split)")
        if spec["max_train_samples"]:
            train = train.shuffle(seed=training_args.seed).select(range(min(spec["max_train_samples"], len(train))))
        if spec["max_eval_samples"]:
            test = test.shuffle(seed=training_args.seed).select(range(min(spec["max_eval_samples"], len(test))))
        names = spec["label_names"]
        if names is None:
            feature = train.features[spec["label_column"]]
            if not hasattr(feature, "names"):
                raise ValueError(
                    f"task {spec['name']!r}: column {spec['label_column']!r} is not a ClassLabel; give `label_names`."
                )
            names = list(feature.names)
        loaded.append((spec, train, test, [str(n) for n in names]))
    return loaded


def build_label_space(loaded) -> tuple[list[str], list[list[int]]]:
    """Union of the label names in task order; each task's classes as global ids."""
    global_names: list[str] = []
    task_classes = []
    for _, _, _, names in loaded:
        ids = []
        for name in names:
            if name not in global_names:
                global_names.append(name)
            ids.append(global_names.index(name))
        task_classes.append(ids)
    return global_names, task_classes


def check_model(args: ScriptArguments):
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    if args.head == "linear":
        from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

        if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
            raise ValueError(
                f"`model_name_or_path` {args.model_name_or_path!r} ({config.model_type!r}) has no sequence-"
                "classification head class (AutoModelForSequenceClassification); use a text encoder such as BERT."
            )
    return config


def main(argv=None):
    script_args, training_args = parse_recipe_args((ScriptArguments, MagMaxConfig), argv)
    setup_logging(training_args)
    check_launch(training_args)
    set_seed(training_args.seed)

    check_model(script_args)
    loaded = load_tasks(script_args, training_args)
    label_names, task_classes = build_label_space(loaded)
    logger.info("%d tasks, %d classes in all", len(loaded), len(label_names))

    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(spec, local_to_global):
        columns = spec["text_columns"]

        def fn(batch):
            if len(columns) == 2:  # a sentence pair
                first, second = batch[columns[0]], batch[columns[1]]
            else:  # one column, or several joined with a space
                first = [" ".join(str(batch[c][i]) for c in columns) for i in range(len(batch[columns[0]]))]
                second = None
            out = tokenizer(first, second, truncation=True, max_length=script_args.max_length)
            out["labels"] = [local_to_global[y] for y in batch[spec["label_column"]]]
            return out

        return fn

    train_datasets, eval_datasets = {}, {}
    for (spec, train, test, _), classes in zip(loaded, task_classes):
        fn = encode(spec, classes)
        with training_args.main_process_first(desc=f"tokenizing {spec['name']}"):
            train_datasets[spec["name"]] = train.map(fn, batched=True, remove_columns=train.column_names)
            eval_datasets[spec["name"]] = test.map(fn, batched=True, remove_columns=test.column_names)

    id2label = dict(enumerate(label_names))
    if script_args.head == "linear":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            script_args.model_name_or_path,
            num_labels=len(label_names),
            id2label=id2label,
            label2id={n: i for i, n in id2label.items()},
            ignore_mismatched_sizes=True,
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        from transformers import AutoModel

        from hf_magmax.heads import attach_label_embedding_head

        model = attach_label_embedding_head(
            AutoModel.from_pretrained(script_args.model_name_or_path), tokenizer, label_names
        )

    peft_config = None
    if script_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="SEQ_CLS" if script_args.head == "linear" else None,
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules,
        )

    trainer = MagMaxTrainer(
        model=model,
        args=training_args,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy_compute_metrics,
        train_datasets=train_datasets,
        eval_datasets=eval_datasets,
        task_classes=task_classes,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=resume_argument(training_args))
    trainer.save_model(training_args.output_dir)
    finish_run(trainer, training_args, script_args, label_names, recipe="continual_text_classification")


if __name__ == "__main__":
    main()
    end_launch()
