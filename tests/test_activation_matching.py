"""distmerge align --data: activation matching with a rotated residual stream (distmerge/activation_matching.py).

The barrier it lowers on the skills harness's bases is measured in tests/test_align.py."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distmerge.activation_matching import Transforms, activation_matching, apply_transforms
from distmerge.align import llama_spec
from distmerge.demo import llama_config, make_llama, save_safetensors
from distmerge.tinyllama import ModelArgs, forward
from tests.helpers import run_main


def config(tied=False, kv_heads=2):
    return llama_config(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=kv_heads, vocab=128, tie_embeddings=tied)


def model(tmp_path, seed, tied=False, kv_heads=2, sharp=1.0):
    """A random float32 Llama whose norm weights are far from 1; q/k scaled by ``sharp``
    (peaked attention patterns, so that heads differ)."""
    state = make_llama(tmp_path / f"m{seed}", seed=seed, num_layers=2, heads=4, kv_heads=kv_heads, tie_embeddings=tied, dtype=torch.float32)
    gen = torch.Generator().manual_seed(100 + seed)
    for n in state:
        if n.endswith("norm.weight"):
            state[n] = 0.5 + torch.rand(state[n].shape, generator=gen)
        if n.endswith(("q_proj.weight", "k_proj.weight")):
            state[n] = state[n] * sharp
    save_safetensors(state, tmp_path / f"m{seed}" / "model.safetensors", metadata={"format": "pt"})
    return state


def tokens(seed, rows=64, length=24):
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def random_transforms(spec, args, seed) -> Transforms:
    """A random orthogonal residual map (a permutation with tied embeddings), permutations of
    MLP units and whole KV head groups, value rotations and rotary-plane rotations."""
    gen = torch.Generator().manual_seed(seed)
    orth = lambda n: torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0].float()  # noqa: E731
    perms, g = {}, args.heads // args.kv_heads
    for p in spec:
        if p.name.endswith(".mlp"):
            perms[p.name] = torch.randperm(p.size, generator=gen)
        elif p.name.endswith(".heads"):
            perms[p.name] = torch.cat([int(j) * g + torch.randperm(g, generator=gen) for j in torch.randperm(p.size // g, generator=gen)])
    if args.tie_embeddings:
        perms["residual"] = torch.randperm(args.hidden, generator=gen)
        q = torch.zeros(args.hidden, args.hidden)
        q[perms["residual"], torch.arange(args.hidden)] = 1.0
    else:
        q = orth(args.hidden)
    hd = args.hidden // args.heads
    values = {i: [orth(hd) for _ in range(args.kv_heads)] for i in range(args.layers)}
    keys = {i: [planes(hd, gen) for _ in range(args.kv_heads)] for i in range(args.layers)}
    return Transforms(residual=q, rotate_residual=not args.tie_embeddings, perms=perms, values=values, keys=keys, similarity={})


def planes(hd, gen):
    """A random rotation of each rotary plane (i, i + hd/2)."""
    theta = torch.rand(hd // 2, generator=gen) * 6.28
    a, b = torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2
    r = torch.zeros(hd, hd)
    r[a, a], r[a, b], r[b, a], r[b, b] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    return r


@pytest.mark.parametrize("tied,kv_heads", [(False, 2), (False, 4), (True, 2)])
def test_aligned_model_computes_the_same_logits_with_the_references_norms(tmp_path, tied, kv_heads):
    import transformers

    ref, b = model(tmp_path, 0, tied, kv_heads), model(tmp_path, 1, tied, kv_heads)
    cfg = config(tied, kv_heads)
    aligned, t = activation_matching(ref, b, cfg, llama_spec(cfg, b), tokens(0))
    assert t.rotate_residual is not tied
    if not tied:  # the model takes the reference's norm weights: the two interpolate in one gauge
        assert torch.equal(aligned["model.norm.weight"], ref["model.norm.weight"])
        assert torch.equal(aligned["model.layers.1.input_layernorm.weight"], ref["model.layers.1.input_layernorm.weight"])
    save_safetensors(aligned, tmp_path / "m1" / "model.safetensors", metadata={"format": "pt"})
    x = tokens(1, rows=2, length=16)
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m1", torch_dtype=torch.float32)
    with torch.no_grad():
        got = m(x).logits
    want = forward(b, ModelArgs.from_config(cfg), x)
    assert got.abs().max() > 0.1  # logits large enough for the tolerance to mean something
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_activation_matching_undoes_a_planted_rotation_and_permutation(tmp_path, tied):
    ref = model(tmp_path, 0, tied, sharp=20.0)
    cfg = config(tied)
    args, spec = ModelArgs.from_config(cfg), llama_spec(cfg, ref)
    planted = apply_transforms(ref, ref, spec, random_transforms(spec, args, seed=3), args)
    assert max(float((planted[n] - ref[n]).abs().max()) for n in ref) > 0.01
    torch.testing.assert_close(forward(planted, args, tokens(1)), forward(ref, args, tokens(1)), atol=1e-4, rtol=1e-4)
    aligned, t = activation_matching(ref, planted, cfg, spec, tokens(2))
    for n in ref:
        torch.testing.assert_close(aligned[n], ref[n], atol=1e-4, rtol=1e-4, msg=n)
    assert min(t.similarity.values()) > 0.999


def test_align_command_with_data_matches_activations(tmp_path):
    import transformers
    make_llama(tmp_path / "ref", seed=0, num_layers=2, heads=4, kv_heads=2, shards=2, dtype=torch.bfloat16)
    make_llama(tmp_path / "model", seed=1, num_layers=2, heads=4, kv_heads=2, shards=2, dtype=torch.bfloat16)
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(f"the {i} quick brown fox {i * 7} jumps over {i % 5} lazy dogs" for i in range(200)))
    res = run_main("align", tmp_path / "model", "--to", tmp_path / "ref", tmp_path / "out", "--data", text, "--rows", "8", "--length", "32")
    assert res.returncode == 0, res.stderr
    assert "matching activations, residual stream rotated" in res.stdout
    record = json.loads((tmp_path / "out" / "align.json").read_text())
    assert record["method"] == "activations" and record["data"] == str(text)
    assert record["objective_after"] > record["objective_before"]
    assert set(record["similarity"]) == {"residual", "layers.0.mlp", "layers.0.heads", "layers.1.mlp", "layers.1.heads"}
    x = tokens(4, rows=2, length=10)
    before = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model", torch_dtype=torch.float32)
    after = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    assert after.model.embed_tokens.weight.dtype == torch.float32  # loaded as asked; stored in bf16:
    from safetensors import safe_open

    with safe_open(str(sorted((tmp_path / "out").glob("*.safetensors"))[0]), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    with torch.no_grad():  # the rotated weights are rounded to bf16 once: close, not equal
        a, b = after(x).logits, before(x).logits
    assert float((a - b).abs().max()) < 0.02 * float(b.abs().max())


def test_align_data_errors_say_what_to_give(tmp_path):
    make_llama(tmp_path / "ref", seed=0, num_layers=2, dtype=torch.float32)
    make_llama(tmp_path / "model", seed=1, num_layers=2, dtype=torch.float32)
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    res = run_main("align", tmp_path / "model", "--to", tmp_path / "ref", tmp_path / "out", "--data", short)
    assert res.returncode == 2 and "fewer than one window of 64; give more text or a smaller --length" in res.stderr
    assert "Traceback" not in res.stderr
    ref = make_llama(tmp_path / "zero", seed=0, num_layers=2, dtype=torch.float32)
    ref["model.layers.1.post_attention_layernorm.weight"][3] = 0.0
    save_safetensors(ref, tmp_path / "zero" / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    res = run_main("align", tmp_path / "model", "--to", tmp_path / "zero", tmp_path / "out3", "--data", text)
    assert res.returncode == 2 and "model.layers.1.post_attention_layernorm.weight has zero entries" in res.stderr
    assert "align without --data (weight matching)" in res.stderr
    make_llama(tmp_path / "bare", seed=0, num_layers=2, dtype=torch.float32, tokenizer=False)
    res = run_main("align", tmp_path / "model", "--to", tmp_path / "bare", tmp_path / "out2", "--data", short)
    assert res.returncode == 2 and "no tokenizer.json" in res.stderr


def test_without_tokenizers_align_data_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from distmerge.activation_matching import calibration_tokens
    from distmerge.errors import MergeError

    make_llama(tmp_path / "ref", seed=0, num_layers=1, dtype=torch.float32)
    text = tmp_path / "t.txt"
    text.write_text("some text\n" * 100)
    assert calibration_tokens(tmp_path / "ref", text, rows=4, length=8).shape == (4, 8)
    limit = json.loads((tmp_path / "ref" / "config.json").read_text())["max_position_embeddings"]
    text.write_text("some text\n" * (limit // 2))
    assert calibration_tokens(tmp_path / "ref", text, rows=10**6, length=1).numel() > limit
    assert calibration_tokens(tmp_path / "ref", text, rows=1, length=10**6).shape == (1, limit)  # capped at its positions
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(MergeError, match="needs the tokenizers library: pip install tokenizers"):
        calibration_tokens(tmp_path / "ref", text, rows=4, length=8)


def test_queries_and_keys_turn_only_plane_by_plane(tmp_path):
    """A rotation of each rotary plane (i, i + head_dim/2), the same for a KV head's keys and
    its query heads, keeps the function; a general rotation of the head's dims does not."""
    ref = model(tmp_path, 0, sharp=5.0)
    cfg = config()
    args, spec = ModelArgs.from_config(cfg), llama_spec(cfg, ref)
    identity = random_transforms(spec, args, seed=1)
    identity.residual = torch.eye(args.hidden)
    identity.perms = {p.name: torch.arange(p.size) for p in spec if p.name != "residual"}
    identity.values = {i: [torch.eye(16)] * args.kv_heads for i in range(args.layers)}
    x = tokens(5)
    turned = apply_transforms(ref, ref, spec, identity, args)
    assert not torch.equal(turned["model.layers.0.self_attn.k_proj.weight"], ref["model.layers.0.self_attn.k_proj.weight"])
    torch.testing.assert_close(forward(turned, args, x), forward(ref, args, x), atol=1e-5, rtol=1e-5)
    gen = torch.Generator().manual_seed(2)
    identity.keys = {i: [torch.linalg.qr(torch.randn(16, 16, generator=gen))[0] for _ in range(args.kv_heads)] for i in range(args.layers)}
    assert (forward(apply_transforms(ref, ref, spec, identity, args), args, x) - forward(ref, args, x)).abs().max() > 1e-3


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(3, 40), cols=st.integers(1, 6), cuts=st.lists(st.integers(1, 39), max_size=4), seed=st.integers(0, 2**16))
def test_correlation_from_batches_is_pearson_of_all_rows(rows, cols, cuts, seed):
    from distmerge.activation_matching import Correlation

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    b = 0.5 * a[:, torch.randperm(cols, generator=gen)] + torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    c = Correlation.zeros(cols)
    bounds = sorted({0, rows, *(x for x in cuts if x < rows)})
    for lo, hi in zip(bounds, bounds[1:]):
        c.add(a[lo:hi], b[lo:hi])
    want = torch.corrcoef(torch.cat([a, b], dim=1).T)[:cols, cols:]
    torch.testing.assert_close(c.matrix(), want, atol=1e-9, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(half=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_each_plane_turns_by_the_best_angle_and_procrustes_is_the_best_orthogonal_map(half, seed):
    from distmerge.activation_matching import _plane_rotations, _procrustes

    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(2 * half, 2 * half, generator=gen, dtype=torch.float64)
    value = lambda r: float((r.double() * m).sum())  # tr(Rᵀ m)  # noqa: E731
    r = _plane_rotations(m)
    assert torch.allclose(r.T @ r, torch.eye(2 * half), atol=1e-6) and float(torch.linalg.det(r)) > 0
    for _ in range(20):  # any other turn of the planes does no better
        assert value(planes(2 * half, gen)) <= value(r) + 1e-6
    q = _procrustes(m)
    assert torch.allclose(q.T @ q, torch.eye(2 * half), atol=1e-6)
    for _ in range(20):
        other = torch.linalg.qr(torch.randn(2 * half, 2 * half, generator=gen, dtype=torch.float64))[0]
        assert value(other) <= value(q) + 1e-6


def test_a_head_dim_apart_from_hidden_over_heads_is_refused():
    from distmerge.activation_matching import check_alignable
    from distmerge.errors import MergeError

    cfg = llama_config(num_layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=32, vocab=128)
    with pytest.raises(MergeError, match="activation matching needs head_dim = hidden_size / heads"):
        check_alignable(cfg, {})


def test_layers_are_gathered_one_at_a_time(tmp_path, monkeypatch):
    """Each layer's sums come before the next layer runs (so only one layer's are ever held),
    and the residual stream's are summed over all 2 × layers + 1 boundaries."""
    import distmerge.activation_matching as am

    ref, b = model(tmp_path, 0), model(tmp_path, 1)
    args = ModelArgs.from_config(config())
    ran = []
    block = am._block
    monkeypatch.setattr(am, "_block", lambda w, a, i, *rest: ran.append(i) or block(w, a, i, *rest))
    residual = am.Residual.zeros(args.hidden, args.rms_norm_eps)
    it = am.layers(ref, b, args, tokens(0, rows=40), residual, batch=16)
    first = next(it)
    assert ran == [0] * 6 and isinstance(first, am.Layer)  # 3 batches × 2 models, layer 0 only
    assert first.mlp.n == 40 * 24
    assert len(list(it)) == 1 and ran == [0] * 6 + [1] * 6
    assert float(residual.norms[0]) == pytest.approx(5 * 40 * 24 * args.hidden, rel=1e-2)  # x̂: unit RMS (but for eps)
