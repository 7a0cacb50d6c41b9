"""distmerge align: Git Re-Basin weight matching (distmerge/align.py)."""

import json

import pytest
import torch

from distmerge.align import align, apply_permutation, llama_spec, objective, weight_matching
from distmerge.demo import llama_config, make_llama
from tests.helpers import run_main
from tests.skills_fixtures import skill_models  # noqa: F401  (fixture)

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


def valid_perms(p):
    """Every permutation a unit group allows (heads: whole KV groups, query heads inside them)."""
    import itertools

    g = p.group
    inner = list(itertools.permutations(range(g)))
    return [
        torch.tensor([j * g + k for j, order in zip(outer, inners) for k in order])
        for outer in itertools.permutations(range(p.size // g))
        for inners in itertools.product(inner, repeat=p.size // g)
    ]


@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (4, 2), (2, 2)])
def test_each_coordinate_step_is_the_brute_force_optimum_and_ascent_is_monotone(heads, kv_heads, monkeypatch):
    """On a model small enough to enumerate (hidden 4, intermediate 4), each LAP (the heads' two
    levels included) finds the permutation that maximises the whole objective with the others
    fixed, and the objective never falls from one coordinate step to the next."""
    import random

    import distmerge.align as align_module
    from distmerge.tinyllama import ModelArgs, init_weights

    args = ModelArgs(vocab=5, layers=2, hidden=4, intermediate=4, heads=heads, kv_heads=kv_heads)
    gen = torch.Generator().manual_seed(heads + kv_heads)
    ref = {n: torch.randn(t.shape, generator=gen) for n, t in init_weights(args, 0).items()}
    model = {n: torch.randn(t.shape, generator=gen) for n, t in ref.items()}
    spec = llama_spec(args.config(), ref)
    rng = random.Random(0)
    perms = {p.name: rng.choice(valid_perms(p)) for p in spec}
    value = lambda ps: objective(ref, apply_permutation(model, spec, ps))  # noqa: E731
    for p in spec:
        new, _ = align_module._solve(ref, model, spec, perms, p)
        best = max(value({**perms, p.name: q}) for q in valid_perms(p))
        assert value({**perms, p.name: new}) == pytest.approx(best, rel=1e-9), p.name
    trace, solve = [], align_module._solve

    def spy(ref_, model_, spec_, perms_, perm):
        trace.append(value(perms_))
        return solve(ref_, model_, spec_, perms_, perm)

    monkeypatch.setattr(align_module, "_solve", spy)
    final, _ = weight_matching(ref, model, spec, seed=1)
    trace.append(value(final))
    assert all(b >= a - 1e-9 for a, b in zip(trace, trace[1:])) and trace[-1] > trace[0]


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


def test_without_scipy_align_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from distmerge.errors import MergeError

    state = make_llama(tmp_path / "ref", seed=0, num_layers=1, dtype=torch.float32, tokenizer=False)
    spec = llama_spec(llama_config(num_layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128), state)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(MergeError, match="needs scipy: pip install scipy"):
        weight_matching(state, state, spec)


def test_tied_embeddings_planted_permutation(tmp_path):
    state = make_llama(tmp_path / "ref", seed=0, num_layers=1, tie_embeddings=True, dtype=torch.float32, tokenizer=False)
    assert "lm_head.weight" not in state
    config = llama_config(num_layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128, tie_embeddings=True)
    spec = llama_spec(config, state)
    model = apply_permutation(state, spec, random_perms(spec, seed=9))
    perms, _ = weight_matching(state, model, spec, seed=3)
    aligned = apply_permutation(model, spec, perms)
    assert all(torch.equal(aligned[n], state[n]) for n in state)


def test_align_rejects_models_of_different_shapes(tmp_path):
    from distmerge.errors import MergeError

    make_llama(tmp_path / "a", seed=0, num_layers=2, tokenizer=False)
    make_llama(tmp_path / "b", seed=0, num_layers=2, intermediate=96, tokenizer=False)
    with pytest.raises(MergeError, match="differ in shape"):
        align(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out"))


ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory, skill_models):
    """Two skills-harness bases trained from different initialisations, B aligned to A by
    weight matching and by activation matching (on 256 calibration rows drawn apart from the
    evaluation rows), and the loss along each linear path on 512 fixed pre-training rows. A is
    the skills fixture's base (``train_base`` with seed 0), B is trained here from seed 1
    (~15 s on 2 cores)."""
    import random
    from types import SimpleNamespace

    import torch.nn.functional as F

    from distmerge.activation_matching import activation_matching
    from distmerge.skills import SKILLS, _rows, sample, train_base
    from distmerge.tinyllama import forward, load_model

    root = tmp_path_factory.mktemp("bases")
    wa, args = load_model(skill_models["base"])
    wb, _ = load_model(train_base(root / "b", seed=1))
    spec = llama_spec(args.config(), wa)
    perms, _ = weight_matching(wa, wb, spec, seed=0)
    by_weights = apply_permutation(wb, spec, perms)

    def rows(seed, n):
        rng = random.Random(seed)
        return _rows([sample(rng.choice(list(SKILLS)), rng) for _ in range(n)], False)

    by_activations, _ = activation_matching(wa, wb, args.config(), spec, rows(7, 256)[0])
    tokens, targets = rows(123, 512)

    def loss(w):
        with torch.no_grad():
            out = forward(w, args, tokens)
            return float(F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.view(-1), ignore_index=-100))

    def curve(b):
        return [loss({k: (1 - a) * wa[k] + a * b[k] for k in wa}) for a in ALPHAS]

    curves = {"before": curve(wb), "weights": curve(by_weights), "activations": curve(by_activations)}
    print("\nalpha       " + "  ".join(f"{a:6.2f}" for a in ALPHAS))
    for name, c in curves.items():
        print(f"{name:11s} " + "  ".join(f"{x:6.3f}" for x in c))
    return SimpleNamespace(wa=wa, wb=wb, by_weights=by_weights, by_activations=by_activations, **curves)


def barrier(curve):
    """The loss at the midpoint above the mean of the two ends."""
    return curve[2] - (curve[0] + curve[-1]) / 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_alignment_of_independent_bases_keeps_the_function_and_moves_b_closer(two_bases):
    b = two_bases
    dist = lambda w: sum(float((b.wa[k] - w[k]).pow(2).sum()) for k in b.wa) ** 0.5  # noqa: E731
    for aligned, curve in ((b.by_weights, b.weights), (b.by_activations, b.activations)):
        assert curve[-1] == pytest.approx(b.before[-1], abs=1e-5)  # the same model B, transformed
        assert curve[0] == b.before[0]
        assert dist(aligned) < 0.95 * dist(b.wb)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.xfail(strict=True, reason="measured: weight matching does not lower the barrier at alpha = 0.5 on these bases, nor on wider, longer or weight-decayed ones (README, Git Re-Basin)")
def test_weight_matching_lowers_the_loss_barrier(two_bases):
    assert two_bases.weights[2] < two_bases.before[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_activation_matching_halves_the_loss_barrier(two_bases):
    """Measured 1.73 -> 0.57 (README): the aligned midpoint knows something (its loss is below
    the 3.36 of predicting each token by its frequency), the unaligned one does not."""
    assert barrier(two_bases.activations) < barrier(two_bases.before) / 2
    assert two_bases.activations[2] < 3.0 < 3.36 < two_bases.before[2]
