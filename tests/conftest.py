"""Shared fixtures. The tiny random-weight model set is built once per machine (cached, atomic) and reused.

DPSLM_TEST_DEVICE (default cpu) is the device that tests taking the `device` fixture run their models on, e.g.
`DPSLM_TEST_DEVICE=cuda make test` on a GPU machine. Tests marked `cpu_only` (oneDNN kernels, bitwise claims that
hold for CPU kernels) are skipped on any other device."""

import contextlib
import os

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


def _test_device() -> torch.device:
    name = os.environ.get("DPSLM_TEST_DEVICE", "cpu")
    return torch.device("meta" if name == "sim" else name)


@pytest.fixture(scope="session")
def device():
    """The device the tests run their models on (DPSLM_TEST_DEVICE, default cpu); skips when it is not there.

    DPSLM_TEST_DEVICE=sim runs them on the simulated accelerator of dpslm_stream/bench/_simdevice.py (a CPU-only
    check that device-aware tests keep their tensors on one device; the simulation stays on for the session and
    fails at the end if any operation mixed device and host tensors)."""
    if os.environ.get("DPSLM_TEST_DEVICE") == "sim":
        from dpslm_stream.bench._simdevice import SIM, SimulatedCuda

        with SimulatedCuda() as sim:
            yield SIM
        assert sim.counts["mixed"] == 0 and sim.counts["numpy"] == 0, sim.where
        return
    dev = _test_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"DPSLM_TEST_DEVICE={dev} but torch sees no CUDA device")
    if dev.type == "cuda":
        from dpslm_stream.device import exact_kernels

        exact_kernels()  # TF32 off, as every model worker sets up: the fp32 tolerances assume it
    yield dev


@pytest.fixture(scope="session")
def on_host(device):
    """``with on_host(): ...`` for CPU work amid device-aware tests: loading checkpoints (the loaders build skeletons
    on torch's meta device, which DPSLM_TEST_DEVICE=sim takes for its simulated accelerator). A no-op otherwise."""
    from dpslm_stream.bench._simdevice import active

    return lambda: active().paused() if active() is not None else contextlib.nullcontext()


def pytest_collection_modifyitems(config, items):
    dev = _test_device()
    if dev.type == "cpu":
        return
    skip = pytest.mark.skip(reason=f"CPU-only test (DPSLM_TEST_DEVICE={dev})")
    for item in items:
        if "cpu_only" in item.keywords:
            item.add_marker(skip)
