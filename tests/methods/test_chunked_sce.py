"""sce's chunked CPU form (``sce_chunked``) gives the bits of the whole-tensor ``sce``."""

import filecmp

import pytest
import torch

from distmerge.methods import chunk_ranges, get
from distmerge.methods import sce as sce_module
from distmerge.methods.sce import _chunk_variance, erase_and_merge, sce, sce_chunked, task_vector_weights, variance
from tests.helpers import synthetic_models
from tests.test_merge_vs_mergekit import distmerge, models


def reader(base: torch.Tensor, tensors: list[torch.Tensor], log: list | None = None):
    """``read(start, end)`` over flattened whole tensors, as the run gives it (float32 copies)."""
    flat_base, flat = base.reshape(-1), [x.reshape(-1) for x in tensors]

    def read(start: int, end: int, stored: bool = False):
        if log is not None:
            log.append((start, end))
        return flat_base[start:end].clone(), [x[start:end].clone() for x in flat]

    return read


def chunked(base, tensors, chunk, **params) -> torch.Tensor:
    """Run ``sce_chunked`` and join its pieces, checking they cover [0, numel) in order."""
    numel = base.numel()
    pieces = sce_chunked(reader(base, tensors), tuple(base.shape), chunk, **params)
    assert pieces is not None
    pieces = list(pieces)
    assert [(s, e) for s, e, _ in pieces] == chunk_ranges(numel, chunk)
    assert all(p.dtype == torch.float32 and p.shape == (e - s,) for s, e, p in pieces)
    return torch.cat([p for _, _, p in pieces]).view(base.shape)


def family(shape, n: int, seed: int, bf16: bool = True):
    """A base and n fine-tunes; bf16-rounded values make exact ties (equal deltas, equal variances)."""
    return synthetic_models(shape, n, seed, spread=0.02, dtype=torch.bfloat16 if bf16 else torch.float32, as_float32=True)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.slow
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("shape, n, bf16", [((37, 53), 2, True), ((37, 53), 3, False), ((1001,), 3, True)])
def test_chunked_sce_is_the_whole_tensor_sce(shape, n, bf16, select_topk):
    base, tensors = family(shape, n, seed=n + len(shape), bf16=bf16)
    whole = sce(base, tensors, select_topk=select_topk)
    numel = base.numel()
    for chunk in (1, 7, 100, numel - 1):
        assert_same_bits(chunked(base, tensors, chunk, select_topk=select_topk), whole)


@pytest.mark.parametrize("select_topk", [0.5, 0.3, 0.05])
def test_chunked_sce_keeps_the_same_variance_ties(select_topk):
    """Deltas from a handful of values: most variances are equal, so which of the entries at
    the threshold are kept (the lower flat indices) decides the result."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(41, 29, generator=g).bfloat16().float()
    tensors = [base + torch.randint(-2, 3, base.shape, generator=g).float() * 0.125 for _ in range(3)]
    var = variance([x - base for x in tensors]).reshape(-1)
    k = int(torch.count_nonzero(var) * select_topk)
    threshold = var.sort(descending=True).values[k - 1]
    above, ties = var > threshold, (var == threshold).nonzero().flatten()
    assert int(above.sum()) < k < int(above.sum()) + len(ties)  # the cut goes through ties
    whole = sce(base, tensors, select_topk=select_topk)
    for chunk in (1, 13, 256, base.numel() - 1):
        assert_same_bits(chunked(base, tensors, chunk, select_topk=select_topk), whole)

    # the lowest-index ties are the ones that count: keeping the highest-index ones instead
    # gives another result, so a wrong tie cut fails the test above
    def merge_kept(ties_kept):
        keep = above.clone()
        keep[ties_kept] = True
        deltas = [torch.where(keep.view(base.shape), x - base, 0.0) for x in tensors]
        return erase_and_merge(base, deltas, task_vector_weights(deltas))

    wanted = k - int(above.sum())
    assert_same_bits(merge_kept(ties[:wanted]), whole)
    assert not torch.equal(merge_kept(ties[-wanted:]), whole)


def test_a_lone_element_has_the_whole_tensors_variance():
    """A 1-element chunk's variance is computed as the whole tensor's is: torch reduces a
    stack of single elements in another order, 1 ulp apart for values like these (found
    among random ones; each column is one entry across 5 models)."""
    columns = [
        ["0x1.3bf6p-8", "-0x1.0cb9p-7", "-0x1.a875p-7", "-0x1.840ap-8", "-0x1.4a2dp-7"],
        ["-0x1.2e428p-6", "0x1.1fa9p-7", "0x1.7fe3p-7", "-0x1.8d7p-10", "0x1.38f6p-8"],
        ["0x1.0b508p-6", "0x1.ed88p-9", "-0x1.f15cp-8", "0x1.2a6p-7", "-0x1.3dccp-8"],
    ]
    deltas = list(torch.tensor([[float.fromhex(v) for v in column] for column in columns]).T)
    whole = variance(deltas)
    lone = torch.cat([_chunk_variance([d[i : i + 1] for d in deltas], len(columns)) for i in range(len(columns))])
    assert_same_bits(lone, whole)


def test_chunked_sce_edge_cases():
    base, tensors = family((5, 7), 2, seed=3)
    assert sce_chunked(reader(base, []), tuple(base.shape), 4) is None  # no models: sce returns the base
    for select_topk in (0.0, 1e-9, 0.999999, 1.5):  # nothing kept, k = 0, nearly all, all
        assert_same_bits(chunked(base, tensors, 4, select_topk=select_topk), sce(base, tensors, select_topk=select_topk))
    same = [base.clone(), base.clone()]  # no task vector: equal weights, the base
    assert_same_bits(chunked(base, same, 4, select_topk=0.5), sce(base, same, select_topk=0.5))
    one = base[:1, :1]
    assert_same_bits(chunked(one, [t[:1, :1] for t in tensors], 1, select_topk=0.5), sce(one, [t[:1, :1] for t in tensors], select_topk=0.5))
    assert get("sce").chunked is sce_chunked


def test_chunked_sce_reads_each_pass_in_order():
    base, tensors = family((37, 53), 2, seed=1)
    log = []
    list(sce_chunked(reader(base, tensors, log), tuple(base.shape), 500, select_topk=0.3))
    ranges = chunk_ranges(base.numel(), 500)
    assert log == [(0, 0)] + ranges * 3  # the model count (an empty read), Var, the energies of every model, the merge


@pytest.mark.slow
def test_chunked_sce_is_the_whole_tensor_result(llama_family, tmp_path, monkeypatch):
    """bf16 inputs merged with sce in 777- and 4099-element chunks give the bytes of the whole-tensor merge."""
    from distmerge import tensor_merge

    f = llama_family
    recipe = {
        "merge_method": "sce",
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", None), ("ft2", None)),
        "parameters": {"select_topk": 0.3},
        "dtype": "bfloat16",
    }
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1 << 40)  # every tensor whole
    whole = distmerge(recipe, tmp_path / "whole")
    passes = []  # the chunked form does run (it is not None for these tensors)
    real = sce_module._sce_passes
    monkeypatch.setattr(sce_module, "_sce_passes", lambda *a: passes.append(a[1]) or real(*a))
    for chunk in (777, 4099):
        monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", chunk)
        chunked_out = distmerge(recipe, tmp_path / f"chunked{chunk}")
        shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
        assert shards and all(filecmp.cmp(whole / n, chunked_out / n, shallow=False) for n in shards)
        assert passes and max(passes) > chunk


def test_welford_variance_is_torch_var_bit_for_bit():
    """sce's variance on CPU (``welford_variance``, element-wise) gives the bits of mergekit's
    ``torch.var(torch.stack(τ), dim=0, unbiased=False)``: 2 to 5 models, values from any
    float32 bit pattern (NaN, ±Inf, −0, subnormals, huge and tiny magnitudes)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from distmerge.methods.sce import welford_variance

    def bits(x):
        x = x.clone()
        x[x.isnan()] = float("nan")  # one NaN pattern: torch and the update may carry others
        return x.view(torch.int32)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(2, 5), st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=40), st.integers(0, 2**32 - 1))
    def check(n, words, seed):
        g = torch.Generator().manual_seed(seed)
        special = torch.tensor(words, dtype=torch.int32).view(torch.float32)
        deltas = []
        for i in range(n):
            x = torch.randn(300, generator=g) * 10 ** float(torch.randint(-30, 30, (), generator=g))
            x[: len(words)] = special.roll(i)
            deltas.append(x)
        ref = torch.var(torch.stack(deltas), dim=0, unbiased=False)
        assert torch.equal(bits(welford_variance(deltas)), bits(ref))

    check()
