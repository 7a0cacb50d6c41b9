"""model_stock's chunked form (bounded memory on CPU) equals its whole-tensor merge, bit for bit."""

from __future__ import annotations

import dataclasses
import filecmp

import pytest
import torch

from distmerge.methods import METHODS
from distmerge.methods.model_stock import model_stock, model_stock_chunked
from tests.helpers import synthetic_models
from tests.test_merge_vs_mergekit import distmerge, models


def family(shape, n, seed):
    """bf16-rounded base and fine-tunes in float32, the fine-tunes' task vectors partly shared
    (cos θ around 0.5) so that t is neither 0 nor 1."""
    return synthetic_models(shape, n, seed, spread=0.01, shared=0.01, dtype=torch.bfloat16, as_float32=True, from_rounded_base=True)


def run_chunked(base, tensors, chunk, filter_wise, models_read=None, buffer=torch.empty):
    """The chunked form's pieces, concatenated; checks that they cover the tensor in order
    and that every pass of reads goes up the tensor from 0 without gaps, reading the same
    inputs throughout. Returns (merged, the passes' ranges); ``models_read`` gets each pass's
    ``models`` (the inputs it reads besides the base; None: all)."""
    flat_base, flat = base.reshape(-1), [x.reshape(-1) for x in tensors]
    passes, models_read = [], [] if models_read is None else models_read

    def read(i, j, models=None, out=None, stored=False):
        """``TensorInputs.read_range``: the base and ``models`` (None: all), copied into
        ``out`` if given, each chunk into a buffer of its own (float32 here, stored or not)."""
        chosen = [flat_base[i:j]] + [x[i:j] for x in (flat if models is None else [flat[k] for k in models])]
        if i < j:  # not the empty read by which the form asks how many models there are
            if not passes or i != passes[-1][-1][1]:
                assert i == 0, f"a pass starts at {i}"
                passes.append([])
                models_read.append(models)
            assert models == models_read[-1], "a pass reads the same inputs throughout"
            passes[-1].append((i, j))
        if out is not None:
            assert len(out) >= len(chosen) and all(o.numel() >= j - i for o in out)
            chosen = [o[: j - i].copy_(x) for o, x in zip(out, chosen)]
        return chosen[0], chosen[1:]

    pieces = list(model_stock_chunked(read, tuple(base.shape), chunk, filter_wise=filter_wise, buffer=buffer))
    assert [p[0] for p in pieces] == [0] + [p[1] for p in pieces[:-1]] and pieces[-1][1] == base.numel()
    assert all(p[2].shape == (p[1] - p[0],) and p[2].dtype == torch.float32 for p in pieces)
    return torch.cat([p[2] for p in pieces]).view(base.shape), passes


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(37, 53), (1, 64), (101,)], ids=str)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_chunked_model_stock_is_the_whole_tensor_merge(shape, n, filter_wise):
    base, tensors = family(shape, n, seed=n + len(shape))
    whole = model_stock(base, tensors, filter_wise=filter_wise)
    assert not torch.equal(whole, base)  # t ≠ 0: the ratio matters
    for chunk in (1, 7, 100, base.numel() - 1):
        got, passes = run_chunked(base, tensors, chunk, filter_wise)
        assert torch.equal(got, whole), (chunk, (got - whole).abs().max())
        assert all(p[-1][1] == base.numel() for p in passes)  # every pass reads the whole tensor


def test_passes_and_row_batches():
    """Per tensor: one pass for the statistics, reading every model, and one to merge, in
    chunks of `chunk`. Per row: two passes, in batches of whole rows, never a lone row."""
    base, tensors = family((37, 53), 3, seed=0)
    models_read = []
    _, passes = run_chunked(base, tensors, 100, filter_wise=False, models_read=models_read)
    assert len(passes) == 2 and all(j - i <= 100 for p in passes for i, j in p)
    assert models_read == [None, None]
    _, passes = run_chunked(base, tensors, 100, filter_wise=True)
    assert len(passes) == 2 and passes[0] == passes[1]
    assert [(i // 53, j // 53) for i, j in passes[0]] == [(k, k + 2) for k in range(0, 34, 2)] + [(34, 37)]
    assert all(i % 53 == 0 == j % 53 for i, j in passes[0])


def test_the_norms_stream_without_a_copy_of_the_task_vector(monkeypatch):
    """‖τⱼ‖ is added up chunk by chunk with torch's bits (``reductions.Norm``): the buffer, a
    float32 copy of the whole τⱼ, is never asked for. Where the norm's bits are not reproduced
    (``norm_lanes`` None) τⱼ goes into the buffer for torch's norm: the same result."""
    from distmerge import reductions

    base, tensors = family((37, 53), 3, seed=1)
    whole = model_stock(base, tensors)

    def no_buffer(n):
        raise AssertionError(f"asked for a buffer of {n}")

    assert reductions.norm_lanes() == 8
    assert torch.equal(run_chunked(base, tensors, 100, filter_wise=False, buffer=no_buffer)[0], whole)
    asked = []
    monkeypatch.setattr(reductions, "norm_lanes", lambda: None)
    got, _ = run_chunked(base, tensors, 100, filter_wise=False, buffer=lambda n: asked.append(n) or torch.empty(n))
    assert torch.equal(got, whole) and asked == [37 * 53]
    models_read = []  # one pass per model: pass j reads θⱼ (‖τⱼ‖) and those before it (τᵢ·τⱼ, i < j)
    run_chunked(base, tensors, 100, filter_wise=False, models_read=models_read)
    assert models_read == [(0,), (1, 0), (2, 0, 1), None]
    # Sums not streamed (``lanes`` None: copies of the products summed by torch): those passes
    # too, not one pass whose NaN fallback would copy every sum's buffer chunk by chunk.
    monkeypatch.setattr(reductions, "norm_lanes", lambda: 8)
    monkeypatch.setattr(reductions, "lanes", lambda: None)
    asked.clear()
    got, _ = run_chunked(base, tensors, 100, filter_wise=False, buffer=lambda n: asked.append(n) or torch.empty(n))
    assert torch.equal(got, whole) and asked == [37 * 53]


def test_the_statistics_take_one_pass_over_bf16_inputs_and_a_nan_chunk_takes_torch_ops():
    """bf16 inputs as stored (numba's loops): one statistics pass reading every model, then the
    interpolation's; a NaN in a later chunk of the second model is redone with torch ops from
    the accumulators' state before that chunk: the whole-tensor merge's bits, NaN included."""
    base, tensors = family((37, 53), 3, seed=2)
    whole = model_stock(base, tensors)
    stored = [x.to(torch.bfloat16) for x in (base, *tensors)]
    models_read = []
    got, passes = run_chunked(stored[0], stored[1:], 500, filter_wise=False, models_read=models_read)
    assert torch.equal(got, whole) and models_read == [None, None]
    tensors[1].view(-1)[1234] = float("nan")
    stored = [x.to(torch.bfloat16) for x in (base, *tensors)]  # (torch's bf16 NaN: 0xFFFF)
    whole = model_stock(stored[0].float(), [x.float() for x in stored[1:]])
    got, _ = run_chunked(stored[0], stored[1:], 500, filter_wise=False)
    assert whole.isnan().all() and torch.equal(got.view(torch.int32), whole.view(torch.int32))


@pytest.mark.slow
@pytest.mark.parametrize("filter_wise", [False, True])
def test_long_rows(filter_wise):
    """Rows longer than torch's parallel grain (32768): a lone row would be summed in
    per-thread parts, so no batch is a single row; and the (pairs × rows) mean of 4 models.
    The whole-tensor form reads 11 passes of 120,000 elements: in chunks of 97 (many, none on a
    row boundary; 0.7 s), not of 1 (49 s of Python calls; chunks of one element are tested on
    the small shapes above)."""
    base, tensors = family((3, 40000), 4, seed=5)
    whole = model_stock(base, tensors, filter_wise=filter_wise)
    for chunk in (1 if filter_wise else 97, 40000, 80001, base.numel() - 1):
        got, _ = run_chunked(base, tensors, chunk, filter_wise)
        assert torch.equal(got, whole), chunk


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(37, 53), (101,)], ids=str)
def test_opposite_task_vectors_give_the_base(shape, filter_wise):
    """τ₂ = −τ₁: cos θ = −1 and N = 2, so the denominator 1 + (N − 1) cos θ is 0 and t = 0."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g).to(torch.bfloat16).float()
    delta = (0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16).float()
    tensors = [base + delta, base - delta]
    whole = model_stock(base, tensors, filter_wise=filter_wise)
    assert torch.equal(whole, base)
    for chunk in (1, 7, 100, base.numel() - 1):
        got, _ = run_chunked(base, tensors, chunk, filter_wise)
        assert torch.equal(got, whole), chunk


@pytest.mark.parametrize(
    "filter_wise, stored", [(False, "bf16"), (True, "bf16"), (False, "f32")], ids=["tensor", "rows", "tensor-f32-stored"]
)
def test_chunked_model_stock_through_the_cli(request, tmp_path, monkeypatch, filter_wise, stored):
    """bf16 recipe, base + 2 models: merged in 777- and 4099-element chunks, the same bytes as
    the whole-tensor merge; also from float32 checkpoints, which the chunked reads round to
    bf16 before widening them into their buffers."""
    from distmerge import tensor_merge

    method = METHODS["model_stock"]
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1])
        return model_stock_chunked(*args, **kwargs)

    monkeypatch.setitem(METHODS, "model_stock", dataclasses.replace(method, chunked=spy))
    f = request.getfixturevalue("llama_family" if stored == "bf16" else "llama_family_f32")
    recipe = {
        "merge_method": "model_stock",
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", None), ("ft2", None)),
        "parameters": {"filter_wise": filter_wise},
        "dtype": "bfloat16",
    }
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1 << 40)  # every tensor whole
    whole = distmerge(recipe, tmp_path / "whole")
    assert not calls
    for chunk in (777, 4099):
        monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", chunk)
        chunked = distmerge(recipe, tmp_path / f"chunked{chunk}")
        shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
        assert shards and all(filecmp.cmp(whole / n, chunked / n, shallow=False) for n in shards)
    assert calls  # the chunked form did run


def test_a_buffer_reused_from_tensor_to_tensor_gives_each_its_whole_tensor_merge(monkeypatch):
    """The run's buffer (``tensor_merge.Buffer``) is handed over with the last tensor's values in
    it (model_stock asks for it where its norms do not stream: ``norm_lanes`` None)."""
    from distmerge import reductions, tensor_merge

    monkeypatch.setattr(reductions, "norm_lanes", lambda: None)
    monkeypatch.setattr(tensor_merge, "BUFFER_ELEMENTS", 3000)
    buffer = tensor_merge.Buffer()
    for shape, seed in [((37, 53), 1), ((29, 41), 2), ((37, 53), 3)]:  # ≤ 3000 elements: kept
        base, tensors = family(shape, 2, seed)
        got, _ = run_chunked(base, tensors, 100, False, buffer=buffer)
        assert torch.equal(got, model_stock(base, tensors))
    kept = buffer.kept
    assert kept is not None and kept.numel() == 37 * 53 and buffer(100).data_ptr() == kept.data_ptr()
    assert buffer(3001).numel() == 3001 and buffer.kept is None  # a larger one is not kept, nor is the old
