"""numba's loops for the TIES family's passes over bf16 inputs give the torch ops' bits."""

from __future__ import annotations

import filecmp
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distmerge import kernels
from distmerge.kernels import loops, reference
from distmerge.methods import get
from distmerge.methods.sparsify import NO_DROP, NONE_KEPT, rule_mask

MAGNITUDE = 0x7FFFFFFF


def bf16(words: list[int]) -> torch.Tensor:
    return torch.tensor(words, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def finite_words(n: int):
    """bf16 bit patterns of finite values (every exponent but all ones), ±0 and subnormals included."""
    return st.lists(st.integers(0, 0xFFFF).filter(lambda w: (w & 0x7F80) != 0x7F80), min_size=n, max_size=n)


def magnitude_bits(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x.float() - base.float()).view(torch.int32) & MAGNITUDE


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 300), st.integers(1, 3))
def test_histograms_selections_and_counts_are_torchs(data, n, models):
    base = bf16(data.draw(finite_words(n)))
    xs = [bf16(data.draw(finite_words(n))) for _ in range(models)]
    bits = [magnitude_bits(base, x) for x in xs]
    hist = torch.zeros(models, 1 << 15, dtype=torch.int64)
    loops.magnitude_histograms(base, xs, hist)
    assert all(torch.equal(row, torch.bincount(b >> 16, minlength=1 << 15)) for row, b in zip(hist, bits))
    buckets = [(int(b[data.draw(st.integers(0, n - 1))]) >> 16, data.draw(st.integers(0, 0x7F7F))) for b in bits]
    buckets = [data.draw(st.sampled_from([pair, pair[:1] * 2])) for pair in buckets]  # two buckets, or one
    picked = loops.magnitude_selects(base, xs, buckets, torch.empty(models, n, dtype=torch.int32))
    for entries, b, (first, second) in zip(picked, bits, buckets):
        assert torch.equal(entries, b[((b >> 16) == first) | ((b >> 16) == second)])
    assert loops.count_magnitude(base, xs[0], int(bits[0][0])) == int((bits[0] == bits[0][0]).sum())


@pytest.mark.parametrize("n", [2048, 3 * 2048 + 5])
def test_selections_across_blocks_are_torchs(n):
    """The selection loop works block by block and finds its entries eight flags at a time:
    entries at the edges of blocks and of those groups, and buckets holding many entries,
    are picked in flat order as torch picks them."""
    g = torch.Generator().manual_seed(n)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    xs = [(base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16() for _ in range(2)]
    bits = [magnitude_bits(base, x) for x in xs]
    common = int(torch.bincount(bits[0] >> 16).argmax())  # the fullest bucket
    # Model 1's buckets hold its entries at the positions of a partial last block's unused
    # flags (5 and 6 of the block before): stale flags there must not be read for model 0.
    edge = max(0, n - 2048)  # position 5 of the block before the last, where the last has 5 entries
    buckets = [(common, int(bits[0][-1]) >> 16), (int(bits[1][edge]) >> 16, int(bits[1][edge + 1]) >> 16)]
    picked = loops.magnitude_selects(base, xs, buckets, torch.empty(2, n, dtype=torch.int32))
    for entries, b, (first, second) in zip(picked, bits, buckets):
        want = b[((b >> 16) == first) | ((b >> 16) == second)]
        assert want.numel() > 1 and torch.equal(entries, want)


def test_histogram_of_nonfinite_differences_counts_them_in_the_nan_and_inf_buckets():
    """The only place the loops may differ from torch: which NaN a difference of two NaNs is.
    Every such entry still lands at or above the Inf bucket, which sends the merge to torch."""
    words = [0x7F8A, 0x7FDD, 0xFF80, 0x7F80, 0x3F80, 0x0000]
    base, x = bf16(words), bf16(words[::-1])
    hist = torch.zeros(1, 1 << 15, dtype=torch.int64)
    loops.magnitude_histograms(base, [x], hist)
    expected = torch.bincount(magnitude_bits(base, x) >> 16, minlength=1 << 15)
    assert int(hist[0, 0x7F80:].sum()) == int(expected[0x7F80:].sum()) == 6
    assert torch.equal(hist[0, :0x7F80], expected[:0x7F80])


def rules(data, bits: torch.Tensor):
    """A ``ChunkedTopK.rule`` over these bits: a plain cut, or a cut with its first n ties."""
    value = int(bits[data.draw(st.integers(0, bits.numel() - 1))])
    kind = data.draw(st.sampled_from(["all", "none", "cut", "ties"]))
    if kind == "all":
        return (-1, -1, 0)
    if kind == "none":
        return (NONE_KEPT, -1, 0)
    if kind == "cut":
        return (value, -1, 0)
    return (value, value, data.draw(st.integers(1, int((bits == value).sum()))))


@settings(max_examples=80, deadline=None)
@given(st.data(), st.integers(1, 3000), st.integers(1, 4), st.booleans(), st.booleans())
def test_trim_combine_is_the_references_task_combine(data, n, models, consensus, normalize):
    """Arbitrary finite bf16 values (exact zeros, equal magnitudes, overflow to Inf in the
    products), keep and drop rules with and without counted ties, any weights and λ: the bits
    of ``reference.task_combine`` over the trimmed task vectors. n spans blocks (2048)."""
    words = data.draw(finite_words(n))
    base = bf16(words)
    xs = []
    for _ in range(models):  # near the base (many equal |δ|), or anywhere
        near = data.draw(st.booleans())
        other = data.draw(finite_words(n)) if not near else [w ^ data.draw(st.integers(0, 3)) for w in words]
        xs.append(bf16(other))
    weight = [data.draw(st.floats(-2, 2, width=32)) for _ in xs]
    lambda_ = data.draw(st.sampled_from([1.0, 0.7, 1.3]))
    keep, drop, deltas = [], [], []
    for x in xs:
        bits = magnitude_bits(base, x)
        keep.append(rules(data, bits))
        drop.append(data.draw(st.sampled_from([NO_DROP, rules(data, bits)])))
        delta = x.float() - base.float()
        deltas.append(reference.kept(rule_mask(bits, keep[-1]) & ~rule_mask(bits, drop[-1]), delta))
    out = torch.empty(n, dtype=torch.float32)
    assert loops.trim_combine(base, xs, weight, keep, drop, consensus=consensus, normalize=normalize, lambda_=lambda_, out=out)
    expected = reference.task_combine(base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("nan", [False, True])
def test_task_merge_of_bf16_tensors_runs_the_loop_with_the_references_bits(consensus, nan, monkeypatch):
    """``kernels.task_merge`` without a keep rule (task_arithmetic) takes the loop for bf16
    tensors; a NaN task vector sends it to the reference, whose NaN bits it then has."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(70001, generator=g).bfloat16()
    xs = [(base.float() + 0.01 * torch.randn(70001, generator=g)).bfloat16() for _ in range(3)]
    if nan:
        xs[0][7] = base[7] = float("nan")
        xs[1][9] = float("inf")
    calls = []
    task_merge = loops.task_merge
    monkeypatch.setattr(loops, "task_merge", lambda *a, **k: calls.append(1) or task_merge(*a, **k))
    flags = dict(consensus=consensus, normalize=True, lambda_=0.8)
    merged = kernels.task_merge(base, xs, [0.5, -0.3, 0.9], **flags)
    expected = reference.task_merge(base, xs, [0.5, -0.3, 0.9], **flags)
    assert calls == [1] and torch.equal(merged.view(torch.int32), expected.view(torch.int32))
    assert (task_merge(base, xs, [0.5, -0.3, 0.9], **flags) is None) == nan
    never = kernels.KernelOptions(compile="never")
    kernels.task_merge(base, xs, [0.5, -0.3, 0.9], **flags, options=never)
    assert calls == [1]  # "never": no loop


def test_only_bf16_cpu_chunks_are_eligible():
    x = torch.zeros(8, dtype=torch.bfloat16)
    assert loops.eligible(x, [x, x])
    assert not loops.eligible(None, [x])
    assert not loops.eligible(x, [x.float()])
    assert not loops.eligible(x.half(), [x.half()])


# ---------------------------------------------------------------- through the chunked merge


SHAPE, CHUNK = (300, 1000), 1 << 14


def chunked(name: str, base, fine, params: dict, options) -> torch.Tensor:
    """The method's chunked merge of the whole tensor, read as ``TensorInputs.read_range`` reads."""

    def read(i, j, models=None, stored=False):
        how = (lambda x: x) if stored else torch.Tensor.float
        chosen = fine if models is None else [fine[k] for k in models]
        return how(base.view(-1)[i:j]), [how(x.view(-1)[i:j]) for x in chosen]

    out = torch.empty(base.numel())
    for i, j, value in get(name).chunked(read, SHAPE, CHUNK, **params, options=options):
        out[i:j] = value
    return out


@pytest.mark.parametrize("name, extra", [("ties", {}), ("breadcrumbs", {"gamma": [0.01, 0.02]}), ("breadcrumbs_ties", {"gamma": [0.02, 0.01]})])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_chunked_merges_through_the_loops_are_the_torch_ops(name, extra, nonfinite, monkeypatch):
    """Fine-tunes a few bf16 ulps from the base (many equal |τ|: the chunks where only some
    ties are kept), with and without NaN and Inf in a model: the bits of the torch path, and
    the loops ran where the scores are finite (and not where they are not)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(SHAPE, generator=g).bfloat16()
    fine = [(base.float() * (1 + 0.01 * torch.randn(SHAPE, generator=g))).bfloat16() for _ in range(2)]
    if nonfinite:
        fine[1].view(-1)[[5, 70000]] = torch.tensor([float("nan"), float("inf")], dtype=torch.bfloat16)
    calls = []
    trim_combine = loops.trim_combine
    monkeypatch.setattr(loops, "trim_combine", lambda *a, **k: calls.append(1) or trim_combine(*a, **k))
    params = {"weight": [0.6, 0.5], "density": [0.4, 0.7], "normalize": True, "lambda_": 0.9, **extra}
    fused = chunked(name, base, fine, params, kernels.KernelOptions())
    torch_ops = chunked(name, base, fine, params, kernels.KernelOptions(compile="never"))
    assert torch.equal(fused.view(torch.int32), torch_ops.view(torch.int32))
    assert (len(calls) > 0) == (not nonfinite)


def test_ties_on_bf16_checkpoints_through_the_loops_is_the_whole_tensor_merge(llama_family, tmp_path, monkeypatch):
    """End to end: bf16 checkpoints merged in chunks of 4099 through the loops give the bytes
    of the whole-tensor merge (plain torch)."""
    from distmerge import tensor_merge
    from tests.test_merge_vs_mergekit import distmerge, models

    f = llama_family
    recipe = {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", {"weight": 0.7, "density": 0.3}), ("ft2", {"weight": -0.4, "density": 0.7})),
        "parameters": {"lambda": 0.9},
        "dtype": "bfloat16",
    }
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1 << 40)
    whole = distmerge(recipe, tmp_path / "whole")
    calls = []
    trim_combine = loops.trim_combine
    monkeypatch.setattr(loops, "trim_combine", lambda *a, **k: calls.append(1) or trim_combine(*a, **k))
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 4099)
    chunked_out = distmerge(recipe, tmp_path / "chunked")
    shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
    assert calls and shards and all(filecmp.cmp(whole / n, chunked_out / n, shallow=False) for n in shards)


def test_three_selections_of_one_score_gather_what_torch_gathers():
    """More than two buckets in one model's selections (beyond what one scan picks): the same
    statistics as ``ChunkedTopK.gather`` over the float32 task vector."""
    from distmerge.methods.sparsify import ChunkedTopK

    g = torch.Generator().manual_seed(2)
    base = torch.randn(5000, generator=g).bfloat16()
    x = (base.float() + 0.1 * torch.randn(5000, generator=g)).bfloat16()
    ways = []
    for stored in (True, False):
        tops = [ChunkedTopK(5000, k) for k in (100, 2500, 4900)]
        for low in (False, True):
            counts = None  # pass 1's histograms, given to the selections after its last chunk
            for start in range(0, 5000, 1000):
                b, y = base[start : start + 1000], x[start : start + 1000]
                if stored:
                    counts = ChunkedTopK.gather_stored([tops], b, [y], low=low, counts=counts)
                else:
                    ChunkedTopK.gather(tops, y.float() - b.float(), low=low)
            if counts is not None:
                ChunkedTopK.add_counts([tops], counts)
        for top in tops:
            top.finish()
        ways.append([(int(top.threshold.view(torch.int32)), top._ties_left) for top in tops])
    assert ways[0] == ways[1] and len({t for t, _ in ways[0]}) == 3


def test_where_the_loops_do_not_import_the_torch_ops_run(monkeypatch):
    """No numba (or no place to cache its loops): the same merge on torch ops, said in the report's path."""
    import sys

    g = torch.Generator().manual_seed(4)
    base = torch.randn(SHAPE, generator=g).bfloat16()
    fine = [(base.float() + 0.01 * torch.randn(SHAPE, generator=g)).bfloat16() for _ in range(2)]
    params = {"weight": [0.6, 0.5], "density": [0.4, 0.7]}
    with_loops = chunked("ties", base, fine, params, None)
    monkeypatch.setitem(sys.modules, "distmerge.kernels.loops", None)  # import fails
    kernels.loops_available.cache_clear()
    try:
        assert not kernels.use_loops(None)
        assert kernels.path("task_merge/band", "cpu", consensus=True) == "torch"
        without = chunked("ties", base, fine, params, None)
    finally:
        kernels.loops_available.cache_clear()
    assert torch.equal(with_loops.view(torch.int32), without.view(torch.int32))


def test_first_call_of_each_signature_holds_the_cache_lock(monkeypatch):
    """numba's on-disk cache index is read, extended and written back by whichever process
    compiles a new signature; the first call for each number of models takes an exclusive
    lock on the cache directory (two processes at once could otherwise give two signatures
    one data file), later calls take none."""
    import fcntl

    locked = []
    monkeypatch.setattr(loops, "_LOADED", set())
    monkeypatch.setattr(fcntl, "flock", lambda f, op: locked.append((os.path.basename(f.name), op)))
    base = torch.zeros(10, dtype=torch.bfloat16)
    hist = torch.zeros(3, 1 << 15, dtype=torch.int64)
    loops.magnitude_histograms(base, [base, base], hist[:2])
    loops.magnitude_histograms(base, [base, base], hist[:2])
    assert locked == [("distmerge-loops.lock", fcntl.LOCK_EX)]
    loops.magnitude_histograms(base, [base, base, base], hist)  # a new signature: 3 models
    assert len(locked) == 2 and int(hist.sum()) == 70
