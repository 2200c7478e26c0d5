"""MagMaxCallback on a plain Trainer, side by side with MagMaxTrainer: checkpoints, weights, results file, card."""

import json
import re

import torch
import yaml
from safetensors.torch import load_file
from tiny_tasks import classification_tasks, tiny_bert
from transformers import Trainer, TrainingArguments

from hf_magmax.trainer import MagMaxCallback, MagMaxConfig, MagMaxTrainer


def _args(root, **kwargs):
    values = dict(
        output_dir=str(root / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
        seed=0,
    )
    values.update(kwargs)
    return values


def _checkpoints(out):
    return sorted(str(p.relative_to(out)) for p in out.glob("**/checkpoint-*") if p.is_dir())


def _sections(card):
    return re.findall(r"^## .*$", card, flags=re.M)


def test_callback_on_a_plain_trainer_writes_what_magmax_trainer_writes(tmp_path, fake_hub):  # noqa: F811
    train, evaluation = classification_tasks()
    hub = {"hub_token": fake_hub.token}
    ours = MagMaxTrainer(
        tiny_bert(),
        MagMaxConfig(**_args(tmp_path / "t", hub_model_id="me/trainer", **hub)),
        train_datasets=train,
        eval_datasets=evaluation,
    )
    ours.train()

    plain_args = TrainingArguments(**_args(tmp_path / "c", hub_model_id="me/callback", **hub))
    plain = Trainer(tiny_bert(), plain_args, train_dataset=train["a"])
    callback = MagMaxCallback(plain, eval_datasets=evaluation, scaling_coef=0.5)
    for dataset in train.values():
        plain.train_dataset = dataset
        plain.train()

    # the same final weights and the same results file
    expected = ours.model.state_dict()
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    t_out, c_out = tmp_path / "t" / "out", tmp_path / "c" / "out"
    assert json.loads((c_out / "continual_results.json").read_text()) == json.loads(
        (t_out / "continual_results.json").read_text()
    )
    assert callback.results == ours.continual_results

    # per-task checkpoint directories, as MagMaxTrainer's (the second task no longer overwrites the first's)
    layout = ["task-00-a/checkpoint-2", "task-00-a/checkpoint-3", "task-01-b/checkpoint-2", "task-01-b/checkpoint-3"]
    assert _checkpoints(t_out) == layout
    assert _checkpoints(c_out) == layout
    for checkpoint in layout:
        theirs = load_file(str(c_out / checkpoint / "model.safetensors"))
        mine = load_file(str(t_out / checkpoint / "model.safetensors"))
        assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine), checkpoint

    # save_model writes the MagMax card, with the same sections
    ours.save_model(str(tmp_path / "t-model"))
    plain.save_model(str(tmp_path / "c-model"))
    card = (tmp_path / "c-model" / "README.md").read_text()
    assert "## Merged (magmax): accuracy matrix" in card and "scaling_coef: 0.5" in card and "- magmax" in card
    assert _sections(card) == _sections((tmp_path / "t-model" / "README.md").read_text())
    assert "with hf_magmax's `MagMaxCallback`" in card and "MagMaxTrainer" not in card  # what ran the loop
    assert _as_trainer(card) == (tmp_path / "t-model" / "README.md").read_text()
    reloaded = load_file(str(tmp_path / "c-model" / "model.safetensors"))
    assert all(torch.equal(reloaded[k], expected[k]) for k in reloaded)

    # push_to_hub uploads the MagMax card too, with the metadata transformers' example scripts pass
    kwargs = {"finetuned_from": "org/tiny-bert", "tasks": "text-classification", "dataset_tags": "org/tiny-data"}
    ours.push_to_hub(**kwargs)
    plain.push_to_hub(**kwargs)
    pushed = fake_hub.repos["me/callback"].files
    pushed_card = pushed["README.md"].decode()
    assert "# callback\n" in pushed_card  # titled by the repo, as transformers' card
    metadata = yaml.safe_load(pushed_card.split("---")[1])
    assert metadata["base_model"] == "org/tiny-bert" and metadata["pipeline_tag"] == "text-classification"
    assert metadata["datasets"] == ["org/tiny-data"]
    assert _as_trainer(pushed_card.replace("# callback\n", "# trainer\n")) == (
        fake_hub.repos["me/trainer"].files["README.md"].decode()
    )
    assert "continual_results.json" in pushed and "model.safetensors" in pushed
    for repo in ("me/callback", "me/trainer"):  # the per-task checkpoints stay local on both paths
        assert not [name for name in fake_hub.repos[repo].files if name.startswith("task-")], repo
    assert _as_trainer(callback.model_card()) == ours._model_card_text()


def _as_trainer(card: str) -> str:
    """A callback's card as MagMaxTrainer's would read (the one line that says what ran the loop)."""
    return card.replace("`MagMaxCallback`", "`MagMaxTrainer`")


def test_plain_trainer_before_any_task_keeps_transformers_card(tmp_path):
    train, evaluation = classification_tasks()
    plain = Trainer(tiny_bert(), TrainingArguments(**_args(tmp_path, save_strategy="no")), train_dataset=train["a"])
    MagMaxCallback(plain, eval_datasets=evaluation)
    plain.create_model_card()
    assert "magmax" not in (tmp_path / "out" / "README.md").read_text()
    assert plain._get_output_dir(None) == str(tmp_path / "out")  # no task running: the plain output_dir
