"""Execute plans on one rank: merge this rank's tensors one by one and write them, streaming.

The plans are the job's outputs (one for a plain recipe; a sweep's variants, kept stages).
The work goes in units (``graph.work_units``): one tensor name across the outputs, whose
inputs are fetched once. Memory stays bounded by one unit's inputs and results: inputs are
memory-mapped, merged (``distmerge.tensor_merge``), written at the offsets the plan gives
into the (shared) partial output files, and dropped before the next unit. While one tensor
merges, the previous one is written and hashed on the I/O thread and the next unit's inputs
are read ahead. Each tensor is journaled (``distmerge.state``) once its bytes are synced, so
a rerun redoes only what no journal holds; rank 0 publishes each file when it is whole.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from distmerge import kernels
from distmerge.errors import MergeError
from distmerge.faults import fault_point
from distmerge.io.reader import TensorReader
from distmerge.io.staging import Downloader, Uploader
from distmerge.io.writer import PartialFile
from distmerge.graph import assign_units, work_units
from distmerge.plan import OutputFile, OutputTensor, Plan, file_layout
from distmerge.progress import Progress
from distmerge.sources import is_pickle
from distmerge.state import Journal, finished_tensors
from distmerge.kernels import selfcheck
from distmerge.tensor_merge import (
    MergeContext, Pieces, input_path, merge_tensor, merge_together, method_consensus, method_kernels, plan_methods, stage_key,
)  # fmt: skip


@dataclass(slots=True)
class RunOptions:
    device: str = "cpu"
    """Where the math runs: "cpu" or "cuda[:N]"."""
    allow_nonfinite: bool = False
    """Keep going when a merged tensor has NaN or Inf (default: stop and name the tensor)."""
    io: str = "mmap"
    """How inputs are read: "mmap" (zero-copy) or "pread" (into buffers; network file systems)."""
    direct_writes: bool = True
    """Write output tensors around the page cache (``O_DIRECT``) where the file system allows
    (``io.writer``); False: through it."""
    kernels: kernels.KernelOptions = field(default_factory=kernels.KernelOptions.from_env)
    """How the merge methods' fused steps run (compiled CPU loops, Triton); from the environment by default."""


@dataclass(slots=True)
class RankRun:
    """What ``run_rank`` did."""

    written: list[str]
    """The names of the tensors written (a name once per output that got it)."""
    kernels: dict[str, str]
    """Per method: the path its fused steps took on this rank ("triton", "compiled", "torch",
    or "torch (self-check failed: …)"; ``check_kernels``)."""


def check_kernels(
    plans: list[Plan], device: str, options: kernels.KernelOptions
) -> tuple[kernels.KernelOptions, dict[str, str]]:
    """The kernel options a rank merges ``plans`` with on ``device``, and per method the path
    its fused steps take (what the report shows). On CUDA with the Triton kernels on, each
    kernel the methods call is first checked against its reference on the device
    (``kernels.selfcheck``); one that fails runs its reference instead, and says why."""
    names = plan_methods(plans)
    failed: dict[str, str] = {}
    if device.startswith("cuda") and options.triton and kernels.triton_available():
        needed = [k for name in names for k in method_kernels(name, device)]
        if needed:
            options, findings = selfcheck.check(needed, device, options)
            failed = {f.kernel: f.detail for f in findings if not f.ok}
    paths = {}
    for name in names:
        steps = method_kernels(name, device)
        bad = [k for k in steps if k in failed]
        if bad:
            paths[name] = "torch (self-check failed: " + "; ".join(f"{k}: {failed[k]}" for k in bad) + ")"
        else:
            paths[name] = kernels.path(steps[0], device, options, method_consensus(name)) if steps else "torch"
    return options, paths


WRITE_AHEAD = 32 << 20
"""Bytes of merged tensors whose writes and sha256s may be in flight, with the tensor about
to merge, before the merge waits for the oldest. Waiting for all but the newest (one tensor
ahead) left the merge idle after every small tensor that followed a large one (a norm after
an MLP matrix) until the large one was hashed: 0.75 s of a 4 s linear merge of the 2.5 GB
set (32 MB covers a layer's MLP matrix and the tensors after it up to the next, here; 64 MB
measured no faster and added to the peak memory). The newest write is always left in flight,
so the peak memory stays what one tensor ahead gave wherever a tensor and the one before it
hold more than this."""

_SYNC = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distmerge-sync")
"""fsyncs of written files, and the journal lines that wait for them, while the merge goes on."""


def run_rank(
    outputs: list[tuple[Plan, str]],
    rank: int = 0,
    world_size: int = 1,
    options: RunOptions | None = None,
    between: Callable[[], None] | None = None,
    progress: Progress | None = None,
    finished: list[set[str]] | None = None,
) -> RankRun:
    """Merge and write this rank's tensors of every output: ``(plan, out_dir)`` pairs, each
    directory prepared by output.prepare, skipping the names in ``finished`` (per output;
    default: what the directories' journals and published files hold now). Returns the names
    of the tensors written in this call and the path each method's fused steps took (on CUDA,
    after ``check_kernels``'s self-check of the kernels, when there is anything to merge).

    The work goes in units (``graph.work_units``): the outputs' tensors of one name, merged
    one after another from the same fetched inputs. ``between`` is called before every unit
    (the job uses it to stop when another rank failed); ``progress`` counts the work and
    times its phases.
    """
    options = options or RunOptions()
    plans = [plan for plan, _ in outputs]
    units = work_units(plans)
    if finished is None:
        finished = [finished_tensors(plan, out_dir) for plan, out_dir in outputs]
    todo = []
    for u in (units[i] for i in assign_units(units, world_size)[rank]):
        members = [(k, plans[k].tensors[i]) for k, i in u.members if plans[k].tensors[i].name not in finished[k]]
        if members:
            todo.append(members)
    work = sum(math.prod(t.shape) for members in todo for _, t in members)
    kernel_options = options.kernels.for_work(work)
    if todo:
        kernel_options, paths = check_kernels(plans, options.device, kernel_options)
    else:
        paths = {}
    written = []
    cuda = options.device.startswith("cuda")
    uploader, downloader = (Uploader(options.device), Downloader(options.device)) if cuda else (None, None)
    with TensorReader(options.io, pin=cuda) as reader:
        ctx = MergeContext(reader, options.device, progress, options.allow_nonfinite, uploader, kernel_options)
        timed = ctx.timed
        outs = [_RankOutput(plan, out_dir, rank, timed, options.direct_writes) for plan, out_dir in outputs]
        out = outs[0]
        try:
            for n, members in enumerate(todo):
                if between is not None:
                    between()
                if n + 1 < len(todo):
                    for k, t in todo[n + 1]:
                        _prefetch(plans[k], t, ctx)
                mark = reader.mark()
                merge_together([(plans[k], t) for k, t in members], ctx)  # a sweep's element-wise variants
                for k, t in members:
                    out = outs[k]
                    out.open_file_of(t)
                    out.make_room(t.nbytes)
                    value = merge_tensor(plans[k], t, ctx, stream=len(members) == 1 and not cuda)  # alone: nothing else reads it
                    drop = None
                    if isinstance(value, Pieces):  # written as it is merged
                        digest = out.write_stream(t, value.pieces)
                    else:
                        with timed("write"):
                            ready = None
                            if downloader is not None:  # copied out on the download stream; the writer waits for it
                                value, ready = downloader.start(value)
                            drop = reader.dropper(value)  # a mapped input's pages behind the writer
                            digest = out.write(t, value, ready, drop=drop)
                    del value
                    out.started(t, digest, n, mapped=drop is not None)
                    written.append(t.name)
                    fault_point(rank, len(written))
                    if out.journal.due():
                        out.commit()
                    if progress is not None:
                        progress.done(t.read_bytes, t.nbytes)
                ctx.memo.clear()
                for other in outs:  # copies of earlier units' inputs are written before those pages go
                    other.settle_copies(before=n)
                reader.release(upto=mark)
            for out in outs:
                out.commit(wait=True)
        except OSError as e:
            raise MergeError(
                f"writing {out.partial.tmp if out.partial else out.out_dir} failed: {e.strerror or e}; what was "
                "written stays unpublished: fix the cause (free disk space?) and rerun the same command to resume"
            ) from None
        except BaseException as e:
            if not isinstance(e, Exception):  # Ctrl-C or SIGTERM: journal what is already on disk
                for out in outs:
                    with contextlib.suppress(Exception):
                        out.commit(wait=True)
            raise
        finally:
            for out in outs:
                with contextlib.suppress(Exception):  # its error, if any, was raised already or is moot
                    out.wait_synced()
                if out.partial is not None:
                    out.partial.close()
            if uploader is not None:
                uploader.close()
    return RankRun(written, paths)


def _prefetch(plan: Plan, t: OutputTensor, ctx: MergeContext) -> None:
    """Start reading ``t``'s inputs (through the stages it reads) ahead of its merge: into
    the page cache, and on CUDA onto the GPU (read and copied on the upload thread and stream)."""
    for ref in t.all_inputs:
        model = plan.models[ref.model]
        if model.stage:
            stage = plan.stages[model.ref]
            _prefetch(stage, ctx.tensor(stage, ref.name), ctx)
            continue
        if is_pickle(ref.file) or ref.end == ref.begin:
            continue
        path = input_path(plan, ref)
        ctx.reader.prefetch(path, ref.begin, ref.end)
        if ctx.uploader is not None:
            read = functools.partial(ctx.reader.read, path, "U8", (ref.end - ref.begin,), ref.begin, ref.end)
            ctx.uploader.prefetch(stage_key(plan, ref), read)


class _RankOutput:
    """What this rank is writing: the partial output file open now, the tensor whose bytes
    are being written and hashed on the I/O thread, and the journal that records each
    tensor once its bytes are synced."""

    def __init__(self, plan: Plan, out_dir: str, rank: int, timed, direct: bool = True):
        self.plan, self.out_dir, self.timed, self.direct = plan, out_dir, timed, direct
        self.journal = Journal(out_dir, rank)
        self.file_of = {name: f for f in plan.files for name in f.tensors}
        self.file: OutputFile | None = None
        self.partial: PartialFile | None = None
        self.offsets: dict[str, int] = {}
        self.writing: collections.deque[tuple[OutputTensor, Future, int, bool]] = collections.deque()
        """The tensors being written, oldest first: each with the future of its sha256, its unit
        of work's number, and whether its bytes are a mapped input's (a passthrough copy)."""
        self.syncing: Future | None = None
        """The sync of written tensors and their journal lines in flight on the sync thread."""

    def open_file_of(self, t: OutputTensor) -> None:
        """Make the file that holds ``t`` the open one (the one before is committed, and
        closed once synced)."""
        file = self.file_of[t.name]
        if self.file is file:
            return
        if self.partial is not None:
            self.commit(close=True)
        header, offsets = file_layout(self.plan, file)
        self.partial = PartialFile(os.path.join(self.out_dir, file.name), header, file.nbytes, direct=self.direct)
        self.file, self.offsets = file, offsets

    def write(self, t: OutputTensor, value, ready: Callable[[], None] | None, drop: Callable[[int, int], None] | None = None) -> Future:
        """Start writing ``t``'s bytes at its offset; the future of their sha256."""
        return self.partial.write_at(self.offsets[t.name], value, ready=ready, drop=drop)

    def write_stream(self, t: OutputTensor, pieces) -> Future:
        """Write ``t``'s bytes as they are merged, piece by piece (``tensor_merge.Pieces``);
        the future of their sha256."""
        return self.partial.write_stream(self.offsets[t.name], pieces)

    def started(self, t: OutputTensor, digest: Future, unit: int, mapped: bool) -> None:
        """``t``'s write (of unit ``unit``; ``mapped``: its bytes are a mapped input's) is in flight."""
        self.writing.append((t, digest, unit, mapped))

    def make_room(self, nbytes: int) -> None:
        """Before a tensor of ``nbytes`` merges: wait for the oldest writes, all but the newest
        if need be, until those in flight and it hold at most WRITE_AHEAD bytes, or no more than
        it and the newest."""
        held = sum(w[0].nbytes for w in self.writing)
        while len(self.writing) > 1 and held + nbytes > max(WRITE_AHEAD, nbytes + self.writing[-1][0].nbytes):
            held -= self.writing[0][0].nbytes
            self._settle_oldest()

    def settle_copies(self, before: int) -> None:
        """Wait for the writes (and those before them) of units before ``before`` whose bytes
        are a mapped input's: only then may those units' input pages go."""
        last = max((k for k, w in enumerate(self.writing) if w[3] and w[2] < before), default=-1)
        for _ in range(last + 1):
            self._settle_oldest()

    def settle(self) -> None:
        """Wait for every tensor being written and journal them (pending)."""
        while self.writing:
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        t, digest, _, _ = self.writing.popleft()
        self.journal.add(t.name, self.file_of[t.name].name, digest.result(), t.nbytes)

    def commit(self, close: bool = False, wait: bool = False) -> None:
        """Sync the open file, then append what it holds to the journal (closing the file
        when ``close``). The sync runs on the sync thread while the merge goes on, unless
        ``wait``; one at a time per output, and a failed one raises here, at the next."""
        with self.timed("sync"):
            self.settle()
            self.wait_synced()
            lines, flush, partial = self.journal.take(), self.partial.flush_job() if self.partial else None, self.partial
            if close:
                self.partial = None

            def job() -> None:
                if flush is not None:
                    flush()
                self.journal.append(lines)
                if close:
                    partial.close()

            self.syncing = _SYNC.submit(job)
            if wait:
                self.wait_synced()

    def wait_synced(self) -> None:
        """Wait for the sync in flight, if any (its error, if any, raises here)."""
        syncing, self.syncing = self.syncing, None
        if syncing is not None:
            syncing.result()
