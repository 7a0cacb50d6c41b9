"""torch's intra-op threads during a merge (distmerge.threads): set inside, restored after."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from distmerge import threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_sets_one_thread_and_restores_the_count(two_threads):
    with threads.one():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_every_inside_one_uses_the_threads_the_process_was_given_then_one_again(two_threads):
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "3"}):
        with threads.one():
            with threads.every():
                assert torch.get_num_threads() == 3
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_the_count_is_restored_when_the_step_raises(two_threads):
    with pytest.raises(ZeroDivisionError):
        with threads.one():
            1 / 0
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value,want", [("1", 1), ("4", 4), ("0", 1), ("many", None)])
def test_available_reads_omp_num_threads_as_torchrun_sets_it(value, want):
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": value}):
        cpus = len(os.sched_getaffinity(0))
        assert threads.available() == (want if want is not None else cpus)
