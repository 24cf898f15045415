"""Device hygiene on any CPU: the pipeline, the streaming encoder, the batched resynthesis worker and the ULM scorer
run on a simulated accelerator (dpslm_stream/bench/_simdevice.py) with zero mixed-device operations and zero
`.numpy()` of device tensors. The host-sync counts are figures (`dpslm-stream bench syncs`, docs/device_syncs.md),
not asserted here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpslm_stream.bench import syncs
from dpslm_stream.bench._simdevice import SIM, SimTensor, SimulatedCuda

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_simulation_sees_what_a_gpu_would_refuse_or_wait_for():
    with SimulatedCuda() as sim, torch.no_grad():
        x = torch.arange(6.0).to(SIM)
        assert isinstance(x, SimTensor) and x.device == SIM
        assert isinstance(torch.zeros(3, device=SIM), SimTensor)
        lin = torch.nn.Linear(6, 2).to(SIM)
        y = lin(x)
        assert isinstance(y, SimTensor) and y.device == SIM
        torch.testing.assert_close(y.elem, lin.weight.elem @ torch.arange(6.0) + lin.bias.elem)
        assert sim.counts["mixed"] == 0 and sim.syncs() == 0
        _ = x + torch.ones(6)  # a host tensor with elements: CUDA refuses
        assert sim.counts["mixed"] == 1
        _ = x * torch.tensor(2.0)  # a 0-dim host scalar: CUDA accepts
        x[torch.tensor([0, 1])] = 1.0  # CPU indices and Python numbers: CUDA accepts
        assert sim.counts["mixed"] == 1
        x.numpy()
        assert sim.counts["numpy"] == 1 and sim.where["numpy"][0].endswith("device tensor")
        bool(y.sum() > 0), y.tolist(), y.cpu(), y.to("cpu"), float(y[0])
        assert {k: sim.counts[k] for k in ("item", "tolist", "cpu")} == {"item": 2, "tolist": 1, "cpu": 2}
        assert not isinstance(y.cpu(), SimTensor) and y.cpu().device.type == "cpu"


@pytest.fixture(scope="module")
def measured():
    return syncs.measure("tiny", seconds=2.0, streams=2)


def test_library_runs_on_a_device_with_no_mixed_ops_and_no_device_numpy(measured):
    assert measured["violations"] == {"mixed": 0, "numpy": 0}, measured["where"]
    # every path really ran on the simulated device
    assert measured["encoder"]["hops"] > 0 and measured["resynth"]["decode_steps"] > 0
    assert measured["scorer"]["blocks"] > 0 and measured["pipeline"]["units"] > 0


def test_simulated_device_computes_what_the_cpu_computes(tiny_models):
    from dpslm_stream.pipeline import Pipeline

    wav = np.asarray(syncs.speech_like(1.5, 22050, seed=2))
    cpu = Pipeline(tiny_models, syncs.K, syncs.LMBDA).encode(wav, 22050)
    with SimulatedCuda() as sim:
        res = Pipeline(syncs.LoadThenMove("tiny"), syncs.K, syncs.LMBDA, SIM).encode(wav, 22050)
    assert sim.counts["mixed"] == 0
    assert res.units == cpu.units and res.durations == cpu.durations
    np.testing.assert_allclose(res.unit_logprobs, cpu.unit_logprobs, rtol=1e-5, atol=1e-5)
