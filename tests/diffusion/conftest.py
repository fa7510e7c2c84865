"""The diffusion tests run many tiny tensor ops: one intra-op thread avoids spin-wait stalls on busy CPUs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
