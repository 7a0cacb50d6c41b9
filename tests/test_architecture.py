"""Architecture knowledge (distmerge.architecture): which tensors are layers, embeddings and
vocabulary rows, and where a config keeps its layer count, for the families distmerge merges."""

import json

import pytest
import torch
import yaml

from distmerge.architecture import comes_before_layers, is_vocab_tensor, layer_count, set_layer_count, split_layer_name
from tests.helpers import run_cli

# name -> (layer index or None, comes before the layers, one row per token)
NAMES = {
    "model.embed_tokens.weight": (None, True, True),  # Llama, Mistral, Qwen
    "model.layers.7.self_attn.q_proj.weight": (7, False, False),
    "model.norm.weight": (None, False, False),
    "lm_head.weight": (None, False, True),
    "model.layers.1.block_sparse_moe.experts.3.w1.weight": (1, False, False),  # Mixtral: layer 1, not 3
    "transformer.wte.weight": (None, True, True),  # GPT-2
    "transformer.wpe.weight": (None, True, False),
    "transformer.h.11.attn.c_attn.weight": (11, False, False),
    "transformer.ln_f.bias": (None, False, False),
    "gpt_neox.embed_in.weight": (None, True, True),  # GPT-NeoX
    "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (0, False, False),
    "embed_out.weight": (None, False, True),  # NeoX's LM head: after the layers, though named embed_
    "transformer.blocks.3.ffn.up_proj.weight": (3, False, False),  # MPT
    "transformer.word_embeddings.weight": (None, True, True),  # BLOOM, Falcon
}


@pytest.mark.parametrize("name", NAMES)
def test_tensor_names_of_each_family(name):
    index, before, vocab = NAMES[name]
    layer = split_layer_name(name)
    assert (layer.index if layer else None) == index
    assert comes_before_layers(name) == before
    assert is_vocab_tensor(name) == vocab


def test_layer_name_splits_into_stack_index_rest():
    assert tuple(split_layer_name("model.layers.1.block_sparse_moe.experts.3.w1.weight")) == (
        "model.layers", 1, "block_sparse_moe.experts.3.w1.weight"
    )


@pytest.mark.parametrize(
    "config, key",
    [({"num_hidden_layers": 32}, "num_hidden_layers"), ({"n_layer": 12}, "n_layer"), ({"num_layers": 4, "n_layers": None}, "num_layers"), ({}, "num_hidden_layers")],
)
def test_layer_count_is_set_under_the_key_the_config_uses(config, key):
    before = layer_count(config)
    set_layer_count(config, 40)
    assert config[key] == 40 and layer_count(config) == 40
    assert before != 40


@pytest.mark.slow
def test_gpt2_frankenmerge_sets_n_layer(tmp_path):
    """A passthrough that stacks layers of a GPT-2 (config key ``n_layer``) writes the new count
    under that key: transformers loads 3 layers, and h.2 is the source's h.1."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    src = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(src)
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(src), "layer_range": [0, 2]}]}, {"sources": [{"model": str(src), "layer_range": [1, 2]}]}],
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    proc = run_cli("run", tmp_path / "r.yml", tmp_path / "out", "--quiet", "--device", "cpu", timeout=600)
    assert proc.returncode == 0, proc.stderr
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["n_layer"] == 3 and "num_hidden_layers" not in written
    merged, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.isfinite(merged(torch.tensor([[1, 2, 3]])).logits).all()
    source = transformers.GPT2LMHeadModel.from_pretrained(src)
    assert merged.config.n_layer == 3 and len(merged.transformer.h) == 3
    torch.testing.assert_close(merged.transformer.h[2].attn.c_attn.weight, source.transformer.h[1].attn.c_attn.weight, rtol=0, atol=0)
    verified = run_cli("verify", tmp_path / "out", timeout=600)
    assert verified.returncode == 0, verified.stdout + verified.stderr
