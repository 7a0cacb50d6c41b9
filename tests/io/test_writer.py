"""Output files written at tensor offsets: around the page cache where the file system allows,
through it where it does not, with the same bytes either way."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import distmerge.io.writer as writer
from distmerge.io.writer import DIRECT_ALIGN, DIRECT_MIN, PartialFile

HEADER = b"\x07" * 1001  # ends mid-block, as a safetensors header does


def layout(sizes: list[int]) -> list[tuple[int, torch.Tensor]]:
    """Tensors of ``sizes`` bytes (distinct random bytes), laid end to end after HEADER."""
    g = torch.Generator().manual_seed(0)
    out, offset = [], len(HEADER)
    for n in sizes:
        out.append((offset, torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)))
        offset += n
    return out


def expected(tensors: list[tuple[int, torch.Tensor]]) -> bytes:
    return HEADER + b"".join(bytes(t.numpy()) for _, t in tensors)


def write(path, tensors, direct=True, files=1):
    """Write ``tensors`` into ``path`` through ``files`` PartialFiles taking turns (as ranks
    writing neighbouring tensors of one file do), and return the ``.partial``'s bytes."""
    size = len(expected(tensors))
    parts = [PartialFile(str(path), HEADER, size, direct=direct) for _ in range(files)]
    digests = [parts[k % files].write_at(offset, t) for k, (offset, t) in enumerate(tensors)]
    for p in parts:
        p.flush_job()()
    for p in parts:
        p.close()
    assert [d.result() for d in digests] == [writer._sha256(writer.raw_bytes(t)) for _, t in tensors]
    return (path.parent / (path.name + ".partial")).read_bytes(), parts


SIZES = [DIRECT_MIN + 4097, 3 * DIRECT_ALIGN + 5, DIRECT_MIN * 2 + 1, 17, DIRECT_MIN + DIRECT_ALIGN]


@pytest.fixture
def direct_calls(monkeypatch):
    calls = []
    real = writer._pwrite_direct

    def spy(fd, address, nbytes, offset):
        calls.append((offset, nbytes))
        return real(fd, address, nbytes, offset)

    monkeypatch.setattr(writer, "_pwrite_direct", spy)
    return calls


def needs_direct_io(tmp_path):
    fd = writer._open_direct(str(tmp_path / "probe"))  # O_DIRECT without O_CREAT: make it first
    if fd is None:
        (tmp_path / "probe").touch()
        fd = writer._open_direct(str(tmp_path / "probe"))
    if fd is None:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT, so the direct path cannot run here")
    os.close(fd)


@pytest.mark.parametrize("files", [1, 2])
def test_aligned_middles_go_direct_and_the_file_holds_every_byte(tmp_path, direct_calls, files):
    needs_direct_io(tmp_path)
    tensors = layout(SIZES)
    data, parts = write(tmp_path / "f", tensors, files=files)
    assert data == expected(tensors)
    up, down = (lambda n: -(-n // DIRECT_ALIGN) * DIRECT_ALIGN), (lambda n: n // DIRECT_ALIGN * DIRECT_ALIGN)
    big = [(o, t.numel()) for o, t in tensors if down(o + t.numel()) - up(o) >= DIRECT_MIN]
    assert len(direct_calls) == len(big) == 3  # the 17-byte and 12 KiB tensors go through the page cache
    for (offset, nbytes), (o, n) in zip(direct_calls, big):
        assert offset % DIRECT_ALIGN == 0 and nbytes % DIRECT_ALIGN == 0
        assert o <= offset < o + DIRECT_ALIGN and o + n - DIRECT_ALIGN < offset + nbytes <= o + n


def test_a_direct_write_through_many_staging_chunks_holds_every_byte(tmp_path, monkeypatch):
    """A tensor's aligned middle larger than the staging buffer goes to disk chunk by chunk
    through it: every chunk lands at its offset (several chunks, a short last one)."""
    needs_direct_io(tmp_path)
    monkeypatch.setattr(writer, "DIRECT_CHUNK", 3 * DIRECT_ALIGN)
    monkeypatch.setattr(writer, "_staging", writer.threading.local())  # buffers of that size
    tensors = layout([DIRECT_MIN + 4097, DIRECT_MIN + 7 * DIRECT_ALIGN + 3, DIRECT_MIN])
    data, _ = write(tmp_path / "f", tensors)
    assert data == expected(tensors)


def test_a_file_system_without_direct_io_gets_every_byte_through_the_page_cache(tmp_path, direct_calls, monkeypatch):
    monkeypatch.setattr(writer, "_open_direct", lambda path: None)
    tensors = layout(SIZES)
    data, _ = write(tmp_path / "f", tensors)
    assert data == expected(tensors)
    assert direct_calls == []


def test_direct_off_writes_the_same_bytes(tmp_path, direct_calls):
    tensors = layout(SIZES)
    data, _ = write(tmp_path / "f", tensors, direct=False)
    assert data == expected(tensors) and direct_calls == []


def test_a_direct_write_refused_midway_falls_back_for_the_rest_of_the_file(tmp_path, monkeypatch):
    needs_direct_io(tmp_path)
    real, refused = os.pwrite, []

    def picky(fd, data, offset):
        if fd in direct_fds:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    direct_fds: set[int] = set()
    real_open = writer._open_direct

    def tracking_open(path):
        fd = real_open(path)
        direct_fds.add(fd)
        return fd

    monkeypatch.setattr(writer, "_open_direct", tracking_open)
    monkeypatch.setattr(writer.os, "pwrite", picky)
    tensors = layout(SIZES)
    size = len(expected(tensors))
    part = PartialFile(str(tmp_path / "f"), HEADER, size)
    for offset, t in tensors:
        part.write_at(offset, t).result()
    assert len(refused) == 1  # the first refusal turns direct writes off for this file
    assert part.direct_fd is None
    part.flush_job()()
    part.close()
    assert (tmp_path / "f.partial").read_bytes() == expected(tensors)


def test_a_disk_error_in_a_direct_write_reaches_the_caller(tmp_path, monkeypatch):
    needs_direct_io(tmp_path)
    real = os.pwrite

    def full(fd, data, offset):
        if len(data) >= DIRECT_ALIGN and offset % DIRECT_ALIGN == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full)
    tensors = layout([DIRECT_MIN + 4097])
    part = PartialFile(str(tmp_path / "f"), HEADER, len(expected(tensors)))
    with pytest.raises(OSError, match="No space left"):
        part.write_at(*tensors[0]).result()
    part.close()


def test_a_run_writes_the_same_bytes_direct_and_buffered(llama_family, tmp_path, monkeypatch, direct_calls):
    """``distmerge run`` writes around the page cache by default and through it with
    ``--buffered-writes``: the same files, each verified byte for byte."""
    import filecmp

    import yaml

    from distmerge.cli import main
    from tests.helpers import run_main

    needs_direct_io(tmp_path)
    monkeypatch.setattr(writer, "DIRECT_MIN", DIRECT_ALIGN)  # the tiny model's tensors are small
    f = llama_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "float32",
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 0.6}}, {"model": str(f["ft2"]), "parameters": {"weight": 0.4}}],
    }))  # fmt: skip
    main(["run", str(recipe), str(tmp_path / "direct"), "--quiet"])
    assert direct_calls
    calls = len(direct_calls)
    main(["run", str(recipe), str(tmp_path / "buffered"), "--quiet", "--buffered-writes"])
    assert len(direct_calls) == calls
    names = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert names and names == sorted(p.name for p in (tmp_path / "buffered").glob("*.safetensors"))
    for name in names:
        assert filecmp.cmp(tmp_path / "direct" / name, tmp_path / "buffered" / name, shallow=False), name
    assert run_main("verify", tmp_path / "direct", "--full").returncode == 0


def test_written_with_drop_each_piece_is_on_disk_before_it_is_dropped(tmp_path, monkeypatch):
    """A passthrough copy is written straight from its mapped input, dropped behind the writer:
    the same bytes and sha256, and every byte handed to ``drop`` once, in order, after it is in
    the file."""
    monkeypatch.setattr(writer, "PIECE", 64 * DIRECT_ALIGN)  # several pieces per tensor
    tensors = layout(SIZES)
    size = len(expected(tensors))
    part = PartialFile(str(tmp_path / "f"), HEADER, size)
    dropped = []

    def drop_of(offset, t):
        def drop(begin, end):
            with open(part.tmp, "rb") as f:
                f.seek(offset + begin)
                assert f.read(end - begin) == bytes(t[begin:end].numpy()), "dropped before it was written"
            dropped.append((offset, begin, end))

        return drop

    digests = [part.write_at(offset, t, drop=drop_of(offset, t)) for offset, t in tensors]
    assert [d.result() for d in digests] == [writer._sha256(writer.raw_bytes(t)) for _, t in tensors]
    part.flush_job()()
    part.close()
    assert (tmp_path / "f.partial").read_bytes() == expected(tensors)
    for offset, t in tensors:
        ranges = [(b, e) for o, b, e in dropped if o == offset]
        assert ranges[0][0] == 0 and ranges[-1][1] == t.numel()
        assert all(e == b2 for (_, e), (b2, _) in zip(ranges, ranges[1:]))  # contiguous, in order
        assert all((offset + e) % writer.PIECE == 0 for _, e in ranges[:-1])  # cut at file offsets
    assert len(dropped) > len(tensors)


def test_only_a_file_mapping_is_offered_for_dropping(tmp_path):
    """``TensorReader.dropper``: None for ordinary memory (MADV_DONTNEED would zero it); for
    a mapped input, dropping its pages leaves its values as they were (read again from the file)."""
    from distmerge.io.reader import TensorReader

    values = torch.arange(1 << 20, dtype=torch.float32)
    (tmp_path / "x.bin").write_bytes(bytes(values.numpy()))
    with TensorReader("mmap") as reader:
        mapped = reader.read(str(tmp_path / "x.bin"), "F32", (1 << 20,), 0, 4 << 20)
        assert torch.equal(mapped, values)
        reader.dropper(mapped)(0, 4 << 20)
        assert torch.equal(mapped, values)
        copy = mapped.clone()
        assert reader.dropper(copy) is None
    with TensorReader("pread") as reader:
        assert reader.dropper(reader.read(str(tmp_path / "x.bin"), "F32", (1 << 20,), 0, 4 << 20)) is None


def test_a_tensor_written_as_a_stream_of_pieces_is_the_same_bytes_and_sha256(tmp_path, monkeypatch):
    """``write_stream``: pieces of any sizes, gathered into segments (several per tensor here),
    give the file and the digest that ``write_at`` of the whole tensor gives."""
    monkeypatch.setattr(writer, "SEGMENT", 16 * DIRECT_ALIGN)
    tensors = layout(SIZES)
    size = len(expected(tensors))
    part = PartialFile(str(tmp_path / "f"), HEADER, size)
    digests = []
    for k, (offset, t) in enumerate(tensors):
        flat = t.view(-1)
        cuts = sorted({0, flat.numel(), *range(0, flat.numel(), 1000 + 777 * k)})
        digests.append(part.write_stream(offset, (flat[a:b] for a, b in zip(cuts, cuts[1:]))))
    assert [d.result() for d in digests] == [writer._sha256(writer.raw_bytes(t)) for _, t in tensors]
    part.flush_job()()
    part.close()
    assert (tmp_path / "f.partial").read_bytes() == expected(tensors)


def test_streamed_segments_are_written_directly_from_where_they_are(tmp_path, monkeypatch):
    """A streamed tensor's segments sit at addresses aligned as their file offsets are
    (``_segment_for``), so their aligned middles go to disk from the segment itself, not
    copied through the staging buffer, at every offset a tensor can start at: same bytes and
    digests as ``write_at``."""
    monkeypatch.setattr(writer, "SEGMENT", 16 * DIRECT_ALIGN)
    monkeypatch.setattr(writer, "DIRECT_MIN", 2 * DIRECT_ALIGN)
    addresses = []
    spy = writer._pwrite_direct
    monkeypatch.setattr(writer, "_pwrite_direct", lambda fd, address, n, at: addresses.append(address) or spy(fd, address, n, at))
    sizes = [16 * DIRECT_ALIGN * 3 + 5, 7 * DIRECT_ALIGN + 1, 100003, 16 * DIRECT_ALIGN]
    tensors = layout(sizes)
    part = PartialFile(str(tmp_path / "f"), HEADER, len(expected(tensors)))
    digests = [part.write_stream(offset, iter([t.view(-1)[:777], t.view(-1)[777:]])) for offset, t in tensors]
    assert [d.result() for d in digests] == [writer._sha256(writer.raw_bytes(t)) for _, t in tensors]
    part.flush_job()()
    part.close()
    assert (tmp_path / "f.partial").read_bytes() == expected(tensors)
    assert len(addresses) == 7 and all(a % DIRECT_ALIGN == 0 for a in addresses)  # 3 + 1 + 2 + 1 segments go direct


def test_a_disk_error_while_streaming_reaches_the_caller(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "SEGMENT", 16 * DIRECT_ALIGN)
    (offset, t), *_ = layout(SIZES)
    part = PartialFile(str(tmp_path / "f"), HEADER, len(expected(layout(SIZES))))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_pwrite_all", full)
    monkeypatch.setattr(writer, "_pwrite_direct", full)
    with pytest.raises(OSError, match="No space"):
        part.write_stream(offset, iter([t.view(-1)])).result()
    part.close()


@pytest.mark.parametrize(
    "method, params",
    [
        ("ties", ({"weight": 0.5, "density": 0.4}, {"weight": 0.5, "density": 0.6})),  # a chunked form: statistics first
        ("task_arithmetic", ({"weight": 0.7}, {"weight": -0.3})),  # element-wise: range by range
        ("linear", ({"weight": 0.7}, {"weight": 0.3})),
    ],
)
def test_a_chunked_merge_is_written_as_it_is_merged_with_the_bytes_of_a_whole_one(llama_family, tmp_path, monkeypatch, method, params):
    """A large tensor alone in its unit of work, merged by a method's chunked form or
    element-wise, goes to the file piece by piece (``tensor_merge.Pieces``,
    ``PartialFile.write_stream``: its output never allocated whole); the files, and the
    journal's digests the manifest is checked with, are those of the merge with every tensor
    whole."""
    import filecmp

    from distmerge import tensor_merge
    from tests.helpers import run_main
    from tests.test_merge_vs_mergekit import distmerge, models

    f = llama_family
    recipe = {"merge_method": method, "models": models(f, ("ft1", params[0]), ("ft2", params[1])), "dtype": "bfloat16"}
    if method != "linear":
        recipe["base_model"] = str(f["base"])
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 1 << 40)  # every tensor whole
    whole = distmerge(recipe, tmp_path / "whole")
    streamed, pieces = [], []
    real = PartialFile.write_stream

    def spy(self, offset, parts):
        streamed.append(offset)
        return real(self, offset, (pieces.append(p.numel()) or p for p in parts))

    monkeypatch.setattr(PartialFile, "write_stream", spy)
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 999)
    monkeypatch.setattr(tensor_merge, "DROP_ELEMENTS", 2500)  # an element-wise loop's range: several a tensor
    chunked = distmerge(recipe, tmp_path / "chunked")
    assert len(streamed) > 10 and len(pieces) > 2 * len(streamed) and max(pieces) <= 2500
    shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
    assert shards and all(filecmp.cmp(whole / n, chunked / n, shallow=False) for n in shards)
    verified = run_main("verify", chunked, "--full")
    assert verified.returncode == 0 and "every byte" in verified.stdout, verified
