"""SCE: Select (high-variance entries), Calculate (per-model weights), Erase (minority signs)."""

from __future__ import annotations

import math

import torch

from distmerge import kernels, reductions, threads
from distmerge.kernels.reference import agrees, elect_sign, kept
from distmerge.methods import Method, Param, chunk_ranges, in_unit_interval, input_count
from distmerge.methods.sparsify import Bits, ChunkedTopK, top_k_mask


def variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Var_j: the population variance of entry j across the models (mergekit:
    ``torch.var(torch.stack(τ), dim=0, unbiased=False)``; on CPU, ``welford_variance``)."""
    if deltas[0].device.type == "cpu" and deltas[0].dtype == torch.float32:
        return welford_variance(deltas)
    return torch.var(torch.stack(deltas), dim=0, unbiased=False)


def welford_variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """``torch.var(torch.stack(deltas), dim=0, unbiased=False)`` of float32 CPU tensors, bit
    for bit, as element-wise operations: torch's CPU kernel runs Welford's update in float64
    for each entry, over the models in order (δ = x − mean, mean += δ/n, M2 += δ·(x − mean)),
    then rounds M2/N to float32. Its reduction over the stack's outer axis runs that update
    in scalar code: 34 ms per 256K entries of two models, one thread, against 5 ms here
    (sce's variance pass was 142 of its 187 s on the benchmark's second data set)."""
    mean = torch.zeros(deltas[0].shape, dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    for n, d in enumerate(deltas, 1):
        x = d.to(torch.float64)
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
    return (m2 / len(deltas)).to(torch.float32)


def selected_count(nonzero: torch.Tensor, fraction: float) -> int:
    """k = ⌊fraction · #{j : Var_j > 0}⌋ from that count as an int64 tensor: count (int64) ×
    float is a float32 product in torch, as in mergekit, so the same k."""
    return int(nonzero * fraction)


def select_by_variance(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Mask of the k = ⌊fraction · #{j : Var_j > 0}⌋ entries whose variance across the
    models is largest (population variance; ties to the lower flat index)."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    if fraction >= 1:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    var = variance(deltas)
    return top_k_mask(var, selected_count(torch.count_nonzero(var), fraction))


def energy_weights(energies: list[torch.Tensor]) -> list[torch.Tensor]:
    """ηᵢ = eᵢ / Σₖ eₖ for the energies eᵢ = mean(τᵢ²) (0-d tensors); equal weights 1/n
    when that sum is below 1e-6."""
    energies = torch.stack(energies)
    total = energies.sum().item()
    if abs(total) < 1e-6:
        return list(torch.ones_like(energies) / len(energies))
    return list(energies / total)


def task_vector_weights(deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """ηᵢ = mean(τᵢ²) / Σₖ mean(τₖ²); equal weights 1/n when that sum is below 1e-6."""
    return energy_weights([d.square().mean() for d in deltas])


def erase_and_merge(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """θ₀ + Σᵢ ηᵢ mᵢ τᵢ / max(Σᵢ ηᵢ mᵢ, 1e-6), mᵢ = [sgn τᵢ = sgn Σₖ τₖ]: element-wise."""
    sign = elect_sign(deltas)
    merged = torch.zeros_like(base)
    total = torch.zeros_like(base)
    for d, eta in zip(deltas, weights):
        erased = agrees(d, sign) * eta
        merged += d * erased
        total += erased
    return base + merged / total.clamp(min=1e-6)


def sce(
    base: torch.Tensor, tensors: list[torch.Tensor], *, int8_mask: bool = False, select_topk: float = 1.0, options=None
) -> torch.Tensor:
    """θ = θ₀ + Σᵢ ηᵢ mᵢ τ̂ᵢ / max(Σᵢ ηᵢ mᵢ, 1e-6), elementwise, where

    τ̂ᵢ = τᵢ on the ``select_topk`` fraction of highest-variance entries (0 elsewhere),
    ηᵢ = ``task_vector_weights``, mᵢ = [sgn τ̂ᵢ = sgn Σₖ τ̂ₖ] (TIES sign election, unweighted).
    Wan et al. 2024, "FuseChat" (https://arxiv.org/abs/2408.07990). int8_mask is accepted
    for mergekit compatibility and has no effect. (``options``: see ``sce_chunked``.)
    """
    if not tensors:
        return base
    deltas = [x - base for x in tensors]
    if select_topk < 1:
        keep = select_by_variance(deltas, select_topk)
        deltas = [kept(keep, d) for d in deltas]
    return erase_and_merge(base, deltas, task_vector_weights(deltas))


# ---------------------------------------------------------------- passes over chunks (CPU)


def sce_chunked(
    read, shape: tuple[int, ...], chunk: int, *, int8_mask: bool = False, select_topk: float = 1.0, buffer=torch.empty, options=None
):
    """``sce`` for a tensor read in flat chunks: the same bits, without every model's task
    vector (with select_topk < 1, one float32 buffer of the tensor's size and a mask of a bit an
    element, ``Bits``).

    - select_topk < 1, one pass: Var_j chunk by chunk into the buffer (``buffer(n)``, ``Method.buffer``), counting Var_j > 0;
      then k, and the top-k mask m from the buffer (``ChunkedTopK``: two statistics sweeps
      and one mask sweep, in memory).
    - one pass: every model's eᵢ = mean((τᵢ ⊙ m)²), summed chunk by chunk with
      ``task_vector_weights``'s whole-tensor bits (``reductions.total``).
    - last pass: each chunk's τᵢ ⊙ m, sign election and weighted mean (``erase_and_merge``).

    Over bf16 inputs each pass's arithmetic is one loop over the stored values
    (``kernels.loops``, when ``kernels.use_loops(options)``), except in chunks where some τᵢ
    is NaN. None (the run then calls ``sce``) when there are no models: ``sce`` returns θ₀.
    """
    numel = math.prod(shape)
    models = input_count(read) if numel else 0
    if not models:
        return None
    return _sce_passes(read, numel, models, chunk, select_topk, buffer, kernels.use_loops(options))


def _sce_passes(read, numel: int, models: int, chunk: int, select_topk: float, buffer, fused: bool):
    ranges = chunk_ranges(numel, chunk)
    keep = _keep_by_variance(read, numel, ranges, buffer(numel), select_topk, fused) if select_topk < 1 else None

    def task_vector(base, x, start, end):
        delta = x.float() - base.float()
        return delta if keep is None else kept(keep[start:end], delta)

    # eᵢ = mean((τᵢ ⊙ m)²): torch's CPU mean is its sum divided by the count, and the sums are
    # reproduced chunk by chunk (``reductions``), all models' in one pass.
    sums = [reductions.total(numel) for _ in range(models)]
    squares = torch.empty(max((end - start for start, end in ranges), default=0))
    with threads.every():  # element-wise
        for start, end in ranges:
            base, tensors = read(start, end, stored=True)
            loops, mask = fused and kernels.loops_for(base, tensors), None if keep is None else keep[start:end]
            for x, total in zip(tensors, sums):
                if loops and loops.masked_squares(base, x, mask, squares[: end - start]):
                    total.add(squares[: end - start])
                else:
                    total.add(task_vector(base, x, start, end).square_())
    weights = energy_weights([total.result().div_(numel) for total in sums])
    for start, end in ranges:
        base, tensors = read(start, end, stored=True)
        loops = fused and kernels.loops_for(base, tensors)
        if loops:
            out = torch.empty(end - start)
            if loops.erase_merge(base, tensors, None if keep is None else keep[start:end], weights, out):
                yield start, end, out
                continue
        with threads.every():  # element-wise
            merged = erase_and_merge(base.float(), [task_vector(base, x, start, end) for x in tensors], weights)
        yield start, end, merged


def _keep_by_variance(read, numel: int, ranges, buffer: torch.Tensor, fraction: float, fused: bool) -> Bits:
    """``select_by_variance`` (flat), with ``buffer`` as scratch for Var: one pass over the
    inputs. The mask is kept a bit an element: as a bool tensor it was 65 MB of the peak of
    sce on the benchmark's second data set (a 32000 × 2048 embedding, beside its 262 MB
    buffer): its peak RSS went from 0.78 to 0.71-0.72 GB (mergekit 3.01 GB)."""
    if fraction <= 0:
        return Bits(numel)
    nonzero = torch.zeros((), dtype=torch.int64)
    for start, end in ranges:
        base, tensors = read(start, end, stored=True)
        var = buffer[start:end]
        loops = fused and kernels.loops_for(base, tensors)
        if not (loops and loops.variances(base, tensors, var)):
            var[:] = _chunk_variance([x.float() - base.float() for x in tensors], numel)
        nonzero += torch.count_nonzero(var)
    top = ChunkedTopK(numel, selected_count(nonzero, fraction))
    if not top.trivial:
        for add in (top.add_high, top.add_low):
            for start, end in ranges:
                add(buffer[start:end])
        top.finish()
    keep = Bits(numel)
    for start, end in ranges:
        keep[start:end] = top.mask(buffer[start:end])
    return keep


def _chunk_variance(deltas: list[torch.Tensor], numel: int) -> torch.Tensor:
    """``variance`` of a flat chunk, with the bits the whole tensor's variance has there.

    A stack of single elements (a chunk of 1) is reduced along its contiguous axis, in
    another order than the whole tensor's (1 ulp apart now and then), so a lone element
    of a larger tensor is computed as a pair.
    """
    if deltas[0].numel() == 1 and numel > 1:
        return variance([d.expand(2) for d in deltas])[:1]
    return variance(deltas)


METHODS = (
    Method(
        name="sce",
        merge=sce,
        params=(
            Param("int8_mask", bool, False, doc="accepted for mergekit compatibility; no effect on the result"),
            Param("select_topk", float, 1.0, check=in_unit_interval, doc="fraction of highest-variance entries kept"),
        ),
        base="required",
        min_inputs=0,
        summary="Keep high-variance entries, weight task vectors by their energy, erase minority signs.",
        paper="https://arxiv.org/abs/2408.07990",
        chunked=sce_chunked,
        buffer=True,
        kernel_options=True,
    ),
)
