"""Shared fixtures. The tiny random-weight model set is built once per machine (cached, atomic) and reused."""

import pytest
import torch

from dpslm_stream import hub
from dpslm_stream.tiny import ensure_tiny_set


@pytest.fixture(scope="session")
def tiny_dir():
    return ensure_tiny_set()


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    return hub.ModelSet(str(tiny_dir))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: a second OpenMP thread only spins against other processes. Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; the setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
