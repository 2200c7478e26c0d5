import pytest
from datasets import ClassLabel, Dataset

from hf_magmax.continual import (
    ContinualSplit,
    ContinualTask,
    class_incremental_split,
    domain_incremental_split,
    task_incremental_split,
)


def _dataset(num_classes=6, per_class=3):
    labels = [c for _ in range(per_class) for c in range(num_classes)]
    return Dataset.from_dict({"x": list(range(len(labels))), "label": labels})


def test_class_incremental_sorted_order():
    ds = _dataset()
    split = class_incremental_split(ds, num_tasks=3)
    assert isinstance(split, ContinualSplit) and all(isinstance(t, ContinualTask) for t in split)
    assert split.kind == "class_incremental"
    assert split.class_order == [0, 1, 2, 3, 4, 5]
    assert split.task_classes == [[0, 1], [2, 3], [4, 5]]
    assert split.task_names == ["task_1", "task_2", "task_3"]
    for task in split:
        assert sorted(set(task.dataset["label"])) == task.classes
        assert len(task.dataset) == 6
        # original row order is kept
        assert task.dataset["x"] == sorted(task.dataset["x"])
    assert list(split.as_dict()) == split.task_names
    assert split.datasets[0]["label"] == [0, 1, 0, 1, 0, 1]


def test_class_incremental_seeded_order_is_reproducible_and_reusable_for_test():
    train, test = _dataset(per_class=4), _dataset(per_class=2)
    a = class_incremental_split(train, classes_per_task=2, seed=3)
    b = class_incremental_split(train, classes_per_task=2, seed=3)
    assert a.class_order == b.class_order
    assert sorted(a.class_order) == [0, 1, 2, 3, 4, 5]
    assert a.class_order != [0, 1, 2, 3, 4, 5]  # seed 3 permutes
    assert a.task_classes == [a.class_order[0:2], a.class_order[2:4], a.class_order[4:6]]

    on_test = a.apply_to(test)
    assert on_test.task_classes == a.task_classes and on_test.task_names == a.task_names
    assert [len(t.dataset) for t in on_test] == [4, 4, 4]
    again = class_incremental_split(test, classes_per_task=2, class_order=a.class_order)
    assert again.task_classes == a.task_classes


def test_class_incremental_explicit_order_uneven_sizes_and_names():
    split = class_incremental_split(
        _dataset(), class_order=[5, 0, 1, 2, 3, 4], classes_per_task=[1, 2, 3], task_names=["a", "b", "c"]
    )
    assert split.task_classes == [[5], [0, 1], [2, 3, 4]]
    assert [len(t.dataset) for t in split] == [3, 6, 9]
    assert split.task_names == ["a", "b", "c"]


def test_class_incremental_string_and_classlabel_labels():
    ds = Dataset.from_dict({"label": ["cat", "dog", "ant", "bee"]})
    assert class_incremental_split(ds, num_tasks=2).task_classes == [["ant", "bee"], ["cat", "dog"]]
    ds = ds.cast_column("label", ClassLabel(names=["ant", "bee", "cat", "dog"]))
    assert class_incremental_split(ds, classes_per_task=1).task_classes == [[0], [1], [2], [3]]


def test_torch_formatted_dataset():
    ds = _dataset().with_format("torch")
    split = class_incremental_split(ds, num_tasks=3)
    assert split.task_classes == [[0, 1], [2, 3], [4, 5]]
    assert split[0].dataset.format["type"] == "torch"
    assert task_incremental_split([ds]).task_classes == [[0, 1, 2, 3, 4, 5]]


def test_class_incremental_subset_of_classes_warns():
    with pytest.warns(UserWarning, match=r"classes \[2, 3, 4, 5\].*left out"):
        split = class_incremental_split(_dataset(), class_order=[1, 0], num_tasks=2)
    assert split.task_classes == [[1], [0]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"label_column": "y", "num_tasks": 2}, ValueError, r"`label_column='y'` is not a column.*\['x', 'label'\]"),
        ({"num_tasks": 4}, ValueError, r"6 classes are not divisible into `num_tasks=4`"),
        ({"classes_per_task": 4}, ValueError, r"not divisible into tasks of `classes_per_task=4`"),
        ({"num_tasks": 2, "classes_per_task": 2}, ValueError, r"`num_tasks=2` × `classes_per_task=2` = 4"),
        ({}, ValueError, "pass `num_tasks` or `classes_per_task`"),
        ({"class_order": [0, 1, 9], "num_tasks": 1}, ValueError, r"not present in column 'label'.*\[9\]"),
        ({"class_order": [0, 0, 1], "num_tasks": 1}, ValueError, "more than once"),
        ({"classes_per_task": [2, 2]}, ValueError, "sums to 4, but there are 6 classes"),
        ({"num_tasks": 0}, ValueError, "at least 1"),
        ({"num_tasks": 2, "task_names": ["a"]}, ValueError, "`task_names` has 1 name"),
    ],
)
def test_class_incremental_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        class_incremental_split(_dataset(), **kwargs)


def test_apply_to_reports_a_class_missing_from_the_test_split():
    split = class_incremental_split(_dataset(), num_tasks=3)
    test = Dataset.from_dict({"x": [0, 1, 2], "label": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"not present in column 'label'.*\[3, 4, 5\]"):
        split.apply_to(test)
    with pytest.raises(ValueError, match="is empty"):
        class_incremental_split(Dataset.from_dict({"label": []}), num_tasks=1)


def test_domain_incremental():
    ds = Dataset.from_dict(
        {"text": list("abcdef"), "source": ["web", "news", "web", "news", "books", "web"], "label": [0, 1, 1, 0, 0, 1]}
    )
    split = domain_incremental_split(ds, "source")
    assert split.task_names == ["books", "news", "web"]  # sorted by default
    assert [t.domain for t in split] == ["books", "news", "web"]
    assert split.task_classes == [[0], [0, 1], [0, 1]]
    assert split[2].dataset["text"] == ["a", "c", "f"]

    with pytest.warns(UserWarning, match=r"domains \['books'\] of column 'source' are not in `domain_order`"):
        ordered = domain_incremental_split(ds, "source", domain_order=["news", "web"], task_names=["n", "w"])
    assert ordered.task_names == ["n", "w"]
    with pytest.warns(UserWarning, match="left out"):
        assert ordered.apply_to(ds).task_classes == ordered.task_classes
    assert domain_incremental_split(ds, "source", label_column=None).task_classes == [[], [], []]

    with pytest.raises(ValueError, match=r"not present in column 'source': \['blogs'\]"):
        domain_incremental_split(ds, "source", domain_order=["web", "blogs"])
    with pytest.raises(ValueError, match="`domain_column='domain'` is not a column"):
        domain_incremental_split(ds, "domain")


def test_task_incremental():
    a = Dataset.from_dict({"label": [0, 1, 1]})
    b = Dataset.from_dict({"label": [2, 2]})
    split = task_incremental_split({"first": a, "second": b})
    assert split.task_names == ["first", "second"] and split.task_classes == [[0, 1], [2]]
    assert task_incremental_split([a, b]).task_names == ["task_1", "task_2"]
    with pytest.raises(ValueError, match="task 'empty' has no examples"):
        task_incremental_split({"first": a, "empty": Dataset.from_dict({"label": []})})
    with pytest.raises(ValueError, match="`datasets` is empty"):
        task_incremental_split([])
    with pytest.raises(ValueError, match="cannot be applied to a single dataset"):
        split.apply_to(a)
