"""Execute a plan: merge this rank's output files tensor by tensor, streaming.

Memory stays bounded by one tensor's inputs and result: inputs are memory-mapped, merged
in float32, cast, appended to the output file, and dropped before the next tensor.
Each rank writes a contiguous share of the plan's tensors into the (shared) partial output
files at the offsets the plan gives, and journals each tensor once its bytes are synced;
a rerun redoes only what no journal holds (``distmerge.state``). Rank 0 publishes each file
when it is whole.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from distmerge import kernels, methods
from distmerge.errors import MergeError
from distmerge.faults import fault_point
from distmerge.io.header import DTYPES
from distmerge.io.reader import TensorReader
from distmerge.io.staging import Downloader, Uploader
from distmerge.io.writer import PartialFile
from distmerge.plan import TORCH_DTYPE_NAMES, InputRef, OutputFile, OutputTensor, Plan, assign_tensors, file_layout
from distmerge.progress import Progress
from distmerge.sources import is_pickle
from distmerge.state import Journal, finished_tensors
from distmerge.vocab import permute


@dataclass(slots=True)
class RunOptions:
    device: str = "cpu"
    """Where the math runs: "cpu" or "cuda[:N]"."""
    allow_nonfinite: bool = False
    """Keep going when a merged tensor has NaN or Inf (default: stop and name the tensor)."""
    io: str = "mmap"
    """How inputs are read: "mmap" (zero-copy) or "pread" (into buffers; network file systems)."""
    kernels: kernels.KernelOptions = field(default_factory=kernels.KernelOptions.from_env)
    """How the merge methods' fused steps run (compiled CPU loops, Triton); from the environment by default."""


CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk for element-wise methods: 1 MB of float32 per input stays in cache."""
DROP_ELEMENTS = 16 * CHUNK_ELEMENTS
"""How much of each input a chunked merge reads before unmapping it again (one madvise per
input per 16 chunks: frequent enough to bound memory, rare enough to cost nothing)."""


def merge_tensor(
    plan: Plan,
    t: OutputTensor,
    reader: TensorReader,
    device: str = "cpu",
    progress: Progress | None = None,
    allow_nonfinite: bool = False,
    uploader: Uploader | None = None,
    kernel_options: kernels.KernelOptions | None = None,
) -> torch.Tensor:
    """The merged value of one output tensor, in its output dtype. Raises MergeError
    naming the tensor if the result has NaN or Inf, unless ``allow_nonfinite``.

    Element-wise methods on large tensors run chunk by chunk over zero-copy slices of the
    inputs: the same result with a few cache-sized temporaries instead of a float32 copy of
    every input (and the finite check runs on each chunk while it is still in cache). On CPU,
    methods with a ``chunked`` form (the TIES family: top-k statistics in a first pass over
    the chunks, then element-wise trimming and consensus) do the same, bit for bit.
    """
    timed = progress.timed if progress is not None else lambda phase: contextlib.nullcontext()
    method = methods.get(plan.method)
    work, out_dtype = DTYPES[_work_dtype(plan, t)], DTYPES[t.dtype]

    in_shape = (-1, *t.shape[1:]) if t.vocab is not None else tuple(t.shape)  # inputs' vocabularies differ

    def fetch(ref: InputRef) -> torch.Tensor:
        staged = uploader.take(_stage_key(plan, ref)) if uploader is not None else None
        if staged is not None:  # already on the GPU: its bytes, read and copied while the last tensor merged
            x = staged.view(DTYPES[ref.dtype]).view(in_shape)
        elif is_pickle(ref.file):
            x = reader.read_pickled(input_path(plan, ref), ref.name)
        else:
            x = reader.read(input_path(plan, ref), ref.dtype, in_shape, ref.begin, ref.end)
        x = x.to(device)
        if ref.lora is not None:
            x = _apply_lora(x, ref.lora, plan.models[ref.model].adapter_path, reader, device)
        return x

    def compute(x: torch.Tensor | None) -> torch.Tensor | None:
        # Like mergekit: round inputs to the recipe's dtype first, then compute in float32.
        return None if x is None else x.to(work).to(torch.float32)

    with timed("read"):
        inputs = [fetch(r) for r in t.inputs]
        base = fetch(t.base) if t.base else None
        if t.vocab is not None:  # rows re-indexed to the output vocabulary, in the compute dtype
            rows = permute(t.vocab, {r.model: x.to(work) for r, x in zip(t.all_inputs, [base, *inputs][base is None :])})
            inputs, base = [rows[r.model] for r in t.inputs], rows[t.base.model] if t.base else None
    if not out_dtype.is_floating_point:  # integer and bool tensors: copied bit for bit, never cast
        return _same_in_every_model(plan, t, [base, *inputs] if base is not None else inputs)
    if not inputs:  # the base alone (a recipe with no other model): written as it is, rounded like mergekit's
        out = compute(base).to(work).to(out_dtype)
        if not allow_nonfinite:
            _check_finite(t, out)
        return out
    if _is_plain_copy(method, t, inputs, work, out_dtype):
        return inputs[0]  # the mapped input's bytes go to the writer as they are
    kwargs = {method.param_index[k].arg: v for k, v in {**t.params, **t.input_params}.items()}
    if t.seeds is not None:
        kwargs["seeds"] = t.seeds
    if method.kernel_options:
        kwargs["options"] = kernel_options
    numel = inputs[0].numel()
    flat = [x.reshape(-1) for x in inputs]
    flat_base = base.reshape(-1) if base is not None else None
    last = dropped = 0  # inputs' pages before `dropped` are unmapped again (in batches of 16 chunks)
    read_seconds = 0.0

    def drop_read() -> None:
        nonlocal dropped
        for x in (*flat, flat_base):
            if x is not None and last > dropped:
                reader.drop(x[dropped:last])
        dropped = last

    def read(i: int, j: int, widen: Callable = compute) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Float32 (base, inputs) of the flat range [i, j), chunk by chunk in order (a
        chunked method may go over the tensor more than once)."""
        nonlocal last, dropped, read_seconds
        if i != last or last - dropped >= DROP_ELEMENTS:  # a new pass, or 16 chunks behind us
            drop_read()
            dropped = i
        last = j
        start = time.perf_counter()
        chunks = (widen(flat_base[i:j]) if flat_base is not None else None), [widen(x[i:j]) for x in flat]
        read_seconds += time.perf_counter() - start
        return chunks

    def as_stored(x: torch.Tensor) -> torch.Tensor:
        """An input already in the compute dtype as it is: the element-wise kernels widen it to
        float32 inside their loop (the same values as ``compute``, without a pass of its own)."""
        return x if x.dtype == work else compute(x)

    pieces = None
    if numel > CHUNK_ELEMENTS:
        if method.elementwise:
            ranges = methods.chunk_ranges(numel, CHUNK_ELEMENTS)
            pieces = ((i, j, method.merge(*read(i, j, as_stored), **kwargs)) for i, j in ranges)
        elif method.chunked is not None and not inputs[0].is_cuda:
            pieces = method.chunked(read, tuple(inputs[0].shape), CHUNK_ELEMENTS, **kwargs)
    if pieces is None:
        with timed("read"):
            inputs, base = [compute(x) for x in inputs], compute(base)
        with timed("merge"):
            # Round to the compute dtype first, as mergekit returns it, then to the output dtype.
            out = method.merge(base, inputs, **kwargs).to(work).to(out_dtype)
            if not allow_nonfinite:
                _check_finite(t, out)
            return out
    out = torch.empty(numel, dtype=out_dtype, device=device)
    start = time.perf_counter()
    for i, j, merged in pieces:
        out[i:j] = merged.to(work)
        if not allow_nonfinite:
            _check_finite(t, out[i:j])
    drop_read()
    if progress is not None:  # the reads inside the merge count as "read"
        progress.stats.seconds["read"] = progress.stats.seconds.get("read", 0.0) + read_seconds
        merge = time.perf_counter() - start - read_seconds
        progress.stats.seconds["merge"] = progress.stats.seconds.get("merge", 0.0) + merge
    return out.view(t.shape)


def _same_in_every_model(plan: Plan, t: OutputTensor, values: list[torch.Tensor]) -> torch.Tensor:
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


def _is_plain_copy(method: methods.Method, t: OutputTensor, inputs: list[torch.Tensor], work, out_dtype) -> bool:
    """Passthrough without ``scale`` into the input's own dtype: the output is the input,
    byte for byte (no rounding, and a copy produces no NaN or Inf of its own)."""
    return (
        method.name == "passthrough"
        and t.input_params.get("scale") == [None]
        and inputs[0].dtype == work == out_dtype
    )


def _apply_lora(w: torch.Tensor, lora: dict, adapter_dir: str, reader: TensorReader, device: str) -> torch.Tensor:
    """W + s·B·A in float32, rounded to W's dtype: the weight a merged-and-saved adapter
    would have on disk."""

    def part(key: str) -> torch.Tensor:
        file, dtype, shape, begin, end = lora[key]
        return reader.read(os.path.join(adapter_dir, file), dtype, tuple(shape), begin, end).to(device, torch.float32)

    return (w.float() + lora["scale"] * (part("b") @ part("a"))).to(w.dtype)


def input_path(plan: Plan, ref: InputRef) -> str:
    return os.path.join(plan.models[ref.model].path, ref.file)


def _stage_key(plan: Plan, ref: InputRef) -> tuple[str, int, int]:
    return input_path(plan, ref), ref.begin, ref.end


def _work_dtype(plan: Plan, t: OutputTensor) -> str:
    if plan.dtype:
        return TORCH_DTYPE_NAMES[plan.dtype]
    dtypes = {r.dtype for r in t.all_inputs}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


def run_rank(
    plan: Plan,
    out_dir: str,
    rank: int = 0,
    world_size: int = 1,
    options: RunOptions | None = None,
    between: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Merge and write this rank's tensors into ``out_dir`` (prepared by output.prepare).
    Returns the names of the tensors written in this call.

    ``between`` is called before every tensor (the job uses it to stop when another rank
    failed); ``progress`` counts the work and times its phases.
    """
    options = options or RunOptions()
    finished = finished_tensors(plan, out_dir)
    file_of = {name: f for f in plan.files for name in f.tensors}
    todo = [t for t in (plan.tensors[i] for i in assign_tensors(plan, world_size)[rank]) if t.name not in finished]
    journal = Journal(out_dir, rank)
    kernel_options = options.kernels.for_work(sum(math.prod(t.shape) for t in todo))  # worth compiling the CPU loops?
    current: tuple[OutputFile, PartialFile, dict[str, int]] | None = None
    timed = progress.timed if progress is not None else lambda phase: contextlib.nullcontext()

    hashing = None  # (tensor, file, sha256 future, bytes) of the tensor being written

    def settle(upto: int | None = None) -> None:
        """Wait for the tensor being written; then its inputs' pages (read before ``upto``)
        can go: the writer may have been reading them (a passthrough writes mapped bytes)."""
        nonlocal hashing
        if hashing is not None:
            name, file_name, digest, nbytes = hashing
            journal.add(name, file_name, digest.result(), nbytes)
            hashing = None
        reader.release(upto)

    def commit() -> None:
        with timed("sync"):
            settle()
            if current is not None:
                current[1].sync()
            journal.commit()

    written = []
    cuda = options.device.startswith("cuda")
    uploader, downloader = (Uploader(options.device), Downloader(options.device)) if cuda else (None, None)
    with TensorReader(options.io, pin=cuda) as reader:
        try:
            for k, t in enumerate(todo):
                if between is not None:
                    between()
                if k + 1 < len(todo):
                    for ref in todo[k + 1].all_inputs:
                        if is_pickle(ref.file) or ref.end == ref.begin:
                            continue
                        path = input_path(plan, ref)
                        reader.prefetch(path, ref.begin, ref.end)
                        if uploader is not None:  # read and copied to the GPU on the upload thread and stream
                            read = functools.partial(reader.read, path, "U8", (ref.end - ref.begin,), ref.begin, ref.end)
                            uploader.prefetch(_stage_key(plan, ref), read)
                file = file_of[t.name]
                if current is None or current[0] is not file:
                    if current is not None:
                        commit()
                        current[1].close()
                    current = (file, *_open(plan, file, out_dir))
                mark = reader.mark()
                value = merge_tensor(plan, t, reader, options.device, progress, options.allow_nonfinite, uploader, kernel_options)
                with timed("write"):
                    ready = None
                    if downloader is not None:  # copied out on the download stream; the writer waits for it
                        value, ready = downloader.start(value)
                    digest = current[1].write_at(current[2][t.name], value, ready=ready)
                del value
                settle(upto=mark)  # the previous tensor was written and hashed while this one was merged
                hashing = (t.name, file.name, digest, t.nbytes)
                written.append(t.name)
                fault_point(rank, len(written))
                if journal.due():
                    commit()
                if progress is not None:
                    progress.done(t.read_bytes, t.nbytes)
            commit()
        except OSError as e:
            raise MergeError(
                f"writing {current[1].tmp if current else out_dir} failed: {e.strerror or e}; what was "
                "written stays unpublished: fix the cause (free disk space?) and rerun the same command to resume"
            ) from None
        except BaseException as e:
            if not isinstance(e, Exception):  # Ctrl-C or SIGTERM: journal what is already on disk
                with contextlib.suppress(Exception):
                    commit()
            raise
        finally:
            if current is not None:
                current[1].close()
            if uploader is not None:
                uploader.close()
    return written


def _open(plan: Plan, file: OutputFile, out_dir: str) -> tuple[PartialFile, dict[str, int]]:
    header, offsets = file_layout(plan, file)
    return PartialFile(os.path.join(out_dir, file.name), header, file.nbytes), offsets


def _check_finite(t: OutputTensor, value: torch.Tensor) -> None:
    if not value.is_floating_point() or value.numel() == 0:
        return
    # One pass, no mask of the tensor's size: NaN propagates into min and max, and an Inf is one of them.
    low, high = torch.aminmax(value)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        bad = int((~torch.isfinite(value)).sum())
        raise MergeError(
            f"tensor {t.name!r}: the merge produced NaN/Inf values ({bad} found); check the recipe's "
            "parameters for this tensor, or pass --allow-nonfinite to keep them"
        )
