"""Write output files in place, possibly from several ranks, and publish them atomically.

An output file's header, and so every tensor's byte offset, is known from the plan. A
rank that owns some of a file's tensors opens ``NAME.partial`` (creating it, writing the
header and sizing it if needed: every rank would write the same bytes) and writes its
tensors at their offsets. When every tensor of the file is written and synced, rank 0
renames ``NAME.partial`` to ``NAME``. A file with its final name is therefore always whole.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

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

    def __init__(self, path: str, header: bytes, size: int):
        self.path = path
        self.tmp = path + PARTIAL
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT, 0o644)
        self._pending: list[Future] = []
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        _pwrite_all(self.fd, memoryview(header), 0)

    def write_at(self, offset: int, tensor: torch.Tensor, ready: Callable[[], None] | None = None) -> Future:
        """Start writing ``tensor``'s bytes at ``offset`` on the I/O thread. Returns a future
        of their sha256; its ``result()`` also raises the write's OSError, if any. ``ready``,
        if given, is called on the I/O thread first (to wait for an asynchronous copy into
        ``tensor``: see ``distmerge.io.staging.Downloader``)."""
        tensor = tensor.detach().to("cpu").contiguous()

        def job() -> str:
            if ready is not None:
                ready()
            data = raw_bytes(tensor)  # the closure holds the tensor until the job is done
            digest = _HASH.submit(_sha256, data)
            try:
                _pwrite_all(self.fd, data, offset)
                start_writeback(self.fd, offset, len(data))
            finally:
                hexdigest = digest.result()  # never leave the hash reading a tensor we let go of
            return hexdigest

        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(_IO.submit(job))
        return self._pending[-1]

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
        os.close(self.fd)


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()  # hashlib releases the GIL for large buffers


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # One pwrite moves at most ~2 GiB on Linux; embeddings of large vocabularies are bigger.
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


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
