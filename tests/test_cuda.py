"""The library on a CUDA GPU (skipped without one): CUDA agrees with CPU with TF32 off, and every exactness claim
that the CPU tests prove (streaming == offline, batched == one by one, DPDP streaming == offline, resynthesis with
unlimited context == offline greedy) holds on the GPU too. `make gpu-check` runs this file on a GPU machine.

The device is DPSLM_TEST_DEVICE when it names a CUDA device, else `cuda`. Tolerances: CUDA vs CPU compares two
different fp32 kernel sets (reduction orders differ), so 1e-4 relative on features; claims within one device are
the CPU tests' own tolerances."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpslm_stream import device as D
from dpslm_stream.dpdp import StreamingDPDP, dpdp, segments_from_units
from dpslm_stream.models import wavlm
from dpslm_stream.pipeline import Pipeline
from dpslm_stream.stream.encoder import WindowConfig, WindowedEncoder, WindowRunner
from dpslm_stream.tiny import speech_like

K, LMBDA = 500, 4500


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    named = torch.device(os.environ.get("DPSLM_TEST_DEVICE", "cuda"))
    dev = named if named.type == "cuda" else torch.device("cuda")
    D.exact_kernels()  # TF32 off: what every model worker does at setup (the suite runs in one process)
    return dev


@pytest.fixture(scope="module")
def pipelines(tiny_models, cuda):
    return Pipeline(tiny_models, K, LMBDA, "cpu"), Pipeline(tiny_models, K, LMBDA, cuda)


def test_tf32_is_off_after_setup(cuda):
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_features_units_and_scores_match_cpu(pipelines):
    cpu, gpu = pipelines
    wav = speech_like(3.0, 22050, seed=3)  # resampled on the CPU on both paths
    f_cpu, f_gpu = cpu.features(wav, 22050), gpu.features(wav, 22050)
    assert f_gpu.device.type == "cuda"
    torch.testing.assert_close(f_gpu.cpu(), f_cpu, rtol=1e-4, atol=1e-4 * float(f_cpu.abs().max()))
    units = cpu.encode(wav, 22050).units
    assert gpu.encode(wav, 22050, score=False).units == units  # DPDP margins are far above fp32 differences
    np.testing.assert_allclose(gpu.score(units), cpu.score(units), rtol=1e-4, atol=1e-4)


def test_vocoder_matches_cpu(pipelines, cuda):
    cpu, gpu = pipelines
    codes = torch.randint(0, 4096, (1, 1, 75), generator=torch.Generator().manual_seed(0))
    (wt_cpu, _, vocode), (wt_gpu, _, _) = cpu.wavtokenizer, gpu.wavtokenizer
    ref, _ = vocode(wt_cpu, codes)
    got, _ = vocode(wt_gpu, codes.to(cuda))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_ellav_logits_match_cpu(pipelines, cuda):
    cpu, gpu = pipelines
    units = cpu.encode(speech_like(2.0, 16000, seed=4), 16000, score=False).units
    ids = torch.tensor(cpu.ellav.tokenizer.encode_prompt(units))[None]
    with torch.inference_mode():
        ref, got = cpu.ellav(ids), gpu.ellav(ids.to(cuda))
    # (greedy generation is compared within the GPU below: across kernel sets an argmax near-tie may flip)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# --- the exactness claims, on the GPU ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(cuda):
    torch.manual_seed(0)
    return wavlm.WavLM(wavlm.TINY).eval().to(cuda)


@pytest.fixture(scope="module")
def frames(model, cuda):
    wav16 = torch.from_numpy(speech_like(3.3, 16000, seed=5)).to(cuda)
    with torch.inference_mode():
        return model.frontend(F.pad(wav16[None], (40, 40)))[0]


def _run(runner, config, frames, size):
    enc = WindowedEncoder(runner, config)
    out = [enc.push(frames[a : a + size]) for a in range(0, frames.shape[0], size)]
    out.append(enc.flush())
    return torch.cat(out)


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_streaming_encoder_reduces_to_offline(model, frames, size):
    n = frames.shape[0]
    runner = WindowRunner(model)
    with torch.inference_mode():
        expected = model.encode(frames[None], 11)[0]
    for config in (WindowConfig("full"), WindowConfig("sliding", left=n, hop=10, lookahead=n),
                   WindowConfig("cached", left=5, hop=10, lookahead=n)):  # fmt: skip
        got = _run(runner, config, frames, size)
        assert got.device == frames.device
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=config.describe())


def test_streams_batched_in_one_forward_equal_separate_runs(model, frames):
    runner = WindowRunner(model)
    config = WindowConfig("cached", left=20, hop=5, lookahead=3)
    streams = [frames, frames.flip(0), frames * 0.5]
    separate = [_run(runner, config, f, 5) for f in streams]
    encoders = [WindowedEncoder(runner, config) for _ in streams]
    outputs: list[list[torch.Tensor]] = [[] for _ in streams]
    for a in range(0, frames.shape[0], 5):
        plans = []
        for enc, f in zip(encoders, streams):
            enc.add(f[a : a + 5])
            plans.append(enc.plan())
        ready = [(i, p) for i, p in enumerate(plans) if p is not None]
        runner.run([p for _, p in ready])
        for i, p in ready:
            outputs[i].append(encoders[i].complete(p))
    for i, enc in enumerate(encoders):
        outputs[i].append(enc.flush())
    for got, want in zip(outputs, separate):
        torch.testing.assert_close(torch.cat(got), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 13, 90])
def test_dpdp_streaming_equals_offline(cuda, chunk):
    g = torch.Generator().manual_seed(chunk)
    c = torch.randn(50, 16, generator=g)
    x = (c[torch.randint(0, 50, (400,), generator=g)] + 0.9 * torch.randn(400, 16, generator=g)).to(cuda)
    c = c.to(cuda)
    offline = dpdp(x, c, 12.0, 8)
    stream = StreamingDPDP(c, 12.0, 8)
    segments = []
    for a in range(0, x.shape[0], chunk):
        segments.extend(stream.push(x[a : a + chunk]))
    segments.extend(stream.flush())
    assert segments == segments_from_units(offline.cpu())


def test_resynthesis_with_unlimited_context_equals_offline_greedy(tiny_models, cuda):
    from dpslm_stream.stream.resynth_worker import ResynthWorker

    units = Pipeline(tiny_models, K, LMBDA).encode(speech_like(2.0, 16000, seed=6), 16000, score=False).units
    worker = ResynthWorker(tiny_models, cuda, pairs=[(K, LMBDA)])
    s = worker.open_session(K, LMBDA, left_context=None, holdback=None, max_pass_units=None,
                            vocoder_left_context=None, vocoder_lookahead=10**6)  # fmt: skip
    codes, add = [], s.vocoder.add
    s.vocoder.add = lambda c: (codes.extend(c.tolist()), add(c))[1]
    for a in range(0, len(units), 5):
        s.push_units(units[a : a + 5])
        worker.step([s])
    s.end()
    worker.run_until_idle([s])
    s.poll()
    wav, offline, finished = Pipeline(tiny_models, K, LMBDA, cuda).resynthesize(units)[0]
    assert finished and codes == offline
