"""Merge one output tensor: read its inputs, run the method, round to the output dtype.

``TensorInputs`` is one output tensor's inputs: each is fetched (already staged on the GPU,
unpickled, memory-mapped, or, from an earlier stage of a multi-stage recipe, merged by
``merge_tensor`` of that stage's plan), gets its LoRA adapter applied and, for vocabulary
tensors, its rows re-indexed to the output vocabulary; then each is rounded to the work dtype
(the recipe's ``dtype``) and widened to float32, whole or chunk by chunk. ``merge_tensor``
takes it from there; the helpers below it take tensors and return tensors.

``MergeContext.memo`` holds what one unit of work has fetched and merged: the outputs of a
sweep's variants, a stage kept with ``--keep-intermediates`` and the final output that reads
it each read an input, or merge a stage's tensor, once.

Rounding follows mergekit: inputs are rounded to the work dtype first, computed on in
float32, and the result is rounded to the work dtype, then cast to the output dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from distmerge import kernels, lines, methods
from distmerge.errors import MergeError
from distmerge.io import quantized
from distmerge.io.header import DTYPES
from distmerge.io.reader import TensorReader
from distmerge.io.staging import Uploader
from distmerge.plan import TORCH_DTYPE_NAMES, InputRef, OutputTensor, Plan
from distmerge.progress import Progress
from distmerge.sources import is_pickle
from distmerge.vocab import permute

CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk for element-wise methods: 1 MB of float32 per input stays in cache."""
DROP_ELEMENTS = 16 * CHUNK_ELEMENTS
"""How much of each input a chunked merge reads before unmapping it again (one madvise per
input per 16 chunks: frequent enough to bound memory, rare enough to cost nothing)."""


BUFFER_ELEMENTS = 1 << 24
"""The largest buffer for statistics (``Buffer``) kept from one tensor's merge to the next."""


class Buffer:
    """One float32 buffer, reused by a rank's chunked merges tensor after tensor (``Method.buffer``).

    Fresh memory costs its page faults, each page zeroed by the kernel: model_stock allocated
    a float32 copy of every tensor, 4.9 GB over the benchmark's second data set, and spent
    about 2 s more system time than with one buffer reused. One of up to ``BUFFER_ELEMENTS`` is
    kept; a larger request gets a fresh tensor, after the kept one is released, so that a
    method's peak (its buffer, then the output it allocates once the buffer is done) never
    holds both."""

    def __init__(self):
        self.kept: torch.Tensor | None = None

    def __call__(self, numel: int) -> torch.Tensor:
        if numel > BUFFER_ELEMENTS:
            self.kept = None
            return torch.empty(numel)
        if self.kept is None or self.kept.numel() < numel:
            self.kept = None
            self.kept = torch.empty(numel)
        return self.kept[:numel]


@dataclass(slots=True)
class MergeContext:
    """What merging a tensor needs besides its plan: where inputs come from, where the math
    runs, and what this unit of work has already fetched and merged."""

    reader: TensorReader
    device: str = "cpu"
    progress: Progress | None = None
    allow_nonfinite: bool = False
    """Keep NaN/Inf results (default: MergeError naming the tensor)."""
    uploader: Uploader | None = None
    """CUDA: the inputs read and copied to the GPU ahead of their merge."""
    kernel_options: kernels.KernelOptions | None = None
    memo: dict = field(default_factory=dict)
    """Inputs as fetched, and merged tensors (of outputs and stages), keyed by what they are;
    the rank loop clears it after each unit of work."""
    tensors: dict = field(default_factory=dict)
    """plan fingerprint -> {tensor name: OutputTensor}, for the stages' tensors."""
    buffer: Buffer = field(default_factory=Buffer)
    """The chunked merges' buffer for statistics."""

    def timed(self, phase: str):
        """A context that adds its time to ``phase`` of the progress (nothing without one)."""
        return self.progress.timed(phase) if self.progress is not None else contextlib.nullcontext()

    def tensor(self, plan: Plan, name: str) -> OutputTensor:
        if plan.fingerprint not in self.tensors:
            self.tensors[plan.fingerprint] = {t.name: t for t in plan.tensors}
        return self.tensors[plan.fingerprint][name]


class TensorInputs:
    """One output tensor's inputs, read for the merge.

    ``load`` fetches them (``base`` and ``inputs``, in their stored dtype, on ``device``);
    ``widened`` gives them rounded to the work dtype and in float32; ``read_range`` gives
    a flat range of them the same way, unmapping what earlier ranges read as it goes, so
    a chunked merge of a large tensor never holds more than a few chunks of its pages.
    """

    def __init__(self, plan: Plan, t: OutputTensor, ctx: MergeContext):
        self.plan, self.t, self.ctx = plan, t, ctx
        self.reader, self.device, self.uploader = ctx.reader, ctx.device, ctx.uploader
        self.work = DTYPES[work_dtype(plan, t)]
        """The compute dtype: inputs are rounded to it before the float32 math, and so is the result."""
        self.in_shape = (-1, *t.shape[1:]) if t.vocab is not None else tuple(t.shape)  # inputs' vocabularies differ
        self.base: torch.Tensor | None = None
        self.inputs: list[torch.Tensor] = []
        # read_range's position: [dropped, last) is read and still mapped; the seconds it spent
        self._flat: list[torch.Tensor | None] | None = None
        self.last = self.dropped = 0
        self.read_seconds = 0.0

    def load(self) -> None:
        """Fetch every input (the non-base ones first), and re-index vocabulary rows."""
        t = self.t
        self.inputs = [self.fetch(r) for r in t.inputs]
        self.base = self.fetch(t.base) if t.base else None
        if t.vocab is not None:  # rows re-indexed to the output vocabulary, in the compute dtype
            values = [self.base, *self.inputs][self.base is None :]
            rows = permute(t.vocab, {r.model: x.to(self.work) for r, x in zip(t.all_inputs, values)})
            self.inputs, self.base = [rows[r.model] for r in t.inputs], rows[t.base.model] if t.base else None

    def all(self) -> list[torch.Tensor]:
        """The base (if any) and the inputs, in ``t.all_inputs`` order."""
        return [self.base, *self.inputs] if self.base is not None else self.inputs

    def fetch(self, ref: InputRef) -> torch.Tensor:
        """One input tensor as stored (LoRA applied), on the device; once per unit of work."""
        model = self.plan.models[ref.model]
        if model.stage:  # an earlier stage's output tensor, rounded as its checkpoint holds it
            stage = self.plan.stages[model.ref]
            inner = dataclasses.replace(self.ctx, progress=None)  # its time counts in this tensor's
            return merge_tensor(stage, self.ctx.tensor(stage, ref.name), inner).reshape(self.in_shape)
        key = ("read", *self.key(ref), self.in_shape)
        if key not in self.ctx.memo:
            self.ctx.memo[key] = self._fetch(ref)
        return self.ctx.memo[key]

    def key(self, ref: InputRef) -> tuple:
        """What identifies an input's stored values: its bytes (and adapter), or the stage's tensor."""
        model = self.plan.models[ref.model]
        if model.stage:
            return ("stage", self.plan.stages[model.ref].fingerprint, ref.name)
        return (*stage_key(self.plan, ref), ref.dtype, json.dumps(ref.lora, sort_keys=True))

    def _fetch(self, ref: InputRef) -> torch.Tensor:
        plan, reader = self.plan, self.reader
        q = ref.quant  # a quantized tensor: its data is read as stored, then dequantized
        dtype, shape = (q["data"][1], tuple(q["data"][2])) if q else (ref.dtype, self.in_shape)
        staged = self.uploader.take(stage_key(plan, ref)) if self.uploader is not None else None
        if staged is not None:  # already on the GPU: its bytes, read and copied while the last tensor merged
            x = staged.view(DTYPES[dtype]).view(shape)
        elif is_pickle(ref.file):
            x = reader.read_pickled(input_path(plan, ref), ref.name)
        else:
            x = reader.read(input_path(plan, ref), dtype, shape, ref.begin, ref.end)
        x = x.to(self.device)
        if q is not None:
            file, scale_dtype, scale_shape, begin, end = q["scale"]
            scale = reader.read(os.path.join(plan.models[ref.model].path, file), scale_dtype, tuple(scale_shape), begin, end)
            x = quantized.dequantize(x, scale.to(self.device), q).reshape(self.in_shape)
        if ref.lora is not None:
            b, a = self._lora_part(ref, "b"), self._lora_part(ref, "a")
            x = apply_lora(x, a, b, ref.lora["scale"])
        return x

    def _lora_part(self, ref: InputRef, key: str) -> torch.Tensor:
        file, dtype, shape, begin, end = ref.lora[key]
        path = os.path.join(self.plan.models[ref.model].adapter_path, file)
        return self.reader.read(path, dtype, tuple(shape), begin, end).to(self.device, torch.float32)

    def widen(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else widen(x, self.work)

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """An input already in the compute dtype as it is: the element-wise kernels widen it to
        float32 inside their loop (the same values as ``widen``, without a pass of its own)."""
        return x if x.dtype == self.work else widen(x, self.work)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """x as stored where widening it to float32 is exact (``read_range``'s ``stored``)."""
        return x if self.work in (x.dtype, torch.float32) else widen(x, self.work)

    def widened(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Float32 (base, inputs), whole."""
        return self.widen(self.base), [widen(x, self.work) for x in self.inputs]

    def read_range(
        self,
        i: int,
        j: int,
        how: Callable | None = None,
        models: tuple[int, ...] | None = None,
        out: list[torch.Tensor] | None = None,
        stored: bool = False,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base, inputs) of the flat range [i, j), widened by ``how`` (default: to float32).
        With ``models`` (indices into the inputs), only those inputs, in that order: a pass of
        a chunked method that needs the base and one model widens no other. With ``out``
        (float32 tensors of at least j − i elements, the base's first if there is one, then
        one per input read), the chunks are widened into them and returned as views of them:
        the same values without a fresh float32 chunk per input and call (fresh memory costs
        its page faults), valid until the caller writes there again. With ``stored``, each
        chunk as stored where widening it to float32 is exact (it is in the recipe's dtype, or
        the recipe computes in float32), else widened: ``x.float()`` is ``widen``'s value.
        Called chunk by chunk in order (a chunked method may go over the tensor more than
        once): pages behind the reads are unmapped every DROP_ELEMENTS, and on a new pass."""
        if i != self.last or self.last - self.dropped >= DROP_ELEMENTS:  # a new pass, or 16 chunks behind us
            self.drop_read()
            self.dropped = i
        self.last = j
        start = time.perf_counter()
        *flat, flat_base = self._flattened()
        if models is not None:
            flat = [flat[k] for k in models]
        if out is not None:
            buffers = iter(out)

            def how(x: torch.Tensor) -> torch.Tensor:
                return widen_into(x, self.work, next(buffers)[: j - i])

        how = self.exact if stored else how or self.widen
        chunks = (how(flat_base[i:j]) if flat_base is not None else None), [how(x[i:j]) for x in flat]
        self.read_seconds += time.perf_counter() - start
        return chunks

    def _flattened(self) -> list[torch.Tensor | None]:
        """Flat views of the inputs, then of the base (None without one)."""
        if self._flat is None:
            self._flat = [x.reshape(-1) for x in self.inputs] + [self.base.reshape(-1) if self.base is not None else None]
        return self._flat

    def drop_read(self) -> None:
        """Unmap the inputs' pages read so far (before ``last``)."""
        for x in self._flattened():
            if x is not None and self.last > self.dropped:
                self.reader.drop(x[self.dropped : self.last])
        self.dropped = self.last


@dataclass(frozen=True, slots=True)
class Pieces:
    """A merged tensor not held whole: its output-dtype bytes as ``pieces`` yields them, in
    order, each checked for NaN and Inf (``merge_tensor`` with ``stream``). Iterated once."""

    pieces: Iterator[torch.Tensor]


def merge_tensor(plan: Plan, t: OutputTensor, ctx: MergeContext, stream: bool = False) -> torch.Tensor | Pieces:
    """The merged value of one output tensor, in its output dtype. Raises MergeError
    naming the tensor if the result has NaN or Inf, unless ``ctx.allow_nonfinite``.
    Merged once per unit of work (``ctx.memo``), however many outputs or stages read it.
    With ``stream`` (the caller is the only reader: it writes the tensor and nothing else
    asks for it), a large tensor merged by a method's chunked form or element-wise on CPU
    comes as ``Pieces``, its output never allocated whole (a 70B model's lm_head is 2.1 GB
    in bf16).

    Element-wise methods on large tensors run chunk by chunk over zero-copy slices of the
    inputs: the same result with a few cache-sized temporaries instead of a float32 copy of
    every input (and the finite check runs on each chunk while it is still in cache). On CPU,
    methods with a ``chunked`` form (the TIES family: top-k statistics in a first pass over
    the chunks, then element-wise trimming and consensus) do the same, bit for bit.
    """
    key = ("merged", plan.fingerprint, t.name)
    if key in ctx.memo:
        return ctx.memo[key]
    value = _merge(plan, t, ctx, stream)
    if not isinstance(value, Pieces):
        ctx.memo[key] = value
    return value


def plan_method(plan: Plan, t: OutputTensor) -> methods.Method:
    """The plan's method for ``t``; with LiNeS (``plan.lines``), one whose merge scales the
    update from the base by t's layer scale (and that has no ``chunked`` form or ``into``
    loop: the scale needs each chunk's base and float32 update, which the element-wise path
    hands it and the two-pass forms and fused loops do not)."""
    method = methods.get(plan.method)
    if plan.lines is None or t.base is None:
        return method
    scale = lines.layer_scale(plan.lines, t.layer, len(plan.layer_map))
    merge = method.merge

    def scaled(base, tensors, **kwargs):
        return lines.scale_update(base, merge(base, tensors, **kwargs), scale)

    return dataclasses.replace(method, merge=scaled, chunked=None, into=None)


_KERNELS = {"linear": "linear_sum", "slerp": "slerp_combine", "passthrough": "scale", "model_stock": "stock_interpolate"}
"""The fused step (``distmerge.kernels``) of each method outside the task-arithmetic family."""


def method_kernels(name: str, device: str) -> tuple[str, ...]:
    """The kernels (``kernels.selfcheck.KERNELS`` names) that the method ``name`` calls on
    ``device``, its main one first; () for a method with none (plain torch throughout). The
    task-arithmetic family calls ``task_merge`` with its sparsifier's kind of keep rule, and
    on CPU its two-pass chunked forms also ``task_combine`` (``_chunked``: CPU only)."""
    from distmerge.methods import task_arithmetic as ta

    member = next((m for m in ta.FAMILY if m.name == name), None)
    if member is None:
        return (_KERNELS[name],) if name in _KERNELS else ()
    kind = {None: "", ta.TRIM: "/band", ta.BAND: "/band", ta.DROP: "/draw", ta.MAGPRUNE: "/mask"}[member.sparsifier]
    chunked = () if device.startswith("cuda") or member.sparsifier is None else ("task_combine",)
    return ("task_merge" + kind, *chunked)


def method_consensus(name: str) -> bool:
    """Whether the method elects signs (TIES): its kernels' compiled CPU loops pay off sooner."""
    from distmerge.methods import task_arithmetic as ta

    return any(m.consensus for m in ta.FAMILY if m.name == name)


def plan_methods(plans: list[Plan]) -> list[str]:
    """The methods of ``plans`` and of the stages they read, each once, stages first."""
    names: list[str] = []
    for plan in plans:
        for name in [*plan_methods(list(plan.stages.values())), plan.method]:
            if name not in names:
                names.append(name)
    return names


def _merge(plan: Plan, t: OutputTensor, ctx: MergeContext, stream: bool = False) -> torch.Tensor | Pieces:
    if t.quant is not None:
        return _requantized(plan, t, ctx)
    progress, device, timed = ctx.progress, ctx.device, ctx.timed
    method = plan_method(plan, t)
    src = TensorInputs(plan, t, ctx)
    work, out_dtype = src.work, DTYPES[t.dtype]
    check = (lambda value: None) if ctx.allow_nonfinite else (lambda value: check_finite(t, value))

    with timed("read"):
        src.load()
    if not out_dtype.is_floating_point:  # integer and bool tensors: copied bit for bit, never cast
        return same_in_every_model(plan, t, src.all())
    if not src.inputs:  # the base alone (a recipe with no other model): written as it is, rounded like mergekit's
        out = widen(src.base, work).to(work).to(out_dtype)
        check(out)
        return out
    if is_plain_copy(method, t, src.inputs, work, out_dtype):
        return src.inputs[0]  # the mapped input's bytes go to the writer as they are
    kwargs = method_kwargs(method, t, ctx.kernel_options)
    numel = src.inputs[0].numel()
    if numel > CHUNK_ELEMENTS and method.elementwise:
        if stream:  # range by range into buffers of their own: the output never whole
            ranges = _fill_elementwise(src, [(t, method, kwargs)], ctx, lambda i, j: [torch.empty(j - i, dtype=out_dtype, device=device)])
            return Pieces(piece for piece, in ranges)
        return _merge_elementwise(src, [(t, method, kwargs)], ctx)[0]
    pieces = _chunked(method, src, kwargs) if numel > CHUNK_ELEMENTS else None
    if pieces is None:
        with timed("read"):
            base, inputs = src.widened()
        with timed("merge"):
            # Round to the compute dtype first, as mergekit returns it, then to the output dtype.
            out = method.merge(base, inputs, **kwargs).to(work).to(out_dtype)
            check(out)
            return out
    if stream:
        return Pieces(_rounded(pieces, src, work, out_dtype, check))
    out = None  # allocated at the first piece: a method's passes before it (statistics, float32 buffers) run without it
    start = time.perf_counter()
    for i, j, merged in pieces:
        if out is None:
            out = torch.empty(numel, dtype=out_dtype, device=device)
        out[i:j] = merged.to(work)
        check(out[i:j])
    src.drop_read()
    _count_reads(progress, src, start)
    return out.view(t.shape)


def _rounded(pieces: Iterator, src: TensorInputs, work: torch.dtype, out_dtype: torch.dtype, check) -> Iterator[torch.Tensor]:
    """A chunked form's pieces rounded as ``_merge`` rounds them into its output, and checked."""
    start = time.perf_counter()
    for _, _, merged in pieces:
        piece = merged.to(work).to(out_dtype)
        check(piece)
        yield piece
    src.drop_read()
    _count_reads(src.ctx.progress, src, start)


def _requantized(plan: Plan, t: OutputTensor, ctx: MergeContext) -> torch.Tensor:
    """A part of an fp8 output tensor (``out_dtype: fp8``): the float32 merge of its data
    tensor quantized per block (``quantized.quantize_fp8``): its fp8 values, or its scales.
    Each part is its own unit of work, so a rank may merge a tensor for either (the same bytes)."""
    q = t.quant
    key = ("fp8", plan.fingerprint, q["of"])
    if key not in ctx.memo:
        data = dataclasses.replace(t, name=q["of"], shape=q["shape"], dtype="F32", quant=None)
        ctx.memo[key] = quantized.quantize_fp8(_merge(plan, data, ctx), q["block"])
    values, scales = ctx.memo[key]
    return values if q["part"] == "data" else scales


def merge_together(items: list[tuple[Plan, OutputTensor]], ctx: MergeContext) -> None:
    """Merge the large element-wise tensors of a unit of work that read the same inputs (a
    sweep's variants) chunk by chunk together: each chunk of the inputs is read once for all
    of them and is still in cache for the second. Each result is the bytes ``merge_tensor``
    gives alone (the same chunks, the same kernel); they go into ``ctx.memo``, where
    ``merge_tensor`` finds them. Tensors that cannot join a group are left to it."""
    groups: dict[tuple, list[tuple[Plan, OutputTensor]]] = {}
    for plan, t in items:
        key = _shared_inputs(plan, t, ctx)
        if key is not None and ("merged", plan.fingerprint, t.name) not in ctx.memo:
            groups.setdefault(key, []).append((plan, t))
    for group in (g for g in groups.values() if len(g) > 1):
        src = TensorInputs(*group[0], ctx)
        with ctx.timed("read"):
            src.load()
        jobs = []
        for plan, t in group:
            method = plan_method(plan, t)
            jobs.append((t, method, method_kwargs(method, t, ctx.kernel_options)))
        for (plan, t), value in zip(group, _merge_elementwise(src, jobs, ctx)):
            ctx.memo["merged", plan.fingerprint, t.name] = value


def _shared_inputs(plan: Plan, t: OutputTensor, ctx: MergeContext) -> tuple | None:
    """What a tensor merged chunk by chunk by an element-wise method reads (its inputs'
    keys and the compute dtype); None for a tensor merged otherwise."""
    method = methods.get(plan.method)
    if not method.elementwise or method.name == "passthrough" or not t.inputs or t.vocab is not None or t.quant:
        return None
    if not DTYPES[t.dtype].is_floating_point or math.prod(t.shape) <= CHUNK_ELEMENTS:
        return None
    src = TensorInputs(plan, t, ctx)
    return (work_dtype(plan, t), t.base is not None, tuple(t.shape), *map(src.key, t.all_inputs))


def _merge_elementwise(src: TensorInputs, jobs: list[tuple[OutputTensor, methods.Method, dict]], ctx: MergeContext) -> list[torch.Tensor]:
    """Element-wise merges of ``src``'s (loaded) inputs, ``(t, method, kwargs)`` each, over
    zero-copy chunks of the inputs: a few cache-sized temporaries instead of a float32 copy
    of every input; each chunk is read once for every job, and checked for NaN and Inf
    while it is still in cache. A method with an ``into`` loop merged alone writes the
    output directly, DROP_ELEMENTS at a time (a range it declines goes chunk by chunk)."""
    numel = src.inputs[0].numel()
    outs = [torch.empty(numel, dtype=DTYPES[t.dtype], device=ctx.device) for t, _, _ in jobs]
    for _ in _fill_elementwise(src, jobs, ctx, lambda i, j: [out[i:j] for out in outs]):
        pass
    return [out.view(t.shape) for (t, _, _), out in zip(jobs, outs)]


def _fill_elementwise(
    src: TensorInputs, jobs: list[tuple[OutputTensor, methods.Method, dict]], ctx: MergeContext, targets: Callable[[int, int], list[torch.Tensor]]
) -> Iterator[list[torch.Tensor]]:
    """``_merge_elementwise``'s work range by range: each job's output over [i, j) merged into
    ``targets(i, j)`` (slices of whole outputs, or a streamed tensor's buffers), which it
    then yields, in order."""
    numel = src.inputs[0].numel()
    how = src.as_stored if len(jobs) == 1 else src.widen  # several jobs: each chunk widened to float32 once, for all
    _, method, kwargs = jobs[0]
    stored = [x for x in (src.base, *src.inputs) if x is not None]
    cpu = torch.device(ctx.device).type == "cpu"
    into = method.into if cpu and len(jobs) == 1 and all(d == src.work for d in (DTYPES[jobs[0][0].dtype], *(x.dtype for x in stored))) else None
    start = time.perf_counter()
    for i, j in methods.chunk_ranges(numel, DROP_ELEMENTS if into else CHUNK_ELEMENTS):
        outs = targets(i, j)
        if into is not None and into(*src.read_range(i, j, how), out=outs[0], **kwargs):
            src.drop_read()  # one range's input pages mapped at a time, as chunk by chunk
        else:
            for a, b in methods.chunk_ranges(j - i, CHUNK_ELEMENTS):
                _merge_chunk(src, jobs, [out[a:b] for out in outs], i + a, i + b, how, ctx)
        yield outs
    src.drop_read()
    _count_reads(ctx.progress, src, start)


def _merge_chunk(src: TensorInputs, jobs: list[tuple[OutputTensor, methods.Method, dict]], outs: list[torch.Tensor], i: int, j: int, how, ctx: MergeContext) -> None:
    """The chunk [i, j) of each job's output: merged, rounded into ``outs`` (each job's place
    for it), checked."""
    chunks = src.read_range(i, j, how)
    for (t, method, kwargs), out in zip(jobs, outs):
        merged = method.merge(*chunks, **kwargs)
        if out.dtype == src.work:  # rounded once, into its place
            out.copy_(merged)
        else:  # to the compute dtype, as mergekit returns it, then to the output dtype
            out[:] = merged.to(src.work)
        if not ctx.allow_nonfinite:
            check_finite(t, out)


def _count_reads(progress: Progress | None, src: TensorInputs, start: float) -> None:
    """Split the time since ``start`` of a merge chunk by chunk: its reads count as "read"."""
    if progress is not None:
        seconds = progress.stats.seconds
        seconds["read"] = seconds.get("read", 0.0) + src.read_seconds
        seconds["merge"] = seconds.get("merge", 0.0) + time.perf_counter() - start - src.read_seconds


def _chunked(method: methods.Method, src: TensorInputs, kwargs: dict) -> Iterator | None:
    """(start, end, merged) chunk by chunk, for a method with a ``chunked`` form (the TIES
    family: statistics in a first pass, then element-wise) on CPU; None for one without."""
    if method.chunked is not None and not src.inputs[0].is_cuda:
        if method.shares_statistics and src.t.vocab is None:
            kwargs = {**kwargs, "stats": src.ctx.memo.setdefault(("stats", src.work, *map(src.key, src.t.all_inputs)), {})}
        if method.buffer:
            kwargs = {**kwargs, "buffer": src.ctx.buffer}
        return method.chunked(src.read_range, tuple(src.inputs[0].shape), CHUNK_ELEMENTS, **kwargs)
    return None


def method_kwargs(method: methods.Method, t: OutputTensor, kernel_options: kernels.KernelOptions | None = None) -> dict:
    """The keyword arguments of the method's function for ``t``: its parameters, seeds, kernel options."""
    kwargs = {method.param_index[k].arg: v for k, v in {**t.params, **t.input_params}.items()}
    if t.seeds is not None:
        kwargs["seeds"] = t.seeds
    if method.kernel_options:
        kwargs["options"] = kernel_options
    return kwargs


def widen(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """Like mergekit: round an input to the recipe's dtype first, then compute in float32."""
    return x.to(work).to(torch.float32)


def widen_into(x: torch.Tensor, work: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """``widen``'s values written into the float32 tensor ``out`` (returned): no rounding step
    when x is already in the recipe's dtype or the recipe computes in float32."""
    return out.copy_(x if work in (x.dtype, torch.float32) else x.to(work))


def apply_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s·B·A in float32, rounded to W's dtype: the weight a merged-and-saved adapter
    would have on disk."""
    return (w.float() + scale * (b @ a)).to(w.dtype)


def same_in_every_model(plan: Plan, t: OutputTensor, values: list[torch.Tensor]) -> torch.Tensor:
    """The one value every model holds for an integer or bool tensor; MergeError naming two
    models that disagree (such a tensor is not merged, and picking one would hide it)."""
    refs = t.all_inputs
    for ref, x in zip(refs[1:], values[1:]):
        if not torch.equal(x, values[0]):
            raise MergeError(
                f"tensor {t.name!r} ({t.dtype}) holds different values in {plan.models[refs[0].model].ref!r} and "
                f"{plan.models[ref.model].ref!r}; integer and bool tensors are copied, not merged, so every model "
                "must hold the same values: remove it from the checkpoints that differ, or make them agree"
            )
    return values[0]


def is_plain_copy(method: methods.Method, t: OutputTensor, inputs: list[torch.Tensor], work, out_dtype) -> bool:
    """Passthrough without ``scale`` into the input's own dtype: the output is the input,
    byte for byte (no rounding, and a copy produces no NaN or Inf of its own)."""
    return (
        method.name == "passthrough"
        and t.input_params.get("scale") == [None]
        and inputs[0].dtype == work == out_dtype
    )


def check_finite(t: OutputTensor, value: torch.Tensor) -> None:
    """MergeError naming ``t`` when ``value`` holds NaN or Inf."""
    if not value.is_floating_point() or value.numel() == 0:
        return
    # One pass, no mask of the tensor's size: a NaN or an Inf makes the sum NaN or Inf. So can
    # finite values whose sum overflows (float16's range is small: summed in float32), which
    # the count below tells apart. 16 µs a 256K-element chunk against 58 for aminmax and two
    # isfinite calls, mostly the small ops' overhead.
    total = value.sum(dtype=torch.float32) if value.dtype == torch.float16 else value.sum()
    if math.isfinite(total.item()):
        return
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise MergeError(
            f"tensor {t.name!r}: the merge produced NaN/Inf values ({bad} found); check the recipe's "
            "parameters for this tensor, or pass --allow-nonfinite to keep them"
        )


def input_path(plan: Plan, ref: InputRef) -> str:
    return os.path.join(plan.models[ref.model].path, ref.file)


def stage_key(plan: Plan, ref: InputRef) -> tuple[str, int, int]:
    """What identifies an input's bytes staged on the GPU ahead of its merge."""
    return input_path(plan, ref), ref.begin, ref.end


def work_dtype(plan: Plan, t: OutputTensor) -> str:
    """The compute dtype's name: the recipe's ``dtype``, else the inputs' own when they
    agree, else F32."""
    if plan.dtype:
        return TORCH_DTYPE_NAMES[plan.dtype]
    dtypes = {r.dtype for r in t.all_inputs}
    return dtypes.pop() if len(dtypes) == 1 else "F32"
