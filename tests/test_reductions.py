"""Whole-tensor sums from chunks (distmerge.reductions): torch's bits, in constant memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distmerge import reductions, threads


def _spread(n: int, seed: int) -> torch.Tensor:
    """Values over many magnitudes and both signs: any other order of additions shows in the bits."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))


def _torch_sum(x: torch.Tensor) -> torch.Tensor:
    with threads.one():
        return x.sum()


def _streamed(x: torch.Tensor, cuts: list[int], streamed: bool = True) -> torch.Tensor:
    acc = reductions.total(x.numel(), streamed=streamed)
    start = 0
    for end in [*sorted(cuts), x.numel()]:
        acc.add(x[start:end])
        start = end
    return acc.result()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float32 and a.view(torch.int32).item() == b.view(torch.int32).item()


def test_this_machines_torch_sum_is_reproduced():
    """The benchmarks' memory figures for DARE and DELLA assume the streamed sum; CI runs here."""
    assert reductions.lanes() == 8


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300_000), seed=st.integers(0, 2**16), data=st.data())
def test_a_sum_streamed_in_any_chunks_has_torchs_bits(n, seed, data):
    x = _spread(n, seed)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=6))
    assert _same_bits(_streamed(x, cuts), _torch_sum(x))


@pytest.mark.parametrize(
    "n",
    [
        (1 << 21) + 12_345,  # 16-row blocks, all four levels passing sums on
        (1 << 24) + 3 * (1 << 19) + 37,  # 32-row blocks: rows past 16 added one by one
    ],
)
def test_large_sums_with_every_level_have_torchs_bits(n):
    x = _spread(n, 7)
    assert _same_bits(_streamed(x, [262_144 * k for k in range(1, n // 262_144)]), _torch_sum(x))


def test_zero_sums_have_torchs_sign():
    x = -torch.zeros(1000)
    assert _same_bits(_streamed(x, [300]), _torch_sum(x))
    assert _streamed(x, [300]).item() == 0 and not torch.signbit(_streamed(x, [300]))


def test_infinities_and_nan_come_out_as_torchs():
    x = _spread(100_000, 3)
    x[5] = float("inf")
    assert _streamed(x, [1000]).item() == float("inf")
    x[7] = float("-inf")
    assert torch.isnan(_streamed(x, [1000]))


def test_the_buffered_fallback_is_torchs_sum_too():
    x = _spread(70_001, 5)
    acc = reductions.total(x.numel(), streamed=False)
    assert isinstance(acc, reductions.Buffered)
    for part in x.split(1000):
        acc.add(part)
    assert _same_bits(acc.result(), _torch_sum(x))


def test_a_wrong_count_of_elements_is_an_error():
    acc = reductions.total(10)
    acc.add(torch.ones(6))
    with pytest.raises(ValueError, match="6 of 10"):
        acc.result()
    with pytest.raises(ValueError, match="more than the 10"):
        acc.add(torch.ones(5))


@pytest.mark.parametrize("n", [40_000, (1 << 21) + 12_345])
def test_the_cascade_is_the_same_with_or_without_numbas_loop(n, monkeypatch):
    """The cascade as numba's loop and as torch's and numpy's sums: torch's bits both ways
    (−0s and Inf included, every level on the larger size), so a process without the loops
    streams the same sums."""
    x = _spread(n, 5)
    x[:5000] = -0.0
    x[-7] = float("inf")
    cuts = [1000, 30_000, n // 2]
    fused = _streamed(x, cuts)
    monkeypatch.setattr(reductions.kernels, "loops_available", lambda: False)
    assert _same_bits(_streamed(x, cuts), fused) and _same_bits(fused, _torch_sum(x))
    x[-7] = 1.0
    assert _same_bits(_streamed(x, cuts), _torch_sum(x))
    assert _same_bits(_streamed(-torch.zeros(5000), [77]), _torch_sum(-torch.zeros(5000)))


@pytest.mark.parametrize("n", range(1, 17))
def test_sums_of_a_few_elements_have_torchs_bits(n):
    """Below one vector (8 lanes) torch's scalar loop has an order of its own: 5, 6 and 7
    elements differ from adding one by one (found by hypothesis: n=5, seed=14)."""
    for seed in range(40):
        x = _spread(n, seed)
        assert _same_bits(_streamed(x, [n // 2]), _torch_sum(x)), seed


# ---------------------------------------------------------------- norms


def _torch_norm(x: torch.Tensor) -> torch.Tensor:
    with threads.one():
        return torch.linalg.vector_norm(x)


def _streamed_norm(x: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    acc = reductions.Norm(x.numel(), reductions.norm_lanes())
    start = 0
    for end in [*sorted(cuts), x.numel()]:
        acc.add(x[start:end])
        start = end
    return acc.result()


def test_this_machines_torch_norm_is_reproduced():
    """model_stock's memory figures assume the streamed norm; CI runs here."""
    assert reductions.norm_lanes() == 8


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 100_000), seed=st.integers(0, 2**16), data=st.data())
def test_a_norm_streamed_in_any_chunks_has_torchs_bits(n, seed, data):
    x = _spread(n, seed) * 1e-3  # (x² of _spread's largest values would overflow)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=6))
    assert _same_bits(_streamed_norm(x, cuts), _torch_norm(x))


def test_a_large_norm_has_torchs_bits():
    """16.8M elements (the 2.5 GB set's embedding has 65.5M): one scan, no splits in torch."""
    x = torch.randn((1 << 24) + 37, generator=torch.Generator().manual_seed(4))
    assert _same_bits(_streamed_norm(x, [262_147 * k for k in range(1, 64)]), _torch_norm(x))


def test_norms_of_zeros_infinities_and_nan():
    assert _same_bits(_streamed_norm(torch.zeros(100), [33]), _torch_norm(torch.zeros(100)))
    x = torch.ones(50)
    x[17] = float("inf")
    assert _streamed_norm(x, [20]).item() == float("inf") == _torch_norm(x).item()
    x[17] = float("nan")
    assert _streamed_norm(x, [20]).isnan() and _torch_norm(x).isnan()


def test_a_wrong_count_of_elements_in_a_norm_is_an_error():
    acc = reductions.Norm(10, 8)
    acc.add(torch.ones(6))
    with pytest.raises(ValueError, match="6 of 10 elements added"):
        acc.result()
    with pytest.raises(ValueError, match="more than the 10 elements"):
        acc.add(torch.ones(5))
