# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The O-LoRA-lineage continual-learning benchmarks for LLMs: Standard CL, Long-15 and SuperNI-15.

Data layout, task orders, label sets, prompt format and scores as the public code of the benchmark defines them, so
that sequential fine-tuning and MagMax can be compared with published numbers (checked against the public code on
2026-12-05, see `recipes/README.md`):

- **Standard CL** (orders 1-3, 4 tasks) and **Long-15** (orders 4-6, 15 tasks): O-LoRA's `CL_Benchmark` folder
  (`cmnfriend/O-LoRA`), `<root>/<task type>/<task>/{train,dev,test}.json` (a JSON list of `{"sentence", "label"}`)
  and `<root>/<task type>/<task>/labels.json` (the label set, a JSON list of strings), e.g.
  `CL_Benchmark/TC/dbpedia/test.json`. Task types and task folders: [`OLORA_TASK_TYPES`].
- **SuperNI-15** (orders 7-8, 15 generation and classification tasks of Super-NaturalInstructions): SAPT's
  `CL_Benchmark/SuperNI` folder (`circle-hit/SAPT`), `<root>/SuperNI/<task>/{train,dev,test}.json`, each file one
  SuperNI task (`{"Definition": [...], "Instances": [{"id", "input", "output"}, ...], ...}`; `output` a string or a
  list of references).

Every task is read into a `datasets.Dataset` with the string columns `prompt` and `answer` (the training target) and
the list column `references` (what a generated answer is scored against), so one collator
([`~hf_magmax.extras.trace.TraceDataCollator`]: `BOS + prompt + answer + EOS`, the prompt masked) and one generation
loop serve all of them and TRACE. Scores are in `[0, 100]`: exact match after O-LoRA's normalization (lower case,
punctuation removed, whitespace collapsed) for the classification benchmarks, ROUGE-L F1 (`rouge-score`, Porter
stemmer, the best reference) for SuperNI.

The public API, also used by `benchmarks/continual_llm.py` on local corpora written in the same layout:

- orders: [`BENCHMARK_ORDERS`], [`TASK_ORDERS`], [`benchmark_of_order`];
- data: [`load_cl_task`], [`load_cl_benchmark`], [`find_task_dir`], [`resolve_cl_root`];
- prompts: [`olora_prompt`], [`superni_prompt`], [`extract_answer`];
- scores: [`normalize_answer`], [`exact_match`], [`rouge_l`], [`score_cl_task`], [`BENCHMARK_METRICS`];
- published numbers: [`PUBLISHED_RESULTS`], [`reference_table`];
- the run: [`~hf_magmax.extras.generation.GenerationMagMaxTrainer`] and
  [`~hf_magmax.extras.generation.run_continual_generation`].

Example:

```python
>>> from hf_magmax.extras.llm_cl import TASK_ORDERS, olora_prompt, exact_match
>>> TASK_ORDERS[1]
('dbpedia', 'amazon', 'yahoo', 'agnews')
>>> olora_prompt("Title: Hi\\nText: hello\\n", ["World", "Sports"], "TC", "agnews").splitlines()
['Task:TC', 'Dataset:agnews', 'What is the topic of the following paragraph? Choose one from the option.', \
'Option: World, Sports ', 'Title: Hi', 'Text: hello', '', 'Answer:']
>>> exact_match(["sports."], ["Sports"])
100.0
```
"""

from __future__ import annotations

import json
import logging
import os
import string
from collections.abc import Mapping, Sequence
from typing import Any


logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARK_METRICS",
    "BENCHMARK_ORDERS",
    "CL_SPLITS",
    "OLORA_INSTRUCTIONS",
    "OLORA_LABELS",
    "OLORA_TASK_TYPES",
    "PUBLISHED_RESULTS",
    "SUPERNI_TASKS",
    "TASK_ORDERS",
    "benchmark_of_order",
    "exact_match",
    "extract_answer",
    "find_task_dir",
    "load_cl_benchmark",
    "load_cl_task",
    "normalize_answer",
    "olora_prompt",
    "reference_table",
    "resolve_cl_root",
    "rouge_l",
    "score_cl_task",
    "superni_prompt",
    "summarize_runs",
]

#: The three split files of every task folder (O-LoRA and SAPT name the validation split `dev`).
CL_SPLITS: tuple[str, ...] = ("train", "dev", "test")

#: O-LoRA's task folders, `<root>/<task type>/<task>` (`cmnfriend/O-LoRA`, `CL_Benchmark/`).
OLORA_TASK_TYPES: dict[str, str] = {
    "dbpedia": "TC",
    "amazon": "SC",
    "yahoo": "TC",
    "agnews": "TC",
    "yelp": "SC",
    "IMDB": "SC",
    "SST-2": "SC",
    "MNLI": "NLI",
    "CB": "NLI",
    "RTE": "NLI",
    "QQP": "QQP",
    "BoolQA": "BoolQA",
    "COPA": "COPA",
    "MultiRC": "MultiRC",
    "WiC": "WiC",
}

#: O-LoRA's label set of every task (`CL_Benchmark/<task type>/<task>/labels.json`), in file order.
OLORA_LABELS: dict[str, tuple[str, ...]] = {
    "dbpedia": ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation")
    + ("Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"),
    "amazon": ("very negative", "negative", "neutral", "positive", "very positive"),
    "yahoo": ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet")
    + ("Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships", "Politics & Government"),
    "agnews": ("World", "Sports", "Business", "Science or Technology"),
    "yelp": ("very negative", "negative", "neutral", "positive", "very positive"),
    "IMDB": ("Good", "Bad"),
    "SST-2": ("Good", "Bad"),
    "MNLI": ("neutral", "entailment", "contradiction"),
    "CB": ("entailment", "contradiction", "neutral"),
    "RTE": ("contradiction", "entailment"),
    "QQP": ("False", "True"),
    "BoolQA": ("True", "False"),
    "COPA": ("A", "B"),
    "MultiRC": ("False", "True"),
    "WiC": ("True", "False"),
}

#: O-LoRA's zero-shot instruction of each task type (`configs/instruction_config.json`); COPA has none (its sentence
#: holds the question and both choices).
OLORA_INSTRUCTIONS: dict[str, str] = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the '
    "option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.\n',
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? Choose one "
    "from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? Choose one "
    "from the option.\n",
}

#: The 15 SuperNI tasks of SAPT's benchmark (`circle-hit/SAPT`, `CL_Benchmark/SuperNI/`), in order 7.
SUPERNI_TASKS: tuple[str, ...] = (
    "task1572_samsum_summary",
    "task363_sst2_polarity_classification",
    "task1290_xsum_summarization",
    "task181_outcome_extraction",
    "task002_quoref_answer_generation",
    "task1510_evalution_relation_extraction",
    "task639_multi_woz_user_utterance_generation",
    "task1729_personachat_generate_next",
    "task073_commonsenseqa_answer_generation",
    "task1590_diplomacy_text_generation",
    "task748_glucose_reverse_cause_event_detection",
    "task511_reddit_tifu_long_text_summarization",
    "task591_sciq_answer_generation",
    "task1687_sentiment140_classification",
    "task875_emotion_classification",
)

#: The task orders of the lineage, numbered as the papers number them: 1-3 Standard CL (O-LoRA `scripts/order_*.sh`),
#: 4-6 Long-15 (O-LoRA's paper; `configs/order{4,5,6}_configs` of O-LoRA forks; order 6 is O-LoRA's `scripts/long.sh`),
#: 7-8 SuperNI-15 (SAPT `gen_script_superni_*.py`, its orders 1 and 2).
TASK_ORDERS: dict[int, tuple[str, ...]] = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
    4: ("MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia", "agnews")
    + ("MultiRC", "yahoo"),
    5: ("MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yelp")
    + ("amazon", "yahoo"),
    6: ("yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo")
    + ("MultiRC", "BoolQA", "WiC"),
    7: SUPERNI_TASKS,
    8: (
        "task748_glucose_reverse_cause_event_detection",
        "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation",
        "task639_multi_woz_user_utterance_generation",
        "task1572_samsum_summary",
        "task1687_sentiment140_classification",
        "task591_sciq_answer_generation",
        "task363_sst2_polarity_classification",
        "task1510_evalution_relation_extraction",
        "task1729_personachat_generate_next",
        "task181_outcome_extraction",
        "task511_reddit_tifu_long_text_summarization",
        "task002_quoref_answer_generation",
        "task1290_xsum_summarization",
        "task875_emotion_classification",
    ),
}

#: The orders of each benchmark.
BENCHMARK_ORDERS: dict[str, tuple[int, ...]] = {"standard_cl": (1, 2, 3), "long15": (4, 5, 6), "superni": (7, 8)}

#: The score of each benchmark (a key of [`score_cl_task`]'s metrics).
BENCHMARK_METRICS: dict[str, str] = {"standard_cl": "exact_match", "long15": "exact_match", "superni": "rouge_l"}

_SLAO = "Merge before Forget (SLAO), ICLR 2026, arXiv:2512.23017"

#: Published average performance (final average score over all tasks in %, mean over the orders; TRACE: OP) to print
#: beside ours.
PUBLISHED_RESULTS: dict[str, dict[str, Any]] = {
    "standard_cl": {
        "source": _SLAO,
        "setting": "Llama-2-7B-chat, LoRA r 8 on q/v, 1 epoch per task, orders 1-3 x 3 seeds, exact match",
        "scores": {"MagMax": 80.3, "SeqLoRA": 76.0, "O-LoRA": 77.2, "SLAO": 80.4, "MTL": 80.9},
    },
    "long15": {
        "source": _SLAO,
        "setting": "Llama-2-7B-chat, LoRA r 8 on q/v, 1 epoch per task, orders 4-6 x 3 seeds, exact match",
        "scores": {"MagMax": 73.4, "SeqLoRA": 68.7, "SLAO": 74.8, "MTL": 78.1},
    },
    "superni": {
        "source": _SLAO,
        "setting": "Llama-2-7B-chat, LoRA r 8 on q/v, 1 epoch per task, orders 7-8 x 3 seeds, ROUGE-L",
        "scores": {"MagMax": 11.2, "SeqLoRA": 22.6, "SLAO": 37.2, "MTL": 45.2},
    },
    "trace_500": {
        "source": "MoRAM's TRACE-500 comparison as quoted in hf_magmax issue #20 (not checked against the paper "
        "offline); no MagMax number published",
        "setting": "Llama-2-7B-chat, LoRA, TRACE LLM-CL-Benchmark_500 (500 training samples per task), OP",
        "scores": {"O-LoRA": 42.78, "MoRAM": 44.54},
    },
    "trace_5000": {
        "source": "TRACE (Wang et al., 2023, arXiv:2310.06762), values as commonly quoted (check against its tables)",
        "setting": "Llama-2-7B-chat, TRACE LLM-CL-Benchmark_5000, OP",
        "scores": {"SeqFT (full fine-tuning)": 48.7, "LoRA-SeqFT": 12.7, "Replay": 55.5},
    },
}


def benchmark_of_order(order: int) -> str:
    """The benchmark (`"standard_cl"`, `"long15"` or `"superni"`) an order number belongs to.

    Example:

    ```python
    >>> benchmark_of_order(5)
    'long15'
    ```
    """
    for name, orders in BENCHMARK_ORDERS.items():
        if order in orders:
            return name
    raise ValueError(f"unknown task order {order!r}: the orders are {sorted(TASK_ORDERS)} (1-3 Standard CL, 4-6 "
                     "Long-15, 7-8 SuperNI-15).")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------------

#: The text after which a decoder's answer starts (O-LoRA's `ANSWER_PREFIX`).
ANSWER_PREFIX = "Answer:"


def olora_prompt(
    sentence: str,
    labels: Sequence[str],
    task_type: str,
    dataset: str,
    instruction: str | None = None,
    add_task_name: bool = True,
    add_dataset_name: bool = True,
) -> str:
    """O-LoRA's prompt for a decoder: `Task:<type>\\nDataset:<task>\\n<instruction>Option: <labels> \\n<sentence>\\nAnswer:`.

    As O-LoRA's `uie_dataset_lora.py` and `uie_collator.py` build it with `--add_task_name True --add_dataset_name
    True` (its scripts' setting); COPA gets no instruction and no option line.

    Args:
        sentence (`str`): the record's `sentence`.
        labels (`Sequence[str]`): the task's `labels.json`.
        task_type (`str`): the task-type folder (`"TC"`, `"SC"`, `"NLI"`, ...).
        dataset (`str`): the task folder (`"dbpedia"`, ...).
        instruction (`str`, *optional*): defaults to [`OLORA_INSTRUCTIONS`] of the task type.
        add_task_name (`bool`, *optional*, defaults to `True`): prefix `Task:<type>`.
        add_dataset_name (`bool`, *optional*, defaults to `True`): prefix `Dataset:<task>`.

    Returns:
        `str`: the prompt, ending with `Answer:`.
    """
    prefix = f"Task:{task_type}\n" if add_task_name else ""
    if add_dataset_name:
        prefix += f"Dataset:{dataset}\n"
    if task_type == "COPA" and instruction is None:
        return f"{prefix}{sentence}\n{ANSWER_PREFIX}"
    if instruction is None:
        if task_type not in OLORA_INSTRUCTIONS:
            raise ValueError(
                f"task type {task_type!r} has no O-LoRA instruction (known: {', '.join(OLORA_INSTRUCTIONS)}); pass "
                "`instructions={task_type: '...'}`."
            )
        instruction = OLORA_INSTRUCTIONS[task_type]
    return f"{prefix}{instruction}Option: {', '.join(labels)} \n{sentence}\n{ANSWER_PREFIX}"


def superni_prompt(definition: str, task_input: str) -> str:
    """SAPT's zero-shot SuperNI prompt: `Definition: <definition>\\n\\nNow complete the following example -\\nInput:
    <input>\\nOutput: ` (`src/cl_dataset.py`, `load_SuperNI_dataset`).

    Example:

    ```python
    >>> superni_prompt("Classify the sentiment.", "I love it")
    'Definition: Classify the sentiment.\\n\\nNow complete the following example -\\nInput: I love it\\nOutput: '
    ```
    """
    return f"Definition: {definition.strip()}\n\nNow complete the following example -\nInput: {task_input}\nOutput: "


def extract_answer(text: str, prefix: str = ANSWER_PREFIX) -> str:
    """The answer in a generated continuation: the text after the last `prefix` when the model repeated it (O-LoRA's
    `skip_instructions`), else the whole text; surrounding whitespace stripped.

    Example:

    ```python
    >>> extract_answer(" Sports\\n")
    'Sports'
    >>> extract_answer("World Answer: Business")
    'Business'
    ```
    """
    if prefix and prefix in text:
        text = text.split(prefix)[-1]
    return text.strip()


# ---------------------------------------------------------------------------------------------------------------------
# Scores (in [0, 100])
# ---------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """O-LoRA's (SQuAD v1.1's, articles kept) normalization: lower case, punctuation removed, whitespace collapsed.

    Example:

    ```python
    >>> normalize_answer("  Science or  Technology. ")
    'science or technology'
    ```
    """
    exclude = set(string.punctuation)
    return " ".join("".join(ch for ch in text.lower() if ch not in exclude).split())


def _reference_lists(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; pass one per example.")
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"example {i} has no reference; every example needs at least one.")
        out.append([str(r) for r in refs])
    return out


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Percentage of predictions equal to a reference after [`normalize_answer`] (O-LoRA's `exact_match`).

    Args:
        predictions (`Sequence[str]`): the answers.
        references (`Sequence[str]` or `Sequence[Sequence[str]]`): one reference, or a list, per example.

    Example:

    ```python
    >>> exact_match(["World", "sports!", "Business"], ["World", "Sports", ["Science or Technology"]])
    66.66666666666667
    ```
    """
    refs = _reference_lists(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(any(normalize_answer(p) == normalize_answer(r) for r in rs) for p, rs in zip(predictions, refs))
    return 100.0 * hits / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean ROUGE-L F1 × 100, the best over each example's references (`rouge-score` with the Porter stemmer, as
    O-LoRA's and SuperNI's `compute_metrics`).

    Example:

    ```python
    >>> rouge_l(["the cat sat"], [["a dog ran", "the cat sat down"]])
    85.71428571428571
    ```
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError('ROUGE-L needs `rouge-score`: `pip install "hf_magmax[metrics]"`.') from err
    refs = _reference_lists(predictions, references)
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(predictions, refs))
    return 100.0 * total / len(predictions)


_METRICS = {"exact_match": exact_match, "rouge_l": rouge_l}


def score_cl_task(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], metric: str = "exact_match"
) -> float:
    """Score one task's generated answers with `metric` (`"exact_match"` or `"rouge_l"`); a score in `[0, 100]`."""
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(_METRICS)}.")
    return _METRICS[metric](predictions, references)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def find_task_dir(root: str, task: str) -> tuple[str, str]:
    """Locate a task's folder under `root` and tell its layout.

    Looked for, in order: `<root>/<O-LoRA task type>/<task>` ([`OLORA_TASK_TYPES`]), `<root>/SuperNI/<task>`,
    `<root>/<task>`, then `<root>/<any folder>/<task>` (a task of another type, e.g. a local corpus cast in O-LoRA's
    layout). A folder with `labels.json` is O-LoRA's layout; one without is SuperNI's.

    Returns:
        `tuple[str, str]`: the folder and its layout, `"olora"` or `"superni"`.

    Raises:
        `FileNotFoundError`: no such folder; the message lists what `root` holds.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"benchmark data folder {root!r} does not exist: pass `data_path` = a local folder.")
    candidates = []
    if task in OLORA_TASK_TYPES:
        candidates.append(os.path.join(root, OLORA_TASK_TYPES[task], task))
    candidates += [os.path.join(root, "SuperNI", task), os.path.join(root, task)]
    candidates += sorted(os.path.join(root, d, task) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    for path in candidates:
        if os.path.isdir(path):
            return path, "olora" if os.path.isfile(os.path.join(path, "labels.json")) else "superni"
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise FileNotFoundError(
        f"no folder for task {task!r} under {root!r} (it holds: {', '.join(present) or 'nothing'}). Expected O-LoRA's "
        f"layout `<root>/<task type>/{task}/{{train,dev,test}}.json` + `labels.json` (e.g. `TC/dbpedia`), or SAPT's "
        f"`<root>/SuperNI/{task}/{{train,dev,test}}.json`."
    )


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file {path} does not exist; check `data_path` and the task name.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"benchmark file {path} is not valid JSON ({err}).") from err


def _olora_records(folder: str, task: str, split: str, instructions: Mapping[str, str] | None, **prompt_kwargs):
    labels = _read_json(os.path.join(folder, "labels.json"))
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{os.path.join(folder, 'labels.json')} must be a JSON list of label strings.")
    records = _read_json(os.path.join(folder, f"{split}.json"))
    path = os.path.join(folder, f"{split}.json")
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of {{'sentence', 'label'}} records.")
    if task in OLORA_LABELS and tuple(labels) != OLORA_LABELS[task]:
        logger.warning("%s lists %s, O-LoRA's %s has %s", folder, labels, task, list(OLORA_LABELS[task]))
    task_type = os.path.basename(os.path.dirname(folder))
    instruction = (instructions or {}).get(task_type)
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or "sentence" not in record or "label" not in record:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(f"record {i} of {path} must have the keys 'sentence' and 'label', got {keys}.")
        label = str(record["label"])
        prompt = olora_prompt(str(record["sentence"]), labels, task_type, task, instruction, **prompt_kwargs)
        yield prompt, label, [label]


def _superni_records(folder: str, split: str):
    path = os.path.join(folder, f"{split}.json")
    data = _read_json(path)
    if not isinstance(data, Mapping) or "Instances" not in data or "Definition" not in data:
        raise ValueError(
            f"{path} must be one SuperNI task: a JSON object with 'Definition' and 'Instances' (its folder has no "
            "`labels.json`, so it is read as SAPT's SuperNI layout; an O-LoRA task folder needs its `labels.json`)."
        )
    definition = data["Definition"][0] if isinstance(data["Definition"], list) else data["Definition"]
    for i, instance in enumerate(data["Instances"]):
        if not isinstance(instance, Mapping) or "input" not in instance or "output" not in instance:
            raise ValueError(f"instance {i} of {path} must have the keys 'input' and 'output'.")
        outputs = instance["output"]
        references = [str(o) for o in outputs] if isinstance(outputs, list) else [str(outputs)]
        if not references:
            raise ValueError(f"instance {i} of {path} has an empty 'output' list.")
        # SAPT trains on a random reference of a list; the first one here, so runs are reproducible.
        yield superni_prompt(str(definition), str(instance["input"])), references[0].strip(), references


def load_cl_task(
    root: str,
    task: str,
    split: str,
    max_samples: int | None = None,
    instructions: Mapping[str, str] | None = None,
    add_task_name: bool = True,
    add_dataset_name: bool = True,
):
    """Read one split of one task into a `datasets.Dataset` with columns `prompt`, `answer` and `references`.

    Args:
        root (`str`):
            The benchmark folder (O-LoRA's or SAPT's `CL_Benchmark`).
        task (`str`):
            The task folder name, e.g. `"dbpedia"` or `"task1572_samsum_summary"`.
        split (`str`):
            `"train"`, `"dev"` or `"test"`.
        max_samples (`int`, *optional*):
            Keep the first `max_samples` records (O-LoRA's `random` sampling strategy takes the first ones too).
        instructions (`Mapping[str, str]`, *optional*):
            Instruction per O-LoRA task type, overriding [`OLORA_INSTRUCTIONS`] (needed for a task type it lacks).
        add_task_name (`bool`, *optional*, defaults to `True`):
            O-LoRA's `Task:<type>` prefix (O-LoRA layout only).
        add_dataset_name (`bool`, *optional*, defaults to `True`):
            O-LoRA's `Dataset:<task>` prefix (O-LoRA layout only).

    Returns:
        `datasets.Dataset`: one row per record, in file order.
    """
    from datasets import Dataset, Features, Sequence, Value

    folder, layout = find_task_dir(root, task)
    if layout == "olora":
        rows = _olora_records(
            folder, task, split, instructions, add_task_name=add_task_name, add_dataset_name=add_dataset_name
        )
    else:
        rows = _superni_records(folder, split)
    prompts, answers, references = [], [], []
    for prompt, answer, refs in rows:
        if max_samples is not None and len(prompts) >= max_samples:
            break
        prompts.append(prompt)
        answers.append(answer)
        references.append(refs)
    features = Features(
        {"prompt": Value("string"), "answer": Value("string"), "references": Sequence(Value("string"))}
    )
    return Dataset.from_dict({"prompt": prompts, "answer": answers, "references": references}, features=features)


def resolve_cl_root(data_path: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A local benchmark folder: `data_path` itself, or a snapshot of the Hub dataset repo it names (same layout)."""
    if os.path.isdir(data_path):
        return data_path
    if data_path.startswith((".", "/", "~")) or data_path.count("/") != 1:
        raise FileNotFoundError(
            f"`data_path` {data_path!r} is not an existing folder and not a Hub dataset repo id (`owner/name`)."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return snapshot_download(repo_id=data_path, repo_type="dataset", revision=revision, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise FileNotFoundError(
            f"`data_path` {data_path!r} is not a local folder and the Hub dataset repo could not be fetched "
            f"({type(err).__name__}). Pass a local folder in O-LoRA's or SAPT's layout."
        ) from err


def load_cl_benchmark(
    data_path: str,
    tasks: Sequence[str],
    splits: Sequence[str] = ("train", "test"),
    max_samples: int | Mapping[str, int | None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load tasks in order: `{task: DatasetDict(split=Dataset(prompt, answer, references))}`.

    Every task folder and split file is checked before the first one is read, so a missing file fails at once.

    Args:
        data_path (`str`): local folder or Hub dataset repo id.
        tasks (`Sequence[str]`): task names in learning order, e.g. `TASK_ORDERS[1]`.
        splits (`Sequence[str]`, *optional*, defaults to `("train", "test")`): the splits to read.
        max_samples (`int` or `dict[str, int]`, *optional*): cap per split (one number, or one per split name).
        kwargs: passed to [`load_cl_task`] (`instructions`, `add_task_name`, `add_dataset_name`).

    Returns:
        `dict[str, datasets.DatasetDict]`: the tasks in order.
    """
    from datasets import DatasetDict

    if not tasks:
        raise ValueError("`tasks` is empty: give the tasks in learning order, e.g. an order of `TASK_ORDERS`.")
    root = resolve_cl_root(data_path)
    missing = []
    for task in tasks:
        folder, _ = find_task_dir(root, task)
        missing += [
            os.path.join(folder, f"{s}.json") for s in splits if not os.path.isfile(os.path.join(folder, f"{s}.json"))
        ]
    if missing:
        raise FileNotFoundError(f"benchmark folder {root!r} is missing {', '.join(missing)}.")
    out = {}
    for task in tasks:
        parts = {}
        for split in splits:
            cap = max_samples.get(split) if isinstance(max_samples, Mapping) else max_samples
            parts[split] = load_cl_task(root, task, split, cap, **kwargs)
        out[task] = DatasetDict(parts)
        logger.info("%s: %s", task, {s: len(d) for s, d in parts.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Published numbers
# ---------------------------------------------------------------------------------------------------------------------


def reference_table(benchmark: str, ours: Mapping[str, str | float] | None = None) -> str:
    """A Markdown table of our scores (`ours`: method → score or "mean ± std" text) beside the published ones.

    Example:

    ```python
    >>> print(reference_table("superni", {"MagMax (ours)": 12.5}).splitlines()[2])
    | MagMax (ours) | 12.50 | this run |
    ```
    """
    if benchmark not in PUBLISHED_RESULTS:
        raise ValueError(f"no published numbers for {benchmark!r}: known are {', '.join(PUBLISHED_RESULTS)}.")
    published = PUBLISHED_RESULTS[benchmark]
    lines = ["| Method | Score | Source |", "|---|---|---|"]
    for name, value in (ours or {}).items():
        text = f"{value:.2f}" if isinstance(value, (int, float)) else str(value)
        lines.append(f"| {name} | {text} | this run |")
    for name, value in published["scores"].items():
        lines.append(f"| {name} | {value:.2f} | {published['source']} ({published['setting']}) |")
    return "\n".join(lines)


#: The summary metrics [`summarize_runs`] averages, as the trainer's `continual_results` names them.
SUMMARY_METRICS: tuple[str, ...] = ("final_average_accuracy", "backward_transfer", "forgetting")


def summarize_runs(
    runs: Sequence[Mapping[str, Any]], kinds: Sequence[str] = ("sequential", "merged")
) -> dict[str, dict[str, dict[str, Any]]]:
    """Average the summaries of several runs (orders × seeds): mean, sample standard deviation and standard error.

    Args:
        runs (`Sequence[Mapping]`):
            One trainer `continual_results` per run (`{"sequential": {"metrics": {...}}, "merged": {...}}`).
        kinds (`Sequence[str]`, *optional*, defaults to `("sequential", "merged")`):
            The models to summarize.

    Returns:
        `dict`: `{kind: {metric: {"mean", "std", "stderr", "values"}}}` for the metrics of [`SUMMARY_METRICS`]
        (`final_average_accuracy` is the benchmark's average performance AP); `std` and `stderr` are 0 for one run.

    Example:

    ```python
    >>> runs = [{"merged": {"metrics": {"final_average_accuracy": 70.0}}},
    ...         {"merged": {"metrics": {"final_average_accuracy": 80.0}}}]
    >>> summarize_runs(runs, kinds=["merged"])["merged"]["final_average_accuracy"]["mean"]
    75.0
    ```
    """
    import math

    if not runs:
        raise ValueError("`runs` is empty: pass the continual results of at least one run.")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in kinds:
        out[kind] = {}
        for metric in SUMMARY_METRICS:
            values = [float(r[kind]["metrics"][metric]) for r in runs if metric in r.get(kind, {}).get("metrics", {})]
            if not values:
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            out[kind][metric] = {"mean": mean, "std": std, "stderr": std / math.sqrt(len(values)), "values": values}
    return out
