"""The random-drop methods' chunked forms (DARE, DELLA) equal their whole-tensor merges, bit for bit."""

from __future__ import annotations

import pytest
import torch

from distmerge import rng
from distmerge.errors import MergeError
from distmerge.methods import METHODS
from tests.helpers import synthetic_models


def family(shape, n, seed):
    """bf16-rounded base and fine-tunes in float32: many exactly equal |δ| (rank ties)."""
    return synthetic_models(shape, n, seed, spread=0.01, dtype=torch.bfloat16, as_float32=True, from_rounded_base=True)


def run_chunked(name, base, tensors, chunk, **params):
    flat_base, flat = base.reshape(-1), [x.reshape(-1) for x in tensors]
    passes = []

    def read(i, j, models=None, stored=False):
        """``TensorInputs.read_range``: the base and ``models`` (None: all), float32 here."""
        if not passes or i < passes[-1][-1][0]:
            passes.append([])
        passes[-1].append((i, j))
        return flat_base[i:j], [x[i:j] for x in (flat if models is None else [flat[k] for k in models])]

    pieces = METHODS[name].chunked(read, tuple(base.shape), chunk, **params)
    if pieces is None:
        return None, passes
    pieces = list(pieces)
    assert [p[0] for p in pieces] == [0] + [p[1] for p in pieces[:-1]] and pieces[-1][1] == base.numel()
    return torch.cat([p[2] for p in pieces]).view(base.shape), passes


def params_for(name, n, rescale):
    p = dict(weight=[0.6, -0.4, 0.3][:n], density=[0.3, 0.7, 1.0][:n], normalize=name == "della", rescale=rescale)
    p["seeds"] = [rng.derive_seed(7, "t", str(i)) for i in range(n)]
    if name.startswith("della"):
        p["epsilon"] = [0.1, 0.2, 0.05][:n]
    return p


@pytest.mark.slow
@pytest.mark.parametrize("name", ["della", "della_linear", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("shape", [(37, 53), (5, 300), (64, 1)], ids=str)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n", [2, 3])
def test_chunked_drop_is_the_whole_tensor_merge(name, shape, rescale, n):
    base, tensors = family(shape, n, seed=len(name) + n)
    params = params_for(name, n, rescale)
    whole = METHODS[name].merge(base, tensors, **params)
    # One-element chunks on the 64-element shape; 13 on the larger ones (a draw per chunk: 1961
    # chunks of one cost 6 s a case and test nothing the 64 do not).
    for chunk in (1 if base.numel() <= 64 else 13, 7, 100, base.numel() - 1):
        got, _ = run_chunked(name, base, tensors, chunk, **params)
        assert torch.equal(got, whole), (chunk, (got - whole).abs().max())


def test_della_chunks_are_whole_rows():
    base, tensors = family((9, 50), 2, seed=1)
    _, passes = run_chunked("della", base, tensors, 120, **params_for("della", 2, True))
    assert passes and all((i % 50, j % 50) == (0, 0) and j - i == 100 for p in passes for i, j in p[:-1])


def test_della_chunked_changes_with_the_rank_order():
    """The per-row ranking matters: permuting one row's columns changes that row's keep set
    but the chunked result still follows the whole-tensor merge."""
    base, tensors = family((8, 40), 2, seed=3)
    params = params_for("della", 2, True)
    got, _ = run_chunked("della", base, tensors, 80, **params)
    tensors[0][2] = tensors[0][2].flip(0)
    base[2] = base[2].flip(0)
    moved, _ = run_chunked("della", base, tensors, 80, **params)
    assert not torch.equal(moved[2], got[2])
    assert torch.equal(moved, METHODS["della"].merge(base, tensors, **params))


def test_della_chunked_falls_back_for_one_dimensional_tensors():
    base, tensors = family((301,), 2, seed=2)
    got, passes = run_chunked("della", base, tensors, 50, **params_for("della", 2, True))
    assert got is None and passes == []


def test_della_chunked_refuses_bad_epsilon_like_the_whole_merge():
    base, tensors = family((10, 10), 2, seed=4)
    params = params_for("della", 2, True)
    params["epsilon"] = [0.5, 0.1]
    with pytest.raises(MergeError, match="density ± epsilon"):
        run_chunked("della", base, tensors, 30, **params)


def test_bits_written_in_flat_order_read_back_any_range():
    from distmerge.methods.sparsify import Bits

    g = torch.Generator().manual_seed(3)
    for numel in (1, 8, 13, 1000):
        mask = torch.rand(numel, generator=g) < 0.5
        bits = Bits(numel)
        cuts = sorted({0, numel, *torch.randint(0, numel + 1, (5,), generator=g).tolist()})
        for start, end in zip(cuts, cuts[1:]):
            bits[start:end] = mask[start:end]
        assert bits.packed.nbytes == (numel + 7) // 8
        for _ in range(20):
            start, end = sorted(torch.randint(0, numel + 1, (2,), generator=g).tolist())
            assert torch.equal(bits[start:end], mask[start:end]), (numel, start, end)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_dare_masks_drawn_in_windows_are_the_whole_tensors_draw(name, monkeypatch):
    from distmerge.methods import task_arithmetic

    monkeypatch.setattr(task_arithmetic, "DRAW_ELEMENTS", 1000)  # 3 windows, the last partial
    base, tensors = family((50, 53), 2, seed=4)
    params = params_for(name, 2, rescale=True)
    got, _ = run_chunked(name, base, tensors, 300, **params)
    assert torch.equal(got, METHODS[name].merge(base, tensors, **params))
