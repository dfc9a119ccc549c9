"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each test on one torch thread: the tensors are tiny, and on a busy 2-core machine
    OpenMP's spinning threads made them 10-50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
