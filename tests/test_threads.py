"""torch's intra-op threads during a merge (distmerge.threads): set inside, restored after."""

from __future__ import annotations

import pytest
import torch

from distmerge import threads


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_one_sets_one_thread_and_restores_the_count(three_threads):
    with threads.one():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3


def test_every_inside_one_uses_the_count_the_process_had_then_one_again(three_threads):
    with threads.one():
        with threads.every():
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
        with threads.one():  # nested (an SVD method inside a rank): still the process's count
            with threads.every():
                assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 3


def test_every_outside_one_keeps_the_count_as_it_is(three_threads):
    with threads.every():
        assert torch.get_num_threads() == 3


def test_the_count_is_restored_when_the_step_raises(three_threads):
    with pytest.raises(ZeroDivisionError):
        with threads.one():
            1 / 0
    assert torch.get_num_threads() == 3
    with threads.one():
        with threads.every():
            assert torch.get_num_threads() == 3
