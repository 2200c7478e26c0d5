"""hf_magmax.io: output-path checks before any work, the atomic commit, stale staging dirs, reading what
`from_pretrained` reads, index paths confined to the checkpoint, the streaming shard writer."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from builders import leftovers, load_dir, make_synthetic_family
from safetensors.torch import save_file

from hf_magmax import merge_checkpoints
from hf_magmax.cli import main
from hf_magmax.io import (
    CheckpointReader,
    ShardedSafetensorsWriter,
    check_output_path,
    copy_non_weight_files,
    remove_stale_staging_dirs,
    staged_output_dir,
)
from hf_magmax.io import output as io_output


@pytest.fixture
def family(tmp_path):
    return make_synthetic_family(tmp_path / "family", num_tensors=3, shape=(8, 4))


# ---------------------------------------------------------------------------------------------------------------------
# output paths refused before any work
# ---------------------------------------------------------------------------------------------------------------------


def _refused(base, models, output, match, **kwargs):
    calls = []
    real = CheckpointReader.read_tensor_table
    with pytest.MonkeyPatch.context() as patch:  # "before any work": no tensor table is even read
        patch.setattr(CheckpointReader, "read_tensor_table", lambda self: calls.append(self) or real(self))
        with pytest.raises(ValueError, match=match):
            merge_checkpoints(base, models, output, show_progress=False, **kwargs)
    assert calls == []


def test_symlinked_output_is_refused_before_any_work(family, tmp_path):
    base, models = family
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    _refused(base, models, link, r"`output_dir` .*link is a symbolic link .*Pass the real directory")
    assert link.is_symlink() and list(target.iterdir()) == []


def test_current_directory_is_refused(family, tmp_path, monkeypatch):
    base, models = family
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    _refused(base, models, ".", r"`output_dir` \. is the current directory")
    _refused(base, models, tmp_path, "is the current directory \\(or contains it\\)", overwrite=True)


def test_output_inside_an_input_or_containing_one_is_refused(family, tmp_path):
    base, models = family
    _refused(base, models, Path(base) / "merged", r"lies inside the input model .*base.*copied into the output")
    _refused(base, models, Path(models[1]), "would replace the input model .*task1", overwrite=True)
    _refused(base, models, tmp_path / "family", "would replace the input model", overwrite=True)
    assert sorted(p.name for p in Path(base).iterdir()) == ["model.safetensors"]


def test_check_output_path_accepts_a_sibling(tmp_path):
    (tmp_path / "base").mkdir()
    assert check_output_path(tmp_path / "out", {"base": tmp_path / "base"}) == tmp_path / "out"


def test_base_files_are_never_copied_into_themselves(tmp_path):
    source = tmp_path / "base"
    (source / "sub").mkdir(parents=True)
    (source / "tokenizer.json").write_text("{}")
    (source / "sub" / "x.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"")
    target = source / "out"  # the API refuses this; the copier is safe on its own too
    target.mkdir()
    copied = copy_non_weight_files(source, target)
    assert copied == ["sub/x.json", "tokenizer.json"]
    assert copy_non_weight_files(source, target) == copied  # a re-run does not copy out/ into out/out/
    assert not (target / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# staging dirs and the commit
# ---------------------------------------------------------------------------------------------------------------------


def test_staging_dir_carries_the_pid_and_an_error_removes_it(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(output, overwrite=False) as staging:
            assert staging.name.startswith(f".out.hf_magmax-tmp-{os.getpid()}-")
            (staging / "partial").write_text("x")
            raise RuntimeError("boom")
    assert leftovers(output) == []


def test_stale_staging_dirs_of_dead_processes_are_removed_and_named(tmp_path, caplog):
    output = tmp_path / "out"
    dead = subprocess_pid_that_exited()
    stale = tmp_path / f".out.hf_magmax-tmp-{dead}-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out.hf_magmax-tmp-{os.getpid()}-efgh"
    live.mkdir()
    other = tmp_path / f".other.hf_magmax-tmp-{dead}-ijkl"
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="hf_magmax.io"):
        assert remove_stale_staging_dirs(output) == [stale]
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert f"removed {stale}, left by an interrupted merge (process {dead} is gone)" in caplog.text


def test_an_old_output_set_aside_by_a_killed_fallback_commit_is_restored(tmp_path, caplog):
    output = tmp_path / "out"
    old = tmp_path / f".out.hf_magmax-old-{subprocess_pid_that_exited()}-abcd"
    old.mkdir()
    (old / "keep.txt").write_text("keep")
    with caplog.at_level(logging.WARNING, logger="hf_magmax.io"):
        remove_stale_staging_dirs(output)
    assert (output / "keep.txt").read_text() == "keep" and not old.exists()
    assert f"restored {output}" in caplog.text


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_overwrite_commit_has_no_window_where_the_output_is_missing(tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    seen = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # the old output is deleted only once the new one is in place
        seen.append((Path(path).name, (output / "new.txt").is_file(), (Path(path) / "old.txt").is_file()))
        return real_rmtree(path, *args, **kwargs)

    def no_replace(src, dst):
        raise AssertionError(f"os.replace({src}, {dst}): the exchange should have been atomic")

    monkeypatch.setattr(io_output.shutil, "rmtree", rmtree)
    monkeypatch.setattr(io_output.os, "replace", no_replace)
    with staged_output_dir(output, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert (output / "new.txt").read_text() == "new" and not (output / "old.txt").exists()
    assert seen and seen[0][1:] == (True, True)
    assert leftovers(output) == ["out"]


def test_overwrite_commit_falls_back_to_two_renames(tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    monkeypatch.setattr(io_output, "_exchange", lambda a, b: False)
    with staged_output_dir(output, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in output.iterdir()) == ["new.txt"] and leftovers(output) == ["out"]


# ---------------------------------------------------------------------------------------------------------------------
# reading: what from_pretrained reads, index entries confined to the checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def _sharded(directory: Path, weight_map: dict, tensors: dict):
    directory.mkdir(parents=True, exist_ok=True)
    for file in set(weight_map.values()):
        save_file({k: v for k, v in tensors.items() if weight_map[k] == file}, directory / file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_entries_must_stay_inside_the_checkpoint(tmp_path):
    outside = tmp_path / "secret.safetensors"
    save_file({"w": torch.ones(2)}, outside)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for entry in ["../secret.safetensors", str(outside), "sub/../../secret.safetensors"]:
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": entry}}))
        reader = CheckpointReader("ckpt", ckpt)
        with pytest.raises(ValueError, match=r"maps tensor 'w' to .*outside the checkpoint directory"):
            reader.read_tensor_table()


def test_a_stale_single_file_beside_an_index_is_what_from_pretrained_reads(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    _sharded(ckpt, {"w": "model-00001-of-00001.safetensors"}, {"w": torch.zeros(2)})
    save_file({"w": torch.ones(2)}, ckpt / "model.safetensors")
    reader = CheckpointReader("ckpt", ckpt)
    with caplog.at_level(logging.WARNING, logger="hf_magmax.io"):
        reader.read_tensor_table()
    assert reader.tensors["w"].file == ckpt / "model.safetensors"
    assert torch.equal(reader.get("w"), torch.ones(2))
    assert "model.safetensors.index.json" in caplog.text and "as transformers' from_pretrained does" in caplog.text
    # transformers' own choice, for the record
    from transformers import modeling_utils  # noqa: F401  (the rule: SAFE_WEIGHTS_NAME is tried before its index)

    source = Path(modeling_utils.__file__).read_text()
    assert source.index("_add_variant(SAFE_WEIGHTS_NAME, variant))\n            ):") < source.index(
        "_add_variant(SAFE_WEIGHTS_INDEX_NAME, variant))\n            ):"
    )


# ---------------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------------


def test_sharded_writer_streams_blocks_and_plans_with_huggingface_hub(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    entries = [(name, "float32", (10, 10)) for name in tensors]
    with ShardedSafetensorsWriter(tmp_path, entries, max_shard_size=1000) as writer:
        assert writer.is_sharded and len(writer.shards) == 3
        for name in writer.order:
            writer.begin(name)
            for rows in (slice(0, 3), slice(3, 10)):
                writer.write_part(tensors[name][rows])
            writer.end()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 500, "total_size": 2000}
    assert set(index["weight_map"].values()) == {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    loaded = load_dir(tmp_path)
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def test_sharded_writer_refuses_a_short_tensor_and_an_early_close(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [("a", "float32", (4,)), ("b", "float32", (2,))], 10**6)
    writer.begin("a")
    writer.write_part(torch.zeros(3))
    with pytest.raises(RuntimeError, match="'a' got 12 bytes instead of 16"):
        writer.end()
    writer = ShardedSafetensorsWriter(tmp_path, [("a", "float32", (4,)), ("b", "float32", (2,))], 10**6)
    writer.write("a", torch.zeros(4))
    with pytest.raises(RuntimeError, match="before every planned tensor"):
        writer.close()


def test_unknown_user_home_is_one_line(family, tmp_path, capsys):
    base, _ = family
    assert main(["merge", "--base", base, "--models", "~nouser-hf-magmax/x", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "~nouser-hf-magmax/x" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_signal_turned_into_another_error_by_library_code_is_still_a_termination():
    import signal

    from hf_magmax.io import Terminated, terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as caught:
        with terminate_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between bytecodes
                    pass
            except KeyboardInterrupt:
                raise ValueError("could not determine the shape of object type") from None  # as torch may do
    assert caught.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # restored
