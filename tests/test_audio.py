"""Tests for dpslm_stream.audio: resampling (offline vs a direct float64 oracle, streaming vs offline), PCM
conversions, file I/O and input validation.

CPU by design, whatever DPSLM_TEST_DEVICE says: the library resamples on the CPU on every path (docs/gpu.md) and
converts PCM and files there, so these tests take no `device` and run, unchanged, in a GPU run too. None is
`cpu_only`: nothing here depends on which CPU kernels run (the tolerances hold for any x86 CPU)."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpslm_stream.audio import (
    StreamingResampler,
    check_finite,
    check_sample_rate,
    float32le_to_float,
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    resample,
    save_wav,
)
from dpslm_stream.errors import InvalidInput


# ---------------------------------------------------------------------------------------------------------------
# Oracle: the Hann-windowed sinc interpolation formula, evaluated directly per output sample in float64 with the
# physical rates (no gcd reduction, no polyphase bookkeeping, no conv):
#   y[m] = sum_s x[s] * (B/orig) * sinc(B*(s/orig - m/new)) * cos^2(pi*B*(s/orig - m/new) / (2*6)),
# B = 0.99 * min(orig, new), over the input samples with |B*(s/orig - m/new)| <= 6 (the window is zero beyond).
# Output length ceil(new*T/orig).


def reference_resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    lw, base = 6, 0.99 * min(orig, new)
    n_out = math.ceil(new * len(x) / orig)
    y = np.zeros(n_out)
    half_span = lw * orig / base  # input samples within lw zero crossings of the output instant
    for m in range(n_out):
        centre = m * orig / new  # output instant, in input-sample units
        s = np.arange(max(0, math.floor(centre - half_span)), min(len(x), math.ceil(centre + half_span) + 1))
        t = base * (s / orig - m / new)
        w = np.where(np.abs(t) <= lw, np.cos(np.pi * t / (2 * lw)) ** 2, 0.0)
        y[m] = np.sum(x[s] * (base / orig) * np.sinc(t) * w)  # np.sinc(t) = sin(pi t)/(pi t)
    return y


def test_reference_is_a_lowpass_interpolator():
    # Sanity of the oracle itself: a slow sine resamples to the same sine (away from the zero-padded edges).
    orig, new = 22050, 16000
    s = np.arange(4000)
    x = np.sin(2 * np.pi * 440 * s / orig)
    y = reference_resample(x, orig, new)
    m = np.arange(len(y))
    expected = np.sin(2 * np.pi * 440 * m / new)
    assert np.abs(y - expected)[100:-100].max() < 2e-3


def random_signal(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(-1, 1).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Offline resample


@pytest.mark.parametrize("orig,new", [(8000, 16000), (22050, 16000), (44100, 16000), (48000, 16000),
                                      (16000, 24000), (11025, 16000)])
@pytest.mark.parametrize("n", [1, 37, 2003])
def test_resample_matches_direct_formula(orig, new, n):
    x64 = random_signal(n, seed=orig + n, dtype=torch.float64)
    ref = reference_resample(x64.numpy(), orig, new)

    y64 = resample(x64, orig, new)
    assert y64.dtype == torch.float64 and y64.shape == (math.ceil(new * n / orig),)
    np.testing.assert_allclose(y64.numpy(), ref, rtol=0, atol=1e-12)

    # float32 input: the kernel is built in float32, as torchaudio builds it. Its phase argument
    # t = base_g * (k/o_g - i/n_g) multiplies an already rounded difference by base_g = 0.99*min(o_g, n_g) (up to
    # ~437 at 11025 Hz), so the float32 kernel error scales with base_g; a float64 kernel would be closer to the
    # formula but would no longer reproduce upstream's features bit for bit.
    g = math.gcd(orig, new)
    base_g = 0.99 * min(orig, new) / g
    y32 = resample(x64.float(), orig, new)
    assert y32.dtype == torch.float32 and y32.shape == y64.shape
    np.testing.assert_allclose(y32.numpy(), ref, rtol=0, atol=1e-6 + 2e-7 * base_g)


def test_resample_batched_equals_per_row():
    x = random_signal(3 * 2 * 777, seed=1).reshape(3, 2, 777)
    y = resample(x, 44100, 16000)
    assert y.shape == (3, 2, math.ceil(16000 * 777 / 44100))
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(y[i, j], resample(x[i, j], 44100, 16000), rtol=0, atol=1e-6)


def test_resample_identity_returns_input_object():
    x = random_signal(100, seed=2)
    assert resample(x, 16000, 16000) is x


@pytest.mark.parametrize("orig,new", [(8000, 16000), (22050, 16000), (44100, 16000), (48000, 16000),
                                      (16000, 24000), (12345, 16000), (16000, 8000)])
def test_resample_output_length(orig, new):
    for n in [0, 1, 2, 3, 5, 147, 440, 441, 442, 16001, 44100]:
        y = resample(torch.zeros(n), orig, new)
        # exact ceil(new * n / orig) with integers
        assert y.shape == (-(-new * n // orig),)


def test_resample_preserves_dc_in_the_interior():
    y = resample(torch.ones(20000, dtype=torch.float64), 44100, 16000)
    assert np.abs(y.numpy()[200:-200] - 1).max() < 1e-2


@pytest.mark.parametrize("bad", [16000.0, 0, -16000, "16000", None, True, 22050.5])
def test_resample_rejects_bad_rates(bad):
    with pytest.raises(InvalidInput, match="orig_sr"):
        resample(torch.zeros(10), bad, 16000)
    with pytest.raises(InvalidInput, match="new_sr"):
        resample(torch.zeros(10), 16000, bad)
    with pytest.raises(InvalidInput):
        StreamingResampler(bad)


def test_resample_accepts_numpy_integer_rates():
    x = random_signal(500, seed=3)
    torch.testing.assert_close(resample(x, np.int64(44100), np.int32(16000)), resample(x, 44100, 16000))


def test_resample_rejects_bad_waveforms():
    with pytest.raises(InvalidInput, match="floating-point"):
        resample(torch.zeros(10, dtype=torch.int16), 44100, 16000)
    with pytest.raises(InvalidInput, match="0-d"):
        resample(torch.tensor(1.0), 44100, 16000)
    with pytest.raises(InvalidInput, match="torch.Tensor"):
        resample(np.zeros(10, dtype=np.float32), 44100, 16000)


# ---------------------------------------------------------------------------------------------------------------
# Streaming resampler


def stream_all(rs: StreamingResampler, x, sizes) -> torch.Tensor:
    """Push x in consecutive chunks of the given sizes (which sum to len(x)), then flush; concatenate outputs."""
    bounds = np.cumsum([0, *sizes]).tolist()
    outs = [rs.push(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    outs.append(rs.flush())
    return torch.cat(outs)


# Chunk sizes: empty pushes, single samples, odd sizes, sizes around one output block (160 at 44.1 kHz) and one
# input block (441), and arbitrary sizes up to a few blocks. The signal length is their sum.
chunk_sizes = st.lists(st.one_of(st.sampled_from([0, 1, 2, 3, 7, 159, 160, 161, 441]), st.integers(0, 900)),
                       min_size=0, max_size=30)


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=chunk_sizes, seed=st.integers(0, 2**16))
def test_streaming_equals_offline(orig, sizes, seed):
    n = sum(sizes)
    x = random_signal(n, seed)
    offline = resample(x, orig, 16000)
    streamed = stream_all(StreamingResampler(orig, 16000), x, sizes)
    assert streamed.shape == offline.shape == (-(-16000 * n // orig),)
    torch.testing.assert_close(streamed, offline, rtol=0, atol=2e-6)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (16000, 24000), (12345, 16000)])
def test_streaming_equals_offline_float64_numpy_chunks(orig, new):
    x = random_signal(5000, seed=7, dtype=torch.float64)
    rs = StreamingResampler(orig, new, dtype=torch.float64)
    cuts = np.sort(np.random.default_rng(0).integers(0, 5000, size=30))
    out = stream_all(rs, x.numpy(), np.diff(cuts, prepend=0, append=5000).tolist())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, resample(x, orig, new), rtol=0, atol=1e-13)


def test_streaming_one_sample_at_a_time():
    x = random_signal(1500, seed=8)
    rs = StreamingResampler(22050, 16000)
    out = torch.cat([rs.push(x[i:i + 1]) for i in range(len(x))] + [rs.flush()])
    torch.testing.assert_close(out, resample(x, 22050, 16000), rtol=0, atol=2e-6)


def test_streaming_output_is_final_as_soon_as_its_input_arrived():
    # Latency: after T input samples the stream has emitted exactly the output blocks whose input window
    # [j*o - width, (j+1)*o + width) lies inside [0, T) (streaming-encoder.md), checked after every single sample.
    orig, new = 44100, 16000
    o, n = 441, 160
    width = math.ceil(6 * o / (min(o, n) * 0.99))
    x = random_signal(2500, seed=9)
    rs = StreamingResampler(orig, new)
    emitted = 0
    for t in range(1, len(x) + 1):
        emitted += rs.push(x[t - 1:t]).numel()
        complete_blocks = max(0, (t - width - o) // o + 1)  # largest j with (j+1)*o + width <= t, plus one
        assert emitted == complete_blocks * n
        if t == 1800:
            emitted_at_1800 = emitted
    # ... and what was emitted by then does not depend on later input.
    full, prefix = resample(x, orig, new), resample(x[:1800], orig, new)
    torch.testing.assert_close(full[:emitted_at_1800], prefix[:emitted_at_1800])


def test_streaming_flush_resets_and_reset_forgets():
    x = random_signal(3000, seed=10)
    expected = resample(x, 48000, 16000)
    rs = StreamingResampler(48000)
    first = torch.cat([rs.push(x), rs.flush()])
    second = torch.cat([rs.push(x), rs.flush()])  # flush() reset the stream
    torch.testing.assert_close(first, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(second, expected, rtol=0, atol=2e-6)
    rs.push(random_signal(1234, seed=11))
    rs.reset()
    torch.testing.assert_close(torch.cat([rs.push(x), rs.flush()]), expected, rtol=0, atol=2e-6)
    assert rs.flush().numel() == 0  # nothing pushed: nothing out


def test_streaming_identity_rate():
    x = random_signal(100, seed=12)
    rs = StreamingResampler(16000, 16000)
    a, b = rs.push(x[:40]), rs.push(x[40:].numpy())
    assert torch.equal(torch.cat([a, b, rs.flush()]), x)
    assert rs.state_nbytes == 0


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000])
def test_streaming_state_is_bounded(orig):
    g = math.gcd(orig, 16000)
    o, n = orig // g, 16000 // g
    width = math.ceil(6 * o / (min(o, n) * 0.99))
    bound = (2 * width + o) * 4  # float32 input tail
    rs = StreamingResampler(orig)
    rng = np.random.default_rng(orig)
    x = random_signal(orig * 5, seed=13).numpy()  # 5 s of audio
    pos, peak, total = 0, 0, 0
    while pos < len(x):
        step = int(rng.integers(1, 3000))
        total += rs.push(x[pos:pos + step]).numel()
        pos += step
        peak = max(peak, rs.state_nbytes)
    assert 0 < peak < bound
    total += rs.flush().numel()
    assert total == -(-16000 * len(x) // orig)
    assert rs.state_nbytes == width * 4  # back to the initial left padding


def test_streaming_rejects_bad_chunks():
    rs = StreamingResampler(44100)
    with pytest.raises(InvalidInput, match="1-D"):
        rs.push(torch.zeros(2, 10))
    with pytest.raises(InvalidInput, match="float"):
        rs.push(np.zeros(10, dtype=np.int16))
    with pytest.raises(InvalidInput, match="float"):
        rs.push(torch.zeros(10, dtype=torch.int32))
    with pytest.raises(InvalidInput, match="numpy"):
        rs.push([0.0, 1.0])
    with pytest.raises(InvalidInput, match="floating-point"):
        StreamingResampler(44100, dtype=torch.int16)


# ---------------------------------------------------------------------------------------------------------------
# Sample-rate validation


def test_check_sample_rate():
    for sr in [8000, 11025, 16000, 22050, 44100, 48000, np.int64(32000)]:
        assert check_sample_rate(sr) == int(sr)
    for bad in [7999, 48001, 0, -1, 16000.0, "16000", None, True]:
        with pytest.raises(InvalidInput):
            check_sample_rate(bad)
    with pytest.raises(InvalidInput, match=r"\[8000, 48000\]"):
        check_sample_rate(96000)


def test_check_finite():
    check_finite(np.zeros(3), "x")
    check_finite(torch.zeros(3), "x")
    for bad in [np.float32("nan"), np.inf, -np.inf]:
        with pytest.raises(InvalidInput, match="my chunk"):
            check_finite(np.array([0.0, bad, 1.0], dtype=np.float32), "my chunk")
        with pytest.raises(InvalidInput, match="non-finite"):
            check_finite(torch.tensor([0.0, float(bad)]), "x")


# ---------------------------------------------------------------------------------------------------------------
# PCM conversions


def test_pcm16_round_trip_is_exact_for_every_int16():
    ints = np.arange(-32768, 32768, dtype="<i2")
    f = pcm16_to_float(ints.tobytes())
    assert f.dtype == np.float32 and f.min() == -1.0 and f.max() == np.float32(32767 / 32768)
    np.testing.assert_array_equal(f, ints.astype(np.float64) / 32768)
    assert float_to_pcm16(f) == ints.tobytes()


def test_float_to_pcm16_rounds_and_clips():
    x = np.array([0.0, 1.0, -1.0, 2.0, -3.0, 0.4 / 32768, 0.6 / 32768, -0.6 / 32768, 0.5 / 32768, 1.5 / 32768])
    q = np.frombuffer(float_to_pcm16(x), dtype="<i2")
    np.testing.assert_array_equal(q, [0, 32767, -32768, 32767, -32768, 0, 1, -1, 0, 2])  # ties to even
    # float -> pcm -> float error is at most half a step inside the range
    y = random_signal(10000, seed=14).numpy()
    y = y[np.abs(y) <= 32767 / 32768]  # +1.0 itself clips to 32767
    err = np.abs(pcm16_to_float(float_to_pcm16(torch.from_numpy(y))) - y)
    assert err.max() <= 0.5 / 32768 + 1e-9


def test_float32le_round_trip():
    x = random_signal(513, seed=15).numpy()
    y = float32le_to_float(x.astype("<f4").tobytes())
    np.testing.assert_array_equal(y, x)
    y[0] = 5.0  # writable copy, not a view of immutable bytes
    assert float32le_to_float(bytearray(8)).tolist() == [0.0, 0.0]


def test_pcm_bad_inputs():
    with pytest.raises(InvalidInput, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(InvalidInput, match="multiple of 4"):
        float32le_to_float(b"\x00" * 6)
    with pytest.raises(InvalidInput, match="bytes"):
        pcm16_to_float("abcd")
    with pytest.raises(InvalidInput, match="non-finite"):
        float_to_pcm16(np.array([0.0, np.nan]))
    with pytest.raises(InvalidInput, match="floats"):
        float_to_pcm16(np.array([1, 2], dtype=np.int16))
    assert pcm16_to_float(b"").shape == (0,) and float_to_pcm16([]) == b""


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_save_and_load_wav_round_trip(tmp_path):
    x = random_signal(2400, seed=16)
    path = tmp_path / "a.wav"
    save_wav(path, x[None], 24000)
    info = sf.info(str(path))
    assert info.samplerate == 24000 and info.channels == 1 and info.subtype == "PCM_16"
    y, sr = load_audio(path)
    assert sr == 24000 and y.dtype == np.float32 and y.shape == (2400,)
    np.testing.assert_array_equal(y, pcm16_to_float(float_to_pcm16(x)))


def test_load_audio_downmixes_stereo(tmp_path):
    left = np.arange(-500, 500, dtype=np.int16) * 16
    right = np.full(1000, 800, dtype=np.int16)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), 22050, subtype="PCM_16")
    y, sr = load_audio(path)
    assert sr == 22050
    np.testing.assert_allclose(y, (left.astype(np.float64) + right) / 2 / 32768, rtol=0, atol=1e-7)
    first, _ = load_audio(path, mono="first")
    np.testing.assert_array_equal(first, left / np.float32(32768))
    with pytest.raises(InvalidInput, match="mono"):
        load_audio(path, mono="left")


def test_load_audio_errors(tmp_path):
    with pytest.raises(InvalidInput, match="not found"):
        load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_audio(junk)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.int16), 16000, subtype="PCM_16")
    with pytest.raises(InvalidInput, match="no samples"):
        load_audio(empty)


def test_save_wav_errors(tmp_path):
    with pytest.raises(InvalidInput, match="mono"):
        save_wav(tmp_path / "x.wav", np.zeros((2, 10), dtype=np.float32), 16000)
    with pytest.raises(InvalidInput, match="non-finite"):
        save_wav(tmp_path / "x.wav", np.array([0.0, np.inf]), 16000)
    with pytest.raises(InvalidInput, match="sr"):
        save_wav(tmp_path / "x.wav", np.zeros(10, dtype=np.float32), 0)
