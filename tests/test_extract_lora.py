"""`distmerge extract-lora`: the factor math, the adapter's contents, PEFT, ranks and resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.demo import make_family
from distmerge.extract_lora import ADAPTER, CONFIG, PARTS, ExtractOptions, Item, assign, energy_rank, extract, lora_factors
from tests.helpers import REPO_ROOT, child_env, run_main

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base; ft1 = base + N(0, 0.01²) everywhere (full-rank deltas); low = base + a rank-3
    delta in every linear weight, and a changed final norm."""
    root = tmp_path_factory.mktemp("lora-family")
    paths = make_family(root, n_finetunes=1, dtype=torch.float32)
    low = root / "low"
    shutil.copytree(paths["base"], low)
    state = load_file(low / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    for name, w in state.items():
        if name.endswith(tuple(f"{m}.weight" for m in LINEAR)):
            u, v = torch.randn(w.shape[0], 3, generator=g), torch.randn(3, w.shape[1], generator=g)
            state[name] = w + 0.01 * u @ v
    state["model.norm.weight"] = state["model.norm.weight"] + 0.5
    save_file(state, low / "model.safetensors", metadata={"format": "pt"})
    return {**paths, "low": low}


def load(path):
    return load_file(path / ADAPTER), json.loads((path / CONFIG).read_text())


def applied(base: dict, adapter: dict) -> dict:
    """base + B A for every LoRA pair; whole tensors replace the base's."""
    out = dict(base)
    for key, t in adapter.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in name:
            target = name.replace(".lora_A.", ".")
            out[target] = base[target] + adapter[key.replace("lora_A", "lora_B")].double() @ t.double()
        elif ".lora_B." not in name:
            out[name] = t
    return out


def test_factors_recover_a_low_rank_delta_and_drop_what_eckart_young_predicts():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(48, 5, generator=g) @ torch.randn(5, 40, generator=g)
    a, b = lora_factors(low, 5)
    assert a.shape == (5, 40) and b.shape == (48, 5)
    torch.testing.assert_close(b @ a, low, atol=1e-4, rtol=0)  # |Δ| ~ 2..20: float32 rounding
    assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-4)  # the √Σ split: equal scales

    full = torch.randn(48, 40, generator=g)
    s = torch.linalg.svdvals(full.double())
    for r in (1, 7, 40):
        a, b = lora_factors(full, r)
        err = float((full.double() - b.double() @ a.double()).norm())
        assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-4, abs=1e-4)


def test_energy_rank_is_the_smallest_rank_keeping_the_fraction():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        s = torch.rand(30, generator=g).sort(descending=True).values
        for fraction in (1e-6, 0.3, 0.9, 0.99, 1.0):
            total, kept, direct = float((s.double() ** 2).sum()), 0.0, None
            for r in range(1, 31):  # the definition, by hand
                kept += float(s[r - 1].double() ** 2)
                if kept >= fraction * total * (1 - 1e-12):
                    direct = r
                    break
            assert energy_rank(s, fraction) == direct
    assert energy_rank(torch.zeros(4), 0.9) == 1


def test_ranks_share_the_svds_by_cost():
    items = [Item(name=f"w{i}", kind="lora", shape=[m, n]) for i, (m, n) in enumerate([(8192, 28672)] * 2 + [(8192, 8192)] * 6 + [(1024, 8192)] * 4)]
    items.append(Item(name="norm", kind="full", shape=[8192]))
    shares = assign(items, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(items)))  # each once
    assert 0 in shares[0] and 1 in shares[1]  # the two largest SVDs on different ranks
    loads = [sum(items[i].cost for i in s) for s in shares]
    assert max(loads) / min(loads) < 1.1
    assert assign(items, 1) == [sorted(range(len(items)), key=lambda i: -items[i].cost)]


def test_low_rank_fine_tune_is_recovered_exactly_at_its_rank(family, tmp_path):
    result = extract(str(family["base"]), str(family["low"]), str(tmp_path / "out"), ExtractOptions(rank=3))
    adapter, config = load(tmp_path / "out")
    assert config["r"] == config["lora_alpha"] == 3 and config["rank_pattern"] == {}
    assert sorted(config["target_modules"]) == sorted(LINEAR)
    base, model = load_file(family["base"] / "model.safetensors"), load_file(family["low"] / "model.safetensors")
    got = applied(base, adapter)
    for name in model:
        torch.testing.assert_close(got[name].float(), model[name], atol=2e-6, rtol=0, msg=name)
    # Only the final norm changed among the other tensors: it is saved whole, the rest left out.
    assert config["modules_to_save"] == ["model.norm"]
    left = dict(result.left_out)
    assert "model.embed_tokens.weight" in left and "model.layers.0.input_layernorm.weight" in left
    assert len(left) + sum(1 for i in result.items if i.kind == "lora") + 1 == len(model)  # every tensor accounted for
    assert not (tmp_path / "out" / PARTS).exists()


def test_full_rank_delta_error_is_the_dropped_singular_values(family, tmp_path):
    extract(str(family["base"]), str(family["ft1"]), str(tmp_path / "out"), ExtractOptions(rank=8, module_ranks=[("mlp", 12), ("self_attn.q_proj", 4)]))
    adapter, config = load(tmp_path / "out")
    assert config["r"] == 12 and config["lora_alpha"] == 12
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 4
    assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 8 and "model.layers.0.mlp.up_proj" not in config["rank_pattern"]
    base, model = load_file(family["base"] / "model.safetensors"), load_file(family["ft1"] / "model.safetensors")
    got = applied(base, adapter)
    checked = 0
    for name in model:
        if not name.endswith(tuple(f"{m}.weight" for m in LINEAR)):
            torch.testing.assert_close(got[name], model[name], atol=0, rtol=0)  # saved whole (it changed)
            continue
        r = 4 if "q_proj" in name else 12 if ".mlp." in name else 8
        assert adapter[f"base_model.model.{name[:-7]}.lora_A.weight"].shape[0] == r
        s = torch.linalg.svdvals((model[name].double() - base[name].double()))
        err = float((model[name].double() - got[name]).norm())
        assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-4)
        checked += 1
    assert checked == 28


def test_rank_by_energy_picks_each_tensors_rank(family, tmp_path):
    extract(str(family["base"]), str(family["ft1"]), str(tmp_path / "out"), ExtractOptions(energy=0.5))
    adapter, config = load(tmp_path / "out")
    base, model = load_file(family["base"] / "model.safetensors"), load_file(family["ft1"] / "model.safetensors")
    ranks = set()
    for name in model:
        if name.endswith(tuple(f"{m}.weight" for m in LINEAR)):
            s = torch.linalg.svdvals(model[name] - base[name]).double() ** 2
            direct = int((torch.cumsum(s, 0) < 0.5 * s.sum()).sum()) + 1
            module = name[:-7]
            assert adapter[f"base_model.model.{module}.lora_A.weight"].shape[0] == direct, name
            assert config["rank_pattern"].get(module, config["r"]) == direct
            assert config["alpha_pattern"].get(module, config["lora_alpha"]) == direct
            ranks.add(direct)
    assert len(ranks) > 1  # the shapes differ: so do the ranks


def test_skip_full_leaves_the_other_tensors_out_and_says_so(family, tmp_path):
    r = run_main("extract-lora", "--base", family["base"], "--model", family["ft1"], "--rank", "2", "--skip-full", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "28 weights as LoRA factors (rank 2), 0 modules whole" in r.stdout
    assert "left out: 11 tensor(s) (model.embed_tokens.weight," in r.stderr and "--skip-full" in r.stderr
    adapter, config = load(tmp_path / "out")
    assert config["modules_to_save"] is None and len(adapter) == 2 * 28


@pytest.mark.slow  # importing transformers and peft: ~5 s
@pytest.mark.needs("peft", "transformers")
def test_adapter_loads_in_peft_and_merges_to_the_model(family, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    extract(str(family["base"]), str(family["low"]), str(tmp_path / "out"), ExtractOptions(rank=3))
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family["base"]), tmp_path / "out").merge_and_unload()
    state = merged.state_dict()
    model = load_file(family["low"] / "model.safetensors")
    for name, w in model.items():
        torch.testing.assert_close(state[name], w, atol=2e-6, rtol=0, msg=name)


def test_a_killed_run_resumes_without_recomputing_and_gives_the_same_bytes(family, tmp_path, monkeypatch):
    options = ExtractOptions(rank=4)
    extract(str(family["base"]), str(family["ft1"]), str(tmp_path / "fresh"), options)
    monkeypatch.setenv("DISTMERGE_FAULT", "0:5:raise")
    with pytest.raises(RuntimeError, match="injected fault"):
        extract(str(family["base"]), str(family["ft1"]), str(tmp_path / "out"), options)
    assert not (tmp_path / "out" / ADAPTER).exists() and len(list((tmp_path / "out" / PARTS).glob("*.safetensors"))) == 5
    monkeypatch.delenv("DISTMERGE_FAULT")
    # A different command does not mix with the parts.
    r = run_main("extract-lora", "--base", family["base"], "--model", family["ft1"], "--rank", "5", tmp_path / "out")
    assert r.returncode == 2 and "different extraction" in r.stderr
    again = extract(str(family["base"]), str(family["ft1"]), str(tmp_path / "out"), options)
    assert again.kept == 5 and again.computed == len(again.items) - 5
    for name in (ADAPTER, CONFIG):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_and_two_ranks_write_the_same_bytes(family, tmp_path):
    args = ["extract-lora", "--base", str(family["base"]), "--model", str(family["ft1"]), "--rank-by-energy", "0.8"]
    one = run_main(*args, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "distmerge.cli", *args, str(tmp_path / "two")]
    two = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=150, cwd=REPO_ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in (ADAPTER, CONFIG):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model", "/nonexistent/model"], "no such directory"),
        (["--model", "{ft1}", "--rank", "0"], "--rank 0: a rank is at least 1"),
        (["--model", "{ft1}", "--rank-by-energy", "0"], "give a fraction in (0, 1]"),
        (["--model", "{ft1}", "--rank-by-energy", "1.5"], "give a fraction in (0, 1]"),
        (["--model", "{ft1}", "--module-rank", "mlp"], "give MODULE=RANK"),
        (["--model", "{ft1}", "--module-rank", "mlp=0"], "--module-rank mlp=0: a rank is at least 1"),
        (["--model", "{ft1}", "--module-rank", "mlp=4", "--rank-by-energy", "0.9"], "give it or --module-rank, not both"),
        (["--model", "{wide}"], "shape [128, 32] in"),
    ],
)
def test_bad_input_is_one_clear_line(family, tmp_path, extra, expected):
    if "{wide}" in extra:
        from distmerge.demo import make_llama

        make_llama(tmp_path / "wide", seed=0, hidden=32, dtype=torch.float32)
    extra = [e.format(ft1=family["ft1"], wide=tmp_path / "wide") for e in extra]
    r = run_main("extract-lora", "--base", family["base"], *extra, tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and expected in r.stderr, r.stderr
