"""Model Stock: move the average of the fine-tuned models back toward the base by an
amount set by the angle between their task vectors."""

from __future__ import annotations

import copy
import math
from itertools import combinations
from typing import Callable

import torch

from distmerge import kernels, reductions, threads
from distmerge.methods import Method, Param, chunk_ranges, input_count


def _cosines(norms: list[torch.Tensor], dot: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """cos(τᵢ, τⱼ) = τᵢ·τⱼ / max(‖τᵢ‖‖τⱼ‖, 1e-6), clamped to [−1, 1], for the pairs i < j in
    order, stacked on a new first axis; from the norms ‖τᵢ‖ and ``dot(i, j)`` = τᵢ·τⱼ."""
    pairs = combinations(range(len(norms)), 2)
    cosines = [(dot(i, j) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for i, j in pairs]
    return torch.stack(cosines)


def _pairwise_cosines(deltas: list[torch.Tensor]) -> torch.Tensor:
    """``_cosines`` of the task vectors ``deltas``, along their last axis."""
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    return _cosines(norms, lambda i, j: (deltas[i] * deltas[j]).sum(dim=-1))


def _ratio(cosines: torch.Tensor, n: int) -> torch.Tensor:
    """t = N cos θ / (1 + (N − 1) cos θ), cos θ the mean of the stacked pairwise ``cosines``,
    with a trailing axis of 1 (one t per vector); 0 where the denominator is below 1e-6."""
    cos = cosines.mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


def model_stock(
    base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool = False, options=None
) -> torch.Tensor:
    """θ = t θ̄ + (1 − t) θ₀ with θ̄ = Σ θᵢ / N and t = N cos θ / (1 + (N − 1) cos θ).

    Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"
    (https://arxiv.org/abs/2403.19522), cos θ the mean pairwise cosine between the task
    vectors θᵢ − θ₀ of the whole tensor, or of each row with ``filter_wise``. Where the
    denominator is below 1e-6 in magnitude t = 0 (the base), as mergekit does.
    """
    w0 = _vectors(base, filter_wise)
    models = [_vectors(x, filter_wise) for x in tensors]
    t = _ratio(_pairwise_cosines([x - w0 for x in models]), len(models))
    return kernels.stock_interpolate(w0, models, t, options=options).reshape(base.shape)  # t θ̄ + (1 − t) θ₀


def _vectors(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The vectors whose angles are measured, along the last axis: the whole tensor, or
    its rows (a 1-D tensor is one row)."""
    if not filter_wise:
        return x.reshape(-1)
    return x.unsqueeze(0) if x.dim() == 1 else x


def model_stock_chunked(read, shape: tuple[int, ...], chunk: int, *, filter_wise: bool = False, options=None, buffer=torch.empty):
    """``model_stock`` for a tensor read in flat chunks: the same bits in bounded memory.

    One vector (the whole tensor, or a tensor that is one row): each norm ‖τᵢ‖ and each dot
    product τᵢ·τⱼ is a whole-tensor reduction, each added up chunk by chunk with torch's bits
    (``reductions.Norm``, ``reductions.total``), all in one pass (``_vector_chunked``). Rows (``filter_wise``): one
    pass over batches of whole rows gathers every row's pairwise cosines. A last pass
    interpolates chunk by chunk. ``buffer(n)`` gives the float32 buffer (``Method.buffer``).
    """
    numel = math.prod(shape)
    if numel == 0:
        return None
    vector_shape = _vectors(torch.empty(shape, device="meta"), filter_wise).shape  # as model_stock sees them
    n = input_count(read)
    if math.prod(vector_shape[:-1]) > 1:
        return _rows_chunked(read, n, vector_shape, chunk, options)
    return _vector_chunked(read, n, vector_shape, chunk, options, buffer)


def _vector_chunked(read, n: int, vector_shape: torch.Size, chunk: int, options, new_buffer):
    """``model_stock_chunked`` of one vector (a whole tensor, or one row).

    The statistics: each ‖τⱼ‖ is added up chunk by chunk (``reductions.Norm``, the bits of
    torch's ``vector_norm``) and each τᵢ·τⱼ too (``reductions.total``, the bits of torch's
    whole-tensor sum), all of them in one pass that reads the base and every model. Where
    ``Norm`` does not reproduce this torch (``reductions.norm_lanes`` is None), τⱼ goes whole
    into the buffer for torch's norm instead (``new_buffer``: 4 bytes an element, 262 MB for
    the benchmark's embedding), one pass per model: pass j reads the base, θⱼ and the θᵢ
    (i < j) for the dot products. Then one pass interpolates. For N = 2 that is 3 + 3 inputs
    read per element (2 + 3 + 3 with the buffer). Over bf16 inputs each pass's arithmetic is
    one loop over the stored values (``kernels.loops.stock_pass``, ``stock_interpolate``,
    when ``kernels.use_loops``), except in a chunk that holds a NaN; else the chunks are
    widened into ``staging``.
    """
    numel = math.prod(vector_shape)
    ranges = chunk_ranges(numel, chunk)
    width = reductions.norm_lanes() if reductions.lanes() else None  # (both streamed, or the buffered passes)
    buffer = None if width else new_buffer(numel)  # τⱼ whole, for torch's norm (Method.buffer)
    scratch = torch.empty(2, min(numel, chunk)) if width else None  # a chunk of τⱼ, of τᵢ ⊙ τⱼ
    staging = torch.empty(n + 1, min(numel, chunk))  # the chunks read, widened in place
    norms = torch.empty(n, *vector_shape[:-1])  # the reductions, allocated up front: see below
    dots = torch.empty(math.comb(n, 2), *vector_shape[:-1])
    pair = {p: k for k, p in enumerate(combinations(range(n), 2))}
    fused = kernels.use_loops(options)

    def read_widened(start: int, end: int, models=None) -> tuple[torch.Tensor, list[torch.Tensor], object]:
        """The chunks as stored, then (if ``kernels.loops`` take them: bf16) those loops, else
        None and the chunks widened into ``staging``."""
        base, xs = read(start, end, models=models, stored=True)
        loops = fused and kernels.loops_for(base, xs)
        if loops:
            return base, xs, loops
        widened = [row[: end - start].copy_(x) for row, x in zip(staging, (base, *xs))]
        return widened[0], widened[1:], None

    def measure(start: int, end: int, norm_of: list, dot_of: dict) -> None:
        """One chunk of every model: τⱼ into norm_of[j], τᵢ ⊙ τⱼ (i < j) into dot_of[i, j]."""
        base, xs, loops = read_widened(start, end)
        tau, product = scratch[:, : end - start]
        if loops:
            before = copy.deepcopy((norm_of, dot_of))  # (a few small arrays)
            for j, norm in enumerate(norm_of):
                products = staging[:j, : end - start]
                if not loops.stock_pass(base, xs[j], xs[:j], tau, products):
                    break  # a NaN τ: the chunk again with torch ops, from the state before it
                for i in range(j):
                    dot_of[i, j].add(products[i])
                norm.add(tau)
            else:
                return
            norm_of[:], saved_dots = before
            dot_of.update(saved_dots)
            base, xs = base.float(), [x.float() for x in xs]  # torch's NaN bits (bf16 widened: copies)
        for j, norm in enumerate(norm_of):
            torch.sub(xs[j], base, out=tau)
            for i in range(j):
                dot_of[i, j].add(torch.sub(xs[i], base, out=product).mul_(tau))
            norm.add(tau)

    def fill(start: int, end: int, j: int, sums: list) -> None:
        """τⱼ into the buffer, and τᵢ ⊙ τⱼ (i < j) into ``sums`` (no view of the buffer outlives it)."""
        base, xs, loops = read_widened(start, end, models=(j, *range(j)))
        tau = buffer[start:end]
        if loops:
            products = staging[:j, : end - start]
            if loops.stock_pass(base, xs[0], xs[1:], tau, products):
                for product, total in zip(products, sums):
                    total.add(product)
                return
            base, xs = base.float(), [x.float() for x in xs]  # a NaN τ: torch's NaN bits (bf16 widened: copies)
        torch.sub(xs[0], base, out=tau)
        for x, total in zip(xs[1:], sums):  # x is a copy (staging, or widened): overwritten
            total.add(x.sub_(base).mul_(tau))

    # Each reduction writes into norms and dots: a small result kept across the passes would
    # pin the chunks' freed temporaries below it in the heap (glibc), and resident memory
    # would grow with every pass.
    if width:
        norm_of = [reductions.Norm(numel, width) for _ in range(n)]
        dot_of = {p: reductions.total(numel) for p in pair}
        with threads.every():  # element-wise (the sums and the norms are not threaded)
            for start, end in ranges:
                measure(start, end, norm_of, dot_of)
        for j, norm in enumerate(norm_of):
            norms[j] = norm.result().reshape(norms[j].shape)
        for p, total in dot_of.items():
            dots[pair[p]] = total.result()
    else:
        for j in range(n):
            sums = [reductions.total(numel) for _ in range(j)]  # τᵢ · τⱼ for i < j
            with threads.every():  # element-wise (the sums and the norm are not threaded)
                for start, end in ranges:
                    fill(start, end, j, sums)
            torch.linalg.vector_norm(buffer.view(vector_shape), dim=-1, out=norms[j])
            for i, total in enumerate(sums):
                dots[pair[i, j]] = total.result()
    t = _ratio(_cosines(list(norms), lambda i, j: dots[pair[i, j]]), n).reshape(-1)  # one ratio
    buffer = None  # released (unless the run keeps it for the next tensor) before the output is allocated
    for start, end in ranges:
        with threads.every():  # element-wise (a yield cannot sit inside the with)
            base, tensors, loops = read_widened(start, end)
            merged = torch.empty(end - start) if loops else None
            if not (loops and loops.stock_interpolate(base, tensors, t, merged)):
                if loops:  # a NaN input: torch's NaN bits
                    base, tensors = base.float(), [x.float() for x in tensors]
                merged = kernels.stock_interpolate(base, tensors, t, options=options, overwrite=True)
        yield start, end, merged


def _rows_chunked(read, n: int, vector_shape: torch.Size, chunk: int, options):
    """``model_stock_chunked`` with ``filter_wise`` of a tensor of several rows.

    Pass 1 reduces each batch of whole rows as ``model_stock`` does (every row's norms and
    dot products are its own, whatever the batch) into the stacked pairwise cosines of all
    rows, a (pairs × rows) buffer whose mean over pairs is then taken as ``model_stock``
    takes it (that reduction's order depends on the number of rows, so it is not done per
    batch). Pass 2 interpolates each batch with its rows' ratios.
    """
    columns = vector_shape[-1]
    rows = math.prod(vector_shape[:-1])
    batches = _row_batches(rows, chunk // columns)
    cosines = torch.empty(math.comb(n, 2), *vector_shape[:-1])  # as model_stock stacks them
    for first, last in batches:
        base, tensors = read(first * columns, last * columns)
        w0 = base.reshape(-1, columns)
        cosines.view(-1, rows)[:, first:last] = _pairwise_cosines([x.reshape(-1, columns) - w0 for x in tensors])
    t = _ratio(cosines, n).reshape(rows, 1)
    for first, last in batches:
        with threads.every():  # element-wise (the rows' reductions above stay on one thread)
            base, tensors = read(first * columns, last * columns)
            models = [x.reshape(-1, columns) for x in tensors]
            merged = kernels.stock_interpolate(base.reshape(-1, columns), models, t[first:last], options=options)
        yield first * columns, last * columns, merged.reshape(-1)


def _row_batches(rows: int, per_batch: int) -> list[tuple[int, int]]:
    """Ranges [first, last) of about ``per_batch`` rows that cover ``rows``, in order, none of
    them a single row: torch sums a lone row of ≥ 32768 elements in per-thread parts (its
    reduction to a single value), but a row among others in one sweep, as in the whole tensor."""
    batches = chunk_ranges(rows, max(2, per_batch))
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] == 1:
        batches[-2:] = [(batches[-2][0], rows)]
    return batches


METHODS = (
    Method(
        name="model_stock",
        merge=model_stock,
        params=(Param("filter_wise", bool, False, doc="one interpolation ratio per row instead of per tensor"),),
        base="required",
        min_inputs=2,
        summary="Average of the models, pulled toward the base by the angle between their task vectors.",
        paper="https://arxiv.org/abs/2403.19522",
        chunked=model_stock_chunked,
        buffer=True,
        kernel_options=True,
    ),
)
