"""Write one safetensors file as its tensors are produced, and publish it atomically.

The header is computed from the plan and written first; tensor data is appended in
header order; the file is written as ``NAME.partial``, fsynced, and renamed to ``NAME``
only when complete. A file with its final name is therefore always whole.
"""

from __future__ import annotations

import ctypes
import hashlib
import os

import torch

from distmerge.io.header import DTYPE_NAMES, build_header

PARTIAL = ".partial"


class ShardWriter:
    """Streams the tensors of one output file, in the order given, to ``path``."""

    def __init__(self, path: str, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self.tmp = path + PARTIAL
        self._expected = list(tensors)
        self._next = 0
        header, _ = build_header(tensors, metadata)
        self._hash = hashlib.sha256()
        self._file = open(self.tmp, "wb")
        self._write(header)

    def _write(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; it must be the next one the header announces, with its dtype and shape."""
        want_name, want_dtype, want_shape = self._expected[self._next]
        got_dtype = DTYPE_NAMES[tensor.dtype]
        if (name, got_dtype, tuple(tensor.shape)) != (want_name, want_dtype, tuple(want_shape)):
            raise RuntimeError(
                f"{self.path}: expected {want_name} {want_dtype}{list(want_shape)}, "
                f"got {name} {got_dtype}{list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous()
        self._write(raw_bytes(data))
        self._next += 1

    def finish(self) -> str:
        """Flush, fsync and rename into place. Returns the file's sha256."""
        if self._next != len(self._expected):
            missing = [n for n, _, _ in self._expected[self._next :]]
            raise RuntimeError(f"{self.path}: {len(missing)} tensors never written, first {missing[0]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Close and delete the partial file (after an error)."""
        self._file.close()
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes (no numpy needed, any dtype)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


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
