# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Tiny offline models, tokenizers and data in the real formats, for the recipe and TRACE tests."""

from __future__ import annotations

import json
import os

from hf_magmax.trace import TRACE_TASKS


#: Example records per TRACE task, in the style of the real data (prompt with an instruction, short answer).
TRACE_EXAMPLES = {
    "C-STANCE": [
        ("判断以下文本对目标的立场。文本：支持 目标：政策 答案：", "A"),
        ("文本：反对 目标：计划 答案：", "B"),
    ],
    "FOMC": [
        ("What is the monetary policy stance? Text: rates rise. Answer:", "A"),
        ("Text: rates fall. Answer:", "B"),
    ],
    "MeetingBank": [("Summarize the meeting: the council approved the budget.", "council approved budget")] * 2,
    "Py150": [("<s> def add ( a , b ) : return", "a + b"), ("<s> x = <NUM_LIT> ; y =", "x + <NUM_LIT>")],
    "ScienceQA": [
        ("Question: which is a mammal? Options: A. cat B. fish Answer:", "A"),
        ("Which is hot? A. ice B. fire", "B"),
    ],
    "NumGLUE-cm": [("If you have 2 apples and get 3 more, how many? Answer:", "5"), ("4 minus 1? Answer:", "3")],
    "NumGLUE-ds": [("A train goes 60 km in 1 hour. Speed? Answer:", "60"), ("Double 7? Answer:", "14")],
    "20Minuten": [
        ("Vereinfache: Der Bundesrat hat heute neue Regeln beschlossen.", "Der Bundesrat hat neue Regeln."),
        ("Vereinfache: Es regnet in Zürich seit Tagen.", "Es regnet in Zürich."),
    ],
}


def make_trace_dir(root: str, tasks=TRACE_TASKS, copies: int = 2) -> str:
    """Write a TRACE-layout folder: `<root>/<task>/{train,eval,test}.json`, JSON lists of `{"prompt", "answer"}`."""
    for task in tasks:
        os.makedirs(os.path.join(root, task), exist_ok=True)
        records = [{"prompt": p, "answer": a} for p, a in TRACE_EXAMPLES[task]] * copies
        for split in ("train", "eval", "test"):
            with open(os.path.join(root, task, f"{split}.json"), "w", encoding="utf-8") as f:
                json.dump(records, f, ensure_ascii=False)
    return root


def trace_corpus() -> list[str]:
    return [p + " " + a for examples in TRACE_EXAMPLES.values() for p, a in examples]


def make_tokenizer(corpus: list[str], vocab_size: int = 300, wrap: bool = False):
    """A byte-level BPE tokenizer trained in code, wrapped in `PreTrainedTokenizerFast` (BOS/EOS/PAD/UNK set).

    `wrap=True` adds BOS and EOS around every text (CLIP's text tower pools at the EOS token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if wrap:
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_llama(path: str, corpus: list[str] | None = None) -> str:
    """Save a 2-layer, hidden-32 Llama and its trained tokenizer to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(corpus or trace_corpus())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TEXT_CORPUS = [
    "the movie was great and fun",
    "terrible plot and bad acting",
    "stocks rose on strong earnings",
    "the team won the final match",
    "new phone released with fast chip",
    "i loved every minute of it",
]


def make_tiny_bert(path: str) -> str:
    """Save a 1-layer, hidden-32 BERT (no head: the recipe adds one) and a trained WordPiece-like tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = make_tokenizer(TEXT_CORPUS * 3, vocab_size=280)
    tokenizer.add_special_tokens({"cls_token": "<s>", "sep_token": "</s>"})
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_text_dataset(path: str, labels: list[str], n_per_class: int = 4, text_column: str = "text") -> str:
    """A text-classification dataset saved with `save_to_disk` (train and test splits, a ClassLabel column)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    texts, ys = [], []
    for y in range(len(labels)):
        for i in range(n_per_class):
            texts.append(f"{TEXT_CORPUS[(y + i) % len(TEXT_CORPUS)]} {labels[y]}")
            ys.append(y)
    features = Features({text_column: Value("string"), "label": ClassLabel(names=labels)})
    ds = Dataset.from_dict({text_column: texts, "label": ys}, features=features)
    DatasetDict({"train": ds, "test": ds}).save_to_disk(path)
    return path


def make_image_dataset(path: str, num_classes: int = 4, n_per_class: int = 3, size: int = 32) -> str:
    """An image dataset like `uoft-cs/cifar100` (columns `img` (Image) and `fine_label` (ClassLabel)), on disk.

    A `domain` column ("photo" / "sketch", alternating) serves the domain-incremental scenario.
    """
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.RandomState(0)
    names = ["apple", "bicycle", "castle", "dolphin", "eagle", "forest"][:num_classes]
    images, labels = [], []
    for y in range(num_classes):
        for _ in range(n_per_class):
            base = np.full((size, size, 3), 40 * y, dtype=np.uint8)
            noise = rng.randint(0, 30, size=(size, size, 3)).astype(np.uint8)
            images.append(PILImage.fromarray(base + noise))
            labels.append(y)
    domains = ["photo" if i % 2 == 0 else "sketch" for i in range(len(labels))]
    features = Features({"img": Image(), "fine_label": ClassLabel(names=names), "domain": Value("string")})
    ds = Dataset.from_dict({"img": images, "fine_label": labels, "domain": domains}, features=features)
    DatasetDict({"train": ds, "test": ds}).save_to_disk(path)
    return path


def make_tiny_clip(path: str) -> str:
    """Save a tiny `CLIPModel` (both towers), a trained tokenizer and a `CLIPImageProcessor` to `path`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    names = "apple bicycle castle dolphin eagle forest".split()
    tokenizer = make_tokenizer(["a photo of a " + n for n in names], wrap=True)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def make_tiny_vit(path: str) -> str:
    """Save a tiny `ViTForImageClassification` backbone and its image processor to `path`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# --- the O-LoRA-lineage LLM benchmarks (Standard CL, Long-15, SuperNI-15) ---------------------------------------------

#: A sentence per O-LoRA task type, in the style of the release's records (`sentence` field).
OLORA_SENTENCES = {
    "TC": "Title: {word} news\nText: the {word} story of the day.\n",
    "SC": "Title: {word}\nText: this {word} product is what I expected.\n",
    "NLI": "sentence 1: the {word} is here.\nsentence 2: the {word} is there.",
    "QQP": "first sentence: what is a {word}?\nsecond sentence: what is the {word}?",
    "BoolQA": "question: is the {word} red\npassage: the {word} is red.",
    "COPA": 'Which sentence is the effect of "The {word} fell."? Choose one between A and B.\nA: It broke.\nB: It sang.',
    "MultiRC": "paragraph: the {word} is red.\nquestion: what color?\nanswer: red",
    "WiC": "word: {word}\nthe {word} is here.\nthe {word} is there.",
}


def make_olora_benchmark(root: str, tasks, per_split: int = 4) -> str:
    """Write O-LoRA's `CL_Benchmark` layout: `<root>/<task type>/<task>/{train,dev,test}.json` (JSON lists of
    `{"sentence", "label"}`) and `labels.json` (the release's label set), for each task."""
    from hf_magmax.extras.llm_cl import OLORA_LABELS, OLORA_TASK_TYPES

    for task in tasks:
        task_type = OLORA_TASK_TYPES[task]
        folder = os.path.join(root, task_type, task)
        os.makedirs(folder, exist_ok=True)
        labels = list(OLORA_LABELS[task])
        with open(os.path.join(folder, "labels.json"), "w", encoding="utf-8") as f:
            json.dump(labels, f)
        records = [
            {"label": labels[i % len(labels)], "sentence": OLORA_SENTENCES[task_type].format(word=f"{task} {i}")}
            for i in range(per_split)
        ]
        for split in ("train", "dev", "test"):
            with open(os.path.join(folder, f"{split}.json"), "w", encoding="utf-8") as f:
                json.dump(records, f, ensure_ascii=False)
    return root


def make_superni_benchmark(root: str, tasks, per_split: int = 3) -> str:
    """Write SAPT's SuperNI layout: `<root>/SuperNI/<task>/{train,dev,test}.json`, each one SuperNI task object
    (`Definition`, `Positive Examples`, `Instances` of `{"id", "input", "output"}`; `output` a list of references)."""
    for task in tasks:
        folder = os.path.join(root, "SuperNI", task)
        os.makedirs(folder, exist_ok=True)
        instances = [
            {
                "id": f"{task}-{i}",
                "input": f"the {task.split('_')[1]} text {i}",
                "output": [f"answer {i}", f"reply {i}"],
            }
            for i in range(per_split)
        ]
        payload = {
            "Definition": [f"In this task you answer the {task.split('_')[1]} question. "],
            "Positive Examples": [{"input": "x", "output": "y", "explanation": "z"}],
            "Negative Examples": [],
            "Instances": instances,
        }
        for split in ("train", "dev", "test"):
            with open(os.path.join(folder, f"{split}.json"), "w", encoding="utf-8") as f:
                json.dump(payload, f)
    return root


def llm_cl_corpus() -> list[str]:
    """Texts to train the tiny tokenizer of the LLM-benchmark tests on (prompts and labels of the formats above)."""
    from hf_magmax.extras.llm_cl import OLORA_INSTRUCTIONS, OLORA_LABELS

    texts = list(OLORA_INSTRUCTIONS.values()) + [", ".join(labels) for labels in OLORA_LABELS.values()]
    texts += [s.format(word="word") for s in OLORA_SENTENCES.values()]
    return texts + ["Definition: In this task you answer Now complete the following example - Input: Output: answer"]
