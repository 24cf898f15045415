"""The streaming front-end and windowed transformer (dpslm_stream.stream.frontend / encoder), on a small random WavLM.

Oracles: the model's own offline pieces (`WavLM.frontend` on the whole padded signal, `WavLM.encode` on all frames),
`resample` on the whole signal, and, for the windowed modes, a slow reference written here that recomputes each
hop from scratch with the model's own layer calls.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpslm_stream.audio import StreamingResampler, resample
from dpslm_stream.errors import InvalidInput
from dpslm_stream.models import wavlm
from dpslm_stream.stream.encoder import (
    KV_SLACK_WINDOWS,
    PRESETS,
    WindowConfig,
    WindowedEncoder,
    WindowRunner,
    window_config,
)
from dpslm_stream.stream.frontend import StreamingFrontend


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(device):
    torch.manual_seed(0)
    return wavlm.WavLM(wavlm.TINY).eval().to(device)


@pytest.fixture(scope="module")
def runner(model):
    return WindowRunner(model)


def signal(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Noise with a slow envelope and a few tones: broadband, so every frame differs."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = rng.normal(0, 0.05, t.size) * (1 + np.sin(2 * np.pi * 1.3 * t)) + 0.1 * np.sin(2 * np.pi * 220 * t)
    return x.astype(np.float32)


def offline_frames(model, wav16: torch.Tensor) -> torch.Tensor:
    wav16 = wav16.to(next(model.parameters()).device)
    with torch.inference_mode():
        return model.frontend(F.pad(wav16[None], (40, 40)))[0]


def chunks(n: int, sizes: list[int]):
    """Split range(n) into consecutive pieces of the given sizes (cycled)."""
    pos, i = 0, 0
    while pos < n:
        size = sizes[i % len(sizes)]
        yield pos, min(n, pos + size)
        pos += size
        i += 1


# ----------------------------------------------------------------------------------------------------------------
# Front-end (with the resampler in front of it, as a session runs them)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sr=st.sampled_from([8000, 16000, 22050, 44100, 48000]),
       sizes=st.lists(st.integers(1, 6000), min_size=1, max_size=6), seed=st.integers(0, 3))  # fmt: skip
def test_streaming_resampler_and_frontend_equal_offline(model, sr, sizes, seed):
    x = signal(0.7, sr, seed)
    sizes = [max(s, 97) for s in sizes]  # odd sizes, but not thousands of 1-sample pushes (slow, tested in audio)
    resampler, frontend = StreamingResampler(sr, 16000), StreamingFrontend(model)
    pieces16, frames = [], []
    for a, b in chunks(len(x), sizes):
        y = resampler.push(x[a:b])
        pieces16.append(y)
        frames.append(frontend.push(y))
    tail = resampler.flush()
    pieces16.append(tail)
    frames += [frontend.push(tail), frontend.flush()]
    wav16 = resample(torch.from_numpy(x), sr, 16000)
    np.testing.assert_allclose(torch.cat(pieces16).numpy(), wav16.numpy(), atol=1e-6)
    expected = offline_frames(model, wav16)
    got = torch.cat(frames)
    assert got.shape == expected.shape == (wav16.numel() // 320, model.cfg.encoder_embed_dim)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("channels, length, kernel, stride, groups", [(8, 300, 3, 2, 1), (1, 3200, 10, 5, 1),
                                                                   (64, 140, 16, 1, 4)])  # fmt: skip
def test_packed_conv_reads_and_writes_channels_last_without_copies(channels, length, kernel, stride, groups):
    """PackedConv1d (oneDNN, prepacked) takes a transposed [N, L, C] tensor as it is (no copy op runs) and returns
    a transposed [N, L_out, C_out] one, equal to F.conv1d to float rounding whichever layout the input came in."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dpslm_stream.stream.onednn import PackedConv1d

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(channels + kernel)
    weight = torch.randn(channels * 2, channels // groups, kernel, generator=g) / math.sqrt(channels * kernel / groups)
    bias = torch.randn(channels * 2, generator=g)
    conv = PackedConv1d(weight, bias, stride=stride, groups=groups)
    frames_last = torch.randn(2, length, channels, generator=g)  # [N, L, C]: how the encoder holds frames
    expected = F.conv1d(frames_last.transpose(1, 2), weight, bias, stride=stride, groups=groups)
    for x in (frames_last.transpose(1, 2), frames_last.transpose(1, 2).contiguous()):
        with Ops() as ops:
            out = conv(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        if conv.packed is not None:
            assert out.transpose(1, 2).is_contiguous()  # [N, L_out, C_out] memory: a LayerNorm over C reads it as is
            if not x.is_contiguous():  # the frames' own memory
                assert not [n for n in ops.names if "copy" in n or "clone" in n], ops.names


@pytest.mark.parametrize("enabled", [True, False])
def test_packed_conv_computes_in_its_weights_dtype_and_answers_in_the_inputs(enabled):
    """A bfloat16 input to a float32 conv (oneDNN-packed or plain F.conv1d) is computed in float32 and comes back in
    bfloat16 (mutation testing found this path untested)."""
    from dpslm_stream.stream.onednn import PackedConv1d

    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(16, 8, 3, generator=g) / 5, torch.randn(16, generator=g)
    conv = PackedConv1d(weight, bias, stride=2, enabled=enabled)
    x = torch.randn(2, 8, 40, generator=g).to(torch.bfloat16)
    out = conv(x)
    assert out.dtype == torch.bfloat16
    expected = F.conv1d(x.float(), weight, bias, stride=2)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)  # bfloat16 rounding of the result


def test_frontend_emits_each_frame_as_soon_as_its_window_is_complete(model):
    frontend = StreamingFrontend(model)
    # Frame t reads samples [320 t - 40, 320 t + 360): frame 0 needs 360 samples, frame 1 680.
    assert frontend.push(torch.zeros(359)).shape[0] == 0
    assert frontend.push(torch.zeros(1)).shape[0] == 1
    assert frontend.push(torch.zeros(319)).shape[0] == 0
    assert frontend.push(torch.zeros(1)).shape[0] == 1
    # 680 samples in total: floor(680 / 320) = 2 frames, both already out.
    assert frontend.flush().shape[0] == 0
    assert frontend.num_samples == 0  # flush resets


def test_frontend_short_streams_have_floor_T_over_320_frames(model):
    for n in (0, 1, 319, 320, 359, 360, 639, 640):
        frontend = StreamingFrontend(model)
        total = frontend.push(torch.zeros(n)).shape[0] + frontend.flush().shape[0]
        assert total == n // 320, n


def test_frontend_state_is_bounded(model):
    frontend = StreamingFrontend(model)
    sizes = []
    for i in range(200):
        frontend.push(torch.randn(777) * 0.1)
        sizes.append(frontend.state_nbytes)
    assert max(sizes) < 400 * 4 + 777 * 4  # fewer than one window of samples carried, plus at most one chunk


# ----------------------------------------------------------------------------------------------------------------
# Window configuration


def test_window_config_presets_and_overrides():
    assert window_config("cached") == WindowConfig("cached", *PRESETS["low-latency"])
    assert window_config("sliding", "quality", hop=30) == WindowConfig("sliding", 250, 30, 64)
    c = window_config("cached", left=10, hop=4, lookahead=2)
    assert (c.left, c.hop, c.lookahead) == (10, 4, 2)
    assert c.oldest_frame_lag_s == pytest.approx(5 * 0.02 + 0.0025)
    assert c.newest_frame_lag_s == pytest.approx(2 * 0.02 + 0.0025)
    assert window_config("full").oldest_frame_lag_s == math.inf
    for preset, (left, hop, lookahead) in PRESETS.items():
        assert window_config("cached", preset) == WindowConfig("cached", left, hop, lookahead)


@pytest.mark.parametrize("kwargs", [
    dict(mode="windowed"), dict(preset="fast"), dict(hop=0), dict(left=-1), dict(lookahead=-5),
    dict(hop=2.5), dict(left="10"), dict(hop=True), dict(left=10**7),
])  # fmt: skip
def test_window_config_rejects_bad_values(kwargs):
    with pytest.raises(InvalidInput):
        window_config(**{"mode": "cached", **kwargs})


# ----------------------------------------------------------------------------------------------------------------
# Windowed transformer: reductions to offline and to a slow reference


@pytest.fixture(scope="module")
def frames(model):
    wav16 = torch.from_numpy(signal(3.3, 16000, seed=5))
    return offline_frames(model, wav16)  # 165 frames


def run_encoder(runner, config, frames, sizes):
    enc = WindowedEncoder(runner, config)
    out = [enc.push(frames[a:b]) for a, b in chunks(frames.shape[0], sizes)]
    out.append(enc.flush())
    return torch.cat(out)


def offline_features(model, frames):
    with torch.inference_mode():
        return model.encode(frames[None], 11)[0]


@pytest.mark.parametrize("sizes", [[1], [7, 13], [1000]])
def test_full_sliding_and_cached_reduce_to_offline(model, runner, frames, sizes):
    n = frames.shape[0]
    expected = offline_features(model, frames)
    for config in (WindowConfig("full"),
                   WindowConfig("sliding", left=n, hop=10, lookahead=n),  # L and R cover the whole input
                   WindowConfig("cached", left=5, hop=10, lookahead=n)):  # R covers the whole input  # fmt: skip
        got = run_encoder(runner, config, frames, sizes)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=config.describe())


def reference_sliding(model, frames, L, H, R):
    """Each hop from scratch: WavLM.encode on the window [m - L, m + H + R) (clipped to the stream), keep [m, m+H)."""
    n, out, m = frames.shape[0], [], 0
    while m < n:
        end = m + H + R
        if end > n:  # the last window reaches the true end and emits everything left
            end, H = n, n - m
        start = max(0, m - L)
        out.append(offline_features(model, frames[start:end])[m - start : m - start + H])
        m += H
    return torch.cat(out)


def reference_cached(model, frames, L, H, R):
    """Each hop with the model's own layer calls: queries [m, m + H + R) attend to the per-layer keys/values of
    the last L emitted frames; pos_conv sees the 64 frames before m and zeros after the window."""
    n, out, m = frames.shape[0], [], 0
    caches = [None] * 11
    with torch.inference_mode():
        while m < n:
            q = min(H + R, n - m)
            emit = H if m + H + R <= n else n - m
            window = F.pad(frames[max(0, m - 64) : m + q], (0, 0, max(0, 64 - m), 0))  # zeros before the stream
            x = model.positional(window[None])[:, 64:]  # conv zero-pads after m + q, as the runner does
            for i in range(11):
                past = caches[i]
                bias = model.relative_bias(q, q + (0 if past is None else past[0].shape[2]))
                x_new, (k, v) = model.layer(i, x, bias, past)
                keys = k[:, :, :emit] if past is None else torch.cat([past[0], k[:, :, :emit]], 2)
                values = v[:, :, :emit] if past is None else torch.cat([past[1], v[:, :, :emit]], 2)
                caches[i] = (keys[:, :, -L:], values[:, :, -L:]) if L else None
                x = x_new
            out.append(x[0, :emit])
            m += emit
    return torch.cat(out)


@pytest.mark.parametrize("L, H, R", [(30, 10, 5), (12, 7, 0), (0, 8, 3), (64, 25, 64)])
def test_sliding_equals_slow_reference(model, runner, frames, L, H, R):
    got = run_encoder(runner, WindowConfig("sliding", L, H, R), frames, [9])
    torch.testing.assert_close(got, reference_sliding(model, frames, L, H, R), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("L, H, R", [(30, 10, 5), (12, 7, 0), (0, 8, 3), (64, 25, 64)])
def test_cached_equals_slow_reference(model, runner, frames, L, H, R):
    got = run_encoder(runner, WindowConfig("cached", L, H, R), frames, [9])
    torch.testing.assert_close(got, reference_cached(model, frames, L, H, R), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sliding", "cached"])
def test_many_pending_hops_in_one_forward_equal_one_hop_at_a_time(runner, frames, mode):
    config = WindowConfig(mode, left=20, hop=6, lookahead=4)
    one_by_one = run_encoder(runner, config, frames, [1])  # every hop runs alone as soon as it is ready
    enc = WindowedEncoder(runner, config)
    enc.add(frames[:150])  # a stream that fell behind: 23 hops pending
    got, hops_per_forward = [], []
    while (plan := enc.plan(max_hops=50)) is not None:
        hops_per_forward.append(plan.hops)
        runner.run([plan])
        got.append(enc.complete(plan))
    got += [enc.push(frames[150:]), enc.flush()]
    assert max(hops_per_forward) > 10  # after the warm-up the pending hops went through together
    torch.testing.assert_close(torch.cat(got), one_by_one, atol=2e-5, rtol=1e-5)


def test_streams_batched_in_one_forward_equal_separate_runs(runner, frames):
    config = WindowConfig("cached", left=20, hop=5, lookahead=3)
    streams = [frames, frames.flip(0), frames * 0.5]
    separate = [run_encoder(runner, config, f, [5]) for f in streams]
    encoders = [WindowedEncoder(runner, config) for _ in streams]
    outputs: list[list[torch.Tensor]] = [[] for _ in streams]
    batch_sizes = []
    for a, b in chunks(frames.shape[0], [5]):
        plans = []
        for enc, f in zip(encoders, streams):
            enc.add(f[a:b])
            plans.append(enc.plan())
        ready = [(i, p) for i, p in enumerate(plans) if p is not None]
        runner.run([p for _, p in ready])
        batch_sizes.append(len(ready))
        for i, p in ready:
            outputs[i].append(encoders[i].complete(p))
    for i, enc in enumerate(encoders):
        outputs[i].append(enc.flush())
    assert max(batch_sizes) == 3
    for got, want in zip(outputs, separate):
        torch.testing.assert_close(torch.cat(got), want, atol=2e-5, rtol=1e-5)


def test_one_window_per_stream_attention_equals_the_general_path_bit_for_bit(runner, frames, monkeypatch):
    """Live steps (one window per stream) attend per stream on [cache | window] written once; the general path
    (stacked caches, one batched attention) must give the same features to the last bit, batched or not."""
    config = WindowConfig("cached", left=20, hop=5, lookahead=3)
    streams = [frames, frames.flip(0), frames * 0.5]

    def run(batched: bool) -> list[torch.Tensor]:
        encoders = [WindowedEncoder(runner, config) for _ in streams]
        outputs: list[list[torch.Tensor]] = [[] for _ in streams]
        for a, b in chunks(frames.shape[0], [5]):
            plans = []
            for enc, f in zip(encoders, streams):
                enc.add(f[a:b])
                plans.append(enc.plan(max_hops=1))
            ready = [(i, p) for i, p in enumerate(plans) if p is not None]
            for group in [ready] if batched else [[r] for r in ready]:
                runner.run([p for _, p in group])
            for i, p in ready:
                outputs[i].append(encoders[i].complete(p))
        return [torch.cat(out) for out in outputs]

    fast = [run(True), run(False)]
    general = runner._with_left_context
    monkeypatch.setattr(runner, "_one_window_contexts", lambda group, layer, keys, values, caches: [
        (k[None], v[None]) for k, v in zip(*general(group, layer, keys, values, caches))])  # fmt: skip
    for got, want in zip(fast, [run(True), run(False)]):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(*fast))


def test_windowed_state_is_bounded_and_outputs_are_final(runner, frames):
    config = WindowConfig("cached", left=20, hop=8, lookahead=3)
    enc = WindowedEncoder(runner, config)
    sizes, emitted = [], 0
    for rep in range(4):  # 660 frames, 82 hops
        for a, b in chunks(frames.shape[0], [8]):
            out = enc.push(frames[a:b])
            emitted += out.shape[0]
            sizes.append(enc.state_nbytes)
            assert enc.num_emitted == emitted  # everything returned is counted once, never re-emitted
    # frames kept: 64 (pos_conv) + pending < H + R + one push; cache: 11 layers x (k, v) x L frames, each a view
    # of its stream's buffer: [cache | window] keys or values and room for KV_SLACK_WINDOWS more windows.
    dim, itemsize = runner.dim, 4
    bound = (64 + 11 + 8) * dim * itemsize + 11 * 2 * (20 + (1 + KV_SLACK_WINDOWS) * (8 + 3)) * dim * itemsize
    assert max(sizes) <= bound
    assert max(sizes[len(sizes) // 2 :]) <= max(sizes[: len(sizes) // 2])
