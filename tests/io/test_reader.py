"""TensorReader's mapped reads: what stays resident in the process after ``release``."""

import sys

import pytest

from distmerge.io.reader import TensorReader

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def mapped_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_released_tensors_leave_no_page_of_the_file_mapped(tmp_path):
    """Tensors of 40 KB read out of order and released one unit at a time: touching one maps
    pages of its neighbours too (fault-around, large folios), so a neighbour released earlier
    would keep pages mapped to the end; afterwards none are."""
    size = 40 * 1024
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * (12 * size // 256))  # in the page cache: written just now
    with TensorReader("mmap") as reader:
        for k in (1, 3, 0, 2, 5, 4, 7, 6):  # each after a neighbour already released
            mark = reader.mark()
            x = reader.read(str(path), "U8", (size,), k * size, (k + 1) * size)
            assert int(x.sum()) == 127.5 * size  # every byte touched
            assert mapped_kb(path) >= size // 1024  # it was resident while in use
            reader.release(upto=mark + 1)
            del x
        assert mapped_kb(path) == 0
        kept = reader.read(str(path), "U8", (size,), 0, size)  # in use: a neighbour's release
        mark = reader.mark()  # unmaps its pages but leaves its values (read again from the file)
        reader.read(str(path), "U8", (size,), size, 2 * size).sum()
        reader.release(upto=mark + 1)
        assert bytes(kept.numpy()) == path.read_bytes()[:size]
