"""The task-arithmetic family: task vectors, optionally sparsified, optionally sign-elected.

Every member computes, from the base θ₀ and models θ₁..θₙ with weights wᵢ::

    τᵢ = θᵢ − θ₀                                  task vectors
    τ̂ᵢ = sparsify(τᵢ; densityᵢ, …)                trim / drop (distmerge.methods.sparsify)
    τ  = Σᵢ wᵢτ̂ᵢ                  (linear)   or    Σᵢ [sgn wᵢτ̂ᵢ = γ] wᵢτ̂ᵢ   (TIES consensus)
    τ ← τ / D                     if normalize; D = Σᵢ wᵢ, or Σᵢ [sgn wᵢτ̂ᵢ = γ] wᵢ
    θ  = θ₀ + λ τ

as mergekit 0.1.5's GeneralizedTaskArithmeticMerge does, with its quirks: the sign is
elected on the *weighted* deltas; the linear divisor is replaced by 1 when |D| < 1e-8,
the consensus divisor only where D = 0 exactly; "rescale" matches the L1 norm of each
sparsified delta to the original's (not DARE's 1/density); and every member accepts
the same parameters (int8_mask, normalize, rescale, lambda, weight, density, plus gamma
or epsilon), even where one has no effect: task_arithmetic ignores density and rescale,
and int8_mask never changes a result (it only picks the dtype of a 0/1 mask).

The eight registered methods are the rows of ``FAMILY``: a sparsifier (none, TIES's trim,
DARE's drop, Breadcrumbs' band, DELLA's MagPrune) and whether signs are elected, with the
defaults mergekit gives each. Each sparsifier's equation and paper are in ``sparsify``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from distmerge import kernels, reductions, rng, threads
from distmerge.kernels.reference import RESCALE_EPS, kept
from distmerge.methods import Method, Param, chunk_ranges, in_unit_interval, non_negative, sparsify
from distmerge.methods.sparsify import Bits


def task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """τᵢ = θᵢ − θ_base."""
    return [x - base for x in tensors]


def combine(base, deltas, weight, *, consensus: bool, normalize: bool, lambda_: float, options=None) -> torch.Tensor:
    """θ₀ + λ · (Σᵢ wᵢτᵢ, or its TIES disjoint version) / D — the family's last step.

    Linear: D = Σᵢ wᵢ. Consensus: γ = sgn Σᵢ wᵢτᵢ, Σᵢ [sgn wᵢτᵢ = γ] wᵢτᵢ / Σᵢ [sgn wᵢτᵢ = γ] wᵢ
    (``kernels.reference.disjoint_sum``). One fused kernel on CUDA (``distmerge.kernels``).
    """
    return kernels.task_combine(
        base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_, options=options
    )


def merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    density: list[float] | None = None,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    seeds: list[int] | None = None,
    int8_mask: bool = False,
    options: kernels.KernelOptions | None = None,
    sparsifier: Sparsifier | None = None,
    consensus: bool = False,
) -> torch.Tensor:
    """θ = θ₀ + λ Σᵢ wᵢτ̂ᵢ / D (linear), or with ``consensus`` (TIES, Yadav et al. 2023,
    https://arxiv.org/abs/2306.01708)::

        θ = θ₀ + λ Σᵢ [sgn wᵢτ̂ᵢ = γ] wᵢτ̂ᵢ / Σᵢ [sgn wᵢτ̂ᵢ = γ] wᵢ,   γ = sgn Σᵢ wᵢτ̂ᵢ

    where τ̂ᵢ keeps of τᵢ = θᵢ − θ₀ what ``sparsifier`` decides (all of it without one, or
    where densityᵢ ≥ 1), L1-rescaled when ``rescale``; D = Σᵢ wᵢ when ``normalize``, else 1.
    The member of the family fixes ``sparsifier`` and ``consensus`` (``FAMILY``). On CUDA,
    task vectors, what is kept of them and their combination are one kernel pass over the
    models (``kernels.task_merge``).
    """
    if not tensors:
        return base
    keep = None
    if sparsifier is not None:
        per_input = {"density": density, "gamma": gamma, "epsilon": epsilon, "seed": seeds}
        rules = tuple(
            None if density[i] >= 1 else sparsifier.rule(x, base, **{k: v[i] for k, v in per_input.items() if v})
            for i, x in enumerate(tensors)
        )
        keep = kernels.Keep(rules, rescale)
    return kernels.task_merge(
        base, tensors, weight, keep, consensus=consensus, normalize=normalize, lambda_=lambda_, options=options
    )


# ---------------------------------------------------------------- what each sparsifier keeps


def _trim(x, base, *, density, **_):
    return sparsify.top_k(x - base, density)


def _band(x, base, *, density, gamma, **_):
    return sparsify.outliers(x - base, density, gamma)


def _drop(x, base, *, density, seed, **_):
    return sparsify.drop(density, seed)


def _magprune(x, base, *, density, epsilon, seed, **_):
    return sparsify.magprune(x - base, density, epsilon, seed)


# ---------------------------------------------------------------- two passes over chunks (CPU)


def _chunked(read, numel: int, chunk: int, weight, selections, *, consensus, normalize, lambda_, options):
    """``merge`` with top-k sparsifiers, for a tensor read in flat chunks: the same bits.

    ``selections[i]`` is None (τᵢ kept whole) or (keep, drop): τ̂ᵢ keeps the entries of
    ``keep``'s top-k |τᵢ| that are not in ``drop``'s (None: none dropped). Two statistics
    passes gather every selection's statistics over all chunks (``sparsify.ChunkedTopK``); a
    last pass trims each chunk's task vectors with its cuts and combines them, all
    element-wise. Over bf16 inputs each pass is one loop over the stored values
    (``kernels.loops``, when ``kernels.use_loops``), unless some |τᵢ| is NaN or Inf: then
    the tensor's passes are torch ops, whose NaN bits the statistics must match.
    """
    ranges = chunk_ranges(numel, chunk)
    live = [[top for top in pair or () if top is not None and top.needs_passes] for pair in selections]
    fused = kernels.use_loops(options)  # until a chunk read shows inputs the loops don't take
    first = [[top for top in tops if not top.has_high] for tops in live]  # pass 1 not shared already
    if any(first):
        fused = _statistics_pass(read, ranges, first, False, fused)
    if fused and any(top.nonfinite() for tops in live for top in tops):
        fused = False
        if any(first):
            for top in (top for tops in first for top in tops):
                top.restart()
            _statistics_pass(read, ranges, first, False, False)
    if any(live):
        fused = _statistics_pass(read, ranges, live, True, fused)
    for tops in live:
        for top in tops:
            top.finish()
    for start, end in ranges:
        base, tensors = read(start, end, stored=True)
        loops = fused and kernels.loops_for(base, tensors)
        fused = bool(loops)
        if loops:  # every |τᵢ| finite: each selection's rule is known
            keep, drop = zip(*_rules(selections, base, tensors, loops))
            out = torch.empty(end - start, dtype=torch.float32)
            flags = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
            if not loops.trim_combine(base, tensors, weight, keep, drop, **flags, out=out):
                raise AssertionError("a NaN task vector after statistics passes that found every |τ| finite")
            yield start, end, out
            continue
        deltas = task_vectors(base.float(), [x.float() for x in tensors])
        trimmed = [delta if pair is None else pair[0].trim(delta, pair[1]) for pair, delta in zip(selections, deltas)]
        yield start, end, combine(
            base, trimmed, weight, consensus=consensus, normalize=normalize, lambda_=lambda_, options=options
        )


def _statistics_pass(read, ranges, passing, low: bool, fused: bool) -> bool:
    """One statistics pass (pass 1, or with ``low`` pass 2) of ``passing[i]``'s selections of
    |τᵢ| over every chunk: from the stored chunks in ``kernels.loops`` when ``fused`` and the
    chunks are bf16, else from float32 task vectors. Returns whether the loops ran."""
    counts = None  # pass 1 in the loops: every chunk's histograms, given to the selections at the end
    for start, end in ranges:
        base, tensors = read(start, end, stored=True)
        fused = fused and kernels.loops_for(base, tensors) is not None
        if fused:
            counts = sparsify.ChunkedTopK.gather_stored(passing, base, tensors, low=low, counts=counts)
            continue
        for tops, x in zip(passing, tensors):
            if tops:
                sparsify.ChunkedTopK.gather(tops, x.float() - base.float(), low=low)
    if counts is not None:
        sparsify.ChunkedTopK.add_counts(passing, counts)
    return fused


def _rules(selections, base, tensors, loops) -> list[tuple]:
    """Per model, the next chunk's (keep, drop) rules (``ChunkedTopK.rule``; a model kept
    whole keeps all and drops nothing), ties counted over the stored chunks."""
    rules = []
    for pair, x in zip(selections, tensors):
        if pair is None:
            rules.append((kernels.keep.SELECT_ALL, sparsify.NO_DROP))
            continue

        def count_ties(bits: int, x=x) -> int:
            return loops.count_magnitude(base, x, bits)

        keep, drop = pair
        rules.append((keep.rule(x.numel(), count_ties), sparsify.NO_DROP if drop is None else drop.rule(x.numel(), count_ties)))
    return rules


def _top_k(stats: dict | None, i: int, numel: int, k: int) -> sparsify.ChunkedTopK:
    """The top-k selection of |τᵢ|: shared with the unit's other merges through ``stats``."""
    if stats is None:
        return sparsify.ChunkedTopK(numel, k)
    return stats.setdefault(("top_k", i), sparsify.SharedTopK()).top_k(numel, k)


def _trim_chunked(read, shape, chunk, *, weight, density, normalize, rescale, lambda_=1.0, options=None, consensus, stats=None, **_):
    """TIES's trim in two passes over chunks (None with ``rescale``: its L1 norms need whole tensors)."""
    if not density or (rescale and min(density) < 1):
        return None
    numel = math.prod(shape)
    selections = [None if d >= 1 else (_top_k(stats, i, numel, sparsify.top_count(numel, d)), None) for i, d in enumerate(density)]
    return _chunked(
        read, numel, chunk, weight, selections, consensus=consensus, normalize=normalize, lambda_=lambda_, options=options
    )


def _band_chunked(read, shape, chunk, *, weight, density, gamma, normalize, rescale, lambda_=1.0, options=None, consensus, stats=None, **_):
    """Breadcrumbs' band in two passes over chunks (None with ``rescale``): the top skip + k minus the top skip."""
    if not density or (rescale and min(density) < 1):
        return None
    numel = math.prod(shape)

    def band(i: int, density: float, gamma: float):
        if density >= 1:
            return None
        skip, k = sparsify.band_ranks(numel, density, gamma)
        return _top_k(stats, i, numel, skip + k), _top_k(stats, i, numel, skip)

    selections = [band(i, d, g) for i, (d, g) in enumerate(zip(density, gamma))]
    return _chunked(
        read, numel, chunk, weight, selections, consensus=consensus, normalize=normalize, lambda_=lambda_, options=options
    )


DRAW_ELEMENTS = 1 << 24
"""Elements of a DARE mask drawn at once (a byte each, before they are packed into ``Bits``)."""


@dataclass(frozen=True, slots=True)
class MagPrune:
    """DELLA's keep mask of chunks of whole rows of ``columns`` entries (``sparsify.magprune``
    row by row): from a chunk's task vector in torch ops (``mask``), or from its stored bf16
    chunks in one loop (``loop``, ``kernels.loops.magprune``). The same draws either way."""

    density: float
    epsilon: float
    seed: int
    columns: int

    def mask(self, start: int, delta: torch.Tensor) -> torch.Tensor:
        if self.density <= 0:
            return torch.zeros(delta.numel(), dtype=torch.bool)
        probs = sparsify.della_probabilities(delta.view(-1, self.columns), self.density, self.epsilon)
        return rng.bernoulli_keep(self.seed, probs.shape, probs, offset=start).view(-1)

    def loop(self, loops, start: int, base: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, *sums) -> bool:
        """``mask`` into ``keep`` (and |τ|, |τ ⊙ m| into ``sums``) by ``loops.magprune``; False
        where that does not apply (a NaN |τ|, one column, density ≤ 0): then use ``mask``."""
        if self.density <= 0 or self.columns == 1:
            return False
        return loops.magprune(base, x, self.columns, self.density, self.epsilon, self.seed, start, keep, *sums)


def _dropped_chunked(read, ranges, numel, draws, weight, *, rescale, consensus, normalize, lambda_, options):
    """``merge`` with random-drop sparsifiers (DARE, DELLA), for a tensor read in chunks: the same bits.

    ``draws[i]`` is None (τᵢ kept whole), τᵢ's whole keep mask (drawn already: DARE's
    depends on nothing but the element indices), or a ``MagPrune`` (DELLA's depends on τᵢ's
    ranks; a draw depends only on element indices, so a mask does not depend on chunking).
    Per model, reading only the base and that model, pass 1 draws the masks chunk by chunk and,
    with ``rescale``, adds up |τᵢ ⊙ mᵢ| and |τᵢ| as it goes (``reductions.total``):
    ``kernels.reference.masked``'s whole-tensor L1 norms, the same bits. The last pass drops,
    rescales and combines chunk by chunk. Over bf16 inputs each pass is one loop over the
    stored values (``kernels.loops``, when ``kernels.use_loops``), except for chunks where
    some τᵢ is NaN. Memory: one keep mask per model, a bit an element (``Bits``).
    """
    fused = kernels.use_loops(options)
    longest = max((end - start for start, end in ranges), default=0)
    drops = []  # per model: None (τᵢ kept whole) or (keep mask, rescale factor or None)
    for i, draw in enumerate(draws):
        if draw is None:
            drops.append(None)
            continue
        keep = draw if isinstance(draw, Bits) else Bits(numel)
        sums = (torch.empty(longest), torch.empty(longest)) if rescale and fused else ()
        if rescale:
            after, before = reductions.total(numel), reductions.total(numel)
        if rescale or keep is not draw:
            with threads.every():  # element-wise (and draws that depend only on indices)
                for start, end in ranges:
                    base, (x,) = read(start, end, models=(i,), stored=True)
                    mine = tuple(t[: end - start] for t in sums)
                    loops = fused and kernels.loops_for(base, [x])
                    if loops and _looped_pass(loops, draw, keep, start, base, x, mine):
                        if rescale:
                            before.add(mine[0])
                            after.add(mine[1])
                        continue
                    delta = x.float() - base.float()
                    if keep is not draw:
                        keep[start:end] = draw.mask(start, delta)
                    if rescale:
                        after.add(kept(keep[start:end], delta).abs_())  # |τᵢ| where kept, +0 elsewhere
                        before.add(delta.abs_())
        factor = None
        if rescale:
            before, after = before.result(), after.result()
            if before >= RESCALE_EPS and after >= RESCALE_EPS:
                factor = before / after
        drops.append((keep, factor))
    flags = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    for start, end in ranges:
        with threads.every():  # element-wise; the yield stays outside, where the caller rounds the chunk on one thread
            merged = _dropped_chunk(read, start, end, drops, weight, fused, flags, options)
        yield start, end, merged


def _dropped_chunk(read, start: int, end: int, drops, weight, fused: bool, flags: dict, options) -> torch.Tensor:
    """The last pass of ``_dropped_chunked`` for one chunk: τ̂ᵢ = (τᵢ ⊙ mᵢ)·fᵢ, combined."""
    base, tensors = read(start, end, stored=True)
    loops = fused and kernels.loops_for(base, tensors)
    if loops:
        keeps = [None if drop is None else drop[0][start:end] for drop in drops]
        factors = [None if drop is None else drop[1] for drop in drops]
        out = torch.empty(end - start)
        if loops.masked_combine(base, tensors, keeps, factors, weight, **flags, out=out):
            return out
    base = base.float()
    deltas = []
    for drop, delta in zip(drops, task_vectors(base, [x.float() for x in tensors])):
        if drop is not None:
            keep, factor = drop
            delta = kept(keep[start:end], delta)
            if factor is not None:
                delta = delta * factor
        deltas.append(delta)
    return combine(base, deltas, weight, **flags, options=options)


def _looped_pass(loops, draw: Bits | MagPrune, keep: Bits, start: int, base, x, sums: tuple) -> bool:
    """Pass 1 of ``_dropped_chunked`` for the chunk of τ = x − base at ``start``, by ``kernels.loops``:
    DELLA's keep mask into ``keep`` (DARE's is drawn already), and given ``sums``, |τ| and |τ ⊙ m|
    into them. False where the loops do not apply (a NaN τ): then the chunk takes torch ops."""
    n = x.numel()
    if isinstance(draw, Bits):
        return loops.masked_magnitudes(base, x, keep[start : start + n], *sums)
    mask = torch.empty(n, dtype=torch.bool)
    if not draw.loop(loops, start, base, x, mask, *sums):
        return False
    keep[start : start + n] = mask
    return True


def _drop_chunked(read, shape, chunk, *, weight, density, seeds, normalize, rescale, lambda_=1.0, options=None, consensus, **_):
    """DARE's drop for a tensor read in flat chunks (``_dropped_chunked``): element i of τᵢ
    keeps when ``rng.uniform(seedᵢ)[i] < densityᵢ``. Each mask is drawn whole first,
    DRAW_ELEMENTS at a time: by ``kernels.loops.bernoulli_keep`` (``kernels.use_loops``), or
    on every thread the process was given (``rng.bernoulli_keep``), while torch's own
    threads are idle."""
    numel = math.prod(shape)
    fused = kernels.use_loops(options)

    def drawn(seed: int, d: float) -> Bits:
        keep = Bits(numel)
        for start, end in chunk_ranges(numel, DRAW_ELEMENTS):
            if fused:
                mask = torch.empty(end - start, dtype=torch.bool)
                kernels.loops_module().bernoulli_keep(seed, start, d, mask)
            else:
                mask = rng.bernoulli_keep(seed, (end - start,), d, offset=start)
            keep[start:end] = mask
        return keep

    draws = [None if d >= 1 else drawn(seed, d) for d, seed in zip(density, seeds)]
    return _dropped_chunked(
        read, chunk_ranges(numel, chunk), numel, draws, weight,
        rescale=rescale, consensus=consensus, normalize=normalize, lambda_=lambda_, options=options,
    )  # fmt: skip


def _magprune_chunked(
    read, shape, chunk, *, weight, density, epsilon, seeds, normalize, rescale, lambda_=1.0, options=None, consensus, **_
):
    """DELLA's MagPrune for a 2-D tensor read in whole rows (``_dropped_chunked``): its keep
    probabilities rank |τ| within each row, so each chunk is a block of rows. None for other
    ranks: a 1-D tensor is one row (small), and higher ranks rank along axis 1."""
    if len(shape) != 2:
        return None
    rows, columns = shape
    block = max(1, chunk // columns) * columns

    def drop(i: int) -> MagPrune | None:
        d, eps = density[i], epsilon[i]
        if d >= 1:
            return None
        if d > 0:
            sparsify.check_della(d, eps)
        return MagPrune(d, eps, seeds[i], columns)

    draws = [drop(i) for i in range(len(density))]
    return _dropped_chunked(
        read, chunk_ranges(rows * columns, block), rows * columns, draws, weight,
        rescale=rescale, consensus=consensus, normalize=normalize, lambda_=lambda_, options=options,
    )  # fmt: skip


# ---------------------------------------------------------------- the family, as a table


@dataclass(frozen=True, slots=True)
class Sparsifier:
    """How members of the family sparsify their task vectors."""

    rule: Callable[..., kernels.Rule]
    """(θᵢ, θ₀, density=, gamma=, epsilon=, seed=) -> what survives of τᵢ (``distmerge.kernels.keep``)."""
    chunked: Callable
    """The merge for a tensor read in chunks (``Method.chunked``), also given ``consensus``."""
    params: tuple[Param, ...] = ()
    """Parameters besides the family's own."""
    randomized: bool = False


_GAMMA = Param("gamma", float, 0.01, scope="input", check=non_negative, doc="fraction of largest-magnitude entries dropped")
_EPSILON = Param(
    "epsilon", float, 0.15, scope="input", check=non_negative, doc="keep probabilities span density ± epsilon by rank"
)

TRIM = Sparsifier(_trim, _trim_chunked)
"""TIES: the top-k magnitudes (``sparsify.top_k``)."""
BAND = Sparsifier(_band, _band_chunked, (_GAMMA,))
"""Model Breadcrumbs: a band of magnitudes below the largest (``sparsify.outliers``)."""
DROP = Sparsifier(_drop, _drop_chunked, randomized=True)
"""DARE: Bernoulli(density) draws (``sparsify.drop``)."""
MAGPRUNE = Sparsifier(_magprune, _magprune_chunked, (_EPSILON,), randomized=True)
"""DELLA: draws with magnitude-ranked probabilities (``sparsify.magprune``)."""


@dataclass(frozen=True, slots=True)
class Member:
    """A registered method of the family: its sparsifier, sign election and mergekit's defaults."""

    name: str
    sparsifier: Sparsifier | None
    consensus: bool
    normalize: bool
    rescale: bool
    summary: str
    paper: str


FAMILY = (
    Member("task_arithmetic", None, False, False, False,
           "Base plus the weighted sum of task vectors; negative weights negate.", "https://arxiv.org/abs/2212.04089"),
    Member("ties", TRIM, True, True, False,
           "Trim task vectors by magnitude, elect signs, average the agreeing entries.", "https://arxiv.org/abs/2306.01708"),
    Member("dare_ties", DROP, True, False, True,
           "Randomly drop task-vector entries and rescale, then TIES sign consensus.", "https://arxiv.org/abs/2311.03099"),
    Member("dare_linear", DROP, False, False, True,
           "Randomly drop task-vector entries and rescale, then add them up.", "https://arxiv.org/abs/2311.03099"),
    Member("breadcrumbs", BAND, False, False, False,
           "Drop the smallest and the largest task-vector entries, then add them up.", "https://arxiv.org/abs/2312.06795"),
    Member("breadcrumbs_ties", BAND, True, False, False,
           "Breadcrumbs sparsification with TIES sign consensus.", "https://arxiv.org/abs/2312.06795"),
    Member("della", MAGPRUNE, True, True, True,
           "Drop task-vector entries with magnitude-ranked probabilities, then TIES consensus.", "https://arxiv.org/abs/2406.11617"),
    Member("della_linear", MAGPRUNE, False, False, True,
           "Drop task-vector entries with magnitude-ranked probabilities, then add them up.", "https://arxiv.org/abs/2406.11617"),
)  # fmt: skip
"""(name, sparsifier, consensus, normalize and rescale defaults, summary, paper). task_arithmetic
(Ilharco et al. 2023, "Editing models with task arithmetic") ignores density and rescale."""


def _params(m: Member) -> tuple[Param, ...]:
    """The parameter set every mergekit task-arithmetic method takes, with the member's defaults."""
    return (
        Param("weight", float, scope="input", doc="weight of each task vector (negative to subtract it)"),
        Param("density", float, 1.0, scope="input", check=in_unit_interval if m.sparsifier else None,
              doc="fraction of each task vector kept"),
        Param("normalize", bool, m.normalize, doc="divide the merged task vector by the (agreeing) weights' sum"),
        Param("rescale", bool, m.rescale, doc="scale kept entries so each task vector keeps its L1 norm"),
        Param("int8_mask", bool, False, doc="accepted for mergekit compatibility; no effect on the result"),
        Param("lambda", float, 1.0, doc="scale of the merged task vector"),
    ) + (m.sparsifier.params if m.sparsifier else ())  # fmt: skip


def merge_into(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    out: torch.Tensor,
    weight: list[float],
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    density: list[float] | None = None,
    int8_mask: bool = False,
    options: kernels.KernelOptions | None = None,
    consensus: bool = False,
) -> bool:
    """``merge`` of a member without a sparsifier (every τᵢ whole: ``density`` and ``rescale``
    change nothing), rounded straight into ``out`` where one loop can (``kernels.task_merge_into``)."""
    return bool(tensors) and kernels.task_merge_into(
        base, tensors, weight, consensus=consensus, normalize=normalize, lambda_=lambda_, out=out, options=options
    )


def _method(m: Member) -> Method:
    s = m.sparsifier
    defaults = dict(consensus=m.consensus, normalize=m.normalize, rescale=m.rescale)
    return Method(
        name=m.name,
        merge=functools.partial(merge, sparsifier=s, **defaults),
        chunked=functools.partial(s.chunked, **defaults) if s else None,
        into=None if s else functools.partial(merge_into, **defaults),
        params=_params(m),
        base="required",
        min_inputs=0,
        randomized=bool(s and s.randomized),
        elementwise=s is None,
        shares_statistics=s is not None,
        kernel_options=True,
        summary=m.summary,
        paper=m.paper,
    )


METHODS = tuple(_method(m) for m in FAMILY)
