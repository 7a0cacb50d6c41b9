"""Write output files in place, possibly from several ranks, and publish them atomically.

An output file's header, and so every tensor's byte offset, is known from the plan. A
rank that owns some of a file's tensors opens ``NAME.partial`` (creating it, writing the
header and sizing it if needed: every rank would write the same bytes) and writes its
tensors at their offsets. When every tensor of the file is written and synced, rank 0
renames ``NAME.partial`` to ``NAME``. A file with its final name is therefore always whole.

Tensor bytes go to disk around the page cache (``O_DIRECT``) where the file system allows it:
the 4 KiB-aligned middle of each tensor's byte range, through an aligned buffer; the ragged
ends, which may share a 4 KiB block with a neighbour another rank writes, and the header go
through the page cache. Buffered writes cost the kernel a core: on this project's machines
2 GB written and fsynced took 2.1-5.6 s of system time buffered against 0.14-0.23 s direct
(3.6-6.5 s of wall time against 1.5-1.9 s), time taken from the merge on the same cores.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

import torch

PARTIAL = ".partial"
_IO = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distmerge-write")
"""Writes run on this thread while the next tensor is merged."""
_HASH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distmerge-hash")
"""The sha256 of a tensor's bytes runs here while the write thread writes them: hashing
(about 1.5 GB/s with SHA-NI) and writing each take a core, and one after the other on one
thread they made an I/O-bound merge (passthrough, linear) wait for both."""


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes (no numpy needed, any dtype)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class PartialFile:
    """``path + ".partial"``, sized and headed, open for writing tensors at their offsets."""

    def __init__(self, path: str, header: bytes, size: int, direct: bool = True):
        self.path = path
        self.tmp = path + PARTIAL
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT, 0o644)
        self._pending: list[Future] = []
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        _pwrite_all(self.fd, memoryview(header), 0)
        self.direct_fd = _open_direct(self.tmp) if direct else None
        """A second descriptor that writes around the page cache; None where the file system
        refuses ``O_DIRECT`` (tmpfs, some network file systems), or after a write it refused."""

    def write_at(
        self,
        offset: int,
        tensor: torch.Tensor,
        ready: Callable[[], None] | None = None,
        drop: Callable[[int, int], None] | None = None,
    ) -> Future:
        """Start writing ``tensor``'s bytes at ``offset`` on the I/O thread. Returns a future
        of their sha256; its ``result()`` also raises the write's OSError, if any. ``ready``,
        if given, is called on the I/O thread first (to wait for an asynchronous copy into
        ``tensor``: see ``distmerge.io.staging.Downloader``). ``drop``, if given, is called
        with each byte range [begin, end) of the tensor once it is written and hashed, in
        pieces of PIECE bytes: a tensor written straight from its memory-mapped input (a
        passthrough copy) then never becomes resident whole (``TensorReader.dropper``)."""
        tensor = tensor.detach().to("cpu").contiguous()

        def job() -> str:
            if ready is not None:
                ready()
            data = raw_bytes(tensor)  # the closure holds the tensor until the job is done
            if drop is not None:
                return self._write_in_pieces(data, tensor.data_ptr(), offset, drop)
            digest = _HASH.submit(_sha256, data)
            try:
                self._write(data, tensor.data_ptr(), offset)
            finally:
                hexdigest = digest.result()  # never leave the hash reading a tensor we let go of
            return hexdigest

        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(_IO.submit(job))
        return self._pending[-1]

    def write_stream(self, offset: int, pieces: Iterable[torch.Tensor]) -> Future:
        """Write a tensor whose bytes come as ``pieces`` (CPU tensors, in order, covering it)
        from ``offset``, as they come: gathered into segments of SEGMENT bytes, each written
        and hashed on the I/O and hash threads while the next is gathered, at most two in
        flight and three in all, reused (so the tensor is never in memory whole). Returns the
        future of the sha256 of all its bytes, like ``write_at``; a write's OSError raises
        here or from it."""
        sha = hashlib.sha256()
        in_flight: list[tuple[Future, torch.Tensor]] = []
        spare: list[torch.Tensor] = []  # segments whose jobs are done: at most three exist

        def take() -> torch.Tensor:
            return spare.pop() if spare else _segment_for(offset)

        def submit(segment: torch.Tensor, nbytes: int, at: int) -> None:
            data = raw_bytes(segment)[:nbytes]  # in_flight holds the segment until its job is done

            def job() -> str:
                hashed = _HASH.submit(sha.update, data)  # in order: one hash thread
                try:
                    self._write(data, segment.data_ptr(), at)
                finally:
                    hashed.result()
                return sha.hexdigest()  # of every segment so far: the last job's is the tensor's

            if len(in_flight) == 2:
                done, reused = in_flight.pop(0)
                done.result()
                spare.append(reused)
            in_flight.append((_IO.submit(job), segment))
            self._pending = [f for f in self._pending if not f.done()] + [in_flight[-1][0]]

        segment, filled, position = take(), 0, offset
        for piece in pieces:
            piece = piece.detach().contiguous()  # held while its bytes are copied
            data = raw_bytes(piece)
            while data:
                take_n = min(len(data), SEGMENT - filled)
                raw_bytes(segment)[filled : filled + take_n] = data[:take_n]
                filled, data = filled + take_n, data[take_n:]
                if filled == SEGMENT:
                    submit(segment, filled, position)
                    segment, filled, position = take(), 0, position + SEGMENT
        if filled or not in_flight:
            submit(segment, filled, position)
        return in_flight[-1][0]

    def _write_in_pieces(self, data: memoryview, address: int, offset: int, drop: Callable[[int, int], None]) -> str:
        """``_write`` and the sha256 of ``data`` piece by piece, each piece hashed while it is
        written and then handed to ``drop``. Pieces end at file offsets that are multiples of
        PIECE, so each piece but the first and last is written directly whole."""
        sha = hashlib.sha256()
        cuts = [0, *range(PIECE - offset % PIECE, len(data), PIECE), len(data)]  # the first cut past 0
        for begin, end in zip(cuts, cuts[1:]):
            hashed = _HASH.submit(sha.update, data[begin:end])  # in order: one hash thread
            try:
                self._write(data[begin:end], address + begin, offset + begin)
            finally:
                hashed.result()
            drop(begin, end)
        return sha.hexdigest()

    def _write(self, data: memoryview, address: int, offset: int) -> None:
        """Write ``data`` (at memory ``address``) at file ``offset``: its aligned middle
        directly when this file can, the rest through the page cache."""
        begin, end = _align_up(offset), _align_down(offset + len(data))
        if self.direct_fd is None or end - begin < DIRECT_MIN:
            _pwrite_all(self.fd, data, offset)
            start_writeback(self.fd, offset, len(data))
            return
        head, tail = begin - offset, end - offset
        _pwrite_all(self.fd, data[:head], offset)
        _pwrite_all(self.fd, data[tail:], end)
        try:
            _pwrite_direct(self.direct_fd, address + head, end - begin, begin)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            os.close(self.direct_fd)  # refused after all (an alignment this file system wants bigger)
            self.direct_fd = None
            _pwrite_all(self.fd, data[head:tail], begin)
        start_writeback(self.fd, offset, len(data))  # the ragged ends

    def flush_job(self) -> Callable[[], None]:
        """What makes this file's bytes written so far durable, for the sync thread to run:
        wait for the writes started so far, then fsync."""
        pending, fd = list(self._pending), self.fd

        def flush() -> None:
            for f in pending:
                f.result()
            os.fsync(fd)

        return flush

    def close(self) -> None:
        """Close, after any write still in flight (even after an error: the descriptor must
        not be reused while a write could still go to it)."""
        for f in self._pending:
            try:
                f.result()
            except Exception:
                pass
        if self.direct_fd is not None:
            os.close(self.direct_fd)
        os.close(self.fd)


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()  # hashlib releases the GIL for large buffers


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # One pwrite moves at most ~2 GiB on Linux; embeddings of large vocabularies are bigger.
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


DIRECT_ALIGN = 4096
"""What ``O_DIRECT`` needs file offsets, lengths and buffer addresses aligned to: a page,
a multiple of every disk's logical block size in use (512 or 4096 bytes)."""
DIRECT_MIN = 1 << 20
"""Tensors whose aligned middle is smaller than this go through the page cache whole."""
DIRECT_CHUNK = 8 << 20
"""The aligned buffer a direct write copies through, per writing thread."""
PIECE = 16 << 20
"""Bytes written and hashed before they are dropped, when the writer is asked to drop them."""
SEGMENT = 4 << 20
"""Bytes of a streamed tensor gathered per write (``write_stream``). Small enough that its
three segments do not show in a rank's memory (16 MiB ones, freed to glibc's heap after each
tensor, kept 50 MB more resident through a model_stock run), large enough that a write
costs far more than its job's overhead."""
_staging = threading.local()


def _open_direct(path: str) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:  # EINVAL: this file system has no direct I/O
        return None


def _align_up(n: int) -> int:
    return -(-n // DIRECT_ALIGN) * DIRECT_ALIGN


def _align_down(n: int) -> int:
    return n // DIRECT_ALIGN * DIRECT_ALIGN


def _segment_for(offset: int) -> torch.Tensor:
    """SEGMENT bytes whose address is ``offset`` modulo DIRECT_ALIGN: a segment written at
    ``offset`` plus any multiple of SEGMENT then has the aligned middle of its bytes at an
    aligned address, which ``_pwrite_direct`` writes from where it is, with no copy."""
    buf = torch.empty(SEGMENT + DIRECT_ALIGN, dtype=torch.uint8)
    skip = (offset - buf.data_ptr()) % DIRECT_ALIGN
    return buf[skip : skip + SEGMENT]


def _pwrite_direct(fd: int, address: int, nbytes: int, offset: int) -> None:
    """Write ``nbytes`` from memory ``address`` at file ``offset`` (both multiples of
    DIRECT_ALIGN) on an ``O_DIRECT`` descriptor: from ``address`` itself where it is aligned
    (a streamed tensor's segments, ``_segment_for``), else copied through a page-aligned
    buffer (a tensor's bytes are only 64-byte aligned). The copy is 2.5 GB of memory moved
    per 2.5 GB written, on a core the merge would use."""
    if address % DIRECT_ALIGN == 0:
        view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
        done = 0
        while done < nbytes:  # a short direct write ends on a block boundary
            done += os.pwrite(fd, view[done:], offset + done)
        return
    buf = getattr(_staging, "buf", None)
    if buf is None:
        buf = _staging.buf = mmap.mmap(-1, DIRECT_CHUNK)  # anonymous maps are page-aligned
        _staging.address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        _staging.view = memoryview(buf)
    done = 0
    while done < nbytes:
        n = min(DIRECT_CHUNK, nbytes - done)
        ctypes.memmove(_staging.address, address + done, n)  # releases the GIL
        written = 0
        while written < n:  # a short direct write ends on a block boundary
            written += os.pwrite(fd, _staging.view[written:n], offset + done + written)
        done += n


SYNC_FILE_RANGE_WRITE = 2


@functools.lru_cache(maxsize=None)
def _sync_file_range() -> Callable | None:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``nbytes`` at ``offset`` from the page cache to disk, without waiting
    (Linux's sync_file_range WRITE; nothing elsewhere). The kernel would otherwise leave a
    tensor's dirty pages in memory until the journal's fsync, which then waits for all of
    them at once instead of their writes overlapping the merge of the next tensors. The
    journal still waits for the fsync: durability is unchanged."""
    f = _sync_file_range()
    if f is not None and nbytes:
        f(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)  # advisory: an error here leaves it to fsync


def publish(path: str) -> None:
    """Rename a complete ``path.partial`` to ``path``, durably."""
    fd = os.open(path + PARTIAL, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(path + PARTIAL, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes | str) -> None:
    """Write a small file (JSON, card) so that it is either absent, old, or whole."""
    tmp = path + PARTIAL
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
