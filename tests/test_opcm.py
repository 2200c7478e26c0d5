"""OPCM (Tang et al., NeurIPS 2025) as a method of the core, against an independent implementation written here.

`reference_opcm` follows the paper's algorithm as FusionBench's `OPCMForCLIP.run` spells it, on a `nn.Module`: the
first fine-tuned model is the merge; for every later task, each `nn.Linear` weight (found by module type, not by name)
takes the new task vector projected in the full SVD basis of the merged task vector (diagonal and top-left block
zeroed), every other parameter the plain task vector, with the `λ_{t-1}` / `λ_t` bookkeeping, and the whole model
is rescaled to the mean task-vector norm after every task. Plain torch; hf_magmax is only called as the thing under
test.

Tolerances: the reference runs the full SVD of the *rescaled* merged weights (`θ_merged − θ_0`, rounded to the
model's dtype after every task) and rebuilds `u @ P @ v.T`; the core runs the thin SVD of the running sum and
subtracts the removed part. Both are the same matrix in exact arithmetic: measured, they agree to 3e-15 in fp64
(checked at 1e-12) and to 2.4e-6 in fp32 on weights of magnitude ~1 (about 20 ulps; checked at 2e-5). The
doors of hf_magmax (engine, `StateDictMerger`, streaming merge, CLI, Trainer) run the same op on the same input and
are compared bit for bit.
"""

import math

import pytest
import torch
import yaml
from builders import load_dir, make_family, tiny_model
from safetensors.torch import load_file
from tiny_tasks import Crash, classification_task, tiny_bert, tiny_config
from torch import nn
from transformers import TrainerCallback

from hf_magmax import StateDictMerger, TaskVector, merge_checkpoints, merge_task_vectors
from hf_magmax.cli import main
from hf_magmax.config import MergeConfig
from hf_magmax.merging import (
    ONLINE_MERGES,
    MagMaxMerge,
    MergeSpec,
    OPCMMerge,
    make_online_merge,
    opcm,
    opcm_project,
    opcm_projects,
)
from hf_magmax.trainer import MagMaxConfig, MagMaxTrainer


# --------------------------------------------------------------------------------------------------------------------
# the independent implementation (the paper / FusionBench's OPCMForCLIP.run, on modules)
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_opcm(make_model, theta_0, thetas, alpha=0.5):
    pretrained = make_model()
    pretrained.load_state_dict(theta_0)
    merged = make_model()
    merged.load_state_dict(thetas[0])
    pre = dict(pretrained.named_parameters())

    def task_vector_norm(model):
        params = dict(model.named_parameters())
        return torch.linalg.norm(torch.cat([(params[k] - pre[k]).flatten() for k in pre]))

    norms = [task_vector_norm(merged)]
    previous_lambda = 1.0
    for theta in thetas[1:]:
        task = make_model()
        task.load_state_dict(theta)
        norms.append(task_vector_norm(task))
        average_norm = sum(norms) / len(norms)
        lambda_t = 1.0
        for module_name, module in merged.named_modules():
            if list(module.children()):
                continue  # leaf modules only
            for param_name, param in module.named_parameters():
                full = f"{module_name}.{param_name}" if module_name else param_name
                previous_tv = param - pre[full]
                task_tv = task.get_parameter(full) - pre[full]
                if isinstance(module, nn.Linear) and param_name == "weight":
                    u, s, vh = torch.linalg.svd(previous_tv, full_matrices=True)
                    v = vh.T
                    split = (s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item()
                    projected = u.T @ task_tv @ v
                    projected.diagonal().fill_(0)
                    projected[:split, :split] = 0
                    task_tv = u @ projected @ v.T
                param.copy_(pre[full] + (previous_lambda * previous_tv + task_tv) / lambda_t)
        merged_norm = task_vector_norm(merged)
        lambda_t *= merged_norm / average_norm
        for name, param in merged.named_parameters():
            param.copy_(pre[name] + (param - pre[name]) * (average_norm / merged_norm))
        previous_lambda = lambda_t
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def fine_tunes(dtype=torch.float32, num_tasks=4, seed=0):
    """θ_0 (tiny BERT) and `num_tasks` fine-tunes: θ_0 plus seeded noise on every parameter."""
    base = tiny_bert(seed=seed).to(dtype)
    theta_0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    generator = torch.Generator().manual_seed(100 + seed)
    thetas = []
    for _ in range(num_tasks):
        thetas.append(
            {
                k: v + (0.02 * torch.randn(v.shape, generator=generator, dtype=torch.float64)).to(dtype)
                if v.is_floating_point()
                else v.clone()
                for k, v in theta_0.items()
            }
        )
    return theta_0, thetas


def engine(theta_0, thetas, spec):
    task_vectors = [TaskVector.from_state_dicts(theta_0, theta) for theta in thetas]
    return merge_task_vectors(task_vectors, spec).apply_to(theta_0)


def _max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# --------------------------------------------------------------------------------------------------------------------
# the engine against the independent implementation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.8])
def test_engine_equals_the_paper_in_fp64(alpha):
    theta_0, thetas = fine_tunes(torch.float64)
    expected = reference_opcm(lambda: tiny_bert().double(), theta_0, thetas, alpha)
    ours = engine(theta_0, thetas, MergeSpec("opcm", alpha=alpha))
    assert set(ours) == set(expected)
    assert _max_diff(ours, expected) < 1e-12
    # the projection matters: task arithmetic rescaled the same way is far from it
    summed = merge_task_vectors([TaskVector.from_state_dicts(theta_0, t) for t in thetas], "task_arithmetic", 1.0)
    assert _max_diff(summed.apply_to(theta_0), expected) > 1e-2


def test_engine_equals_the_paper_in_fp32_and_the_doors_agree_bit_for_bit():
    theta_0, thetas = fine_tunes(torch.float32)
    expected = reference_opcm(tiny_bert, theta_0, thetas)
    spec = MergeSpec("opcm")
    ours = engine(theta_0, thetas, spec)
    assert _max_diff(ours, expected) < 2e-5
    # StateDictMerger (what the λ search folds) and the batch engine: the same bits
    merger = StateDictMerger(spec)
    for theta in thetas:
        merger.update(TaskVector.from_state_dicts(theta_0, theta))
    merged = TaskVector(merger.result()).apply_to(theta_0)
    assert all(torch.equal(merged[k], ours[k]) for k in ours)


def test_the_rescale_is_model_wide_and_the_first_task_is_kept_as_is():
    theta_0, thetas = fine_tunes(torch.float64, num_tasks=3)
    tvs = [TaskVector.from_state_dicts(theta_0, t) for t in thetas]
    # one task: OPCM returns it (the scale is exactly 1)
    (one,) = tvs[:1]
    assert all(torch.equal(v, one[k]) for k, v in merge_task_vectors([one], "opcm").items())
    merged = merge_task_vectors(tvs, "opcm")
    # the merged task vector has the mean norm of the task vectors, over the whole model
    norm = math.sqrt(sum(float(v.square().sum()) for v in merged.values()))
    mean = sum(math.sqrt(sum(float(v.square().sum()) for v in tv.values())) for tv in tvs) / len(tvs)
    assert norm == pytest.approx(mean, rel=1e-12)
    # biases, LayerNorm and embeddings are summed unprojected: one model-wide factor times the plain sum
    bias = "bert.encoder.layer.0.attention.self.query.bias"
    scale = float(merged[bias].norm() / sum(tv[bias] for tv in tvs).norm())
    for name in (bias, "bert.embeddings.LayerNorm.weight", "bert.embeddings.word_embeddings.weight"):
        assert torch.allclose(merged[name], scale * sum(tv[name] for tv in tvs), rtol=1e-10, atol=1e-14), name
    # a linear weight is projected: not that multiple of its sum
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged[weight], scale * sum(tv[weight] for tv in tvs), atol=1e-4)


def test_which_tensors_are_projected():
    assert opcm_projects("bert.encoder.layer.0.attention.self.query.weight", (16, 16))
    assert opcm_projects("lm_head.weight", (64, 16)) and opcm_projects("classifier.weight", (4, 16))
    for name in ("bert.embeddings.word_embeddings.weight", "model.embed_tokens.weight", "transformer.wte.weight"):
        assert not opcm_projects(name, (64, 16)), name
    assert not opcm_projects("layer.bias", (16,)) and not opcm_projects("conv.weight", (4, 3, 2, 2))
    # the same set as FusionBench's `isinstance(module, nn.Linear)` on a BERT
    model = tiny_bert()
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    projected = {n for n, p in model.named_parameters() if opcm_projects(n, tuple(p.shape))}
    assert projected == linear


def test_projection_removes_the_merge_s_singular_directions():
    g = torch.Generator().manual_seed(0)
    merged = torch.randn(6, 4, generator=g, dtype=torch.float64)
    tau = torch.randn(6, 4, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    split = int((s.cumsum(0) / s.sum() > 0.5).float().argmax())
    assert split >= 1  # the test covers the block, not only the diagonal
    coords = u.T @ opcm_project(merged, tau, 0.5) @ vh.T
    assert torch.allclose(coords.diagonal(), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(coords[:split, :split], torch.zeros(split, split, dtype=torch.float64), atol=1e-12)
    kept = u.T @ tau @ vh.T
    off = ~torch.eye(4, dtype=torch.bool)
    off[:split, :split] = False
    assert torch.allclose(coords[off], kept[off], atol=1e-12)  # everything else is kept
    # a task vector the merge already holds adds nothing: OPCM of [τ, τ] is τ
    assert torch.allclose(opcm([merged, merged]), merged, atol=1e-12)
    # a zero merge has no subspace: the task vector is added as is
    assert torch.equal(opcm_project(torch.zeros(3, 2), torch.ones(3, 2), 0.5), torch.ones(3, 2))


def test_opcm_is_order_dependent_and_says_so():
    assert OPCMMerge.order_dependent and not OPCMMerge.associative and not OPCMMerge.blockwise
    assert OPCMMerge.needs_model_stats and not OPCMMerge.can_track_winners
    assert not MagMaxMerge.order_dependent and MagMaxMerge.blockwise and not MagMaxMerge.needs_model_stats
    assert [m for m, c in ONLINE_MERGES.items() if not c.blockwise] == ["opcm"]
    theta_0, thetas = fine_tunes(torch.float64, num_tasks=3)
    tvs = [TaskVector.from_state_dicts(theta_0, t) for t in thetas]
    forward, backward = merge_task_vectors(tvs, "opcm"), merge_task_vectors(tvs[::-1], "opcm")
    assert max(float((forward[k] - backward[k]).abs().max()) for k in forward) > 1e-3
    # what reversing changes: the projected linear weights; the summed tensors only by the model-wide factor
    bias = "bert.encoder.layer.0.attention.self.query.bias"
    ratio = float(forward[bias].norm() / backward[bias].norm())
    assert abs(ratio - 1) > 1e-6
    for k in forward:
        proportional = torch.allclose(forward[k], ratio * backward[k], rtol=1e-10, atol=1e-14)
        assert proportional != opcm_projects(k, tuple(forward[k].shape)), k


def test_accumulator_state_dict_resumes_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    tvs = [torch.randn(5, 7, generator=g) for _ in range(5)]
    full = make_online_merge("opcm", alpha=0.3)
    for tv in tvs:
        full.update(tv)
    half = make_online_merge("opcm", alpha=0.3)
    for tv in tvs[:2]:
        half.update(tv)
    resumed = make_online_merge("opcm", alpha=0.3)
    resumed.load_state_dict(half.state_dict())
    for tv in tvs[2:]:
        resumed.update(tv)
    assert torch.equal(resumed.result(), full.result())
    assert resumed.model_stat() == full.model_stat()


# --------------------------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------------------------


def test_alpha_is_validated_once_for_opcm_only():
    assert MergeSpec("opcm").method_options == {"alpha": 0.5} and MergeSpec("opcm").coef == 1.0
    assert MergeSpec("opcm", alpha=0).alpha == 0.0
    for bad in (1.0, -0.1, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match=r"`alpha` must be a number in \[0, 1\)"):
            MergeSpec("opcm", alpha=bad)
    with pytest.raises(ValueError, match="`alpha` only applies to `opcm`, not to `ties`"):
        MergeSpec("ties", alpha=0.5)
    with pytest.raises(ValueError, match="`density` only applies to `ties`, not to `opcm`"):
        MergeSpec("opcm", density=0.5)
    with pytest.raises(TypeError, match="`opcm` takes alpha"):
        make_online_merge("opcm", density=0.2)
    with pytest.raises(ValueError, match="`merge_alpha` only applies to `opcm`"):
        MagMaxConfig(output_dir="unused", merge_method="magmax", merge_alpha=0.5, report_to="none")
    with pytest.raises(ValueError, match="needs the whole tensor"):
        MergeSpec("opcm").accumulator("w", offset=16)
    with pytest.raises(ValueError, match="`alpha` only applies to `opcm`"):
        MergeConfig(base="b", adapters=["a"], method="ties", alpha=0.5, output_dir="o").validate()
    assert MergeConfig(base="b", adapters=["a"], method="opcm", alpha=0.2, output_dir="o").validate().spec.alpha == 0.2


# --------------------------------------------------------------------------------------------------------------------
# the streaming merge and the CLI
# --------------------------------------------------------------------------------------------------------------------


def _save(thetas, root):
    paths = []
    for i, theta in enumerate(thetas):
        model = tiny_bert()
        model.load_state_dict(theta)
        model.save_pretrained(root / f"m{i}")
        paths.append(str(root / f"m{i}"))
    return paths


def test_streaming_merge_and_cli_equal_the_engine_bit_for_bit(tmp_path, monkeypatch):
    import hf_magmax.checkpoints as checkpoints

    theta_0, thetas = fine_tunes(torch.float32, num_tasks=3)
    base, *models = _save([theta_0, *thetas], tmp_path)
    spec = MergeSpec("opcm", alpha=0.3)
    expected = engine(theta_0, thetas, spec)
    assert _max_diff(expected, reference_opcm(tiny_bert, theta_0, thetas, 0.3)) < 2e-5
    # row blocks of 64 elements: a blockwise method would be folded in slices; opcm folds whole tensors
    monkeypatch.setattr(checkpoints, "_CHUNK_ELEMENTS", 64)
    out = merge_checkpoints(base, models, tmp_path / "api", method="opcm", alpha=0.3, show_progress=False)
    streamed = load_file(out / "model.safetensors")
    assert all(torch.equal(streamed[k], expected[k]) for k in expected if expected[k].is_floating_point())

    argv = ["merge", "--base", base, "--models", *models, "--method", "opcm", "--alpha", "0.3"]
    assert main([*argv, "--output-dir", str(tmp_path / "cli"), "--no-progress"]) == 0
    cli = load_file(tmp_path / "cli" / "model.safetensors")
    assert all(torch.equal(cli[k], streamed[k]) for k in streamed)
    recorded = yaml.safe_load((tmp_path / "cli" / "magmax_config.yaml").read_text())
    assert recorded["method"] == "opcm" and recorded["alpha"] == 0.3
    assert "OPCM" in (tmp_path / "cli" / "README.md").read_text()
    # re-run from the recorded config: the same merge
    assert main(["merge", str(tmp_path / "cli" / "magmax_config.yaml"), "--output-dir", str(tmp_path / "again"),
                 "--no-progress"]) == 0  # fmt: skip
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(again[k], cli[k]) for k in cli)


def test_lambda_search_goes_through_the_same_merge(tmp_path):
    theta_0, thetas = fine_tunes(torch.float32, num_tasks=2)
    base, *models = _save([theta_0, *thetas], tmp_path)
    target = engine(theta_0, thetas, MergeSpec("opcm", 0.3))["classifier.weight"]

    def score_fn(model):  # best where the merge's classifier is closest to the λ = 0.3 merge's
        return -float((model.classifier.weight - target).norm())

    out = merge_checkpoints(base, models, tmp_path / "auto", method="opcm", scaling_coef="auto",
                            score_fn=score_fn, scaling_coef_grid=[0.1, 0.3, 1.0], show_progress=False)  # fmt: skip
    assert yaml.safe_load((out / "magmax_config.yaml").read_text())["scaling_coef"] == 0.3
    written = load_file(out / "model.safetensors")
    expected = engine(theta_0, thetas, MergeSpec("opcm", 0.3))
    assert all(torch.equal(written[k], expected[k]) for k in expected if expected[k].is_floating_point())


def test_cli_refuses_alpha_for_another_method(tmp_path, capsys):
    argv = ["merge", "--base", "b", "--models", "m", "--method", "magmax", "--alpha", "0.3", "--output-dir"]
    assert main([*argv, str(tmp_path / "out"), "--no-progress"]) == 2
    assert "`alpha` only applies to `opcm`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# the Trainer
# --------------------------------------------------------------------------------------------------------------------


class EndOfTask(TrainerCallback):
    def __init__(self):
        self.thetas = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.thetas.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def _tasks():
    train = {
        "a": classification_task([0, 1], 16, seed=1),
        "b": classification_task([2, 3], 16, seed=2),
        "c": classification_task([0, 3], 16, seed=3),
    }
    evaluation = {
        n: classification_task(ds.unique("labels"), 8, seed=10 + i) for i, (n, ds) in enumerate(train.items())
    }
    return train, evaluation


def _run(output_dir, callbacks=(), resume=None):
    train, evaluation = _tasks()
    args = tiny_config(output_dir, merge_method="opcm", merge_alpha=0.4)
    trainer = MagMaxTrainer(
        tiny_bert(), args, train_datasets=train, eval_datasets=evaluation, callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_equals_the_paper_and_resumes_bit_for_bit(tmp_path):
    end = EndOfTask()
    reference = _run(tmp_path / "reference", callbacks=[end])
    theta_0 = {k: v.detach().clone() for k, v in tiny_bert().state_dict().items()}
    final = {k: v.detach().clone() for k, v in reference.model.state_dict().items()}
    assert reference.continual_results["method"] == "opcm" and reference.continual_results["scaling_coef"] == 1.0
    assert _max_diff(final, reference_opcm(tiny_bert, theta_0, end.thetas, 0.4)) < 2e-5
    expected = engine(theta_0, end.thetas, MergeSpec("opcm", alpha=0.4))
    assert all(torch.equal(final[k], expected[k]) for k in expected)

    # crash in the middle of the third task (two tasks folded, one projection done), resume: the same bits
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "crashed", callbacks=[Crash(task=2, step=2)])
    resumed = _run(tmp_path / "crashed", resume=True)
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, final[name]), name
    for kind in ("sequential", "merged"):
        assert resumed.continual_results[kind]["matrix"] == reference.continual_results[kind]["matrix"]


def test_tied_weights_are_merged_and_counted_once(tmp_path):
    base, models = make_family(tmp_path, "llama", num_tasks=3, tie=True)
    theta_0 = load_dir(base)
    assert "lm_head.weight" not in theta_0  # saved once, under the embedding's name
    streamed = load_dir(merge_checkpoints(base, models, tmp_path / "merged", method="opcm", show_progress=False))
    tvs = [TaskVector.from_state_dicts(theta_0, load_dir(m)) for m in models]
    expected = merge_task_vectors(tvs, "opcm").apply_to(theta_0)
    floating = [k for k, v in expected.items() if v.is_floating_point()]
    assert all(torch.equal(streamed[k], expected[k]) for k in floating)
    # a model's state_dict names the one tensor twice: the engine and StateDictMerger fold it once, count it once
    base_model, finetuned = tiny_model("llama", tie=True), tiny_model("llama", tie=True)
    base_model.load_state_dict(theta_0, strict=False)
    tied_0 = base_model.state_dict()
    assert "lm_head.weight" in tied_0
    tied_tvs = []
    for m in models:
        finetuned.load_state_dict(load_dir(m), strict=False)
        tied_tvs.append(TaskVector.from_state_dicts(tied_0, finetuned.state_dict()))
    tied = merge_task_vectors(tied_tvs, "opcm").apply_to(tied_0)
    merger = StateDictMerger("opcm")
    for tv in tied_tvs:
        merger.update(tv)
    via_merger = TaskVector(merger.result()).apply_to(tied_0)
    for k in floating:
        assert torch.equal(tied[k], expected[k]) and torch.equal(via_merger[k], expected[k]), k
    assert torch.equal(tied["lm_head.weight"], tied["model.embed_tokens.weight"])


def test_continual_lora_in_the_trainer_and_the_lora_merger(tmp_path):
    peft = pytest.importorskip("peft")
    from tiny_tasks import lm_task, tiny_llama

    from hf_magmax.peft import fold_deltas_into_base, lora_delta_state_dict, merge_adapters

    class SaveAdapters(TrainerCallback):
        def __init__(self):
            self.dirs, self.deltas = [], []

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.dirs.append(str(tmp_path / f"adapter-{len(self.dirs)}"))
            model.save_pretrained(self.dirs[-1])
            self.deltas.append({k: v.clone() for k, v in lora_delta_state_dict(model).items()})

    model, saver = tiny_llama(), SaveAdapters()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    args = MagMaxConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                        learning_rate=5e-2, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                        merge_method="opcm", merge_alpha=0.3)  # fmt: skip
    train = {"x": lm_task(4, seed=1), "y": lm_task(10, seed=2), "z": lm_task(7, seed=5)}
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = MagMaxTrainer(model, args, train_datasets=train, callbacks=[saver], peft_config=lora)
    trainer.train()
    final = trainer.model.state_dict()
    # the Trainer: OPCM of the adapters' ΔW (LoRA B starts at 0: τ_t = ΔW_t), folded into the base
    start = {k: torch.zeros_like(v) for k, v in saver.deltas[0].items()}
    tvs = [TaskVector.from_state_dicts(start, d) for d in saver.deltas]
    expected = tiny_llama()
    expected.load_state_dict(base_state)
    fold_deltas_into_base(expected, merge_task_vectors(tvs, MergeSpec("opcm", alpha=0.3)).apply_to(start))
    for name, value in expected.state_dict().items():
        assert torch.equal(final[name], value), name
    # the LoRA merger on the adapters saved along the way: the same merge (ΔW recomputed from A and B: 1e-6)
    base = tiny_llama()
    base.load_state_dict(base_state)
    merged = merge_adapters(base, saver.dirs, method="opcm", alpha=0.3, lora_output="merged").model
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6)
    # the projection took part: OPCM's ΔW is not a multiple of the ΔW sum
    summed = merge_task_vectors(tvs, "task_arithmetic", 1.0)
    q = "model.layers.0.self_attn.q_proj.weight"
    ours = expected.state_dict()[q] - base_state[q]
    assert not torch.allclose(ours / ours.norm(), summed[q] / summed[q].norm(), atol=1e-3)


def test_streaming_merge_runs_each_svd_once_shows_its_first_pass_and_leaves_no_spill(tmp_path, monkeypatch, capsys):
    base, models = make_family(tmp_path, "llama", num_tasks=3)
    projected = [name for name, t in load_dir(base).items() if opcm_projects(name, t.shape)]
    svd, shapes, shown = torch.linalg.svd, [], []

    def counting_svd(matrix, *args, **kwargs):
        shapes.append(tuple(matrix.shape))
        shown.append(capsys.readouterr().err)  # what the terminal showed before this SVD
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    out = merge_checkpoints(base, models, tmp_path / "out", method="opcm", show_progress=True)
    # one SVD per projected weight per task after the first: pass 2 rescales the sums spilled by pass 1
    assert len(shapes) == (len(models) - 1) * len(projected) > 0
    assert all(rows >= cols for rows, cols in shapes)  # wide weights are projected as their transpose (faster SVD)
    assert "Folding tensors (opcm, pass 1 of 2)" in shown[0]  # a bar before the first SVD
    assert "pass 2 of 2" in capsys.readouterr().err
    assert not [p.name for p in out.iterdir() if "folded" in p.name]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_opcm_project_of_a_wide_matrix_is_the_transpose_of_the_tall_projection():
    generator = torch.Generator().manual_seed(0)
    merged, tau = torch.randn(2, 12, 40, dtype=torch.float64, generator=generator)
    wide = opcm_project(merged, tau, 0.4)
    tall = opcm_project(merged.T.contiguous(), tau.T.contiguous(), 0.4)
    assert wide.shape == (12, 40)
    torch.testing.assert_close(wide, tall.T, rtol=0, atol=1e-12)
    assert not torch.allclose(wide, tau)  # it does project
