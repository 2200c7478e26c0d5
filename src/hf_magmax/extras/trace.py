# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""TRACE: continual instruction tuning of LLMs (Wang et al., 2023, arXiv:2310.06762).

Data, collation, generation and scoring as the TRACE benchmark defines them, so that sequential fine-tuning and MagMax
can be compared with TRACE's published numbers:

- data: eight tasks in a fixed order ([`TRACE_TASKS`]), read from TRACE's own layout
  `<root>/<task>/{train,eval,test}.json`, each file a JSON list of `{"prompt": ..., "answer": ...}`
  ([`load_trace`], from a local folder or a Hub dataset repository);
- collation ([`TraceDataCollator`]): `BOS + prompt + answer + EOS`, the prompt tokens masked with `-100`, no chat
  template, left padding (TRACE pads decoder-only models on the left for training and generation);
- scoring ([`score_trace_task`]): exact match for C-STANCE, FOMC, NumGLUE-cm and NumGLUE-ds; the answer letter for
  ScienceQA; ROUGE-L F1 for MeetingBank; edit similarity (fuzzy ratio) for Py150; SARI for 20Minuten; every score in
  `[0, 100]`;
- the continual summary ([`trace_summary`]): OP, the mean score over all tasks after the last one, and BWT, the mean
  change on the first `T - 1` tasks between learning them and the end (denominator `T - 1`).

The metrics also load as one local `evaluate` module, `evaluate.load(metric_module_path("trace"), "Py150")`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


logger = logging.getLogger(__name__)

__all__ = [
    "TRACE_LORA_EPOCHS",
    "TRACE_SPLITS",
    "TRACE_TASKS",
    "TRACE_TASK_METRICS",
    "TraceDataCollator",
    "check_trace_root",
    "edit_similarity",
    "exact_match",
    "first_char_match",
    "generate_trace_predictions",
    "load_trace",
    "load_trace_split",
    "resolve_trace_root",
    "rouge_l",
    "sari",
    "score_trace_task",
    "trace_summary",
]

#: The eight TRACE tasks, in the order they are learned (the folder names of TRACE's data release).
TRACE_TASKS: tuple[str, ...] = (
    "C-STANCE",
    "FOMC",
    "MeetingBank",
    "Py150",
    "ScienceQA",
    "NumGLUE-cm",
    "NumGLUE-ds",
    "20Minuten",
)

#: The three files of every task folder.
TRACE_SPLITS: tuple[str, ...] = ("train", "eval", "test")

#: The metric TRACE scores each task with (a key of the functions in this module).
TRACE_TASK_METRICS: dict[str, str] = {
    "C-STANCE": "exact_match",
    "FOMC": "exact_match",
    "MeetingBank": "rouge_l",
    "Py150": "edit_similarity",
    "ScienceQA": "first_char_match",
    "NumGLUE-cm": "exact_match",
    "NumGLUE-ds": "exact_match",
    "20Minuten": "sari",
}

#: Epochs per task of TRACE's LoRA setting (r 8, alpha 32, dropout 0.1 on q/v, lr 1e-4).
TRACE_LORA_EPOCHS: dict[str, int] = {
    "C-STANCE": 5,
    "FOMC": 3,
    "MeetingBank": 7,
    "Py150": 5,
    "ScienceQA": 3,
    "NumGLUE-cm": 5,
    "NumGLUE-ds": 5,
    "20Minuten": 7,
}


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def check_trace_root(root: str, tasks: Sequence[str] = TRACE_TASKS, splits: Sequence[str] = TRACE_SPLITS) -> None:
    """Check that `root` holds `<task>/<split>.json` for every task and split; raise one error listing what is missing.

    Args:
        root (`str`):
            The TRACE data folder.
        tasks (`Sequence[str]`, *optional*, defaults to [`TRACE_TASKS`]):
            The task folders that must exist.
        splits (`Sequence[str]`, *optional*, defaults to `("train", "eval", "test")`):
            The files every task folder must hold (without `.json`).

    Raises:
        `ValueError`: no task given.
        `FileNotFoundError`: `root`, a task folder or a file is missing; the message lists every missing path.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("`tasks` is empty: give at least one TRACE task, e.g. `tasks: [C-STANCE, FOMC]`.")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"TRACE data folder {root!r} does not exist: pass `data_path` = a folder or repo id.")
    missing_dirs = [t for t in tasks if not os.path.isdir(os.path.join(root, t))]
    if missing_dirs:
        present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise FileNotFoundError(
            f"TRACE data folder {root!r} has no task folder for {', '.join(missing_dirs)} (found: "
            f"{', '.join(present) or 'none'}). TRACE's layout is `<root>/<task>/{{train,eval,test}}.json`; download "
            "the full release or restrict `tasks` to the folders you have."
        )
    missing_files = [
        os.path.join(t, f"{s}.json")
        for t in tasks
        for s in splits
        if not os.path.isfile(os.path.join(root, t, f"{s}.json"))
    ]
    if missing_files:
        raise FileNotFoundError(
            f"TRACE data folder {root!r} is missing {', '.join(missing_files)}. Every task folder needs "
            f"{', '.join(s + '.json' for s in splits)} (a JSON list of {{'prompt', 'answer'}} records)."
        )


def resolve_trace_root(
    data_path: str,
    tasks: Sequence[str] = TRACE_TASKS,
    splits: Sequence[str] = TRACE_SPLITS,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """Return a local folder with TRACE's layout: `data_path` itself, or a snapshot of the Hub dataset repo it names.

    Only the files of the requested tasks and splits are downloaded. The folder is checked with
    [`check_trace_root`] before it is returned, so a missing task or file fails here, before any training.

    Args:
        data_path (`str`):
            A local folder `<root>` with `<root>/<task>/{train,eval,test}.json`, or a Hub dataset repo id with the
            same layout.
        tasks (`Sequence[str]`, *optional*, defaults to [`TRACE_TASKS`]):
            The tasks needed.
        splits (`Sequence[str]`, *optional*, defaults to `("train", "eval", "test")`):
            The splits needed.
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit) of the dataset repo.
        cache_dir (`str`, *optional*):
            Hub cache folder.

    Returns:
        `str`: the local data folder.
    """
    if os.path.isdir(data_path):
        root = data_path
    elif data_path.startswith((".", "/", "~")) or data_path.count("/") > 1:
        raise FileNotFoundError(
            f"TRACE `data_path` {data_path!r} is not an existing folder and not a Hub repo id (`owner/name`)."
        )
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        patterns = [f"{t}/{s}.json" for t in tasks for s in splits]
        try:
            root = snapshot_download(
                repo_id=data_path,
                repo_type="dataset",
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=patterns,
            )
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
            raise FileNotFoundError(
                f"TRACE `data_path` {data_path!r} is not a local folder and the Hub dataset repo could not be fetched "
                f"({type(err).__name__}: the Hub is offline or unreachable and the files are not cached). Pass a "
                "local folder with `<task>/{train,eval,test}.json`, or run once online."
            ) from err
    check_trace_root(root, tasks, splits)
    return root


def load_trace_split(root: str, task: str, split: str, max_samples: int | None = None):
    """Read `<root>/<task>/<split>.json` into a `datasets.Dataset` with string columns `prompt` and `answer`.

    Args:
        root (`str`):
            The TRACE data folder.
        task (`str`):
            The task folder, e.g. `"FOMC"`.
        split (`str`):
            `"train"`, `"eval"` or `"test"`.
        max_samples (`int`, *optional*):
            Keep only the first `max_samples` records (quick runs); all by default.

    Returns:
        `datasets.Dataset`: one row per record, in file order.
    """
    from datasets import Dataset

    path = os.path.join(root, task, f"{split}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TRACE file {path} does not exist; check `data_path` and the task name {task!r}.")
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"TRACE file {path} is not valid JSON ({err}); it must be a JSON list of records."
            ) from err
    if not isinstance(records, list):
        raise ValueError(f"TRACE file {path} must hold a JSON list of {{'prompt', 'answer'}} records.")
    if max_samples is not None:
        records = records[:max_samples]
    prompts, answers = [], []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or "prompt" not in record or "answer" not in record:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(f"record {i} of {path} must have the keys 'prompt' and 'answer', got {keys}.")
        prompts.append(str(record["prompt"]))
        answers.append(str(record["answer"]))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def load_trace(
    data_path: str,
    tasks: Sequence[str] | None = None,
    splits: Sequence[str] = TRACE_SPLITS,
    max_samples: int | Mapping[str, int] | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Load TRACE: `{task: DatasetDict(train=..., eval=..., test=...)}` in task order.

    Sizes are read from the files, never assumed.

    Args:
        data_path (`str`):
            Local folder or Hub dataset repo id with `<task>/{train,eval,test}.json`.
        tasks (`Sequence[str]`, *optional*):
            Tasks in learning order; defaults to the eight of [`TRACE_TASKS`].
        splits (`Sequence[str]`, *optional*, defaults to `("train", "eval", "test")`):
            The splits to read.
        max_samples (`int` or `dict[str, int]`, *optional*):
            Cap per split (one number, or one per split name), for quick runs.
        revision (`str`, *optional*):
            Hub revision.
        cache_dir (`str`, *optional*):
            Hub cache folder.

    Returns:
        `dict[str, datasets.DatasetDict]`: the tasks in order.

    Example:

    ```python
    >>> from hf_magmax.extras.trace import load_trace
    >>> trace = load_trace("path/to/TRACE-Benchmark/LLM-CL-Benchmark_5000")  # doctest: +SKIP
    >>> list(trace)  # doctest: +SKIP
    ['C-STANCE', 'FOMC', 'MeetingBank', 'Py150', 'ScienceQA', 'NumGLUE-cm', 'NumGLUE-ds', '20Minuten']
    ```
    """
    from datasets import DatasetDict

    tasks = list(TRACE_TASKS if tasks is None else tasks)
    root = resolve_trace_root(data_path, tasks, splits, revision=revision, cache_dir=cache_dir)
    out = {}
    for task in tasks:
        parts = {}
        for split in splits:
            cap = max_samples.get(split) if isinstance(max_samples, Mapping) else max_samples
            parts[split] = load_trace_split(root, task, split, cap)
        out[task] = DatasetDict(parts)
        logger.info("TRACE %s: %s", task, {s: len(d) for s, d in parts.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Collation and generation
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TraceDataCollator:
    """Collate TRACE records as TRACE does: `BOS + prompt + answer + EOS`, prompt masked, left padding.

    Features are dicts with the strings `prompt` and `answer` (keep them: `remove_unused_columns=False`). No chat
    template is applied. The prompt is truncated from the left to `max_prompt_len` tokens (TRACE's truncation side),
    the answer from the right to `max_answer_len`. Labels are `-100` on BOS, the prompt and the padding.

    With `inference=True` the batch is `BOS + prompt` only (left padded, ready for `generate`).

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer. Its `pad_token` is used for padding, or `eos_token` when it has none.
        max_prompt_len (`int`, *optional*, defaults to 1024):
            Maximum prompt tokens (TRACE: 1024).
        max_answer_len (`int`, *optional*, defaults to 512):
            Maximum answer tokens, EOS excluded (TRACE: 512).
        inference (`bool`, *optional*, defaults to `False`):
            Build prompts for generation instead of training sequences.
        pad_to_multiple_of (`int`, *optional*):
            Pad the length to a multiple of this.
        label_pad_token_id (`int`, *optional*, defaults to -100):
            The ignored label id.

    Example:

    ```python
    >>> collator = TraceDataCollator(tokenizer)  # doctest: +SKIP
    >>> batch = collator([{"prompt": "Q: 1+1? A:", "answer": " 2"}])  # doctest: +SKIP
    >>> sorted(batch)  # doctest: +SKIP
    ['attention_mask', 'input_ids', 'labels']
    ```
    """

    tokenizer: Any
    max_prompt_len: int = 1024
    max_answer_len: int = 512
    inference: bool = False
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100

    def __post_init__(self):
        if self.max_prompt_len < 1 or self.max_answer_len < 1:
            raise ValueError(
                f"`max_prompt_len` ({self.max_prompt_len}) and `max_answer_len` ({self.max_answer_len}) must be >= 1."
            )
        if self.tokenizer.eos_token_id is None and not self.inference:
            raise ValueError("the tokenizer has no `eos_token`: TRACE sequences end with EOS; set one first.")

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        if tok.eos_token_id is not None:
            return tok.eos_token_id
        raise ValueError("the tokenizer has neither `pad_token` nor `eos_token`: set `tokenizer.pad_token` first.")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        sequences, label_rows = [], []
        for i, feature in enumerate(features):
            if "prompt" not in feature or (not self.inference and "answer" not in feature):
                raise KeyError(
                    f"feature {i} has keys {sorted(feature)}, TraceDataCollator needs 'prompt' and 'answer'; set "
                    "`remove_unused_columns=False` so the Trainer keeps the raw text columns."
                )
            prompt = self._encode(feature["prompt"])[-self.max_prompt_len :]  # left truncation
            if self.inference:
                sequences.append(bos + prompt)
                continue
            answer = self._encode(feature["answer"])[: self.max_answer_len] + [self.tokenizer.eos_token_id]
            sequences.append(bos + prompt + answer)
            label_rows.append([self.label_pad_token_id] * (len(bos) + len(prompt)) + answer)
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.pad_token_id
        input_ids = [[pad] * (length - len(s)) + s for s in sequences]  # left padding
        attention_mask = [[0] * (length - len(s)) + [1] * len(s) for s in sequences]
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }
        if not self.inference:
            labels = [[self.label_pad_token_id] * (length - len(r)) + r for r in label_rows]
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def generate_trace_predictions(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_prompt_len: int = 1024,
    **generate_kwargs,
) -> list[str]:
    """Generate one answer per prompt (greedy by default), as TRACE decodes: the new tokens only, special tokens skipped.

    Under `torch.distributed` the prompts are split across processes (each process generates its share, all
    processes take part in every step so FSDP / ZeRO-3 shards stay in lockstep) and gathered; every process returns
    the full list in the input order.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            A causal LM.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        prompts (`Sequence[str]`):
            The prompts (TRACE's `prompt` field).
        batch_size (`int`, *optional*, defaults to 8):
            Prompts per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 256):
            Maximum answer length (TRACE: `max_ans_len`).
        max_prompt_len (`int`, *optional*, defaults to 1024):
            Prompts are truncated from the left to this many tokens.
        generate_kwargs:
            More `generate` arguments, e.g. `do_sample=True, temperature=0.1` (TRACE's sampling).

    Returns:
        `list[str]`: the decoded answers, one per prompt.
    """
    import torch
    import torch.distributed as dist

    collator = TraceDataCollator(tokenizer, max_prompt_len=max_prompt_len, inference=True)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    indices = list(range(len(prompts)))
    shard = indices[rank::world]
    # Every rank runs the same number of generate calls (pad the shard by repeating its last prompt).
    num_batches = math.ceil(math.ceil(len(prompts) / world) / batch_size) if prompts else 0
    device = next(model.parameters()).device
    pad_id = collator.pad_token_id
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", pad_id)
    if tokenizer.eos_token_id is not None:
        generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    outputs: list[tuple[int, str]] = []
    with torch.no_grad():
        for b in range(num_batches):
            ids = shard[b * batch_size : (b + 1) * batch_size]
            real = len(ids)
            if real < batch_size and world > 1:
                ids = ids + [shard[-1] if shard else 0] * (batch_size - real)
            if not ids:
                ids = [0]
            batch = collator([{"prompt": prompts[i]} for i in ids])
            batch = {k: v.to(device) for k, v in batch.items()}
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
            texts = tokenizer.batch_decode(
                generated[:, batch["input_ids"].shape[1] :],
                skip_special_tokens=True,
                clean_up_tokenization_spaces=False,
            )
            outputs.extend(zip(ids[:real], texts[:real]))
    if was_training:
        model.train()
    if world > 1:
        gathered: list[list[tuple[int, str]]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, outputs)
        outputs = [pair for part in gathered for pair in part]
    by_index = dict(outputs)
    return [by_index[i] for i in indices]


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (every score in [0, 100]; empty predictions or references score 0, as TRACE's code does)
# ---------------------------------------------------------------------------------------------------------------------


def _check_lengths(predictions: Sequence[str], references: Sequence[Any], name: str = "references") -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} {name}; pass one per example.")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions equal to their reference after stripping surrounding whitespace.

    TRACE's accuracy for C-STANCE, FOMC, NumGLUE-cm and NumGLUE-ds (an empty prediction counts as wrong).

    Example:

    ```python
    >>> exact_match(["A", " B", "C"], ["A", "B", "D"])
    66.66666666666667
    ```
    """
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(1 for p, r in zip(predictions, references) if p.strip() and p.strip() == r.strip())
    return 100.0 * hits / len(predictions)


def _answer_letter(text: str) -> str:
    """TRACE's ScienceQA answer: the character after `"Answer: "` when present, else the first non-space character."""
    pos = text.find("Answer: ")
    if pos != -1:
        return text[pos + 8 : pos + 9]
    text = text.strip()
    return text[:1]


def first_char_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions whose answer letter equals the reference's (TRACE's ScienceQA accuracy).

    The letter is the character after `"Answer: "` when the text has it (TRACE's `resolve`), else the first
    non-space character.

    Example:

    ```python
    >>> first_char_match(["B. because ...", "Answer: C", "A"], ["B", "Answer: A", "A"])
    66.66666666666667
    ```
    """
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = 0
    for p, r in zip(predictions, references):
        lp, lr = _answer_letter(p), _answer_letter(r)
        hits += bool(lp) and lp == lr
    return 100.0 * hits / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (`rouge-score`, no stemming), times 100. TRACE's MeetingBank metric.

    Example:

    ```python
    >>> rouge_l(["hello goodbye", "ankh morpork"], ["goodbye", "ankh morpork"])
    83.33333333333333
    ```
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError('ROUGE-L needs `rouge-score`: `pip install "hf_magmax[metrics]"`.') from err
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for p, r in zip(predictions, references):
        if p and r:
            total += scorer.score(r, p)["rougeL"].fmeasure
    return 100.0 * total / len(predictions)


_PY150_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def _py150_postprocess(code: str) -> str:
    """TRACE's Py150 post-processing: literal placeholders back to code (`<NUM_LIT>` → `0`, `<STR_LIT:x>` → `x`)."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _PY150_LITERAL.sub(lambda m: m.group(2), code)


def _fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio`: `round(100 · (1 − indel distance / (len(a) + len(b))))`, an integer."""
    try:
        from rapidfuzz import fuzz
    except ImportError as err:
        raise ImportError('edit similarity needs `rapidfuzz`: `pip install "hf_magmax[metrics]"`.') from err
    return int(round(fuzz.ratio(a, b)))


def edit_similarity(predictions: Sequence[str], references: Sequence[str], postprocess: bool = True) -> float:
    """Mean fuzzy ratio (fuzzywuzzy `fuzz.ratio` semantics: integer 0–100 per example). TRACE's Py150 metric.

    The ratio is computed with `rapidfuzz` (normalized indel similarity, the same as fuzzywuzzy with
    python-Levenshtein) and rounded to an integer per example as fuzzywuzzy does.

    Args:
        predictions (`Sequence[str]`): generated code.
        references (`Sequence[str]`): reference code.
        postprocess (`bool`, *optional*, defaults to `True`): apply TRACE's Py150 literal post-processing first.

    Example:

    ```python
    >>> edit_similarity(["this is a test"], ["this is a test!"])
    97.0
    ```
    """
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    total = 0
    for p, r in zip(predictions, references):
        if postprocess:
            p, r = _py150_postprocess(p), _py150_postprocess(r)
        if p and r:
            total += _fuzz_ratio(p, r)
    return float(total) / len(predictions)


# SARI, as Hugging Face's `sari` metric (tensor2tensor's SARI with 0/0 = 1 and the keep-score fix), on sentences
# lower-cased and tokenized with sacreBLEU's `13a` tokenizer (EASSE's normalization). Implemented here so it runs
# offline without sacrebleu.
_TOK_13A = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def _normalize_13a(sentence: str) -> str:
    line = sentence.lower()
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _TOK_13A:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _sari_ngram(sgrams: list[str], cgrams: list[str], rgramslist: list[list[str]], numref: int):
    rgramcounter = Counter(g for rgrams in rgramslist for g in rgrams)
    sgramcounter_rep = Counter({g: c * numref for g, c in Counter(sgrams).items()})
    cgramcounter_rep = Counter({g: c * numref for g, c in Counter(cgrams).items()})

    # keep
    keep_rep = sgramcounter_rep & cgramcounter_rep
    keep_good = keep_rep & rgramcounter
    keep_all = sgramcounter_rep & rgramcounter
    keep_p = sum(keep_good[g] / keep_rep[g] for g in keep_good) / len(keep_rep) if keep_rep else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0
    keep = 2 * keep_p * keep_r / (keep_p + keep_r) if keep_p + keep_r > 0 else 0.0

    # delete (precision only)
    del_rep = sgramcounter_rep - cgramcounter_rep
    del_good = del_rep - rgramcounter
    del_p = sum(del_good[g] / del_rep[g] for g in del_good) / len(del_rep) if del_rep else 1.0

    # add
    sset, cset, rset = set(sgramcounter_rep), set(cgramcounter_rep), set(rgramcounter)
    add = cset - sset
    add_good = add & rset
    add_all = rset - sset
    add_p = len(add_good) / len(add) if add else 1.0
    add_r = len(add_good) / len(add_all) if add_all else 1.0
    add_f = 2 * add_p * add_r / (add_p + add_r) if add_p + add_r > 0 else 0.0
    return keep, del_p, add_f


def _sari_sentence(source: str, prediction: str, references: list[str]) -> float:
    s1, c1 = source.split(" "), prediction.split(" ")
    r1 = [r.split(" ") for r in references]
    keeps, dels, adds = [], [], []
    for n in (1, 2, 3, 4):
        k, d, a = _sari_ngram(_ngrams(s1, n), _ngrams(c1, n), [_ngrams(r, n) for r in r1], len(references))
        keeps.append(k)
        dels.append(d)
        adds.append(a)
    return (sum(keeps) / 4 + sum(dels) / 4 + sum(adds) / 4) / 3


def sari(
    sources: Sequence[str], predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> float:
    """Corpus SARI in `[0, 100]` (mean of sentence SARI), as Hugging Face's `sari` metric. TRACE's 20Minuten metric.

    Sentences are lower-cased and tokenized with sacreBLEU's `13a` rules, then SARI (Xu et al., 2016) averages the
    keep F1, delete precision and add F1 over 1- to 4-grams, with tensor2tensor's conventions (0/0 = 1).

    Args:
        sources (`Sequence[str]`): the input texts.
        predictions (`Sequence[str]`): the simplifications.
        references (`Sequence[str]` or `Sequence[Sequence[str]]`): one reference, or a list of references, per example.

    Example:

    ```python
    >>> sari(
    ...     ["About 95 species are currently accepted."],
    ...     ["About 95 you now get in."],
    ...     [["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."]],
    ... )
    26.953601953601954
    ```
    """
    _check_lengths(predictions, references)
    _check_lengths(predictions, sources, "sources")
    if not predictions:
        return 0.0
    total = 0.0
    for src, pred, refs in zip(sources, predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        total += _sari_sentence(_normalize_13a(src), _normalize_13a(pred), [_normalize_13a(r) for r in refs])
    return 100.0 * total / len(predictions)


_METRIC_FUNCTIONS = {
    "exact_match": exact_match,
    "first_char_match": first_char_match,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
}


def score_trace_task(
    task: str,
    predictions: Sequence[str],
    references: Sequence[str],
    sources: Sequence[str] | None = None,
    metric: str | None = None,
) -> float:
    """Score one TRACE task with its metric ([`TRACE_TASK_METRICS`]); a score in `[0, 100]`.

    Args:
        task (`str`):
            A TRACE task name. Other names need `metric`.
        predictions (`Sequence[str]`):
            Generated answers.
        references (`Sequence[str]`):
            The `answer` fields.
        sources (`Sequence[str]`, *optional*):
            The `prompt` fields; required for SARI (20Minuten).
        metric (`str`, *optional*):
            Override the metric: `"exact_match"`, `"first_char_match"`, `"rouge_l"`, `"edit_similarity"` or `"sari"`.

    Returns:
        `float`: the score.
    """
    name = metric or TRACE_TASK_METRICS.get(task)
    if name is None:
        raise ValueError(
            f"unknown TRACE task {task!r}: known tasks are {', '.join(TRACE_TASK_METRICS)}; pass `metric=` for others."
        )
    if name == "sari":
        if sources is None:
            raise ValueError(f"task {task!r} is scored with SARI, which needs `sources` (the prompts).")
        return sari(sources, predictions, references)
    if name not in _METRIC_FUNCTIONS:
        raise ValueError(f"unknown TRACE metric {name!r}: use one of {', '.join([*_METRIC_FUNCTIONS, 'sari'])}.")
    return _METRIC_FUNCTIONS[name](predictions, references)


def trace_summary(matrix: Sequence[Sequence[float]] | np.ndarray) -> dict[str, float]:
    """TRACE's overall performance (OP) and backward transfer (BWT) from a score matrix.

    `OP = mean_i R[T, i]` and `BWT = 1 / (T − 1) · Σ_{i < T} (R[T, i] − R[i, i])`, with `R[t, i]` the score on task `i`
    after learning task `t`. The matrix is `T × T` (rows: after task 1..T) or `(T + 1) × T` with row 0 the base
    model θ_0 (hf_magmax's layout, which is dropped here).

    Args:
        matrix (`array-like`): the score matrix.

    Returns:
        `dict[str, float]`: `{"OP": ..., "BWT": ...}` in the matrix's unit (BWT is 0.0 for one task).

    Example:

    ```python
    >>> trace_summary([[50.0, 10.0], [40.0, 60.0]])
    {'OP': 50.0, 'BWT': -10.0}
    ```
    """
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 1 or array.shape[0] not in (array.shape[1], array.shape[1] + 1):
        raise ValueError(
            f"`matrix` must be T × T or (T + 1) × T (row 0 = θ_0), got shape {array.shape}; row t holds the scores "
            "after task t on every task."
        )
    if array.shape[0] == array.shape[1] + 1:
        array = array[1:]
    num_tasks = array.shape[1]
    op = float(array[-1].mean())
    bwt = 0.0
    if num_tasks > 1:
        bwt = float(sum(array[-1, i] - array[i, i] for i in range(num_tasks - 1)) / (num_tasks - 1))
    return {"OP": op, "BWT": bwt}
