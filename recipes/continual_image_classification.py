# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual image classification with MagMax: the paper's class- and domain-incremental benchmarks.

The default model is the paper's: CLIP ViT-B/16 (`openai/clip-vit-base-patch16`) with the visual tower fine-tuned and
a frozen zero-shot head of text-tower embeddings of the class names (`head: zero_shot`). `head: linear` trains any
`AutoModelForImageClassification` (e.g. ViT) with a linear head over all classes instead.

After every task the sequentially fine-tuned model and the MagMax-merged model are evaluated on the test data of every
task; `output_dir/continual_results.json` holds both accuracy matrices and their summaries, `output_dir/results.json`
the run's arguments and final metrics.

Launch (one GPU, or CPU):

    python recipes/continual_image_classification.py --config recipes/configs/cifar100_10tasks.yaml

Multi-GPU (DDP, FSDP, DeepSpeed ZeRO-2/3):

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/continual_image_classification.py --config recipes/configs/cifar100_10tasks.yaml
    accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml \
        recipes/continual_image_classification.py --config recipes/configs/imagenet_r_10tasks.yaml
    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero2.yaml \
        recipes/continual_image_classification.py --config recipes/configs/cub200_10tasks.yaml

Every YAML value can be overridden on the command line, e.g. `--num_tasks 20 --output_dir runs/c100-20 --seed 1`.
Resume an interrupted run with `--resume_from_checkpoint true` (the last checkpoint in `output_dir`) or a path;
push the final model with `--push_to_hub true --hub_model_id you/clip-magmax-cifar100`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from recipe_common import (
    check_columns,
    check_launch,
    dataset_features,
    end_launch,
    finish_run,
    load_split,
    parse_recipe_args,
    resume_argument,
    setup_logging,
)
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, set_seed

from hf_magmax.continual import class_incremental_split, domain_incremental_split
from hf_magmax.heads import CLIPZeroShotClassifier, check_label_names
from hf_magmax.metrics import accuracy_compute_metrics
from hf_magmax.trainer import MagMaxConfig, MagMaxTrainer


logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    """Data, split and model arguments of the image recipe (training hyperparameters live in `MagMaxConfig`)."""

    model_name_or_path: str = field(
        default="openai/clip-vit-base-patch16", metadata={"help": "Hub id or local folder of the model θ_0."}
    )
    head: str = field(
        default="zero_shot",
        metadata={
            "help": "`zero_shot`: a CLIP model, vision tower fine-tuned under a frozen head of text embeddings of the "
            "class names (the paper). `linear`: an AutoModelForImageClassification with a trained linear head."
        },
    )
    templates: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompt templates of the zero-shot head, with `{}` for the class name (default: hf_magmax's)."
        },
    )
    dataset_name: str = field(
        default="uoft-cs/cifar100",
        metadata={"help": "Hub dataset id, a `save_to_disk` folder, an imagefolder, or a data file."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="test", metadata={"help": "Evaluation split (one test set per task)."})
    image_column: str = field(default="img", metadata={"help": "Column holding the images."})
    label_column: str = field(default="fine_label", metadata={"help": "Column holding the class ids."})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Class names in label-id order (default: the ClassLabel feature's names)."}
    )
    scenario: str = field(
        default="class_incremental", metadata={"help": "`class_incremental` or `domain_incremental`."}
    )
    num_tasks: int | None = field(default=10, metadata={"help": "Class-incremental: number of tasks."})
    classes_per_task: list[int] | None = field(
        default=None,
        metadata={"help": "Class-incremental: classes in each task, for uneven splits (e.g. 196 Cars classes)."},
    )
    class_order: list[int] | None = field(
        default=None,
        metadata={"help": "Class-incremental: class ids in task order (default: shuffled with `split_seed`)."},
    )
    split_seed: int | None = field(
        default=5,
        metadata={"help": "Seed of the class order when `class_order` is not given; null keeps sorted order."},
    )
    domain_column: str | None = field(default=None, metadata={"help": "Domain-incremental: column of the domains."})
    domain_order: list[str] | None = field(default=None, metadata={"help": "Domain-incremental: domains in order."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap the training examples (quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap the evaluation examples."})

    def __post_init__(self):
        if self.head not in ("zero_shot", "linear"):
            raise ValueError(f"`head` must be 'zero_shot' or 'linear', got {self.head!r}.")
        if self.scenario not in ("class_incremental", "domain_incremental"):
            raise ValueError(f"`scenario` must be 'class_incremental' or 'domain_incremental', got {self.scenario!r}.")
        if self.scenario == "class_incremental" and not self.num_tasks and not self.class_order:
            raise ValueError("`num_tasks` must be at least 1 for a class-incremental split (the task list is empty).")
        if self.scenario == "domain_incremental" and not self.domain_column:
            raise ValueError("`scenario: domain_incremental` needs `domain_column` (the column holding the domain).")
        if self.domain_order is not None and len(self.domain_order) == 0:
            raise ValueError("`domain_order` is empty: list at least one domain, or leave it unset for all domains.")


def check_model(args: ScriptArguments):
    """Fail before any data or weights are loaded when the model lacks what `head` needs."""
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    if args.head == "zero_shot":
        if getattr(config, "text_config", None) is None or getattr(config, "vision_config", None) is None:
            raise ValueError(
                f"`model_name_or_path` {args.model_name_or_path!r} is a {config.model_type!r} model without a text "
                "tower: the zero-shot head is built from CLIP's text tower. Use a CLIP checkpoint (both towers, e.g. "
                "openai/clip-vit-base-patch16) or set `head: linear`."
            )
    else:
        from transformers import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

        if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
            raise ValueError(
                f"`model_name_or_path` {args.model_name_or_path!r} ({config.model_type!r}) has no image-classification "
                "head class (AutoModelForImageClassification); use e.g. a ViT checkpoint, or `head: zero_shot` with CLIP."
            )
    return config


def load_data(args: ScriptArguments, training_args):
    required = {"image_column": args.image_column, "label_column": args.label_column}
    if args.scenario == "domain_incremental":
        required["domain_column"] = args.domain_column
    features = dataset_features(args.dataset_name, args.dataset_config)
    if features is not None:
        check_columns(features, required, f"dataset {args.dataset_name!r}")
    with training_args.main_process_first(desc="loading the dataset"):
        train = load_split(args.dataset_name, args.train_split, args.dataset_config)
        test = load_split(args.dataset_name, args.eval_split, args.dataset_config)
    for split, ds in (("train", train), ("eval", test)):
        check_columns(ds.column_names, required, f"dataset {args.dataset_name!r} ({split} split)")
    if args.max_train_samples:
        train = train.shuffle(seed=training_args.seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        test = test.shuffle(seed=training_args.seed).select(range(min(args.max_eval_samples, len(test))))
    label_names = args.class_names
    if label_names is None:
        feature = train.features[args.label_column]
        if not hasattr(feature, "names"):
            raise ValueError(
                f"column {args.label_column!r} is not a ClassLabel, so the class names are unknown: give `class_names`."
            )
        label_names = list(feature.names)
    label_names = [n.replace("_", " ") for n in check_label_names(label_names)]
    if args.scenario == "class_incremental":
        split = class_incremental_split(
            train,
            label_column=args.label_column,
            num_tasks=args.num_tasks,
            classes_per_task=args.classes_per_task,
            class_order=args.class_order,
            seed=args.split_seed,
        )
    else:
        domain_order, task_names = _domain_ids(train, args.domain_column, args.domain_order)
        split = domain_incremental_split(
            train, args.domain_column, domain_order=domain_order, label_column=args.label_column, task_names=task_names
        )
    if len(split) == 0:
        raise ValueError("the split produced no tasks: check `num_tasks`, `class_order` or `domain_order`.")
    return split, split.apply_to(test), label_names


def _domain_ids(train, domain_column: str, domain_order: list[str] | None):
    """`domain_order` and the task names for `domain_incremental_split`.

    A `ClassLabel` domain column (e.g. `wltjr1007/DomainNet`) stores ids: `domain_order` then lists its label names,
    mapped to the stored ids, and the tasks are named by those names. Any other column is used as it is.
    """
    feature = train.features[domain_column]
    if not hasattr(feature, "names"):
        return domain_order, None
    if domain_order is None:
        ids = sorted(set(train.with_format(None)[domain_column]))
    else:
        unknown = [d for d in domain_order if d not in feature.names]
        if unknown:
            raise ValueError(
                f"`domain_order` lists {unknown}, which the ClassLabel column {domain_column!r} does not name; its "
                f"domains are {feature.names}."
            )
        ids = [feature.str2int(d) for d in domain_order]
    return ids, [feature.int2str(i) for i in ids]


def build_model(args: ScriptArguments, config, label_names: list[str]):
    if args.head == "zero_shot":
        from transformers import CLIPModel

        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        clip = CLIPModel.from_pretrained(args.model_name_or_path)
        kwargs = {"templates": args.templates} if args.templates else {}
        # only the vision tower and its projection are kept: they are what is fine-tuned, merged and saved
        return CLIPZeroShotClassifier(clip, tokenizer, label_names, **kwargs)
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        ignore_mismatched_sizes=True,
    )


def make_transform(args: ScriptArguments, image_processor):
    def transform(batch):
        images = [image.convert("RGB") for image in batch[args.image_column]]
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.tensor(batch[args.label_column], dtype=torch.long)}

    return transform


def collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.stack([e["labels"] for e in examples]),
    }


def main(argv=None):
    script_args, training_args = parse_recipe_args((ScriptArguments, MagMaxConfig), argv)
    setup_logging(training_args)
    check_launch(training_args)
    set_seed(training_args.seed)
    logger.info("script arguments %s", script_args)

    config = check_model(script_args)
    train_split, test_split, label_names = load_data(script_args, training_args)
    logger.info("%d tasks: %s", len(train_split), [(t.name, len(t.dataset)) for t in train_split])

    image_processor = AutoImageProcessor.from_pretrained(script_args.model_name_or_path)
    transform = make_transform(script_args, image_processor)
    train_datasets = {t.name: t.dataset.with_transform(transform) for t in train_split}
    eval_datasets = {t.name: t.dataset.with_transform(transform) for t in test_split}
    model = build_model(script_args, config, label_names)

    trainer = MagMaxTrainer(
        model=model,
        args=training_args,
        data_collator=collate,
        processing_class=image_processor,
        compute_metrics=accuracy_compute_metrics,
        train_datasets=train_datasets,
        eval_datasets=eval_datasets,
        task_classes=train_split.task_classes if script_args.scenario == "class_incremental" else None,
    )
    trainer.train(resume_from_checkpoint=resume_argument(training_args))
    trainer.save_model(training_args.output_dir)
    finish_run(trainer, training_args, script_args, label_names, recipe="continual_image_classification")


if __name__ == "__main__":
    main()
    end_launch()
