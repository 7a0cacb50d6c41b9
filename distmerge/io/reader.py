"""Read tensors from safetensors files, memory-mapped: only the bytes asked for are touched."""

from __future__ import annotations

import ctypes
import mmap
import warnings

import torch

from distmerge.io.header import DTYPES


_madvise = ctypes.CDLL(None, use_errno=True).madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class TensorReader:
    """Opens each file once and hands out zero-copy tensors backed by its mapping.

    A tensor from ``read`` is read-only and stays valid while the reader lives; the pages
    it covers are read from disk when they are first touched, and belong to the page cache
    (dropped under memory pressure), not to the process.
    """

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}
        self._pickles: dict[str, dict] = {}
        self._touched: list[tuple[mmap.mmap, int, int]] = []
        self._mapped: list[tuple[int, int]] = []
        """Address ranges of the tensors in ``_touched`` (what ``drop`` may unmap)."""

    def _map(self, path: str) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            with open(path, "rb") as f:
                m = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def prefetch(self, path: str, begin: int, end: int) -> None:
        """Start reading a byte range in the background (the kernel's readahead), so that
        the next tensor's inputs arrive while the current one is merged."""
        if end > begin:
            start = begin - begin % mmap.PAGESIZE
            self._map(path).madvise(mmap.MADV_WILLNEED, start, end - start)

    def read(self, path: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> torch.Tensor:
        m = self._map(path)
        if end == begin:
            return torch.empty(shape, dtype=DTYPES[dtype])
        with warnings.catch_warnings():
            # The mapping is read-only and so is the tensor: we never write to inputs.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(m, dtype=torch.uint8, count=end - begin, offset=begin)
        self._touched.append((m, begin, end))
        self._mapped.append((flat.data_ptr(), flat.data_ptr() + end - begin))
        return flat.view(DTYPES[dtype]).view(shape)

    def read_pickled(self, path: str, name: str) -> torch.Tensor:
        """A tensor of a pickle checkpoint (``--allow-pickle``), by name."""
        from distmerge.sources import load_pickled

        if path not in self._pickles:
            self._pickles[path] = load_pickled(path)
        return self._pickles[path][name]

    def drop(self, view: torch.Tensor) -> None:
        """Unmap the pages under ``view`` from this process now, if ``view`` lies in a file
        mapping handed out by ``read`` (anything else is left alone: on ordinary memory
        MADV_DONTNEED would zero pages). Chunked merges call it after each chunk, so that
        a large tensor's inputs never all become resident at once."""
        start = view.data_ptr()
        end = start + view.numel() * view.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self._mapped):
            return
        start -= start % mmap.PAGESIZE
        _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)

    def mark(self) -> int:
        """A position in the reads so far, for ``release(upto=...)``."""
        return len(self._touched)

    def release(self, upto: int | None = None) -> None:
        """Unmap the pages of the tensors read (before position ``upto``, or all) from this
        process; they stay in the page cache. Without this, a long run's resident memory
        would grow with the model, since touched file pages count as the process's own
        while they stay mapped. Call it once those tensors are no longer used."""
        upto = len(self._touched) if upto is None else upto
        for m, begin, end in self._touched[:upto]:
            start = begin - begin % mmap.PAGESIZE
            m.madvise(mmap.MADV_DONTNEED, start, end - start)
        del self._touched[:upto]
        del self._mapped[:upto]

    def close(self) -> None:
        """Forget the mappings (they are unmapped once no tensor refers to them)."""
        self._touched.clear()
        self._mapped.clear()
        self._maps.clear()
        self._pickles.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
