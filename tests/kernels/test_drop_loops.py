"""numba's loops for DARE's and DELLA's passes over bf16 inputs give the torch ops' bits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distmerge import kernels, rng, threads
from distmerge.kernels import loops, reference
from distmerge.methods import sparsify
from tests.kernels.test_loops import CHUNK, SHAPE, bf16, chunked, finite_words

SEEDS = st.integers(0, (1 << 64) - 1)


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.integers(0, 1 << 40), st.integers(1, 2000), st.one_of(st.sampled_from([0.0, 1.0, 1e-9, 0.5]), st.floats(0, 1)))
def test_bernoulli_keep_draws_rngs_mask(seed, start, n, p):
    """The vectorized Philox: every start (unaligned blocks of four words), length and p."""
    keep = torch.empty(n, dtype=torch.bool)
    loops.bernoulli_keep(seed, start, p, keep)
    assert torch.equal(keep, rng.bernoulli_keep(seed, (n,), p, offset=start))


def near(data, words: list[int]) -> list[int]:
    """A fine-tune of these bf16 words: a few ulps away (many equal |τ|), or anywhere."""
    if data.draw(st.booleans()):
        return [w ^ data.draw(st.integers(0, 3)) for w in words]
    return data.draw(finite_words(len(words)))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 9), st.integers(2, 300), SEEDS, st.integers(0, 1 << 40), st.integers(1, 2))
def test_magprune_is_dellas_mask_and_magnitudes(data, rows, columns, seed, start, parts):
    """Per row: ranks with ties (lower index ranked higher), the keep probabilities' float32
    roundings, the draws at any start; |τ| and |τ ⊙ m| for the rescale; rows split between
    one or two threads."""
    words = data.draw(finite_words(rows * columns))
    base, x = bf16(words), bf16(near(data, words))
    density = data.draw(st.floats(0.05, 0.95))
    epsilon = data.draw(st.floats(0, min(density, 1 - density) * 0.999))
    keep = torch.empty(rows * columns, dtype=torch.bool)
    magnitudes, kept = torch.empty(rows * columns), torch.empty(rows * columns)
    with threads.using(parts):
        assert loops.magprune(base, x, columns, density, epsilon, seed, start, keep, magnitudes, kept)
    delta = (x.float() - base.float()).view(rows, columns)
    probs = sparsify.della_probabilities(delta, density, epsilon)
    expected = rng.bernoulli_keep(seed, probs.shape, probs, offset=start).view(-1)
    assert torch.equal(keep, expected)
    assert torch.equal(magnitudes, delta.abs().view(-1))
    assert torch.equal(kept.view(torch.int32), reference.kept(expected, delta.view(-1)).abs().view(torch.int32))


def test_a_nan_task_vector_is_left_to_torch():
    base = torch.zeros(40, dtype=torch.bfloat16)
    x = base.clone()
    x[13] = float("nan")
    keep, m = torch.empty(40, dtype=torch.bool), torch.empty(40)
    assert not loops.magprune(base, x, 20, 0.5, 0.1, 7, 0, keep)
    assert not loops.masked_magnitudes(base, x, keep, m, m.clone())
    x[13] = float("inf")  # ranks as the largest: the loop applies
    assert loops.magprune(base, x, 20, 0.5, 0.1, 7, 0, keep)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 3000), st.integers(1, 4), st.booleans(), st.booleans())
def test_masked_combine_is_the_references_task_combine(data, n, models, consensus, normalize):
    """Masks (or none), L1 factors (or none), weights and λ: the bits of the reference."""
    words = data.draw(finite_words(n))
    base = bf16(words)
    xs = [bf16(near(data, words)) for _ in range(models)]
    weight = [data.draw(st.floats(-2, 2, width=32)) for _ in xs]
    lambda_ = data.draw(st.sampled_from([1.0, 0.7]))
    keeps, factors, deltas = [], [], []
    for x in xs:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
        keeps.append(data.draw(st.sampled_from([None, torch.rand(n, generator=g) < 0.5])))
        factors.append(data.draw(st.sampled_from([None, torch.tensor(data.draw(st.floats(0.5, 3, width=32)))])))
        delta = x.float() - base.float()
        if keeps[-1] is not None:
            delta = reference.kept(keeps[-1], delta)
            if factors[-1] is not None:
                delta = delta * factors[-1]
        else:
            factors[-1] = None  # a model kept whole is never rescaled
        deltas.append(delta)
    out = torch.empty(n)
    flags = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    assert loops.masked_combine(base, xs, keeps, factors, weight, **flags, out=out)
    expected = reference.task_combine(base, deltas, weight, **flags)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("nan", [False, True])
def test_chunked_drops_through_the_loops_are_the_torch_ops(name, rescale, nan, monkeypatch):
    """bf16 fine-tunes a few ulps from the base, with and without a NaN: the torch path's bits,
    and the loops combined every chunk but the NaN's."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(SHAPE, generator=g).bfloat16()
    fine = [(base.float() * (1 + 0.01 * torch.randn(SHAPE, generator=g))).bfloat16() for _ in range(3)]
    if nan:
        fine[1].view(-1)[70000] = float("nan")
    calls = []
    masked_combine = loops.masked_combine
    monkeypatch.setattr(loops, "masked_combine", lambda *a, **k: calls.append(masked_combine(*a, **k)) or calls[-1])
    params = dict(weight=[0.6, -0.4, 0.5], density=[0.3, 0.7, 1.0], normalize=True, rescale=rescale, lambda_=0.9)
    params["seeds"] = [rng.derive_seed(5, name, str(i)) for i in range(3)]
    if name.startswith("della"):
        params["epsilon"] = [0.1, 0.2, 0.05]
    fused = chunked(name, base, fine, params, kernels.KernelOptions())
    torch_ops = chunked(name, base, fine, params, kernels.KernelOptions(compile="never"))
    assert torch.equal(fused.view(torch.int32), torch_ops.view(torch.int32))
    chunks = -(-base.numel() // (CHUNK // 1000 * 1000 if name.startswith("della") else CHUNK))
    assert len(calls) == chunks and calls.count(False) == int(nan)


# ---------------------------------------------------------------- sce


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 3000), st.integers(1, 4))
def test_sces_variances_squares_and_erase_merge_are_torchs(data, n, models):
    """Welford's float64 variances, the masked squares the energies sum, and the sign-erased
    weighted mean, against ``sce``'s own torch functions: the same bits."""
    from distmerge.methods import sce

    words = data.draw(finite_words(n))
    base = bf16(words)
    xs = [bf16(near(data, words)) for _ in range(models)]
    deltas = [x.float() - base.float() for x in xs]
    var = torch.empty(n)
    assert loops.variances(base, xs, var)
    assert torch.equal(var.view(torch.int32), sce.welford_variance(deltas).view(torch.int32))
    keep = data.draw(st.sampled_from([None, var > var.median()]))
    masked = deltas if keep is None else [reference.kept(keep, d) for d in deltas]
    squares = torch.empty(n)
    assert loops.masked_squares(base, xs[0], keep, squares)
    assert torch.equal(squares.view(torch.int32), masked[0].square().view(torch.int32))
    weights = sce.task_vector_weights(masked) if data.draw(st.booleans()) else [torch.tensor(1.0 / models)] * models
    out = torch.empty(n)
    finite = all(bool(w.isfinite()) for w in weights)  # else torch's (an infinite energy: NaN weights)
    assert loops.erase_merge(base, xs, keep, weights, out) == finite
    expected = sce.erase_and_merge(base.float(), masked, weights)
    assert not finite or torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
@pytest.mark.parametrize("nan", [False, True])
def test_chunked_sce_through_the_loops_is_the_torch_ops(select_topk, nan, monkeypatch):
    """bf16 fine-tunes near the base (equal variances: the top-k's ties), with and without a
    NaN: the torch path's bits."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(SHAPE, generator=g).bfloat16()
    fine = [(base.float() * (1 + 0.01 * torch.randn(SHAPE, generator=g))).bfloat16() for _ in range(3)]
    if nan:
        fine[2].view(-1)[123_456] = float("nan")
    calls = []
    erase_merge = loops.erase_merge
    monkeypatch.setattr(loops, "erase_merge", lambda *a, **k: calls.append(erase_merge(*a, **k)) or calls[-1])
    params = {"select_topk": select_topk}
    fused = chunked("sce", base, fine, params, kernels.KernelOptions())
    torch_ops = chunked("sce", base, fine, params, kernels.KernelOptions(compile="never"))
    assert torch.equal(fused.view(torch.int32), torch_ops.view(torch.int32))
    # A NaN τ kept whole makes its model's energy NaN, so every weight: each chunk then goes
    # to torch. Not selected (NaN > threshold is False), only its chunk does.
    expected = 0 if not nan else len(calls) if select_topk == 1 else 1
    assert len(calls) == -(-base.numel() // CHUNK) and calls.count(False) == expected


# ---------------------------------------------------------------- model_stock


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 3000), st.integers(2, 4), st.floats(-2, 2, width=32))
def test_model_stocks_pass_and_interpolation_are_torchs(data, n, models, ratio):
    """τⱼ and the products τᵢ ⊙ τⱼ its norms and dot products sum, and t·θ̄ + (1 − t)·θ₀."""
    words = data.draw(finite_words(n))
    base = bf16(words)
    xs = [bf16(near(data, words)) for _ in range(models)]
    tau, products = torch.empty(n), torch.empty(models - 1, n)
    assert loops.stock_pass(base, xs[-1], xs[:-1], tau, products)
    deltas = [x.float() - base.float() for x in xs]
    assert torch.equal(tau.view(torch.int32), deltas[-1].view(torch.int32))
    for product, delta in zip(products, deltas):
        assert torch.equal(product.view(torch.int32), (delta * deltas[-1]).view(torch.int32))
    t, out = torch.tensor([ratio]), torch.empty(n)
    assert loops.stock_interpolate(base, xs, t, out)
    expected = reference.stock_interpolate(base.float(), [x.float() for x in xs], t, overwrite=True)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("nan", [False, True])
def test_chunked_model_stock_through_the_loops_is_the_torch_ops(nan, monkeypatch):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(SHAPE, generator=g).bfloat16()
    fine = [(base.float() * (1 + 0.01 * torch.randn(SHAPE, generator=g))).bfloat16() for _ in range(3)]
    if nan:
        fine[1].view(-1)[200_000] = float("nan")
    calls = []
    interpolate = loops.stock_interpolate
    monkeypatch.setattr(loops, "stock_interpolate", lambda *a, **k: calls.append(interpolate(*a, **k)) or calls[-1])
    fused = chunked("model_stock", base, fine, {}, kernels.KernelOptions())
    torch_ops = chunked("model_stock", base, fine, {}, kernels.KernelOptions(compile="never"))
    assert torch.equal(fused.view(torch.int32), torch_ops.view(torch.int32))
    assert len(calls) == -(-base.numel() // CHUNK) and calls.count(False) == int(nan)
