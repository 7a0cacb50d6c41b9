"""The tiny test checkpoints, the sparse full-size ones, the hub cache and the test helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distmerge.demo import (
    LLAMA3_70B,
    LLAMA_70B,
    llama_tensor_shapes,
    main as demo_main,
    make_llama,
    make_sparse_checkpoint,
    save_safetensors,
)
from tests.helpers import (
    REPO_ROOT,
    assert_same_tensors,
    free_port,
    load_state,
    run_cli,
    run_mergekit,
    safetensors_files,
    ulp_bf16,
)


# --------------------------------------------------------------------------- tiny models


@pytest.mark.slow
def test_transformers_loads_model_and_tokenizer(llama_family):
    transformers = pytest.importorskip("transformers")
    path = llama_family["base"]  # sharded: index + 2 files
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == 128
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    enc = tok("hello there, the world!")
    ids = enc["input_ids"]
    assert ids[0] == 1 and 0 not in ids, ids  # BOS first, nothing unknown
    assert tok.decode(ids, skip_special_tokens=True) == "hello there, the world!"

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 128)
    assert torch.isfinite(logits).all()
    # transformers read the same tensors that are in the files.
    loaded = {k: v for k, v in model.state_dict().items()}
    assert_same_tensors(loaded, load_state(path))

    cfg = transformers.AutoConfig.from_pretrained(path)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 128)
    assert cfg.tie_word_embeddings is False


@pytest.mark.slow
def test_tied_embeddings_model_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    state = make_llama(tmp_path, seed=3, tie_embeddings=True, dtype=torch.float32, num_layers=2)
    assert "lm_head.weight" not in state
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert out.shape == (1, 4, 128) and torch.isfinite(out).all()


def test_tensor_names_and_shapes(llama_family):
    state = load_state(llama_family["ft1"])
    assert (llama_family["ft1"] / "model.safetensors").exists()
    expected = dict(llama_tensor_shapes(json.loads((llama_family["ft1"] / "config.json").read_text())))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(state) == 2 + 4 * 9 + 1
    assert state["model.layers.3.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    for f in safetensors_files(llama_family["base"]):
        with safe_open(str(f), "pt") as g:
            assert g.metadata() == {"format": "pt"}


def test_finetunes_differ_from_base_by_noise(llama_family_f32):
    base = load_state(llama_family_f32["base"])
    fts = [load_state(llama_family_f32[f"ft{i}"]) for i in (1, 2, 3)]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert 0.018 < base[q].std() < 0.022
    assert 0.95 < base["model.norm.weight"].mean() < 1.05
    deltas = []
    for ft in fts:
        d = torch.cat([(ft[k] - base[k]).flatten() for k in base])
        assert abs(d.std().item() - 0.01) < 0.0005, d.std()
        assert abs(d.mean().item()) < 0.0005
        deltas.append(d)
    # Task vectors of different fine-tunes are independent.
    corr = torch.corrcoef(torch.stack(deltas))
    assert (corr - torch.eye(3)).abs().max() < 0.05


def test_bf16_and_f32_families_are_the_same_models(llama_family, llama_family_f32):
    bf = load_state(llama_family["ft2"])
    f32 = load_state(llama_family_f32["ft2"])
    assert_same_tensors(bf, {k: v.to(torch.bfloat16) for k, v in f32.items()})
    assert_same_tensors(
        load_state(llama_family["base"]),
        {k: v.to(torch.bfloat16) for k, v in load_state(llama_family_f32["base"]).items()},
    )


def test_sharded_and_single_hold_identical_tensors(tmp_path):
    one = make_llama(tmp_path / "one", seed=7, num_layers=2)
    three = make_llama(tmp_path / "three", seed=7, num_layers=2, shards=3)
    assert_same_tensors(one, three)
    assert_same_tensors(tmp_path / "one", tmp_path / "three")
    index = json.loads((tmp_path / "three" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    assert not (tmp_path / "three" / "model.safetensors").exists()
    # Deterministic in the seed; other seeds give other weights.
    again = make_llama(tmp_path / "again", seed=7, num_layers=2)
    assert_same_tensors(one, again)
    other = make_llama(tmp_path / "other", seed=8, num_layers=2)
    with pytest.raises(AssertionError, match="elements differ"):
        assert_same_tensors(one, other)


def test_tokenizer_is_written_without_the_tokenizers_package(tmp_path, monkeypatch):
    """A plain install has no ``tokenizers``: the demo's models (and so its merges) still get
    tokenizer files, the same JSON that the tokenizers library itself would write."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    make_llama(tmp_path / "m", seed=0, num_layers=1)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    monkeypatch.delitem(sys.modules, "tokenizers")
    tokenizers = pytest.importorskip("tokenizers")
    ours = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    assert json.loads(tokenizers.Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json")).to_str()) == ours
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json")).encode("the cat").tokens == ["<s>", "▁", "th", "e", "▁", "c", "at"]


@pytest.mark.slow
def test_demo_needs_no_transformers_or_numpy(tmp_path):
    # The demo runs in a venv with only distmerge's dependencies (safetensors 0.8's
    # save_file would need numpy, so demo writes safetensors itself).
    code = (
        "import sys; sys.modules['numpy'] = None; sys.modules['transformers'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "from distmerge.demo import make_llama\n"
        "make_llama(sys.argv[1], seed=0, num_layers=1, shards=2)\n"
        "assert 'mergekit' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], check=True, timeout=60)
    assert_same_tensors(tmp_path / "m", make_llama(tmp_path / "again", seed=0, num_layers=1))


def test_save_safetensors_reads_back(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.arange(7, dtype=torch.float32),
        "c": torch.randn(2, 2, 2).half()[:, 1],  # not contiguous
        "empty": torch.zeros(0, 4),
    }
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert_same_tensors(back, tensors)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as g:
        assert g.metadata() == {"format": "pt", "k": "v"}


def test_demo_cli_make(tmp_path, capsys):
    assert demo_main(["make", str(tmp_path / "models"), "--layers", "2", "--finetunes", "2"]) == 0
    assert "ft2" in capsys.readouterr().out
    for name in ("base", "ft1", "ft2"):
        assert (tmp_path / "models" / name / "model.safetensors").exists()
    assert not (tmp_path / "models" / "ft3").exists()


# --------------------------------------------------------------------------- hub cache


def test_hub_cache_resolves_offline(hf_hub_cache, llama_family):
    from huggingface_hub import snapshot_download

    cache_dir, repo_id = hf_hub_cache
    snap = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    assert snap.parent.parent == cache_dir / "models--distmerge-test--tiny-llama"
    src = llama_family["base"]
    assert sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in snap.iterdir():
        assert p.is_symlink() and p.resolve().parent.name == "blobs"
        assert p.read_bytes() == (src / p.name).read_bytes()
    assert_same_tensors(snap, src)
    ft1 = Path(snapshot_download(repo_id + "-ft1", cache_dir=cache_dir, local_files_only=True))
    assert (ft1 / "model.safetensors").read_bytes() == (llama_family["ft1"] / "model.safetensors").read_bytes()

    # The same through the environment, as a CLI subprocess would see it.
    code = (
        "import sys; from huggingface_hub import snapshot_download; "
        "print(snapshot_download(sys.argv[1]))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, repo_id], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == snap


# --------------------------------------------------------------------------- sparse full-size


@pytest.mark.parametrize("preset,vocab", [(LLAMA_70B, 32000), (LLAMA3_70B, 128256)])
def test_sparse_70b_checkpoint(tmp_path, preset, vocab):
    index = make_sparse_checkpoint(tmp_path, preset, shard_bytes=5e9)
    shapes = dict(llama_tensor_shapes(preset))
    assert len(shapes) == 2 + 80 * 9 + 1
    assert set(index["weight_map"]) == set(shapes)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    assert 68e9 < params < 71e9
    assert index["metadata"]["total_size"] == 2 * params

    seen, apparent, blocks = {}, 0, 0
    for fname in sorted(set(index["weight_map"].values())):
        f = tmp_path / fname
        st = os.stat(f)
        assert st.st_size <= 5e9 + 1e6
        apparent += st.st_size
        blocks += st.st_blocks
        with safe_open(str(f), "pt") as g:
            assert g.metadata() == {"format": "pt"}
            for k in g.keys():
                sl = g.get_slice(k)
                assert sl.get_dtype() == "BF16"
                seen[k] = tuple(sl.get_shape())
                assert index["weight_map"][k] == fname
    assert seen == shapes
    assert seen["model.embed_tokens.weight"] == (vocab, 8192)
    assert seen["model.layers.79.self_attn.k_proj.weight"] == (1024, 8192)
    assert seen["model.layers.0.mlp.down_proj.weight"] == (8192, 28672)
    assert apparent > 2 * params
    assert blocks * 512 < 10e6, f"sparse checkpoint uses {blocks * 512} bytes of disk"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["vocab_size"] == vocab and cfg["num_hidden_layers"] == 80
    # A read of a hole gives zeros.
    with safe_open(str(tmp_path / index["weight_map"]["model.norm.weight"]), "pt") as g:
        assert g.get_slice("model.norm.weight")[:8].eq(0).all()


# --------------------------------------------------------------------------- helpers


@pytest.mark.slow
def test_run_mergekit_linear_is_mean(llama_family_f32, tmp_path):
    a, b = llama_family_f32["ft1"], llama_family_f32["ft3"]
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 0.5}},
            {"model": str(b), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    out = run_mergekit(recipe, tmp_path / "mk")
    sa, sb = load_state(a), load_state(b)
    assert_same_tensors(out, {k: (sa[k] + sb[k]) / 2 for k in sa})
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    # Cached: a second run of the same recipe copies the first result.
    t = time.perf_counter()
    again = run_mergekit(recipe, tmp_path / "again")
    assert time.perf_counter() - t < 1.0
    assert_same_tensors(again, out)


def test_assert_same_tensors_tolerances():
    x = torch.tensor([1.0, 0.02, -3.0, 0.0]).bfloat16()
    nxt = (x.view(torch.int16) + 1).view(torch.bfloat16)  # one ulp away in magnitude
    nxt[3] = 0
    assert_same_tensors({"w": x}, {"w": x})
    with pytest.raises(AssertionError, match=r"w: 3/4 elements differ; max \|a-b\| = 0.0156"):
        assert_same_tensors({"w": nxt}, {"w": x})
    assert_same_tensors({"w": nxt}, {"w": x}, ulps=1)
    assert_same_tensors({"w": nxt}, {"w": x}, atol=0.02)
    with pytest.raises(AssertionError, match="dtype"):
        assert_same_tensors({"w": x}, {"w": x.float()})
    assert_same_tensors({"w": x}, {"w": x.float()}, check_dtype=False)
    with pytest.raises(AssertionError, match="only in"):
        assert_same_tensors({"w": x, "v": x}, {"w": x})
    nan = torch.tensor([float("nan"), 1.0])
    assert_same_tensors({"w": nan}, {"w": nan.clone()})
    with pytest.raises(AssertionError, match="NaN"):
        assert_same_tensors({"w": nan}, {"w": torch.tensor([0.0, 1.0])})
    assert ulp_bf16(torch.tensor([1.0, 0.02])).tolist() == [2.0**-7, 2.0**-13]


def test_free_port():
    import socket

    port = free_port()
    assert 1024 <= port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_run_cli_help():
    if not (REPO_ROOT / "distmerge" / "cli.py").exists():
        pytest.skip("distmerge/cli.py is not written yet")
    proc = run_cli("--help", timeout=120, fresh=True)  # the module entry point of a new interpreter
    assert proc.returncode == 0, proc.stderr
    assert "distmerge" in proc.stdout and "run" in proc.stdout


def test_demo_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO_ROOT / "launch" / "demo.sh")], check=True)
