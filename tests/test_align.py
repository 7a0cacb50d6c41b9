"""distmerge align: Git Re-Basin weight matching (distmerge/align.py)."""

import json

import pytest
import torch

from distmerge.align import align, apply_permutation, llama_spec, objective, weight_matching
from distmerge.demo import llama_config, make_llama
from tests.helpers import run_main

transformers = pytest.importorskip("transformers")


def random_perms(spec, seed):
    """A random permutation per unit group; head permutations keep KV groups whole."""
    gen = torch.Generator().manual_seed(seed)
    perms = {}
    for p in spec:
        if p.group == 1:
            perms[p.name] = torch.randperm(p.size, generator=gen)
        else:
            g = p.group
            groups = torch.randperm(p.size // g, generator=gen)
            perms[p.name] = torch.cat([int(j) * g + torch.randperm(g, generator=gen) for j in groups])
    return perms


def logits(path, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2)])
def test_permuted_model_computes_the_same_logits(tmp_path, heads, kv_heads):
    state = make_llama(tmp_path / "ref", seed=0, num_layers=2, hidden=48, heads=heads, kv_heads=kv_heads, dtype=torch.float32)
    config = llama_config(num_layers=2, hidden=48, intermediate=128, heads=heads, kv_heads=kv_heads, vocab=128)
    spec = llama_spec(config, state)
    perms = random_perms(spec, seed=1)
    permuted = apply_permutation(state, spec, perms)
    assert any(not torch.equal(permuted[n], state[n]) for n in state)
    make_llama(tmp_path / "perm", seed=0, num_layers=2, hidden=48, heads=heads, kv_heads=kv_heads, dtype=torch.float32)
    from distmerge.demo import save_safetensors

    save_safetensors(permuted, tmp_path / "perm" / "model.safetensors", metadata={"format": "pt"})
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(tmp_path / "perm", tokens), logits(tmp_path / "ref", tokens), atol=1e-5, rtol=0)


def test_a_permuted_head_dim_changes_the_function(tmp_path):
    """Why heads move whole: permuting dims inside the heads (RoPE pairs dims) is not a symmetry."""
    state = make_llama(tmp_path / "ref", seed=0, num_layers=1, heads=4, kv_heads=2, dtype=torch.float32)
    hd = 16
    bad = dict(state)
    for m in "qk":  # the same swap of dims 0 and 1 in every q and k head: q·k would be unchanged without RoPE
        name = f"model.layers.0.self_attn.{m}_proj.weight"
        n = bad[name].shape[0]
        bad[name] = bad[name][torch.arange(n).view(-1, hd)[:, [1, 0, *range(2, hd)]].reshape(-1)]
    from distmerge.demo import save_safetensors

    make_llama(tmp_path / "bad", seed=0, num_layers=1, heads=4, kv_heads=2, dtype=torch.float32)
    save_safetensors(bad, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    assert (logits(tmp_path / "bad", tokens) - logits(tmp_path / "ref", tokens)).abs().max() > 1e-4


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_weight_matching_recovers_a_planted_permutation(tmp_path, kv_heads):
    state = make_llama(tmp_path / "ref", seed=0, num_layers=2, heads=4, kv_heads=kv_heads, dtype=torch.float32, tokenizer=False)
    config = llama_config(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=kv_heads, vocab=128)
    spec = llama_spec(config, state)
    planted = random_perms(spec, seed=5)
    model = apply_permutation(state, spec, planted)
    perms, iterations = weight_matching(state, model, spec, seed=0)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    aligned = apply_permutation(model, spec, perms)
    assert all(torch.equal(aligned[n], state[n]) for n in state), "align(permute(R)) != R"
    assert objective(state, aligned) > objective(state, model)
    assert iterations >= 2


def test_align_command_writes_the_checkpoint_and_align_json(tmp_path):
    ref = make_llama(tmp_path / "ref", seed=0, num_layers=2, heads=4, kv_heads=2, shards=3, dtype=torch.bfloat16)
    make_llama(tmp_path / "model", seed=1, num_layers=2, heads=4, kv_heads=2, shards=3, dtype=torch.bfloat16)
    res = run_main("align", tmp_path / "model", "--to", tmp_path / "ref", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "permutations moved units" in res.stdout
    out = tmp_path / "out"
    src = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(src + ["align.json"])
    record = json.loads((out / "align.json").read_text())
    assert record["objective_after"] > record["objective_before"]
    assert record["iterations"] >= 1
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model", torch_dtype=torch.float32)
    aligned = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(aligned(tokens).logits, model(tokens).logits, atol=1e-5, rtol=0)
    assert aligned.model.embed_tokens.weight.dtype == torch.float32 and set(ref)
    again = run_main("align", tmp_path / "model", "--to", tmp_path / "ref", out)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_align_rejects_models_of_different_shapes(tmp_path):
    from distmerge.errors import MergeError

    make_llama(tmp_path / "a", seed=0, num_layers=2, tokenizer=False)
    make_llama(tmp_path / "b", seed=0, num_layers=2, intermediate=96, tokenizer=False)
    with pytest.raises(MergeError, match="differ in shape"):
        align(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out"))
