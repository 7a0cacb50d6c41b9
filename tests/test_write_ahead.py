"""How far the merge runs ahead of the writes in flight (``run._RankOutput``): bounded in bytes,
never past a copy of mapped input pages that are about to be released."""

from __future__ import annotations

import collections
import types

from distmerge import run

MB = 1 << 20


def output(*writes: tuple[str, int, int, bool]) -> tuple[run._RankOutput, list[str]]:
    """A rank output with these writes in flight, (name, MB, unit, mapped) each, oldest first,
    whose settling is recorded instead of waited for and journaled."""
    out = run._RankOutput.__new__(run._RankOutput)
    out.writing = collections.deque()
    for name, size, unit, mapped in writes:
        out.started(types.SimpleNamespace(name=name, nbytes=size * MB), None, unit, mapped)
    settled: list[str] = []
    out._settle_oldest = lambda: settled.append(out.writing.popleft()[0].name)
    return out, settled


def test_small_tensors_merge_while_earlier_writes_are_in_flight():
    """An MLP matrix, a norm and two attention matrices (31 MB) and the next small tensor: no wait."""
    out, settled = output(("up", 22, 0, False), ("norm", 0, 1, False), ("k", 1, 2, False), ("o", 8, 3, False))
    out.make_room(1 * MB)
    assert settled == [] and len(out.writing) == 4


def test_the_oldest_writes_are_waited_for_beyond_the_budget():
    out, settled = output(("up", 20, 0, False), ("gate", 10, 1, False))
    out.make_room(5 * MB)  # 35 MB > WRITE_AHEAD (32): the oldest goes
    assert settled == ["up"] and [w[0].name for w in out.writing] == ["gate"]


def test_a_large_tensor_waits_for_all_but_the_newest_write():
    """The peak stays what one tensor ahead gave: the large tensor and the newest write."""
    out, settled = output(("a", 20, 0, False), ("b", 20, 1, False), ("c", 20, 2, False))
    out.make_room(131 * MB)
    assert settled == ["a", "b"] and [w[0].name for w in out.writing] == ["c"]
    out.make_room(500 * MB)  # the newest write always stays in flight
    assert settled == ["a", "b"]


def test_copies_of_mapped_inputs_are_written_before_their_units_pages_go():
    """A passthrough copy of unit 4 (and the writes before it) is done before unit 4's inputs
    are released at the end of unit 5; a later merged tensor stays in flight."""
    out, settled = output(("a", 1, 3, False), ("copy", 1, 4, True), ("b", 1, 5, False))
    out.settle_copies(before=4)
    assert settled == []
    out.settle_copies(before=5)
    assert settled == ["a", "copy"] and [w[0].name for w in out.writing] == ["b"]
    out.settle()
    assert settled == ["a", "copy", "b"] and not out.writing
