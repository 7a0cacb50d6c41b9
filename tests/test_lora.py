"""LoRA adapters in PEFT format, applied on the fly with mergekit's ``model+adapter`` syntax."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distmerge.cli import main
from tests.helpers import assert_same_tensors, load_state, run_mergekit

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def make_adapter(path: Path, base: dict[str, torch.Tensor], *, r=4, alpha=8, rslora=False, seed=0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in base.items():
        if any(f".{t}." in name for t in TARGETS):
            stem = "base_model.model." + name.removesuffix(".weight")
            out, inp = w.shape
            tensors[f"{stem}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.1
            tensors[f"{stem}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "fan_in_fan_out": False,
        "target_modules": [t.split(".")[-1] for t in TARGETS], "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
    }))  # fmt: skip
    return path


def run(recipe: dict, out: Path) -> Path:
    path = out.parent / (out.name + ".yml")
    path.write_text(yaml.safe_dump(recipe))
    main(["run", str(path), str(out), "--quiet"])
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_is_applied_as_w_plus_scaled_ba(llama_family_f32, tmp_path, rslora):
    base_dir = llama_family_f32["ft1"]
    base = load_state(base_dir)
    adapter = make_adapter(tmp_path / "adapter", base, rslora=rslora)
    out = run({"merge_method": "passthrough", "slices": [{"sources": [{"model": f"{base_dir}+{adapter}", "layer_range": [0, 4]}]}]}, tmp_path / "out")
    merged, lora = load_state(out), load_state(adapter)
    scale = 8 / 4**0.5 if rslora else 8 / 4
    name = "model.layers.2.self_attn.q_proj.weight"
    a, b = lora["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"], lora["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(merged[name], base[name] + scale * (b @ a))
    untouched = "model.layers.2.self_attn.k_proj.weight"
    assert torch.equal(merged[untouched], base[untouched])
    assert sum(not torch.equal(merged[k], base[k]) for k in merged) == 3 * 4


@pytest.mark.slow
def test_adapter_merge_agrees_with_mergekit(llama_family_f32, tmp_path):
    """mergekit merges the adapter with PEFT (merge_and_unload) and then merges models."""
    f = llama_family_f32
    adapter = make_adapter(tmp_path / "adapter", load_state(f["ft1"]), seed=3)
    recipe = {
        "merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "float32",
        "models": [{"model": f"{f['ft1']}+{adapter}", "parameters": {"weight": 0.5}}, {"model": str(f["ft2"]), "parameters": {"weight": 0.5}}],
    }  # fmt: skip
    ours = run(recipe, tmp_path / "ours")
    theirs = run_mergekit(recipe, tmp_path / "theirs")
    # PEFT computes B·A and adds it in its own order of operations: float32 rounding apart.
    assert_same_tensors(ours, theirs, atol=2e-7, rtol=1e-6)


def test_adapter_that_does_not_fit_is_refused(llama_family_f32, tmp_path, capsys):
    base = load_state(llama_family_f32["ft1"])
    adapter = make_adapter(tmp_path / "adapter", {k: v[:, :10] if v.dim() == 2 else v for k, v in base.items()})
    with pytest.raises(SystemExit):
        run({"merge_method": "passthrough", "slices": [{"sources": [{"model": f"{llama_family_f32['ft1']}+{adapter}", "layer_range": [0, 4]}]}]}, tmp_path / "out")
    assert "does not fit" in capsys.readouterr().err


def test_per_module_ranks_and_alphas_scale_each_module_as_peft_does(llama_family_f32, tmp_path):
    """rank_pattern / alpha_pattern (PEFT's per-module r and lora_alpha, as extract-lora writes
    them): each module's s = its alpha / its r, not the config's global ones."""
    base_dir = llama_family_f32["ft1"]
    base = load_state(base_dir)
    adapter = make_adapter(tmp_path / "adapter", base, r=4, alpha=8)
    lora = load_state(adapter)
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    lora[f"{q}.lora_A.weight"], lora[f"{q}.lora_B.weight"] = lora[f"{q}.lora_A.weight"][:2].clone(), lora[f"{q}.lora_B.weight"][:, :2].contiguous()
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config |= {"rank_pattern": {"model.layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"model.layers.1.self_attn.q_proj": 5, "down_proj": 3}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = run({"merge_method": "passthrough", "slices": [{"sources": [{"model": f"{base_dir}+{adapter}", "layer_range": [0, 4]}]}]}, tmp_path / "out")
    merged = load_state(out)

    def expect(module: str, scale: float) -> torch.Tensor:
        stem = f"base_model.model.{module}"
        return base[f"{module}.weight"] + scale * (lora[f"{stem}.lora_B.weight"] @ lora[f"{stem}.lora_A.weight"])

    assert torch.equal(merged["model.layers.1.self_attn.q_proj.weight"], expect("model.layers.1.self_attn.q_proj", 5 / 2))
    assert torch.equal(merged["model.layers.2.self_attn.q_proj.weight"], expect("model.layers.2.self_attn.q_proj", 8 / 4))
    assert torch.equal(merged["model.layers.2.mlp.down_proj.weight"], expect("model.layers.2.mlp.down_proj", 3 / 4))


def test_adapter_with_whole_tensors_is_refused_not_half_applied(llama_family_f32, tmp_path, capsys):
    """modules_to_save (whole tensors in the adapter file) would be silently dropped: refused."""
    base = load_state(llama_family_f32["ft1"])
    adapter = make_adapter(tmp_path / "adapter", base)
    lora = load_state(adapter) | {"base_model.model.model.norm.weight": base["model.norm.weight"] * 2}
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit):
        run({"merge_method": "passthrough", "slices": [{"sources": [{"model": f"{llama_family_f32['ft1']}+{adapter}", "layer_range": [0, 4]}]}]}, tmp_path / "out")
    err = capsys.readouterr().err
    assert "holds 1 whole tensor(s) besides LoRA pairs (model.norm.weight: modules_to_save)" in err and "merge_and_unload" in err
    assert not (tmp_path / "out").exists()
