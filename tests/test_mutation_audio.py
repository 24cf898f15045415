"""dpslm_stream.audio at the edges the mutants of `make mutants MODULES=audio` found untested (docs/mutation.md):
clipping below -1 (a value whose int16 wrap-around is not itself -32768), the resampler's kernel size the server
bounds, the file format save_wav writes whatever the file is called, and the exact error messages."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from dpslm_stream.audio import (
    StreamingResampler,
    check_finite,
    check_sample_rate,
    float32le_to_float,
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    resampler_kernel_size,
    save_wav,
)
from dpslm_stream.errors import InvalidInput


def test_float_to_pcm16_clips_below_minus_one():
    # -3.0 * 32768 wraps to -32768 in int16 by chance; -1.5 and -1.25 do not (16384 and 24576 when wrapped).
    q = np.frombuffer(float_to_pcm16(np.array([-1.5, -1.25, -1.0001, 1.5])), dtype="<i2")
    assert q.tolist() == [-32768, -32768, -32768, 32767]


def _kernel_taps(orig_sr: int, new_sr: int) -> int:
    """The slow obvious count: a [new/g, 1, 2*width + orig/g] polyphase kernel, width = ceil(6 * orig/g /
    (min(orig, new)/g * 0.99)) (torchaudio's lowpass_filter_width 6, rolloff 0.99)."""
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    return new * (2 * width + orig)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (8000, 16000), (16000, 24000), (22050, 16000), (11025, 24000),
                                      (47999, 16000), (16000, 8000)])
def test_resampler_kernel_size_counts_the_kernel(orig, new):
    assert resampler_kernel_size(orig, new) == _kernel_taps(orig, new)
    if orig * new < 10**9 and resampler_kernel_size(orig, new) < 10**6:
        # The kernel the streaming resampler builds has exactly that many elements (its state stays below it).
        stream = StreamingResampler(orig, new)
        assert stream.state_nbytes // 4 < resampler_kernel_size(orig, new)
    assert resampler_kernel_size(44100) == 76000 == resampler_kernel_size(44100, 16000)
    assert resampler_kernel_size(16000, 16000) == 0


def test_resampler_kernel_size_checks_both_rates():
    with pytest.raises(InvalidInput) as err:
        resampler_kernel_size(0, 16000)
    assert str(err.value) == "orig_sr must be a positive integer, got 0"
    with pytest.raises(InvalidInput) as err:
        resampler_kernel_size(16000, 2.5)
    assert str(err.value) == "new_sr must be an integer number of samples per second, got 2.5 (float)"


def test_save_wav_writes_wav_whatever_the_file_is_called(tmp_path):
    path = tmp_path / "clip.audio"  # no extension soundfile knows
    save_wav(path, np.array([0.0, 0.5, -0.5], dtype=np.float32), 16000)
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.frames) == ("WAV", "PCM_16", 16000, 3)
    assert path.read_bytes()[:4] == b"RIFF"


def test_error_messages_name_what_was_wrong(tmp_path):
    cases = [
        (lambda: check_sample_rate(16000.0), "sample rate must be an integer number of samples per second, got "
                                             "16000.0 (float)"),
        (lambda: pcm16_to_float("abcd"), "PCM16 data must be bytes, got str"),
        (lambda: float32le_to_float([0.0]), "float32 data must be bytes, got list"),
        (lambda: save_wav(tmp_path / "x.wav", np.zeros(3), 0), "sr must be a positive integer, got 0"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidInput) as err:
            call()
        assert str(err.value) == message


def test_load_audio_tells_how_it_mixed_the_channels(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.array([[0.5, -0.25], [0.25, 0.75]], dtype=np.float32), 8000, subtype="FLOAT")
    told = []
    wav, sr = load_audio(path, notify=told.append)
    assert sr == 8000 and wav.tolist() == [0.125, 0.5]
    wav, _ = load_audio(path, mono="first", notify=told.append)
    assert wav.tolist() == [0.5, 0.25]
    assert told == [f"{path} has 2 channels: averaged to mono", f"{path} has 2 channels: channel 0 kept"]
    mono = tmp_path / "mono.wav"
    save_wav(mono, np.zeros(4), 8000)
    load_audio(mono, notify=told.append)
    assert len(told) == 2  # one channel: nothing to tell


def test_load_audio_unreadable_file_message(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(b"not audio at all")
    with pytest.raises(InvalidInput) as err:
        load_audio(path)
    message = str(err.value)
    assert message.startswith(f"cannot read audio file {str(path)!r}: ")
    assert message.endswith("; expected a format libsndfile reads (WAV, FLAC, OGG, ...)")


def test_check_finite_counts_the_bad_values():
    for x in (np.array([np.nan, 1.0, np.inf]), torch.tensor([float("nan"), 1.0, float("-inf")])):
        with pytest.raises(InvalidInput) as err:
            check_finite(x, "chunk")
        assert str(err.value) == "chunk contains 2 non-finite value(s) (NaN or Inf); expected finite samples"


def test_streaming_resampler_keeps_its_dtype_and_names_bad_arguments():
    wide, narrow = StreamingResampler(44100, dtype=torch.float64), StreamingResampler(44100)
    assert wide.state_nbytes == 2 * narrow.state_nbytes > 0  # the zero padding is held in the stream's dtype
    same = StreamingResampler(16000, 16000, dtype=torch.float64)
    assert same.push(np.zeros(3)).dtype == torch.float64 and same.flush().dtype == torch.float64
    for call, message in [
        (lambda: StreamingResampler(0), "orig_sr must be a positive integer, got 0"),
        (lambda: StreamingResampler(16000, -8000), "new_sr must be a positive integer, got -8000"),
        (lambda: narrow.push(np.zeros(3, dtype=np.int16)),
         "chunk must hold float samples in [-1, 1], got numpy int16; convert PCM with pcm16_to_float"),
        (lambda: narrow.push(torch.zeros(3, dtype=torch.int16)),
         "chunk must hold float samples in [-1, 1], got torch.int16; convert PCM with pcm16_to_float"),
    ]:
        with pytest.raises(InvalidInput) as err:
            call()
        assert str(err.value) == message
