"""The safetensors header: parse and check it without touching tensor data, and build one.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import errno
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

from distmerge.errors import MergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""safetensors refuses larger headers; so do we (a corrupt length would otherwise allocate GBs)."""


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for binary reading, only if it is a regular file (symlinks followed).

    A FIFO, socket or device named like a model file would block ``open`` forever or read
    without end; it is opened without blocking, checked with fstat (so the check and the
    read see the same file) and refused with OSError(EINVAL) naming what it is.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise OSError(22, f"it is {kind}; distmerge reads only regular files", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), at most ``limit``.

    For the small files distmerge reads whole (recipes, configs, tokenizer files): a larger
    file at such a name is the wrong file (a checkpoint, a log), refused with OSError(EFBIG)
    before it is read into memory. ``what`` names the kind of file in that error.
    """
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit // 2**20} MiB, too large for {what}; is this the right file?", path)
    return data


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    dtype: str
    """safetensors dtype name, e.g. "BF16"."""
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the first byte of data in the file."""
    end: int
    """Absolute byte offset one past the last byte."""

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Read and check the header of ``path``: every tensor's dtype, shape and byte range.

    Raises MergeError naming the file and the problem for truncated files, bad lengths,
    bad JSON, unknown dtypes, sizes that don't match shapes, and overlapping or
    out-of-bounds data.
    """
    path = os.fspath(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MergeError(f"{path}: not a safetensors file (only {size} bytes long)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise MergeError(
                    f"{path}: corrupt safetensors header: it claims {n} header bytes but the file "
                    f"has {size} bytes; the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise MergeError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except RecursionError:
        raise MergeError(f"{path}: not a safetensors file: its header JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers of too many digits
        raise MergeError(f"{path}: corrupt safetensors header: invalid JSON ({_one_line(e)})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise MergeError(f"{path}: corrupt safetensors header: __metadata__ is not an object")
    start = 8 + n
    entries = {name: _entry(path, name, info, start) for name, info in header.items()}
    _check_layout(path, entries, size)
    return entries, metadata


def _one_line(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters (values from a hostile header can be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an integer of over 4300 digits
        return "a number too large to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entry(path: str, name: str, info: object, start: int) -> TensorEntry:
    def bad(why: str) -> MergeError:
        return MergeError(f"{path}: corrupt safetensors header: tensor {name!r} {why}")

    if not isinstance(info, dict):
        raise bad("has no dtype/shape/data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"has unsupported dtype {_short(dtype)} (known: {', '.join(DTYPES)})")
    # Sizes are 64-bit in safetensors; the bound also keeps every number printable in a message.
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**64 for d in shape):
        raise bad(f"has an invalid shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o < 2**64 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"has invalid data_offsets {_short(offsets)}")
    entry = TensorEntry(dtype, tuple(shape), start + offsets[0], start + offsets[1])
    if entry.nbytes != entry.numel * itemsize(dtype):
        raise bad(f"has {entry.nbytes} bytes of data but shape {shape} of {dtype} needs {entry.numel * itemsize(dtype)}")
    return entry


def _check_layout(path: str, entries: dict[str, TensorEntry], size: int) -> None:
    last_end, last_name = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.end > size:
            raise MergeError(
                f"{path}: truncated: tensor {name!r} ends at byte {e.end} but the file has {size} bytes; "
                "re-download or re-copy this shard"
            )
        if e.begin < last_end:
            raise MergeError(f"{path}: corrupt safetensors header: tensors {last_name!r} and {name!r} overlap")
        last_end, last_name = max(last_end, e.end), name


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included) for tensors written in the given order.

    ``tensors`` is [(name, dtype, shape)]. Returns (header, data offsets relative to the
    data start, one more than tensors). The JSON is padded with spaces to a multiple of 8
    bytes, as safetensors does, so data stays aligned.
    """
    doc: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offsets = [0]
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * itemsize(dtype)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offsets[-1], offsets[-1] + nbytes]}
        offsets.append(offsets[-1] + nbytes)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
