"""distmerge.rng: Philox4x32-10 bit-exact with published vectors, a scalar reference and Triton."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import pytest
import torch
try:  # the test extra
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    pytest.skip("hypothesis is not installed (property-based tests); pip install -e '.[test]'", allow_module_level=True)

from distmerge import rng

MASK = 0xFFFFFFFF


# ---------------------------------------------------------------- an independent scalar Philox


def philox_scalar(counter: tuple[int, int, int, int], key: tuple[int, int], rounds: int = 10) -> tuple[int, ...]:
    """Philox4x32 on Python ints, straight from Salmon et al. 2011 (Random123), one block."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return c0, c1, c2, c3


def word_scalar(seed: int, index: int) -> int:
    """Element ``index``'s word: word index % 4 of tl.randint4x(seed, index // 4), which Triton
    defines with key = seed's halves and counter = (c lo, c hi, 0, 0) for c = index // 4."""
    c = index >> 2
    return philox_scalar((c & MASK, c >> 32, 0, 0), (seed & MASK, seed >> 32))[index & 3]


def uniform_scalar(seed: int, index: int) -> float:
    """Triton's uint_to_uniform_float: the word as int32, negatives mapped by ~x, times
    float32(4.6566127342e-10) in float32."""
    x = word_scalar(seed, index)
    x = x if x < 1 << 31 else x ^ MASK
    f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731
    return f32(f32(float(x)) * f32(4.6566127342e-10))  # float32 × float32 is exact in float64


# Random123's known-answer tests for philox4x32_10 (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK, MASK, MASK, MASK), (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# (seed, element index) -> word, computed once with philox_scalar above and frozen here. Seed 0,
# elements 0-3 are the four words of Random123's first known answer (counter 0, key 0).
KNOWN = {
    (0, 0): 0x6627E8D5,
    (0, 1): 0xE169C58D,
    (0, 3): 0x9B00DBD8,
    (1, 0): 0xE3E80670,
    (12345, 1000): 0x4F9078CB,
    (2**40 + 7, 3): 0x9DAECF53,
    (2**63 - 25, 2**34 + 5): 0x0805D6EB,
}


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert philox_scalar(counter, key) == expected
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    assert tuple(int(w) for w in rng.philox4x32(*words, *key)) == expected


def test_known_values_frozen():
    for (seed, offset), word in KNOWN.items():
        assert word_scalar(seed, offset) == word, (seed, offset)
        assert int(rng.randint(seed, 1, offset)[0]) == word, (seed, offset)


@pytest.mark.parametrize("seed", [0, 1, 987654321, 2**32 + 1, 2**63 - 1, 2**64 - 1])
@pytest.mark.parametrize("offset", [0, 17, 2**31 - 3, 2**34 - 6])
def test_matches_scalar_reference(seed, offset):
    n = 11  # crosses counter 2**32 (the counter's second word) for offset 2**34 - 6
    words = rng.randint(seed, n, offset)
    floats = rng.uniform(seed, n, offset)
    assert words.tolist() == [word_scalar(seed, offset + i) for i in range(n)]
    assert floats.tolist() == [uniform_scalar(seed, offset + i) for i in range(n)]


def test_uniform_range_and_moments():
    u = rng.uniform(42, 200_000)
    assert u.dtype == torch.float32
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    # mean of 200k U(0,1): sd 1/sqrt(12 * 200k) ≈ 6.5e-4
    assert abs(float(u.mean()) - 0.5) < 5e-3
    assert abs(float(u.var()) - 1 / 12) < 2e-3


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    n=st.integers(1, 300),
    k=st.integers(0, 300),
    base=st.sampled_from([0, 2**32 - 150, 5 * 2**32]),
)
def test_element_index_property(seed, n, k, base):
    """uniform(s, n, offset=base+k) == uniform(s, n+k, offset=base)[k:]: chunks never change draws."""
    whole = rng.uniform(seed, n + k, base)
    assert torch.equal(rng.uniform(seed, n, base + k), whole[k:])


def test_chunking_does_not_change_draws(monkeypatch):
    reference = rng.uniform(7, 10_000)
    monkeypatch.setattr(rng, "CHUNK", 999)
    assert torch.equal(rng.uniform(7, 10_000), reference)
    keep = rng.bernoulli_keep(7, (100, 100), 0.3)
    assert torch.equal(keep, (reference < 0.3).view(100, 100))


@pytest.mark.parametrize("given", [1, 2, 3])
def test_masks_drawn_on_several_threads_are_the_draws_in_order(monkeypatch, given):
    """bernoulli_keep with one probability draws its blocks on every thread the process was
    given (``threads.each``): block k's draws land in block k whatever thread drew them.
    With a probability per element (DELLA, chunk by chunk) it draws on this thread."""
    import threading

    from distmerge import threads

    monkeypatch.setattr(rng, "CHUNK", 1000)  # 10 blocks, the last one short
    u = rng.uniform(5, 9_500, offset=77)
    p = torch.rand(9_500, generator=torch.Generator().manual_seed(0))
    ran_on = set()
    real = rng._c_words

    def spy(seed, start, count):
        ran_on.add(threading.get_ident())
        return real(seed, start, count)

    monkeypatch.setattr(rng, "_c_words", spy)
    main = threading.get_ident()
    with threads.using(given):
        assert torch.equal(rng.bernoulli_keep(5, (95, 100), 0.3, offset=77), (u < 0.3).view(95, 100))
        assert ran_on == {main} if given == 1 else main not in ran_on  # one thread: in order, here
        ran_on.clear()
        assert torch.equal(rng.bernoulli_keep(5, (9_500,), p, offset=77), u < p)
        assert ran_on == {main}


@pytest.mark.parametrize("p", [0.0, 1e-12, 0.3, 0.5, "a draw", 0.9999999, 1.0, 1.5])
def test_one_probability_compares_integers_with_the_same_result(p):
    """bernoulli_keep with one probability compares folded words with an integer threshold;
    it must keep exactly the elements whose float32 uniform is below p."""
    u = rng.uniform(11, 50_000)
    p = float(u[123]) if p == "a draw" else p  # a p that some element equals exactly
    p32 = torch.tensor(p, dtype=torch.float32)
    assert torch.equal(rng.bernoulli_keep(11, (50_000,), p), u < p32)
    t = rng.count_below(float(p32))
    f = lambda y: torch.tensor(y, dtype=torch.float32) * torch.tensor(rng._UNIFORM_SCALE, dtype=torch.float32)  # noqa: E731
    assert (t == 0 or f(t - 1) < p32) and (t == 2**31 or f(t) >= p32)


def test_bernoulli_keep_rate_and_per_element_probabilities():
    n = 100_000
    keep = rng.bernoulli_keep(3, (n,), 0.3)
    # Binomial(n, 0.3): sd ≈ 145; 6 sd
    assert abs(int(keep.sum()) - 0.3 * n) < 6 * (n * 0.3 * 0.7) ** 0.5
    p = torch.linspace(0, 1, n)
    keep = rng.bernoulli_keep(4, (n,), p)
    assert not keep[p == 0].any() and keep[p == 1].all()
    low, high = keep[: n // 2].float().mean(), keep[n // 2 :].float().mean()
    assert abs(float(low) - 0.25) < 0.01 and abs(float(high) - 0.75) < 0.01


def test_derive_seed_stable_and_distinct():
    a = rng.derive_seed(42, "model.layers.0.mlp.up_proj.weight", "ft1")
    assert a == rng.derive_seed(42, "model.layers.0.mlp.up_proj.weight", "ft1")
    assert 0 <= a < 2**63
    others = {
        rng.derive_seed(43, "model.layers.0.mlp.up_proj.weight", "ft1"),
        rng.derive_seed(42, "model.layers.0.mlp.up_proj.weight", "ft2"),
        rng.derive_seed(42, "model.layers.0.mlp.up_proj.weigh", "tft1"),
    }
    assert a not in others and len(others) == 3


def test_derive_seed_frozen():
    """A frozen value: keys must not depend on the process (Python's str hash is salted)
    or change between versions, or recipes would stop reproducing."""
    assert rng.derive_seed(5, "lm_head.weight", "m") == 8475038915551875964


def test_sample_indices_range_and_uniformity():
    idx = rng.sample_indices(9, 100_000, 1000)
    assert idx.dtype == torch.int64 and int(idx.min()) >= 0 and int(idx.max()) < 1000
    counts = torch.bincount(idx, minlength=1000).float()
    assert float(counts.min()) > 50 and float(counts.max()) < 150  # mean 100, sd 10
    big = rng.sample_indices(9, 1000, 3 * 2**32 + 5)
    assert int(big.max()) < 3 * 2**32 + 5 and int(big.max()) > 2**32


# ---------------------------------------------------------------- Triton itself


TRITON_KERNEL = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl
    from distmerge import rng

    from distmerge.kernels.triton_kernels import _uniform

    @triton.jit
    def draw(words, floats, seed, offset, N: tl.constexpr):
        i = tl.arange(0, N)
        idx = i.to(tl.int64) + offset  # 64-bit, as the merge kernels index elements
        r0, r1, r2, r3 = tl.randint4x(seed, idx // 4)
        w = idx % 4
        tl.store(words + i, tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3))))
        tl.store(floats + i, _uniform(seed, idx))

    for seed, offset in [(0, 0), (12345, 1001), (2**40 + 7, 3), (2**63 - 25, 2**31 - 22), (99, 2**34 + 5)]:
        words = torch.empty(64, dtype=torch.int32)
        floats = torch.empty(64, dtype=torch.float32)
        draw[(1,)](words, floats, seed, offset, N=64)
        assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, rng.randint(seed, 64, offset)), (seed, offset)
        assert torch.equal(floats, rng.uniform(seed, 64, offset)), (seed, offset)
    print("ok")
    """
)


@pytest.mark.slow
def test_bit_exact_with_triton_interpreter():
    pytest.importorskip("triton", reason="triton is not installed: cannot compare with tl.randint4x")
    # A subprocess: TRITON_INTERPRET must be set before triton is first imported.
    result = subprocess.run([sys.executable, "-c", TRITON_KERNEL], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    count=st.integers(1, 600),
    offset=st.one_of(st.integers(0, 2**20), st.integers(2**34 - 600, 2**34 + 600), st.integers(0, 2**62)),
)
def test_c_philox_equals_the_tensor_ops(seed, count, offset):
    """CPU draws come from randomgen's C Philox, other devices' from the tensor ops: the same
    words at any key and offset (a block's words split by the offset, the counter's carry into
    its second word), folded the same way in int32 as in int64."""
    c_words = torch.from_numpy(rng._c_words(seed, offset, count).astype("int64"))
    tensor_words = rng._tensor_words(seed, offset, count, "cpu")
    assert torch.equal(c_words, tensor_words)
    folded = rng._folded_block(seed, offset, count, "cpu")
    assert folded.dtype == torch.int32
    assert torch.equal(folded.to(torch.int64), rng._fold(tensor_words))


@pytest.mark.parametrize("below", [0, 1, 12345, 2**30, 2**31 - 2, 2**31 - 1])
def test_fold_below_without_folding(below):
    """CPU masks compare (w + b) mod 2**32 < 2b instead of fold(w) < b: the same at the edges
    of both halves of the word range."""
    import numpy

    edges = [0, 1, below - 1, below, below + 1, 2**31 - 1, 2**31, 2**32 - below - 1, 2**32 - below, 2**32 - below + 1, 2**32 - 1]
    words = numpy.array([w % 2**32 for w in edges], dtype=numpy.uint32)
    folded = rng._fold(torch.from_numpy(words.astype(numpy.int64)))
    out = numpy.empty(len(words), dtype=bool)
    rng._fold_below(words.copy(), below, out=out)
    assert out.tolist() == (folded < below).tolist()
