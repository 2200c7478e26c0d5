"""Continual LoRA training in MagMaxTrainer: task vectors are the adapter's ΔW relative to the base."""

import os

import pytest
import torch
from transformers import TrainerCallback


peft = pytest.importorskip("peft")

from tiny_tasks import lm_task, tiny_llama  # noqa: E402

from hf_magmax import TaskVector, merge_task_vectors  # noqa: E402
from hf_magmax.peft import fold_deltas_into_base, lora_delta_state_dict, merge_adapters  # noqa: E402
from hf_magmax.trainer import MagMaxConfig, MagMaxTrainer  # noqa: E402


class SaveAdapters(TrainerCallback):
    """Saves the adapter after every task (the per-task adapters 'saved along the way') and its ΔW."""

    def __init__(self, directory):
        self.directory, self.deltas, self.dirs = directory, [], []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        path = os.path.join(self.directory, f"adapter-{len(self.dirs)}")
        model.save_pretrained(path)
        self.dirs.append(path)
        self.deltas.append({k: v.clone() for k, v in lora_delta_state_dict(model).items()})


def lora_config(**kwargs):
    return peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)


def run(tmp_path, **kwargs):
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    saver = SaveAdapters(str(tmp_path / "adapters"))
    args = MagMaxConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **kwargs,
    )
    train = {"x": lm_task(4, seed=1), "y": lm_task(10, seed=2)}
    evaluation = {"x": lm_task(4, seed=3), "y": lm_task(10, seed=4)}
    trainer = MagMaxTrainer(
        model, args, train_datasets=train, eval_datasets=evaluation, callbacks=[saver], peft_config=lora_config()
    )
    trainer.train()
    return trainer, base_state, saver, evaluation


def test_lora_merged_equals_merge_of_per_task_adapters(tmp_path):
    trainer, base_state, saver, _ = run(tmp_path)
    assert len(saver.deltas) == 2
    # task 2 continued from the adapter after task 1
    assert all(not torch.equal(saver.deltas[0][k], saver.deltas[1][k]) for k in saver.deltas[0])
    # LoRA B starts at 0, so ΔW at the start is 0 and τ_t = ΔW_t
    start = {k: torch.zeros_like(v) for k, v in saver.deltas[0].items()}
    tvs = [TaskVector.from_state_dicts(start, d) for d in saver.deltas]
    expected_delta = merge_task_vectors(tvs, "magmax", scaling_coef=0.5).apply_to(start)
    expected = tiny_llama()
    expected.load_state_dict(base_state)
    fold_deltas_into_base(expected, expected_delta)

    final = trainer.model
    assert not hasattr(final, "peft_config") and type(final).__name__ == "LlamaForCausalLM"
    for name, value in expected.state_dict().items():
        assert torch.equal(final.state_dict()[name], value), name
    assert not torch.equal(final.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base_state["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip

    # the same result from the LoRA merger on the adapters saved along the way
    base = tiny_llama()
    base.load_state_dict(base_state)
    merged = merge_adapters(base, saver.dirs, method="magmax", scaling_coef=0.5, lora_output="merged").model
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], value, rtol=0, atol=1e-6)

    # the merged row of the matrix is the merged model's score, and the θ_0 row the base model's
    results = trainer.continual_results
    assert results["metric"] == "neg_loss"
    final_model_loss = -trainer.evaluate(eval_dataset=lm_task(4, seed=3))["eval_loss"]
    assert results["merged"]["matrix"][2][0] == pytest.approx(final_model_loss, rel=1e-5)


def test_lora_adapter_output_reproduces_the_merged_delta(tmp_path):
    trainer, base_state, saver, _ = run(tmp_path, lora_output="adapter", lora_rank=16)  # full rank: exact
    final = trainer.model
    assert hasattr(final, "peft_config")
    start = {k: torch.zeros_like(v) for k, v in saver.deltas[0].items()}
    tvs = [TaskVector.from_state_dicts(start, d) for d in saver.deltas]
    expected = merge_task_vectors(tvs, "magmax", scaling_coef=0.5)
    got = lora_delta_state_dict(final, adapter_name=final.active_adapter)
    lora = trainer.continual_results["lora"]
    assert lora["output"] == "adapter" and lora["reconstruction_error"] < 1e-5
    assert sorted(set(lora["ranks"].values())) == [8, 16]  # 16 for the 16×16 q_proj, capped to 8 for the 8×16 v_proj
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6)
    # the base under the adapter is untouched
    base = final.get_base_model()
    targets = [name for name in base_state if name.endswith(("q_proj.weight", "v_proj.weight"))]
    assert len(targets) == 2  # q_proj and v_proj of the one layer: the loop below checks something
    for name in targets:
        module = name.rsplit(".", 1)[0]
        assert torch.equal(base.get_submodule(module).base_layer.weight, base_state[name]), name
