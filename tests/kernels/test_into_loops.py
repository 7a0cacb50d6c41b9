"""The loops that round a merge straight into the bf16 output (``Method.into``: linear,
task_arithmetic) give the bits of the torch ops and the run's copy into bf16."""

from __future__ import annotations

import filecmp

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distmerge import kernels, tensor_merge
from distmerge.errors import MergeError
from distmerge.kernels import loops, reference
from tests.kernels.test_loops import bf16, finite_words


def torchs(tensors: list[torch.Tensor], weight: list[float], normalize: bool) -> torch.Tensor:
    """What the run writes without the loop: the reference's float32, copied into bf16."""
    out = torch.empty(tensors[0].shape, dtype=torch.bfloat16)
    return out.copy_(reference.linear_sum(tensors, weight, normalize=normalize))


@settings(max_examples=80, deadline=None)
@given(st.data(), st.integers(1, 5000), st.integers(1, 4), st.booleans())
def test_linear_into_is_the_references_sum_rounded_as_torch_rounds(data, n, models, normalize):
    """Arbitrary finite bf16 values (±0, subnormals, sums that overflow), any float32 weights
    (their sum never 0, as the plan requires), n across blocks (2048): the loop's bf16 bits
    are torch's wherever every result is finite, and it says False where one is not."""
    tensors = [bf16(data.draw(finite_words(n))) for _ in range(models)]
    weight = [data.draw(st.floats(-3, 3, width=32)) for _ in range(models)]
    if normalize and float(torch.tensor(weight).sum()) == 0:
        weight[0] += 1
    out = torch.empty(n, dtype=torch.bfloat16)
    done = loops.linear_into(tensors, weight, normalize=normalize, out=out)
    expected = torchs(tensors, weight, normalize)
    assert done == bool(expected.isfinite().all())
    if done:
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 5000), st.integers(1, 3), st.booleans(), st.booleans())
def test_task_merge_into_is_the_references_merge_rounded_as_torch_rounds(data, n, models, consensus, normalize):
    """task_arithmetic (and TIES without trimming): θ₀ + λ·Σᵢ wᵢτᵢ / D or the disjoint mean,
    rounded into bf16; False exactly where a result is not finite."""
    words = data.draw(finite_words(n))
    base = bf16(words)
    near = [[w ^ data.draw(st.integers(0, 3)) for w in words] for _ in range(models)]
    tensors = [bf16(data.draw(st.sampled_from([near[i], data.draw(finite_words(n))]))) for i in range(models)]
    weight = [data.draw(st.floats(-2, 2, width=32)) for _ in range(models)]
    lambda_ = data.draw(st.sampled_from([1.0, 0.7, 1.3]))
    flags = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    out = torch.empty(n, dtype=torch.bfloat16)
    done = loops.task_merge_into(base, tensors, weight, **flags, out=out)
    expected = torch.empty(n, dtype=torch.bfloat16).copy_(reference.task_merge(base, tensors, weight, **flags))
    assert done == bool(expected.isfinite().all())
    if done:
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.7e38])
def test_a_result_that_is_not_finite_is_left_to_torch(value):
    """A NaN or Inf input, or a float32 sum (3.4e38) that is finite but rounds to Inf in bf16: False."""
    x = torch.ones(3000, dtype=torch.bfloat16)
    y = x.clone()
    y[2500] = value
    out = torch.empty(3000, dtype=torch.bfloat16)
    assert torchs([x, y], [1.0, 2.0], False)[2500].isinf() or value != value
    assert not loops.linear_into([x, y], [1.0, 2.0], normalize=False, out=out)
    assert loops.linear_into([x, x], [1.0, 1.0], normalize=False, out=out) and bool((out == 2).all())


def test_only_bf16_cpu_tensors_take_the_loop():
    x = torch.ones(10, dtype=torch.bfloat16)
    never = kernels.KernelOptions(compile="never")
    assert kernels.linear_sum_into([x, x], [0.5, 0.5], normalize=True, out=torch.empty(10, dtype=torch.bfloat16))
    assert not kernels.linear_sum_into([x, x], [0.5, 0.5], normalize=True, out=torch.empty(10))
    assert not kernels.linear_sum_into([x, x.half()], [0.5, 0.5], normalize=True, out=torch.empty(10, dtype=torch.bfloat16))
    assert not kernels.linear_sum_into([x, x], [0.5, 0.5], normalize=True, out=torch.empty(10, dtype=torch.bfloat16), options=never)


RECIPES = {
    "linear": lambda f: {"models": [("base", {"weight": 0.4}), ("ft1", {"weight": 0.35}), ("ft2", {"weight": -0.25})]},
    "task_arithmetic": lambda f: {
        "base_model": str(f["base"]),
        "models": [("ft1", {"weight": 0.7}), ("ft2", {"weight": -0.4})],
        "parameters": {"lambda": 0.9, "normalize": True},
    },
}


def _merge(method: str, family, tmp_path, name: str, *args: str):
    from tests.test_merge_vs_mergekit import distmerge, models

    recipe = {"merge_method": method, **RECIPES[method](family), "dtype": "bfloat16"}
    recipe["models"] = models(family, *recipe["models"])
    return distmerge(recipe, tmp_path / name, *args)


def _small_chunks(monkeypatch, chunk: int = 1031) -> None:
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(tensor_merge, "DROP_ELEMENTS", 5 * chunk)


def _same(a, b) -> bool:
    shards = sorted(p.name for p in a.glob("model-*.safetensors"))
    return bool(shards) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in shards)


@pytest.mark.parametrize("method, loop", [("linear", "linear_into"), ("task_arithmetic", "task_merge_into")])
def test_a_merge_through_the_loop_writes_the_torch_ops_bytes(llama_family, tmp_path, monkeypatch, method, loop):
    """End to end on bf16 checkpoints: tensors merged in ranges by the loop (chunks of 1031
    elements, ranges of five) give the bytes of the torch ops (DISTMERGE_COMPILE=0)."""
    _small_chunks(monkeypatch)
    calls = []
    into = getattr(loops, loop)
    monkeypatch.setattr(loops, loop, lambda *a, **k: calls.append(1) or into(*a, **k))
    monkeypatch.setenv("DISTMERGE_COMPILE", "0")
    torch_ops = _merge(method, llama_family, tmp_path, "torch")
    assert not calls
    monkeypatch.delenv("DISTMERGE_COMPILE")
    fused = _merge(method, llama_family, tmp_path, "loop")
    assert calls and _same(fused, torch_ops)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_a_range_with_a_nan_is_merged_by_torch_and_reported(llama_family, tmp_path, monkeypatch, method):
    """A NaN in one model: the loop declines its range, which the torch ops merge and the run's
    check reports (one line, no output); with --allow-nonfinite, the torch ops' bytes."""
    import shutil

    from safetensors.torch import load_file, save_file

    family = dict(llama_family)
    family["ft1"] = tmp_path / "ft1-nan"
    shutil.copytree(llama_family["ft1"], family["ft1"])
    shard = sorted(family["ft1"].glob("*.safetensors"))[0]
    state = load_file(shard)
    name = max(state, key=lambda k: state[k].numel())
    state[name].view(-1)[4000] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    _small_chunks(monkeypatch)
    with pytest.raises((MergeError, SystemExit)):
        _merge(method, family, tmp_path, "refused")
    monkeypatch.setenv("DISTMERGE_COMPILE", "0")
    torch_ops = _merge(method, family, tmp_path, "torch", "--allow-nonfinite")
    monkeypatch.delenv("DISTMERGE_COMPILE")
    fused = _merge(method, family, tmp_path, "loop", "--allow-nonfinite")
    assert _same(fused, torch_ops)
