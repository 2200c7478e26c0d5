"""Hub pushes against the fake Hub (a real loopback HTTP server), and model-card helpers."""

from pathlib import Path

import pytest
from builders import make_family
from fake_hub import FakeHub

from hf_magmax import HubPushError, merge_checkpoints, push_to_hub
from hf_magmax.hub import (
    MAGMAX_CITATION,
    MAGMAX_TAGS,
    build_model_card,
    model_card_tags,
    parse_model_card,
    render_model_card,
    write_model_card,
)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("hubfamily"), "llama", num_tasks=2)


def _folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    write_model_card(folder, {"library_name": "transformers", "tags": ["merge", "magmax"]}, "# A model")
    return folder


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file(fake_hub, tmp_path):  # noqa: F811
    folder = _folder(tmp_path)
    url = push_to_hub(folder, "me/merged", private=True, commit_message="my merge")
    repo = fake_hub.repos["me/merged"]
    assert url.startswith(fake_hub.url) and repo.sha in url
    assert repo.private is True
    assert repo.files == _local_files(folder)
    assert [c.message for c in repo.commits] == ["my merge"]
    # pushing again to the existing repo works (create_repo exist_ok) and keeps visibility
    push_to_hub(folder, "me/merged")
    assert len(repo.commits) == 2 and repo.private is True


def test_push_public_default_namespace_and_branch(fake_hub, tmp_path):  # noqa: F811
    folder = _folder(tmp_path)
    push_to_hub(folder, "merged", revision="dev")
    repo = fake_hub.repos[f"{fake_hub.user}/merged"]
    assert repo.private is False
    assert repo.heads["dev"] == repo.commits[-1].oid and repo.commits[-1].message == "Upload with hf_magmax"
    assert repo.branches["dev"] == _local_files(folder) and repo.files == {}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # httpx2, inside huggingface_hub's LFS upload
def test_push_through_classic_lfs(fake_hub, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # Xet needs a content store the fake lacks
    fake_hub.lfs_threshold = 5000
    folder = _folder(tmp_path)
    push_to_hub(folder, "me/lfs")
    repo = fake_hub.repos["me/lfs"]
    assert repo.commits[-1].lfs_files == ["model.safetensors"]
    assert repo.files == _local_files(folder)
    assert any(path.endswith("/info/lfs/objects/batch") for _, path in fake_hub.requests)


def test_failed_push_keeps_folder_and_says_so(fake_hub, tmp_path):  # noqa: F811
    folder = _folder(tmp_path)
    before = _local_files(folder)
    fake_hub.fail_commits = True
    with pytest.raises(HubPushError, match=rf"'me/refused' failed \(403.*kept at {folder}") as info:
        push_to_hub(folder, "me/refused")
    assert info.value.folder == folder
    assert "\n" not in str(info.value)
    assert _local_files(folder) == before


def test_bad_token_is_reported(fake_hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubPushError, match="401"):
        push_to_hub(_folder(tmp_path), "me/x")
    assert fake_hub.repos == {}


def test_offline_mode_refuses_to_push(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_to_hub(_folder(tmp_path), "me/x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        push_to_hub(tmp_path / "missing", "me/x")


def test_merge_pushes_output_and_card(fake_hub, family, tmp_path):  # noqa: F811
    base, models = family
    out = merge_checkpoints(base, models, tmp_path / "out", push_to_hub="me/merge", private=True, show_progress=False)
    repo = fake_hub.repos["me/merge"]
    local = _local_files(out)
    assert repo.private and repo.files.keys() == local.keys()
    assert {k: v for k, v in repo.files.items() if k != "magmax_config.yaml"} == {
        k: v for k, v in local.items() if k != "magmax_config.yaml"
    }  # the config is published with folder names for local paths (tests/test_publish.py)
    metadata, _ = parse_model_card(repo.files["README.md"].decode())
    assert {"model-merging", "magmax"} <= set(metadata["tags"])
    assert repo.commits[-1].message == "hf_magmax magmax merge"


def test_failed_merge_push_keeps_the_merged_output(fake_hub, family, tmp_path):  # noqa: F811
    base, models = family
    fake_hub.fail_commits = True
    with pytest.raises(HubPushError, match="local output is kept"):
        merge_checkpoints(base, models, tmp_path / "out", push_to_hub="me/merge", show_progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_model_card_roundtrip():
    metadata = {"base_model": "org/base", "tags": ["merge", "magmax"], "library_name": "transformers"}
    text = render_model_card(metadata, "# Title\n\nBody.")
    assert text.startswith("---\nbase_model: org/base\n")
    assert parse_model_card(text) == (metadata, "# Title\n\nBody.\n")
    assert parse_model_card("# no metadata") == ({}, "# no metadata")
    with pytest.raises(ValueError, match="never closed"):
        parse_model_card("---\na: 1\n")
    assert "arXiv" in MAGMAX_CITATION and "Marczak" in MAGMAX_CITATION and "2407.06322" in MAGMAX_CITATION


def test_fake_hub_is_usable_without_the_fixture(tmp_path):
    with FakeHub() as hub:
        assert hub.url.startswith("http://127.0.0.1:")
        hub.add_repo("a/b", {"x.txt": b"x"})
        assert hub.repos["a/b"].files == {"x.txt": b"x"}
    with pytest.raises(RuntimeError, match="not running"):
        hub.url  # noqa: B018


# --- the one model-card builder --------------------------------------------------------------------------------------


def _yaml_block(text: str) -> dict:
    import yaml

    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("\n```", 1)[0])


def test_build_model_card_for_a_checkpoint_merge(tmp_path):
    import importlib.metadata

    from huggingface_hub import ModelCard

    config = {
        "base": "org/base",
        "models": ["org/t1", "org/t2"],
        "method": "ties",
        "scaling_coef": None,
        "density": 0.2,
    }
    card = build_model_card(
        "ties-merge",
        "A TIES merge of 2 fine-tuned models of `org/base`.",
        {"Models merged (task order)": "1. `org/t1`\n2. `org/t2`"},
        base_model="org/base",
        base_model_relation="merge",
        method="ties",
        merge_config=config,
        config_file="magmax_config.yaml",
        rerun_command="hf-magmax merge magmax_config.yaml",
        license="apache-2.0",
    )
    text = str(card)
    metadata, body = parse_model_card(text)
    assert metadata == {
        "base_model": "org/base",
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": ["hf_magmax", "magmax", "model-merging", "ties"],
        "base_model_relation": "merge",
    }
    headings = [line for line in body.splitlines() if line.startswith("#")]
    assert headings == [
        "# ties-merge",
        "## Models merged (task order)",
        "## Merge configuration",
        "## Framework versions",
        "## Citation",
    ]
    assert _yaml_block(body) == config  # the merge can be re-run from the card
    assert "Re-run it with `hf-magmax merge magmax_config.yaml`" in body
    assert text.count(MAGMAX_CITATION.strip()) == 1
    assert f"- hf_magmax: {importlib.metadata.version('hf_magmax')}" in body
    path = write_model_card(tmp_path, card)
    assert path.read_text() == text
    assert ModelCard.load(path).data.to_dict() == metadata


def test_build_model_card_tags_lora_and_continual():
    lora = build_model_card("a", "b", library_name="peft", lora=True, method="magmax")
    assert lora.data.tags == ["hf_magmax", "magmax", "model-merging", "lora"] and lora.data.library_name == "peft"
    run = build_model_card("a", "b", continual=True, lora=True, tags=["magmax", "my-tag", ""])
    assert run.data.tags == ["hf_magmax", "magmax", "model-merging", "lora", "continual-learning", "my-tag"]
    assert model_card_tags() == list(MAGMAX_TAGS)
    assert "## Merge configuration" not in str(run)  # only with a merge_config


def test_build_model_card_records_base_model_only_for_a_hub_id(tmp_path, monkeypatch):
    local = tmp_path / "base"
    local.mkdir()
    monkeypatch.chdir(tmp_path)
    for base in (local, str(local), "base", "./base", None, ""):  # a local directory (even one named like an id)
        metadata = build_model_card("m", "s", base_model=base, base_model_relation="merge").data.to_dict()
        assert "base_model" not in metadata and "base_model_relation" not in metadata, base
    metadata = build_model_card("m", "s", base_model="org/base", base_model_relation="adapter").data.to_dict()
    assert metadata["base_model"] == "org/base" and metadata["base_model_relation"] == "adapter"


def test_build_model_card_validates_its_metadata():
    with pytest.raises(ValueError, match="base_model_relation='merged'"):
        build_model_card("m", "s", base_model="org/base", base_model_relation="merged")
    with pytest.raises(ValueError, match="library_name='torch'"):
        build_model_card("m", "s", library_name="torch")
    with pytest.raises(ValueError, match="invalid model card metadata.*eval_results"):
        build_model_card("m", "s", eval_results=[object()])  # ModelCardData's own check
    with pytest.raises(ValueError, match="builder adds it once"):
        build_model_card("m", "s", {"Cite": MAGMAX_CITATION})
    with pytest.raises(TypeError, match="drop `body`"):
        write_model_card(".", build_model_card("m", "s"), "# body")
