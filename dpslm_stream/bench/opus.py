"""The Opus uplink (start.format "opus"): unit agreement with the PCM path, uplink bytes, and added latency.

For the bundled sample (7.3 s of speech, 16 kHz) and a synthetic speech-like signal, at each Opus bitrate: the
signal is encoded as the Python client does (resampled to 48 kHz by the project's resampler, libopus through PyAV,
20 ms frames, 100 ms Ogg pages / WebM clusters), decoded as the server does, and encoded into units offline (the
units a full-mode session gives). Agreement with the units of the original PCM: the share of 20 ms frames whose unit
is the same, and the unit sequences' edit distance over their length. The models are the tiny set's, with RANDOM
weights: agreement here is a plumbing figure (how much the codec moves random features), not a speech result; the
same figures for PCM that differs slightly (resampled to 48 kHz and back, white noise) are printed as baselines.

Latency: the server's decode time per second of audio (CPU time of one thread, median of repeats), and the
buffering the uplink adds before a sample can be decoded on the server (the encoder's 20 ms frame and look-ahead
plus the container's page or cluster), simulated in 10 ms pushes without a network.

    dpslm-stream bench opus [--bitrates 16000,24000,32000] [--repeats 5] [--seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dpslm_stream.audio import resample
from dpslm_stream.opus import OpusUplinkDecoder, OpusUplinkEncoder

OPUS_SR = 48000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bitrates", default="16000,24000,32000", help="Opus bitrates, bit/s (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the decode timing (median)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the synthetic signal")


def encode(wav: np.ndarray, sr: int, bitrate: int, container: str, push_ms: float = 100.0) -> list[bytes]:
    enc = OpusUplinkEncoder(bitrate, container, input_rate=sr)
    step = int(sr * push_ms / 1000)
    out = []
    for i in range(0, len(wav), step):
        out += enc.push(wav[i : i + step])
    return out + enc.finish()


def decode(messages: list[bytes], container: str) -> np.ndarray:
    dec = OpusUplinkDecoder(container, max_samples=10**9)
    parts = [dec.push(m) for m in messages]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def frame_labels(units: list[int], durations: list[int]) -> np.ndarray:
    return np.repeat(np.asarray(units), np.asarray(durations))


def agree(pipeline, ref, wav: np.ndarray, sr: int) -> tuple[float, float]:
    """(share of 20 ms frames with the reference's unit, unit edit distance / reference units)."""
    res = pipeline.encode(wav, sr, score=False)
    frames, ref_frames = frame_labels(res.units, res.durations), frame_labels(ref.units, ref.durations)
    n = min(len(frames), len(ref_frames))
    return float(np.mean(frames[:n] == ref_frames[:n])), edit_distance(res.units, ref.units) / len(ref.units)


def edit_distance(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def buffering_delay(wav: np.ndarray, sr: int, bitrate: int, container: str, push_ms: float = 10.0) -> tuple[float,
                                                                                                              float]:  # fmt: skip
    """Mean and max time (s) from a sample's capture to the moment the server can decode it, with 10 ms pushes and
    every message delivered at once (no network): framing and container buffering only."""
    enc = OpusUplinkEncoder(bitrate, container, input_rate=sr)
    dec = OpusUplinkDecoder(container, max_samples=10**9)
    step = int(sr * push_ms / 1000)
    decoded = 0
    delays: list[float] = []
    for i in range(0, len(wav), step):
        now = (i + step) / sr  # the push happens when its last sample was captured
        for m in enc.push(wav[i : i + step]):
            n = len(dec.push(m))
            # Decoded samples [decoded, decoded + n) at 48 kHz were captured at their own times (pre-skip removed).
            captured = (decoded + np.arange(0, n, 480)) / OPUS_SR
            delays += list(now - captured)
            decoded += n
    return float(np.mean(delays)), float(np.max(delays))


def run(args) -> None:
    import soundfile as sf

    from dpslm_stream import SAMPLE_WAV
    from dpslm_stream.hub import ModelSet
    from dpslm_stream.pipeline import Pipeline
    from dpslm_stream.signals import speech_like

    bitrates = [int(b) for b in args.bitrates.split(",")]
    sample, sample_sr = sf.read(SAMPLE_WAV, dtype="float32")
    signals = {"sample.wav (speech, 16 kHz)": (sample, sample_sr),
               f"speech_like {args.seconds:g} s (16 kHz)": (speech_like(args.seconds, 16000, seed=7).astype(np.float32),
                                                            16000)}  # fmt: skip
    pipeline = Pipeline(ModelSet("tiny"), 500, 4500)
    print("models: tiny set, k=500, lambda=4500, RANDOM weights (agreement is a plumbing figure, not speech quality)")
    print("timings: one thread's CPU time (time.thread_time), median of", args.repeats, "repeats, on a shared, loaded "
          "2-core Xeon (avx512f/avx512_vnni, no AMX)")  # fmt: skip
    for name, (wav, sr) in signals.items():
        seconds = len(wav) / sr
        ref = pipeline.encode(wav, sr, score=False)
        ref_frames = frame_labels(ref.units, ref.durations)
        print(f"\n{name}: {seconds:.2f} s, {len(ref.units)} units from PCM; PCM16 uplink {2 * len(wav)} bytes "
              f"({16 * sr / 1000:.0f} kbit/s at {sr} Hz)")  # fmt: skip
        print("baselines, the same agreement for PCM that is not bit-identical (how sensitive random units are):")
        up = resample(torch.from_numpy(wav), sr, OPUS_SR).numpy()
        print("  PCM resampled to 48 kHz (the Opus path without the codec): frames {:.1%}, unit edit {:.1%}".format(
            *agree(pipeline, ref, up, OPUS_SR)))  # fmt: skip
        rng = np.random.default_rng(0)
        for snr in (40, 20, 10):
            noisy = wav + rng.standard_normal(len(wav)).astype(np.float32) * np.std(wav) * 10 ** (-snr / 20)
            print("  white noise at {} dB SNR: frames {:.1%}, unit edit {:.1%}".format(snr, *agree(pipeline, ref, noisy,
                                                                                                  sr)))  # fmt: skip
        print(f"{'bitrate':>8s} {'container':>9s} {'bytes':>7s} {'kbit/s':>7s} {'vs PCM16':>8s} {'frames agree':>12s} "
              f"{'unit edit':>9s} {'decode ms/s':>11s} {'delay mean/max ms':>18s}")  # fmt: skip
        for bitrate in bitrates:
            for container in ("ogg", "webm", "raw"):
                messages = encode(wav, sr, bitrate, container)
                nbytes = sum(map(len, messages))
                decoded = decode(messages, container)
                times = []
                for _ in range(args.repeats):
                    t0 = time.thread_time()
                    decode(messages, container)
                    times.append(time.thread_time() - t0)
                # Raw packets decode to the same audio as Ogg plus the decoder's pre-skip (no header says it).
                agreement = "(as ogg)".rjust(22)
                if container != "raw":
                    agreement = "{:12.1%} {:9.1%}".format(*agree(pipeline, ref, decoded, OPUS_SR))
                mean_d, max_d = buffering_delay(wav, sr, bitrate, container)
                print(f"{bitrate:8d} {container:>9s} {nbytes:7d} {8 * nbytes / seconds / 1000:7.1f} "
                      f"{nbytes / (2 * len(wav)):8.1%} {agreement} "
                      f"{1000 * statistics.median(times) / seconds:11.2f} "
                      f"{1000 * mean_d:8.0f} / {1000 * max_d:4.0f}")  # fmt: skip
