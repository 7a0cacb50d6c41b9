"""slerp's chunked form (bounded memory on CPU) equals its whole-tensor merge, bit for bit."""

from __future__ import annotations

import dataclasses
import filecmp

import pytest
import torch

from distmerge.methods import METHODS
from distmerge.methods.slerp import REDUCTION_RUN, slerp, slerp_chunked
from tests.helpers import synthetic_models
from tests.test_merge_vs_mergekit import distmerge, models


def run_chunked(base, other, chunk, t):
    """The chunked form's pieces, concatenated; checks that they cover the tensor in order,
    and that each pass of reads goes up the tensor without gaps in reads of at most ``chunk``
    elements. Returns (merged, the passes' ranges)."""
    flat_base, flat = base.reshape(-1), other.reshape(-1)
    passes = []

    def read(i, j, out=None):
        """``TensorInputs.read_range``, copying the chunks into ``out`` if given."""
        assert 0 < j - i <= chunk
        if not passes or i != passes[-1][-1][1]:
            passes.append([])
        passes[-1].append((i, j))
        if out is None:
            return flat_base[i:j], [flat[i:j]]
        assert len(out) == 2 and all(o.numel() >= j - i for o in out)
        return out[0][: j - i].copy_(flat_base[i:j]), [out[1][: j - i].copy_(flat[i:j])]

    pieces = list(slerp_chunked(read, tuple(base.shape), chunk, t=t))
    assert [p[0] for p in pieces] == [0] + [p[1] for p in pieces[:-1]] and pieces[-1][1] == base.numel()
    assert all(p[2].shape == (p[1] - p[0],) and p[2].dtype == torch.float32 for p in pieces)
    return torch.cat([p[2] for p in pieces]).view(base.shape), passes


def pair(numel, seed, spread=0.3):
    base, (other,) = synthetic_models(numel, 1, seed, spread=spread, dtype=torch.bfloat16, as_float32=True)
    return base, other


@pytest.mark.parametrize(
    "numel",
    [REDUCTION_RUN - 3, REDUCTION_RUN, 2 * REDUCTION_RUN, 3 * REDUCTION_RUN + 12345],
    ids=["one-run", "a-run", "two-runs", "partial-last-run"],
)
def test_chunked_slerp_is_the_whole_tensor_merge(numel):
    """Tensors of several reduction runs are reduced run by run from buffers of a run, in
    reads that need not line up with the runs; the same bits as ``slerp``'s views of the
    whole tensor, the last run partial or not."""
    base, other = pair(numel, seed=numel % 97)
    whole = slerp(base, [other], t=0.3)
    assert not torch.equal(whole, torch.lerp(base, other, 0.3))  # not the near-parallel fallback
    for chunk in (1 << 18, 300007, REDUCTION_RUN + 5):
        got, passes = run_chunked(base, other, chunk, 0.3)
        assert torch.equal(got, whole), (chunk, (got - whole).abs().max())
        assert len(passes) == (1 if numel <= REDUCTION_RUN else 3)  # one run: read once, kept
        assert all(p[0][0] == 0 and p[-1][1] == numel for p in passes)


def test_reads_line_up_with_the_runs():
    """Passes 1 and 2 read run by run, none of their reads across a run's end; pass 3 reads
    in plain chunks."""
    numel, chunk = 2 * REDUCTION_RUN + 1000, 300000
    base, other = pair(numel, seed=1)
    _, passes = run_chunked(base, other, chunk, 0.5)
    assert passes[0] == passes[1] and REDUCTION_RUN in [j for _, j in passes[0]]
    assert all(i // REDUCTION_RUN == (j - 1) // REDUCTION_RUN for i, j in passes[0])
    assert passes[2] == [(i, min(numel, i + chunk)) for i in range(0, numel, chunk)]


@pytest.mark.parametrize("numel", [REDUCTION_RUN // 2, 2 * REDUCTION_RUN + 7], ids=["one-run", "runs"])
@pytest.mark.parametrize("t", [0.0, 0.7, 1.0])
def test_near_parallel_and_the_ends(numel, t):
    """Nearly parallel tensors (|cos Ω| > 0.9995: the linear fallback) and t = 0, 1."""
    base, other = pair(numel, seed=2, spread=0.01)
    whole = slerp(base, [other], t=t)
    got, _ = run_chunked(base, other, 1 << 18, t)
    assert torch.equal(got, whole)


@pytest.mark.parametrize("stored", ["bf16", "f32"])
def test_chunked_slerp_through_the_cli(request, tmp_path, monkeypatch, stored):
    """bf16 recipe, merged in 777-element chunks: the same bytes as the whole-tensor merge,
    from bf16 checkpoints and from float32 ones (rounded to bf16 as they are read)."""
    from distmerge import tensor_merge

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1])
        return slerp_chunked(*args, **kwargs)

    monkeypatch.setitem(METHODS, "slerp", dataclasses.replace(METHODS["slerp"], chunked=spy))
    f = request.getfixturevalue("llama_family" if stored == "bf16" else "llama_family_f32")
    recipe = {
        "merge_method": "slerp",
        "base_model": str(f["base"]),
        "models": models(f, ("base", None), ("ft1", None)),
        "parameters": {"t": 0.3},
        "dtype": "bfloat16",
    }
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1 << 40)  # every tensor whole
    whole = distmerge(recipe, tmp_path / "whole")
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 777)
    chunked = distmerge(recipe, tmp_path / "chunked")
    shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
    assert calls and shards and all(filecmp.cmp(whole / n, chunked / n, shallow=False) for n in shards)
