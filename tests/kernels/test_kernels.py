"""distmerge.kernels: the dispatch, and every Triton kernel against its plain-torch reference.

No GPU is needed. The kernels run on CPU tensors under the Triton interpreter, which has to
be switched on (TRITON_INTERPRET=1) before triton is first imported: triton's own library
functions (tl.rand, tl.sum) are decorated then. So the interpreted tests (``@interpreted``)
are collected only in a child pytest process over this file, started with that variable
by ``test_triton_kernels_under_the_interpreter``; the parent process never sets it, and no
other test module can see it. The parent also compiles the real kernels ahead of time for
an H100 (sm_90), in another subprocess, and reads the PTX: no contracted FMA, IEEE division.

Exactness: the kernels do the reference's float32 operations in the same order, so their
results are compared bitwise, except where a rescale's L1 norms (sums over the whole
tensor, reduced in another order) set a scale factor: there rtol = atol = 1e-6 (a few ulp of
the factor), and the kept entries and the draws are still checked exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from distmerge import kernels, rng
from distmerge.kernels import reference
from distmerge.methods import METHODS
from tests.helpers import REPO_ROOT
from tests.methods.test_methods import ours
from tests.helpers import synthetic_models as models  # base ~ N(0, 1), fine-tunes base + 0.1·N(0, 1), in dtype

BLOCK = 128
"""Block size of the interpreted kernels: the shapes below then span one to three programs,
most with a partial last block. (The interpreter costs about 0.05 to 0.3 s per program.)"""

TOL = dict(rtol=1e-6, atol=1e-6)

CHILD = "DISTMERGE_KERNEL_TESTS_CHILD"
IN_CHILD = os.environ.get(CHILD) == "1"


def interpreted(test):
    """A test of the kernels under the Triton interpreter: collected in the child process only."""
    test.__test__ = IN_CHILD
    return test


def parent_only(test):
    test.__test__ = not IN_CHILD
    return test


# ---------------------------------------------------------------- helpers


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits (so also the same signed zeros)."""
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape)
    if not torch.equal(bits(actual), bits(expected)):
        diff = (actual.float() - expected.float()).abs()
        count = int((bits(actual) != bits(expected)).sum())
        raise AssertionError(f"{count} entries differ, largest by {float(diff.max())}")


def deltas_with_ties(shape, n, seed):
    """A zero base and models on a grid of 1/4: many equal |τ|, to test the top-k tie rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.zeros(shape), [torch.randint(-3, 4, shape, generator=g).float() / 4 for _ in range(n)]


WEIGHTS = [0.7, -0.3, 1.2, 0.5]
DENSITIES = [0.5, 0.3, 0.8, 0.21]
SEEDS = [rng.derive_seed(0, "t", str(i)) for i in range(4)]
CASES = [((7,), 2), ((130,), 3), ((5, 3, 4), 4), ((16, 9), 3), ((300,), 2)]
"""(shape, N): sizes below, at and above one block, and not multiples of it."""


# ---------------------------------------------------------------- dispatch (no triton needed)


@parent_only
def test_use_triton_only_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert not kernels.use_triton(torch.zeros(3))
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert kernels.use_triton(cuda_like)
    assert kernels._impl(cuda_like, kernels.KernelOptions(triton=False)) is reference  # DISTMERGE_NO_TRITON=1
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert not kernels.use_triton(cuda_like)


@parent_only
def test_kernel_options_from_the_environment():
    """DISTMERGE_NO_TRITON and DISTMERGE_COMPILE, read once where a run starts (RunOptions)."""
    from_env = kernels.KernelOptions.from_env
    assert from_env({}) == kernels.KernelOptions(compile="auto", triton=True)
    for off in ("1", "true", "yes"):
        assert not from_env({"DISTMERGE_NO_TRITON": off}).triton
    assert from_env({"DISTMERGE_NO_TRITON": "0"}).triton
    assert from_env({"DISTMERGE_COMPILE": "1"}).compile == "always"
    assert from_env({"DISTMERGE_COMPILE": "off"}).compile == "never"
    assert from_env({"DISTMERGE_COMPILE": "auto"}).compile == "auto"
    assert kernels.KernelOptions().for_work(123).work == 123


@parent_only
def test_kernels_are_a_leaf():
    """distmerge.kernels imports nothing of the methods: they hand it what to keep as data."""
    import pathlib

    for path in pathlib.Path(kernels.__file__).parent.glob("*.py"):
        assert "distmerge.methods" not in path.read_text(), path.name


@parent_only
def test_cpu_tensors_never_touch_triton(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setitem(sys.modules, "distmerge.kernels.triton_kernels", None)  # importing it fails
    base, xs = models((9,), 2, seed=1)
    kernels.linear_sum(xs, [0.5, 0.5], normalize=True)
    kernels.task_merge(base, xs, [1.0, 1.0], top_k([0.5, 0.5])(base, xs), consensus=True, normalize=True, lambda_=1.0)
    kernels.slerp_combine(0.5, 0.5, base, xs[0])
    kernels.scale(base, 2.0)
    kernels.stock_interpolate(base, xs, torch.tensor([0.3]))


@parent_only
def test_top_cut_selects_the_top_k_mask():
    """A ``kernels.Top`` (threshold, tie cut) keeps what ``sparsify.top_k_mask`` keeps, ties included."""
    from distmerge.methods import sparsify

    _, (x,) = deltas_with_ties((40, 7), 1, seed=2)
    for k in (0, 1, 17, 139, 140, 279, 280, 300):
        mask = reference.in_top(x.abs(), sparsify.top_cut(x.abs(), k))
        assert int(mask.sum()) == min(k, x.numel())
        order = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices[:k]
        assert torch.equal(mask.reshape(-1).nonzero().reshape(-1), order.sort().values)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def test_kept_is_torch_where_bit_for_bit():
    """``reference.kept`` (an integer AND) gives ``torch.where(keep, x, 0.0)``'s bits for any
    float32 values (NaN payloads, ±Inf, −0, subnormals) and any mask, strided or not."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    words = st.integers(-(2**31), 2**31 - 1)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(words, st.booleans()), min_size=1, max_size=64), st.booleans())
    def check(entries, transpose):
        bits = torch.tensor([w for w, _ in entries] * 2, dtype=torch.int32)
        x = bits.view(torch.float32).view(2, -1)
        keep = torch.tensor([k for _, k in entries] * 2).view(2, -1)
        if transpose:
            x, keep = x.t(), keep.t()
        assert torch.equal(_bits(reference.kept(keep, x)), _bits(torch.where(keep, x, 0.0)))

    check()
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45, -3.5])
    for keep in (torch.ones(7, dtype=torch.bool), torch.zeros(7, dtype=torch.bool)):
        assert torch.equal(_bits(reference.kept(keep, special)), _bits(torch.where(keep, special, 0.0)))


# ---------------------------------------------------------------- what to keep, as the methods decide it


def top_k(densities, rescale=False):
    """TIES's trim of each model's task vector (``sparsify.top_k``)."""
    from distmerge.methods import sparsify

    return lambda base, xs: kernels.Keep(tuple(sparsify.top_k(x.float() - base.float(), d) for x, d in zip(xs, densities)), rescale)


def outliers(densities, gammas, rescale=False):
    """Breadcrumbs' band of each model's task vector (``sparsify.outliers``)."""
    from distmerge.methods import sparsify

    return lambda base, xs: kernels.Keep(
        tuple(sparsify.outliers(x.float() - base.float(), d, g) for x, d, g in zip(xs, densities, gammas)), rescale
    )


def draws(densities, seeds, rescale=True):
    """DARE's drop (``sparsify.drop``)."""
    from distmerge.methods import sparsify

    return lambda base, xs: kernels.Keep(tuple(sparsify.drop(d, s) for d, s in zip(densities, seeds)), rescale)


def masks(rescale=False, dense=()):
    """Given masks (DELLA's MagPrune draws are such masks); None for the inputs in ``dense``."""
    return lambda base, xs: kernels.Keep(
        tuple(None if i in dense else torch.arange(x.numel()).view(x.shape) % (i + 2) == 0 for i, x in enumerate(xs)),
        rescale,
    )


# ---------------------------------------------------------------- the interpreted kernels


@pytest.mark.slow
@parent_only
def test_triton_kernels_under_the_interpreter(tmp_path):
    """Runs every ``@interpreted`` test of this file in a child pytest with TRITON_INTERPRET=1."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD: "1", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    command += ["--basetemp", str(tmp_path / "t")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=280, env=env, cwd=REPO_ROOT)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print("interpreted kernels:", summary)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.fixture(scope="module")
def tk():
    """distmerge.kernels.triton_kernels, interpreted (child process), with block size BLOCK."""
    from distmerge.kernels import triton_kernels

    assert type(triton_kernels.task_merge_kernel).__name__ == "InterpretedFunction", "TRITON_INTERPRET=1 was not set"
    saved, triton_kernels.BLOCK = triton_kernels.BLOCK, BLOCK
    yield triton_kernels
    triton_kernels.BLOCK = saved


@pytest.fixture(scope="module")
def fma_check(tk):
    """The check for results with an explicit tl.fma (linear): bitwise where the interpreter
    rounds tl.fma once, as the GPU does (Triton ≥ 3.9); TOL where it rounds twice (older)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma(out, a, b, c, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out + i, tl.fma(tl.load(a + i), tl.load(b + i), tl.load(c + i)))

    g = torch.Generator().manual_seed(15)
    a, b, c = (torch.randn(256, generator=g) for _ in range(3))
    out = torch.empty(256)
    fma[(1,)](out, a, b, c, BLOCK=256)
    if torch.equal(out, torch.addcmul(c, a, b)):  # addcmul is one rounding on CPU
        return assert_same
    return lambda got, want: torch.testing.assert_close(got, want, **TOL)


def _drop_alone(tk, delta, density, seed, rescale):
    """One delta through the fused kernel with a DARE draw, as a merge from a zero base."""
    zero = torch.zeros_like(delta)
    keep = kernels.Keep((kernels.Draw(seed, density),), rescale)
    options = dict(consensus=False, normalize=False, lambda_=1.0)
    return tk.task_merge(zero, [delta], [1.0], keep, **options), reference.task_merge(zero, [delta], [1.0], keep, **options)


@interpreted
def test_draws_are_the_rng_bits(tk):
    """tl.rand inside the kernels = distmerge.rng.uniform: the kept set and its size are exact,
    across the counter's high word (offsets ≥ 2**32) and for keys ≥ 2**63."""
    base, (x,) = models((130,), 1, seed=3)
    delta = x - base
    for seed, offset in [(0, 0), (12345, 2**32 - 37), (2**63 - 25, 5), (2**64 - 1, 2**32 - 37)]:
        if offset == 0:
            assert_same(*_drop_alone(tk, delta, 0.4, seed, rescale=False))
        plan = tk._Plan([1.0])
        tk._keep_plan(plan, kernels.Keep((kernels.Draw(seed, 0.4),)), delta.numel(), delta.device)
        _, _, kept = tk.keep_norms(None, (delta,), plan, idx0=offset)
        assert int(kept[0]) == int(rng.bernoulli_keep(seed, delta.shape, 0.4, offset=offset).sum())


@interpreted
@pytest.mark.parametrize("shape", [(7,), (16, 9), (300,)])
def test_drop_rescale(tk, shape):
    base, xs = models(shape, 2, seed=4)
    for x, seed, density in zip(xs, SEEDS, DENSITIES):
        delta = x - base
        got, want = _drop_alone(tk, delta, density, seed, rescale=True)
        assert torch.equal(got != 0, want != 0)  # the same entries kept
        torch.testing.assert_close(got, want, **TOL)  # the scale's L1 sums: another reduction order
        plan = tk._Plan([1.0])
        tk._keep_plan(plan, kernels.Keep((kernels.Draw(seed, density),), True), delta.numel(), delta.device)
        before, after, _ = tk.keep_norms(None, (delta,), plan)
        kept = torch.where(want != 0, delta, 0.0)
        torch.testing.assert_close(before[0], delta.abs().sum(), **TOL)
        torch.testing.assert_close(after[0], kept.abs().sum(), **TOL)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,n", CASES)
def test_linear_sum(tk, fma_check, shape, n, dtype):
    _, xs = models(shape, n, seed=5, dtype=dtype)
    for normalize in (True, False):
        w = WEIGHTS[:n]
        fma_check(tk.linear_sum(xs, w, normalize=normalize), reference.linear_sum(xs, w, normalize=normalize))


@interpreted
@pytest.mark.parametrize("shape,n,dtype", [c + (dt,) for c, dt in zip(CASES, [torch.float32, torch.float16] * 3)])
def test_task_combine(tk, shape, n, dtype):
    base, xs = models(shape, n, seed=6, dtype=dtype)
    deltas = [x.float() - base.float() for x in xs]
    deltas[0][..., :2] = 0.0  # zero deltas never agree; where none agrees the divisor is 1
    for consensus, normalize, lambda_, w in [
        (True, True, 1.0, WEIGHTS[:n]),
        (True, False, 0.7, WEIGHTS[:n]),
        (False, True, 1.0, WEIGHTS[:n]),
        (False, True, 0.7, [1.0, -1.0, 0.5, -0.5][:n]),  # Σw = 0: divisor 1
        (False, False, 1.0, WEIGHTS[:n]),
    ]:
        options = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
        assert_same(tk.task_combine(base, deltas, w, **options), reference.task_combine(base, deltas, w, **options))


SPARSIFIERS = {
    "none": lambda n: lambda base, xs: None,
    "topk": lambda n: top_k(DENSITIES[:n]),
    "topk-edge": lambda n: top_k([1.0, 0.0, 1e-9, 0.5][:n]),  # dense, zeros, k = 1
    "outliers": lambda n: outliers(DENSITIES[:n], [0.1, 0.0, 0.3, 0.05][:n]),
    "outliers-over": lambda n: outliers([0.9] * n, [0.3] * n),  # density + γ > 1
    "random": lambda n: draws([0.5, 1.0, 0.3, 0.8][:n], SEEDS[:n], rescale=False),
    "all-dense": lambda n: draws([1.0] * n, SEEDS[:n], rescale=True),  # no draw, no rescale
    "masked": lambda n: masks(),
    "masked-one-dense": lambda n: masks(dense=(1,)),
}
RESCALED = {
    "topk+rescale": lambda n: top_k(DENSITIES[:n], rescale=True),
    "outliers+rescale": lambda n: outliers(DENSITIES[:n], [0.05] * n, rescale=True),
    "random+rescale": lambda n: draws(DENSITIES[:n], SEEDS[:n], rescale=True),
    "masked+rescale": lambda n: masks(rescale=True),
    "masked-one-dense+rescale": lambda n: masks(rescale=True, dense=(0,)),
}


@interpreted
@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("name", list(SPARSIFIERS) + list(RESCALED))
def test_task_merge(tk, name, consensus):
    n = 3 if consensus else 2
    base, xs = models((300,), n, seed=7)
    keep = {**SPARSIFIERS, **RESCALED}[name](n)(base, xs)
    options = dict(consensus=consensus, normalize=consensus, lambda_=0.7 if consensus else 1.0)
    got = tk.task_merge(base, xs, WEIGHTS[:n], keep, **options)
    want = reference.task_merge(base, xs, WEIGHTS[:n], keep, **options)
    if name in RESCALED:
        torch.testing.assert_close(got, want, **TOL)
    else:
        assert_same(got, want)


@interpreted
@pytest.mark.parametrize("shape,n", [((130,), 3), ((6, 7), 4)])
def test_top_k_tie_rule(tk, shape, n):
    """Among equal |τ| at the threshold the lower flat indices are kept, as sparsify.top_k_mask."""
    base, xs = deltas_with_ties(shape, n, seed=8)
    for densities in ([0.5, 0.3, 0.8, 0.21][:n], [0.1] * n, [0.95] * n):
        for keep in (top_k(densities)(base, xs), outliers(densities, [0.1] * n)(base, xs)):
            options = dict(consensus=True, normalize=True, lambda_=1.0)
            got = tk.task_merge(base, xs, WEIGHTS[:n], keep, **options)
            assert_same(got, reference.task_merge(base, xs, WEIGHTS[:n], keep, **options))


@interpreted
def test_task_merge_storage_dtypes(tk):
    """fp16 / bf16 inputs read as stored and widened inside the kernel (an element-wise method's
    chunks arrive so), each input its own dtype."""
    base, xs = models((16, 9), 3, seed=9, dtype=torch.bfloat16)
    xs[1] = xs[1].to(torch.float16)  # inputs may differ in dtype
    for keep in [None, top_k([0.5, 0.3, 0.8]), draws([0.5, 0.3, 0.8], SEEDS[:3], False), outliers([0.5, 0.3, 0.8], [0.1] * 3)]:
        keep = keep and keep(base, xs)
        options = dict(consensus=True, normalize=True, lambda_=1.0)
        assert_same(tk.task_merge(base, xs, WEIGHTS[:3], keep, **options), reference.task_merge(base, xs, WEIGHTS[:3], keep, **options))


def _awkward_floats() -> torch.Tensor:
    """Values that exercise rounding to bf16 / fp16: exact ties, subnormals, overflow, zeros."""
    g = torch.Generator().manual_seed(10)
    wide = torch.randn(300, generator=g) * torch.logspace(-42, 38, 300)
    tie_bits = (torch.randint(0, 1 << 15, (40,), generator=g, dtype=torch.int32) << 16) | 0x8000
    ties = tie_bits.view(torch.float32)
    special = [0.0, -0.0, 1e-40, -3e-42, 6e-8, 65504.0, 65520.0, 3.3e38, -3.4e38, float("inf"), float("-inf")]
    return torch.cat([wide, ties[torch.isfinite(ties)], torch.tensor(special)])


@interpreted
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, on the values meant to overflow
@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_and_widening(tk, storage):
    x = _awkward_floats().to(storage)
    for s in (None, 0.37, -3.0):
        assert_same(tk.scale(x, s, block=1024), reference.scale(x, s))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (130,), (5, 3, 4)])
def test_slerp_combine(tk, shape, dtype):
    base, (x,) = models(shape, 1, seed=11, dtype=dtype)
    t = torch.tensor(0.3)
    omega = torch.tensor(0.2)
    slerp = (torch.sin((1 - t) * omega) / torch.sin(omega), torch.sin(t * omega) / torch.sin(omega))
    for c0, c1 in [(1 - t, t), slerp]:
        assert_same(tk.slerp_combine(c0, c1, base, x), reference.slerp_combine(c0, c1, base, x))


@interpreted
@pytest.mark.parametrize("shape,n,dtype", [c + (dt,) for c, dt in zip(CASES, [torch.float32, torch.float16] * 3)])
def test_stock_interpolate(tk, shape, n, dtype):
    base, xs = models(shape, n, seed=12, dtype=dtype)
    g = torch.Generator().manual_seed(13)
    per_row = torch.rand(shape[:-1] + (1,), generator=g) if len(shape) > 1 else torch.rand(1, 1, generator=g)
    if len(shape) == 1:
        base, xs = base.unsqueeze(0), [x.unsqueeze(0) for x in xs]
    for t in (torch.tensor([0.37]), per_row, torch.tensor([0.0])):
        assert_same(tk.stock_interpolate(base, xs, t), reference.stock_interpolate(base, xs, t))


@interpreted
def test_empty_tensors(tk):
    e = torch.zeros(0, 4)
    options = dict(consensus=True, normalize=True, lambda_=1.0)
    assert tk.task_merge(e, [e, e], [1.0, 1.0], top_k([0.5, 0.5])(e, [e, e]), **options).shape == e.shape
    assert tk.linear_sum([e], [1.0], normalize=True).shape == e.shape
    assert tk.scale(e, 2.0).shape == e.shape and tk.slerp_combine(0.5, 0.5, e, e).shape == e.shape


# ---------------------------------------------------------------- the methods, routed through the kernels


def _call(name, base, tensors, params, seeds):
    """The method as the run calls it (``ours``), without a base for one that ignores it."""
    return ours(name, base if METHODS[name].base != "ignored" else None, tensors, params, seeds)


METHOD_CASES = [
    ("linear", dict(weight=WEIGHTS[:3]), True),
    ("task_arithmetic", dict(weight=WEIGHTS[:3], normalize=True, **{"lambda": 0.7}), True),
    ("ties", dict(weight=WEIGHTS[:3], density=DENSITIES[:3]), True),
    ("ties", dict(weight=WEIGHTS[:3], density=DENSITIES[:3], rescale=True, normalize=False), False),
    ("breadcrumbs", dict(weight=WEIGHTS[:3], density=DENSITIES[:3], gamma=0.1), True),
    ("breadcrumbs_ties", dict(weight=WEIGHTS[:3], density=DENSITIES[:3], gamma=0.05, rescale=True), False),
    ("dare_ties", dict(weight=WEIGHTS[:3], density=DENSITIES[:3], rescale=False), True),
    ("dare_linear", dict(weight=WEIGHTS[:3], density=DENSITIES[:3]), False),
    ("della", dict(weight=WEIGHTS[:3], density=DENSITIES[:3], epsilon=0.05), False),
    ("della_linear", dict(weight=WEIGHTS[:3], density=DENSITIES[:3], epsilon=0.05, rescale=False), True),
    ("model_stock", dict(), True),
    ("model_stock", dict(filter_wise=True), True),
    ("slerp", dict(t=0.3), True),
    ("passthrough", dict(scale=0.37), True),
]


@interpreted
@pytest.mark.parametrize("name,params,exact", METHOD_CASES)
def test_methods_through_the_kernels(tk, fma_check, monkeypatch, name, params, exact):
    """Each method with the kernels dispatch forced to the (interpreted) Triton path equals
    its CPU path: bitwise, or within TOL where an L1 rescale is involved."""
    base, xs = models((16, 9), 3, seed=14)
    if METHODS[name].max_inputs == 1:
        xs = xs[:1]
    want = _call(name, base, xs, params, SEEDS[: len(xs)])
    calls = []

    def use_triton(tensor):
        calls.append(tensor)
        return True

    monkeypatch.setattr(kernels, "use_triton", use_triton)  # CPU tensors to the (interpreted) kernels
    got = _call(name, base, xs, params, SEEDS[: len(xs)])
    assert calls, "the method did not go through distmerge.kernels"
    if exact:
        (fma_check if name == "linear" else assert_same)(got, want)
    else:
        torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------- the start-up self-check (kernels.selfcheck)

SELFCHECK_SHAPE = (3, 43)
"""129 elements: one full block of BLOCK and a partial one."""


@interpreted
def test_selfcheck_passes_every_correct_kernel(tk, recwarn):
    from distmerge.kernels import selfcheck

    options, findings = selfcheck.check(selfcheck.KERNELS, "cpu", kernels.KernelOptions(), shape=SELFCHECK_SHAPE)
    assert [f.kernel for f in findings] == list(selfcheck.KERNELS)
    assert all(f.ok for f in findings), [f for f in findings if not f.ok]
    assert options == kernels.KernelOptions() and not [w for w in recwarn if "distmerge" in str(w.message)]


def _off_by_one_ulp(fn, when=lambda *a, **k: True):
    """``fn`` with its first result entry one ulp off (when ``when(*args)``)."""

    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        if when(*args, **kwargs):
            out.view(-1)[0] = torch.nextafter(out.view(-1)[0], torch.tensor(float("inf")))
        return out

    return wrong


@interpreted
def test_selfcheck_switches_a_wrong_kernel_to_its_reference(tk, monkeypatch):
    """One ulp off in one entry: scale is disabled with one warning naming it; the dispatch
    then gives the reference's bits, the other kernels still run Triton."""
    from distmerge.kernels import selfcheck

    monkeypatch.setattr(tk, "scale", _off_by_one_ulp(tk.scale))
    with pytest.warns(UserWarning) as caught:
        options, findings = selfcheck.check(["scale", "slerp_combine", "scale"], "cpu", kernels.KernelOptions(), shape=SELFCHECK_SHAPE)
    messages = [str(w.message) for w in caught if "distmerge" in str(w.message)]
    assert len(messages) == 1 and "the scale Triton kernel" in messages[0] and "1 of 129 entries differ" in messages[0], messages
    assert options.disabled == {"scale"} and [(f.kernel, f.ok) for f in findings] == [("scale", False), ("slerp_combine", True)]
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: True)  # CPU tensors to the (interpreted) kernels
    _, (x,) = models((130,), 1, seed=16)
    assert not torch.equal(kernels.scale(x, 0.37), reference.scale(x, 0.37))  # the broken kernel, undisabled
    assert_same(kernels.scale(x, 0.37, options=options), reference.scale(x, 0.37))
    calls = []
    monkeypatch.setattr(tk, "slerp_combine", lambda *a, **k: calls.append(1) or reference.slerp_combine(*a, **k))
    kernels.slerp_combine(0.5, 0.5, x, x, options=options)
    assert calls == [1]


@interpreted
def test_selfcheck_switches_one_kind_of_keep_rule_and_a_raising_kernel(tk, monkeypatch):
    """task_merge wrong only for DARE draws: task_merge/draw is disabled, the bands still run
    Triton; a kernel that raises is disabled with its exception's first line."""
    from distmerge.kernels import selfcheck

    def is_draw(base, tensors, weight, keep=None, **_):
        return kernels.kernel_name(keep) == "task_merge/draw"

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(tk, "task_merge", _off_by_one_ulp(tk.task_merge, is_draw))
    monkeypatch.setattr(tk, "stock_interpolate", broken)
    names = ["task_merge/band", "task_merge/draw", "stock_interpolate"]
    with pytest.warns(UserWarning) as caught:
        options, findings = selfcheck.check(names, "cpu", kernels.KernelOptions(), shape=SELFCHECK_SHAPE)
    messages = [str(w.message) for w in caught if "distmerge" in str(w.message)]
    assert len(messages) == 2 and "task_merge/draw" in messages[0] and "stock_interpolate" in messages[1], messages
    assert "RuntimeError: CUDA error: an illegal memory access was encountered)" in messages[1]
    assert options.disabled == {"task_merge/draw", "stock_interpolate"}
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: True)
    base, xs = models((130,), 2, seed=17)
    for keep in (draws([0.5, 0.3], SEEDS[:2], rescale=False), top_k([0.5, 0.3])):
        keep = keep(base, xs)
        merged = kernels.task_merge(base, xs, WEIGHTS[:2], keep, consensus=True, normalize=True, lambda_=1.0, options=options)
        assert_same(merged, reference.task_merge(base, xs, WEIGHTS[:2], keep, consensus=True, normalize=True, lambda_=1.0))
    t = torch.tensor([0.3])
    assert_same(kernels.stock_interpolate(base[None], [x[None] for x in xs], t, options=options),
                reference.stock_interpolate(base[None], [x[None] for x in xs], t))  # fmt: skip


# ---------------------------------------------------------------- compiled for a GPU, without one


PTX_CHECK = textwrap.dedent(
    """
    import re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from distmerge.kernels import triton_kernels as tk

    try:
        target = GPUTarget("cuda", 90, 32)
    except Exception as e:
        print("skip", e); sys.exit(0)

    def ptx(fn, signature, constexprs):
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        return triton.compile(src, target=target, options={"enable_fp_fusion": False, "num_warps": 4}).asm["ptx"]

    merge = dict(out_ptr="*fp32", base_ptr="*bf16", xs=("*bf16", "*fp16", "*fp32"), fpar_ptr="*fp32",
                 ipar_ptr="*i64", n="i64", idx0="i64", divisor="fp32", lam="fp32")
    flags = dict(masks=None, SUB_BASE=True, ADD_BASE=True, RESCALE=True, NORMALIZE=True, SCALE_LAMBDA=True, BLOCK=1024)
    found = {}
    for keep, consensus in [(tk.KEEP_RANK, True), (tk.KEEP_RANDOM, False)]:
        code = ptx(tk.task_merge_kernel, merge, {**flags, "KEEP": keep, "CONSENSUS": consensus, "FMA": False})
        found[f"merge keep={keep} consensus={consensus}"] = code
    mask_flags = {k: v for k, v in flags.items() if k != "masks"}
    found["merge keep=mask"] = ptx(tk.task_merge_kernel, {**merge, "masks": ("*i1", "*i1", "*i1")},
        {**mask_flags, "KEEP": tk.KEEP_MASK, "CONSENSUS": True, "FMA": False})
    linear = {**flags, "KEEP": 0, "CONSENSUS": False, "FMA": True, "SUB_BASE": False, "ADD_BASE": False}
    found["linear"] = ptx(tk.task_merge_kernel, {**merge, "base_ptr": "constexpr"}, {**linear, "base_ptr": None})
    found["norms"] = ptx(tk.keep_norms_kernel, dict(part_ptr="*fp32", count_ptr="*i32", base_ptr="*fp32",
        xs=("*fp32", "*fp32"), fpar_ptr="*fp32", ipar_ptr="*i64", n="i32", idx0="i64", P="i32"),
        dict(masks=None, SUB_BASE=True, KEEP=tk.KEEP_RANDOM, BLOCK=1024))
    for name, code in found.items():
        fma = len(re.findall(r"\\bfma\\.rn\\.f32", code))
        assert "div.full" not in code and ".ftz" not in code, name
        assert (fma > 0) == (name == "linear"), (name, fma)
        if name.startswith("merge"):
            assert "div.rn.f32" in code, name
    print("ok", len(found))
    """
)


@pytest.mark.slow
@parent_only
def test_kernels_compile_for_sm90_without_contracted_fma(tmp_path):
    """The real (compiled) kernels build for an H100 and their PTX rounds like torch on CPU:
    no FMA except linear's explicit one, IEEE division, no flush-to-zero."""
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("triton.backends.nvidia", reason="triton has no CUDA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    result = subprocess.run([sys.executable, "-c", PTX_CHECK], capture_output=True, text=True, timeout=240, env=env)
    if result.stdout.startswith("skip"):
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-4000:]


def _mergekit_linear(xs: list[torch.Tensor], weight: list[float], normalize: bool) -> torch.Tensor:
    """mergekit 0.1.5's linear merge, step for step: float32 zeros, one ``addcmul_`` per model,
    then ``div_`` by the sum of the weights."""
    w = torch.tensor(weight, dtype=torch.float32)
    out = torch.zeros_like(xs[0], dtype=torch.float32)
    for x, wi in zip(xs, w.unbind(0)):
        out.addcmul_(x, wi)
    return out.div_(w.sum()) if normalize else out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_linear_sum_is_mergekits_accumulation_bit_for_bit(seed, normalize):
    """The reference is mergekit's accumulation: the same bits, signed zeros included (a −0
    product gives +0 in both), for weights of either sign, zero weights, and values from
    subnormal to 1e38."""
    g = torch.Generator().manual_seed(seed)
    n = 4099
    xs = []
    for _ in range(3):
        x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-40, 38, (n,), generator=g).float()
        x[torch.randint(0, n, (n // 5,), generator=g)] = -0.0
        x[torch.randint(0, n, (n // 7,), generator=g)] = 0.0
        xs.append(x)
    xs[1][:64] = -0.0
    xs[2][:64] = -0.0
    for weight in ([0.3, 0.5, 0.2], [0.7, -0.4, 0.0], [-0.0, 1e-30, 2.5], torch.randn(3, generator=g).tolist()):
        want = _mergekit_linear(xs, weight, normalize)
        got = reference.linear_sum(xs, weight, normalize=normalize)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), weight
