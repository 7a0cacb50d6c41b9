"""Read tensors from safetensors files: memory-mapped (default), or with pread into buffers.

mmap touches only the bytes asked for and copies nothing; ``pread`` reads each tensor's
byte range into a buffer of its own (pinned memory when the math runs on CUDA), for network
file systems where mapping files is slow or unsafe.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import warnings
from typing import Callable

import torch

from distmerge.io.header import DTYPES
from distmerge.io.zero import ZeroCheckpoint

_madvise = ctypes.CDLL(None, use_errno=True).madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

FAULT_BLOCK = 2 << 20
"""A read fault in a file mapping maps more than the page touched: the page-cache pages around
it (Linux's fault-around) and whole large folios, so touching a tensor maps pages of its
neighbours in the file too (measured here: 256 KB mapped for 40 KB read). It never maps past
the aligned 2 MiB block of addresses that one page table covers, which bounds it (``release``)."""


class TensorReader:
    """Opens each file once and hands out tensors of byte ranges.

    With ``io="mmap"``, tensors are zero-copy views of the file's mapping: read-only, valid
    while the reader lives; the pages they cover are read when first touched and belong to
    the page cache, not to the process. With ``io="pread"``, each tensor is a fresh buffer
    (``pin`` makes it pinned host memory, for fast copies to a GPU).
    """

    def __init__(self, io: str = "mmap", pin: bool = False):
        if io not in ("mmap", "pread"):
            raise ValueError(f"io must be mmap or pread, not {io!r}")
        self.io, self.pin = io, pin
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._pickles: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._mapped: list[tuple[int, int, int, int]] = []
        """Per tensor read from a mapping, in order: its addresses [lo, hi) (what ``drop`` may
        unmap) and its mapping's [first, last) (what ``release`` may)."""

    def _map(self, path: str) -> mmap.mmap:
        with self._lock:  # the CUDA upload thread reads too (distmerge.io.staging)
            m = self._maps.get(path)
            if m is None:
                with open(path, "rb") as f:
                    m = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return m

    def _fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def prefetch(self, path: str, begin: int, end: int) -> None:
        """Start reading a byte range in the background (the kernel's readahead), so that
        the next tensor's inputs arrive while the current one is merged."""
        if end <= begin:
            return
        if self.io == "pread":
            os.posix_fadvise(self._fd(path), begin, end - begin, os.POSIX_FADV_WILLNEED)
            return
        start = begin - begin % mmap.PAGESIZE
        self._map(path).madvise(mmap.MADV_WILLNEED, start, end - start)

    def read(self, path: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> torch.Tensor:
        if end == begin:
            return torch.empty(shape, dtype=DTYPES[dtype])
        if self.io == "pread":
            return self._pread(path, begin, end).view(DTYPES[dtype]).view(shape)
        m = self._map(path)
        with warnings.catch_warnings():
            # The mapping is read-only and so is the tensor: we never write to inputs.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(m, dtype=torch.uint8, count=end - begin, offset=begin)
        lo = flat.data_ptr()
        self._mapped.append((lo, lo + end - begin, lo - begin, lo - begin + len(m)))
        return flat.view(DTYPES[dtype]).view(shape)

    def _pread(self, path: str, begin: int, end: int) -> torch.Tensor:
        buf = torch.empty(end - begin, dtype=torch.uint8, pin_memory=self.pin)
        view = memoryview((ctypes.c_char * (end - begin)).from_address(buf.data_ptr())).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._fd(path), [view[done:]], begin + done)
            if n == 0:
                raise OSError(f"{path}: file ended at byte {begin + done}, expected data up to {end} (truncated?)")
            done += n
        return buf

    def read_pickled(self, path: str, name: str) -> torch.Tensor:
        """A tensor of a pickle checkpoint (``--allow-pickle``), by name: of a ``.bin``/``.pt``
        file, or of a DeepSpeed ZeRO checkpoint when ``path`` is its tag directory."""
        from distmerge.sources import is_zero, load_pickled

        if path not in self._pickles:
            self._pickles[path] = ZeroCheckpoint(path) if is_zero(path) else load_pickled(path)
        source = self._pickles[path]
        return source.read(name) if isinstance(source, ZeroCheckpoint) else source[name]

    def drop(self, view: torch.Tensor) -> None:
        """Unmap the pages under ``view`` from this process now, if ``view`` lies in a file
        mapping handed out by ``read`` (anything else is left alone: on ordinary memory
        MADV_DONTNEED would zero pages). Chunked merges call it after each chunk, so that
        a large tensor's inputs never all become resident at once."""
        drop = self.dropper(view)
        if drop is not None:
            drop(0, view.numel() * view.element_size())

    def dropper(self, view: torch.Tensor) -> Callable[[int, int], None] | None:
        """For ``view`` in a file mapping handed out by ``read``: a function that unmaps the
        pages under its bytes [begin, end) from this process (they stay in the page cache,
        and a later touch maps them again). None for anything else, on which MADV_DONTNEED
        would zero pages. The writer drops a passthrough copy's pages behind itself with it."""
        start = view.data_ptr()
        end = start + view.numel() * view.element_size()
        if not any(lo <= start and end <= hi for lo, hi, _, _ in self._mapped):
            return None

        def drop(begin: int, stop: int) -> None:
            lo = start + begin
            lo -= lo % mmap.PAGESIZE
            _madvise(ctypes.c_void_p(lo), ctypes.c_size_t(start + stop - lo), mmap.MADV_DONTNEED)

        return drop

    def mark(self) -> int:
        """A position in the reads so far, for ``release(upto=...)``."""
        return len(self._mapped)

    def release(self, upto: int | None = None) -> None:
        """Unmap the pages of the tensors read (before position ``upto``, or all) from this
        process; they stay in the page cache. Without this, a long run's resident memory
        would grow with the model, since touched file pages count as the process's own
        while they stay mapped. Call it once those tensors are no longer used.

        Each tensor's range is widened to whole ``FAULT_BLOCK`` blocks (within its mapping):
        touching it mapped its neighbours' pages in those blocks, and a neighbour released
        before would otherwise keep them mapped to the end of the run (on 5 GB checkpoints of
        54 layers, breadcrumbs' mapped input pages grew from 128 to 150 MB over the run).
        A neighbour not yet released loses nothing but those pages' mapping."""
        upto = len(self._mapped) if upto is None else upto
        for lo, hi, first, last in self._mapped[:upto]:
            start = max(first, lo - lo % FAULT_BLOCK)
            stop = min(last, hi + -hi % FAULT_BLOCK)
            _madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), mmap.MADV_DONTNEED)
        del self._mapped[:upto]

    def close(self) -> None:
        """Forget the mappings (they are unmapped once no tensor refers to them)."""
        self._mapped.clear()
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickles.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
