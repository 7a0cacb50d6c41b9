"""The CPU fused loops (torch.compile over the references' operations) give the references' bits."""

from __future__ import annotations

import pytest
import torch

from distmerge import kernels
from distmerge.kernels import compiled, reference
from tests.helpers import synthetic_models

pytestmark = pytest.mark.slow  # torch.compile: each new graph compiles for seconds

N = 70001  # above compiled.MIN_ELEMENTS, not a multiple of any vector width


ALWAYS = kernels.KernelOptions(compile="always")
"""The compiled loops whatever the size of the run (by default only large runs use them)."""


def no_reference(monkeypatch):
    """Make the torch references fail if called: what follows must run the compiled loops."""
    for name in ("task_combine", "task_merge", "slerp_combine", "scale", "stock_interpolate"):
        monkeypatch.setattr(reference, name, lambda *a, **k: pytest.fail("the reference ran"))


def family(n, seed, dtype=torch.float32):
    """A base and n fine-tunes with exact zeros, exact sign ties and equal values mixed in."""
    base, models = synthetic_models(N, n, seed, spread=0.01)
    models[0][:100] = base[:100]  # τ₀ = 0: never agrees
    if n > 1:
        models[1][100:200] = 2 * base[100:200] - models[0][100:200]  # τ₁ = −τ₀: Σ = 0 elects +1
    return base.to(dtype), [x.to(dtype) for x in models]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a, b.view(torch.uint8))


F32, BF16 = torch.float32, torch.bfloat16
PAIRWISE = [
    # consensus, normalize, (n, weight, λ), dtype: every pair of values of any two of the four
    # factors appears in some row (8 rows, not the 32 of the whole product: each row compiles
    # two loops, 5-7 s each with inductor's cache cold, as in every clean CI clone)
    (False, False, (1, [0.7], 1.0), F32),
    (True, True, (1, [0.7], 1.0), BF16),
    (False, True, (2, [0.6, -0.3], 1.0), BF16),
    (True, False, (2, [0.6, -0.3], 1.0), F32),
    (False, False, (3, [0.5, 0.3, 0.2], 0.8), BF16),
    (True, True, (3, [0.5, 0.3, 0.2], 0.8), F32),
    (True, False, (2, [0.5, -0.5], 1.3), BF16),
    (False, True, (2, [0.5, -0.5], 1.3), F32),
]


@pytest.mark.parametrize("consensus, normalize, case, dtype", PAIRWISE,
                         ids=[f"consensus{c:d}-normalize{z:d}-n{k[0]}-lambda{k[2]}-{str(d)[6:]}" for c, z, k, d in PAIRWISE])  # fmt: skip
def test_task_merge_compiled_is_the_reference(consensus, normalize, case, dtype):
    n, weight, lambda_ = case
    base, models = family(n, seed=n, dtype=dtype)
    kw = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    deltas = [x.float() - base.float() for x in models]
    expected = reference.task_merge(base, models, weight, **kw), reference.task_combine(base, deltas, weight, **kw)
    with pytest.MonkeyPatch.context() as mp:
        no_reference(mp)
        assert same(compiled.task_merge(base, models, weight, **kw), expected[0])
        assert same(compiled.task_combine(base, deltas, weight, **kw), expected[1])
    assert not compiled.fell_back()  # the compiled loops ran, not the eager fallback


def test_task_merge_with_a_keep_rule_sparsifies_eagerly_then_combines_compiled():
    from distmerge.methods import sparsify

    base, models = family(2, seed=5)
    for rescale in (False, True):
        trim = kernels.Keep(tuple(sparsify.top_k(x - base, d) for x, d in zip(models, [0.3, 0.6])), rescale)
        kw = dict(consensus=True, normalize=True, lambda_=1.0)
        want = reference.task_merge(base, models, [0.5, 0.5], trim, **kw)
        assert same(compiled.task_merge(base, models, [0.5, 0.5], trim, **kw), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_slerp_scale_and_stock_compiled_are_the_references(dtype):
    base, (a, b, c) = family(3, seed=9, dtype=dtype)
    kw = {}
    c0, c1 = torch.tensor(0.3712), torch.tensor(0.6931)
    ts = (torch.tensor([0.42]), torch.tensor([0.0]), torch.tensor([1.0]))
    want = (
        reference.slerp_combine(c0, c1, a, b, **kw),
        reference.scale(a, 0.37, **kw),
        [reference.stock_interpolate(base, [a, b, c], t, **kw) for t in ts],
    )
    with pytest.MonkeyPatch.context() as mp:
        no_reference(mp)
        assert same(compiled.slerp_combine(c0, c1, a, b, **kw), want[0])
        assert same(compiled.scale(a, 0.37, **kw), want[1])
        for t, w in zip(ts, want[2]):
            assert same(compiled.stock_interpolate(base, [a, b, c], t, **kw), w)


def test_dispatch_uses_compiled_loops_for_large_cpu_tensors_of_large_runs():
    big, small = torch.zeros(compiled.MIN_ELEMENTS), torch.zeros(10)
    auto = kernels.KernelOptions()
    assert kernels._impl(big, auto) is reference and kernels._impl(big, None) is reference  # a small run
    consensus_only = auto.for_work(compiled.WORK_TO_COMPILE_CONSENSUS)  # enough for the TIES consensus only
    assert kernels._impl(big, consensus_only, consensus=True) is compiled and kernels._impl(big, consensus_only) is reference
    large = auto.for_work(compiled.WORK_TO_COMPILE)
    assert kernels._impl(big, large) is compiled and kernels._impl(small, large) is reference
    assert kernels._impl(big, kernels.KernelOptions(compile="never", work=compiled.WORK_TO_COMPILE)) is reference
    assert kernels._impl(big, ALWAYS) is compiled


def test_a_failing_compiler_falls_back_to_the_same_operations(monkeypatch):
    """No C++ compiler, say: one warning, then the eager operations (the reference's bits)."""
    def broken(fn, **_):
        def call(*a, **k):
            raise RuntimeError("no compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_LOOPS", [])
    fresh = compiled._compiled(compiled._scale.__wrapped__)
    x = torch.randn(N)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        y = fresh(x, torch.tensor(0.5))
    assert same(y, reference.scale(x, 0.5)) and compiled.fell_back() == ["_scale"]
    assert same(fresh(x, torch.tensor(0.5)), y)  # eager from then on, without another warning


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_compiled_loops_in_a_chunked_merge_give_mergekits_bits(llama_family_f32, tmp_path, monkeypatch, method):
    """Every chunk through the compiled loops (no size floor), float32: mergekit's result, bit for bit."""
    import distmerge.tensor_merge
    from tests.helpers import assert_same_tensors
    from tests.test_merge_vs_mergekit import both, models

    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 0)
    monkeypatch.setenv("DISTMERGE_COMPILE", "1")
    monkeypatch.setattr(distmerge.tensor_merge, "CHUNK_ELEMENTS", 4099)
    f = llama_family_f32
    params = [{"weight": 0.7, "density": 0.3}, {"weight": -0.4, "density": 0.7}]
    recipe = {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": models(f, ("ft1", params[0]), ("ft2", params[1])),
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    }
    ours, theirs = both(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    assert not compiled.fell_back()


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "passthrough"])
def test_bf16_chunks_as_stored_through_compiled_loops_are_the_whole_tensor_merge(llama_family, tmp_path, monkeypatch, method):
    """bf16 inputs handed to the element-wise kernels as stored (widened inside the compiled
    loop; task_arithmetic's in numba's, ``kernels.loops``, which come first) give the bytes of
    the whole-tensor merge on float32 copies (plain torch)."""
    import filecmp

    from distmerge import tensor_merge
    from tests.test_merge_vs_mergekit import distmerge, models

    f = llama_family
    if method == "passthrough":
        recipe = {"merge_method": method, "slices": [{"sources": [{"model": str(f["ft1"]), "layer_range": [0, 4], "parameters": {"scale": 0.7}}]}]}
    else:
        recipe = {"merge_method": method, "models": models(f, ("ft1", {"weight": 0.6}), ("ft2", {"weight": -0.3}))}
        if method == "linear":
            recipe["models"] += models(f, ("base", {"weight": 0.5}))
        else:
            recipe["base_model"] = str(f["base"])
    recipe["dtype"] = "bfloat16"
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1 << 40)
    whole = distmerge(recipe, tmp_path / "whole")
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 0)
    monkeypatch.setenv("DISTMERGE_COMPILE", "1")
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 4099)
    chunked = distmerge(recipe, tmp_path / "chunked")
    shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
    assert shards and all(filecmp.cmp(whole / n, chunked / n, shallow=False) for n in shards)
    assert not compiled.fell_back()
