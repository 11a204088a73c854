"""Fixtures shared by the learning core's tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tests that run thousands of tiny tensor ops (the drift tests' permutations) use one
    torch thread: on the shared 2-core machine two threads contend and run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
