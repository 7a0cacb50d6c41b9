"""The top-k statistics of a score read in chunks without the second pass (issue #20).

``ChunkedTopK`` keeps, during pass 1, the entries in a window of high buckets picked from a
sample; when the k-th largest's bucket is inside it (and the window did not overflow), pass 2
is not needed. Either way the threshold, the ties kept and each chunk's mask and trim must be
those of ``top_k_mask``/``kth_largest``, bit for bit. Each test names the path it checks.
"""

from __future__ import annotations

import pytest
import torch

from distmerge.kernels.reference import masked
from distmerge.methods import get, sparsify
from distmerge.methods.sparsify import ChunkedTopK, kth_largest, top_k_mask

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    pytest.skip("hypothesis is not installed (property-based tests); pip install -e '.[test]'", allow_module_level=True)

FAR = torch.full((64,), 1e30)
"""A sample far above any score below: its window misses, so pass 2 runs."""


def select(tops: list[ChunkedTopK], chunks: list[torch.Tensor], sample: torch.Tensor | None) -> list[bool]:
    """The driver's protocol (``task_arithmetic._chunked``) for selections of one score:
    sample, pass 1, pass 2 only for those that need it, finish. Per selection: whether
    pass 2 ran."""
    live = [top for top in tops if top.needs_passes]
    if not live:
        return [False] * len(tops)
    if sample is not None:
        ChunkedTopK.sample(live, sample)
    for c in chunks:
        ChunkedTopK.gather(live, c.clone(), low=False)
    second = [top for top in live if top.end_high()]
    if second:
        for c in chunks:
            ChunkedTopK.gather(second, c.clone(), low=True)
    for top in live:
        top.finish()
    return [top in second for top in tops]


def check(delta: torch.Tensor, k: int, chunk: int, sample: torch.Tensor | None) -> bool:
    """One selection of |δ| over chunks = ``top_k_mask``/``kth_largest`` (mask, threshold,
    trim); returns whether pass 2 ran."""
    n = delta.numel()
    chunks = list(delta.split(chunk))
    top = ChunkedTopK(n, k)
    (second,) = select([top], chunks, sample)
    want = top_k_mask(delta.abs(), k)
    if not top.trivial:
        assert top.threshold.view(torch.int32) == kth_largest(delta.abs(), k).view(torch.int32)
    again = top if top.trivial else top.replay()
    assert torch.equal(torch.cat([again.mask(c.abs()) for c in chunks]), want)
    trimmed = torch.cat([top.trim(c.clone()) for c in chunks])
    assert torch.equal(trimmed.view(torch.int32), masked(delta, want, rescale=False).view(torch.int32))
    return second


def tied(n: int, seed: int, levels: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, (n,), generator=g).float() * 0.25).contiguous()


@pytest.mark.parametrize("k", [1, 2, 500, 3000, 5001, 10006])
def test_one_pass_with_many_ties_at_the_threshold(k):
    delta = tied(10007, 0)
    assert not check(delta, k, 333, sample=delta)  # the score as its own sample: the window holds the bucket


@pytest.mark.parametrize("k", [1, 2, 500, 3000, 5001])
def test_the_fallback_when_the_window_misses(k):
    """A window above every score (near the bottom ranks a window reaches down to 0, so this
    needs k ≤ n/2; ``_cap`` covers k = n − 1)."""
    delta = tied(10007, 0)
    assert check(delta, k, 333, sample=FAR)


@pytest.mark.parametrize("values", ["zeros", "equal", "one nonzero"])
@pytest.mark.parametrize("k", [1, 700, 2500, 4999])
def test_all_equal_and_zeros_both_paths(values, k):
    delta = torch.zeros(5000)
    if values == "equal":
        delta[:] = -0.375
    elif values == "one nonzero":
        delta[1234] = 3.0
    assert not check(delta, k, 256, sample=delta[::7])
    assert check(delta, k, 256, sample=FAR) == (k <= 2500)  # k = n − 1: the window reaches 0


def test_a_window_over_its_cap_drops_its_entries_and_falls_back(monkeypatch):
    """Past ``_cap`` kept entries the window is dropped: pass 2 runs, same result. Without
    the cap the same selection is one pass."""
    delta = tied(10007, 2)
    for k in (3000, 10006):
        assert not check(delta, k, 333, sample=delta)
    monkeypatch.setattr(ChunkedTopK, "_cap", property(lambda self: 400))
    for k in (3000, 10006):
        assert check(delta, k, 333, sample=delta)


@pytest.mark.parametrize("k", [1, 37, 999, 1000])
def test_a_score_of_one_chunk_needs_no_second_pass(k):
    """A chunk that is the whole score (a tensor smaller than a chunk) does both passes at
    once, without a sample; ``add_low`` after it changes nothing."""
    delta = tied(1001, 3, levels=2)
    assert not check(delta, k, 4096, sample=None)
    top = ChunkedTopK(delta.numel(), k)
    top.add_high(delta.abs())
    top.add_low(delta.abs())
    top.finish()
    assert torch.equal(top.mask(delta.abs()), top_k_mask(delta.abs(), k))


def test_without_a_sample_two_passes_as_before():
    delta = tied(10007, 4)
    assert check(delta, 4321, 333, sample=None)


def test_keep_and_drop_of_one_score_each_take_their_path():
    """Breadcrumbs' pair (top skip + k, top skip) gathered together: a window from a sample
    that holds the drop's bucket but not the keep's; each gets its own path, the band is exact."""
    delta = tied(10007, 5, levels=40)
    n, chunks = delta.numel(), list(delta.split(500))
    keep, drop = ChunkedTopK(n, 6000), ChunkedTopK(n, 100)
    order = delta.abs().sort(descending=True).values
    sample = torch.cat([order[:200], torch.full((10,), float(order[0]))])  # only the largest
    assert select([keep, drop], chunks, sample) == [True, False]
    band = top_k_mask(delta.abs(), 6000) & ~top_k_mask(delta.abs(), 100)
    got = torch.cat([keep.trim(c.clone(), drop) for c in chunks])
    assert torch.equal(got.view(torch.int32), masked(delta, band, rescale=False).view(torch.int32))


def test_sample_ranges_spread_inside_the_tensor():
    assert sparsify.sample_ranges(1000, 1000) == []
    for n, chunk in [(1001, 1000), (300_000, 1 << 14), (1 << 24, 1 << 18), (129, 1)]:
        ranges = sparsify.sample_ranges(n, chunk)
        assert len(ranges) == 64
        assert all(0 <= a < b <= n for a, b in ranges)
        assert [a for a, _ in ranges] == sorted(a for a, _ in ranges)
        assert ranges[-1][0] > n // 2  # spread, not a prefix
    assert sum(b - a for a, b in sparsify.sample_ranges(1 << 24, 1 << 18)) == 1 << 18


scores = st.sampled_from(["tied", "zeros", "equal", "normal", "tiny", "inf"])


@settings(max_examples=150, deadline=None)
@given(
    kind=scores,
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**16),
    k_at=st.sampled_from(["1", "n-1", "n", "any"]),
    k_any=st.floats(0, 1),
    chunk=st.integers(1, 4000),
    sample=st.sampled_from(["self", "far", "part", "none"]),
)
def test_property_both_paths_give_top_k_mask(kind, n, seed, k_at, k_any, chunk, sample):
    g = torch.Generator().manual_seed(seed)
    if kind == "tied":
        delta = tied(n, seed, levels=3)
    elif kind == "zeros":
        delta = torch.zeros(n)
        delta[torch.randint(0, n, (max(1, n // 50),), generator=g)] = 0.5
    elif kind == "equal":
        delta = torch.full((n,), -2.5)
    elif kind == "normal":
        delta = torch.randn(n, generator=g)
    elif kind == "tiny":  # subnormals next to zero: the lowest high buckets
        delta = torch.randint(0, 4, (n,), generator=g).float() * 1e-45
    else:
        delta = torch.randn(n, generator=g)
        delta[torch.randint(0, n, (3,), generator=g)] = float("inf")
    k = {"1": 1, "n-1": n - 1, "n": n, "any": min(n, int(k_any * n))}[k_at]
    drawn = {"self": delta, "far": FAR, "part": delta[seed % 7 :: 5], "none": None}[sample]
    second = check(delta, k, chunk, drawn)
    if 0 < k < n:
        if sample == "far" and chunk < n and k <= n // 2 and delta.abs().max() < 1e30:
            assert second
        if sample == "self" or (sample == "none" and chunk >= n):
            assert not second


# ---------------------------------------------------------------- the chunked merges


SHAPE, CHUNK = (300, 1000), 1 << 14


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g).bfloat16()
    fine = [(base.float() + 0.01 * torch.randn(SHAPE, generator=g)).bfloat16() for _ in range(2)]
    return base, fine


def chunked(name: str, base, fine, params: dict) -> tuple[torch.Tensor, int]:
    """The method's chunked merge, and how many passes over the tensor it read."""
    starts = []

    def read(i, j):
        starts.append(i)
        return base.view(-1)[i:j].float(), [x.view(-1)[i:j].float() for x in fine]

    out = torch.empty(base.numel())
    for i, j, value in get(name).chunked(read, SHAPE, CHUNK, **params):
        out[i:j] = value
    return out, starts.count(0)


@pytest.mark.parametrize(
    "name, extra",
    [("ties", {}), ("breadcrumbs", {"gamma": [0.01, 0.02]}), ("breadcrumbs_ties", {"gamma": [0.02, 0.01]})],
)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_chunked_merges_read_twice_with_the_bits_of_three_passes_and_of_the_whole_tensor(monkeypatch, name, extra, density):
    base, fine = inputs()
    params = {"weight": [0.6, 0.4], "density": [density, density * 0.8], **extra}
    one_pass, reads = chunked(name, base, fine, params)
    assert reads == 2  # pass 1 (with the windows) and the merge
    whole = get(name).merge(base.float(), [x.float() for x in fine], **params)
    assert torch.equal(one_pass.view(torch.int32), whole.reshape(-1).view(torch.int32))
    monkeypatch.setattr(sparsify, "sample_ranges", lambda n, chunk: [])
    two_pass, reads = chunked(name, base, fine, params)
    assert reads == 3
    assert torch.equal(one_pass.view(torch.int32), two_pass.view(torch.int32))
