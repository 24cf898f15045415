"""Discontinuous transmission (DTX): a voice activity detector marks silent 20 ms frames; units lying wholly in
silence are not sent. Off by default (`codec encode --dtx`).

The VAD is webrtcvad (the `webrtcvad-wheels` package, a small C extension; the `dtx` extra): it decides per 10/20/30
ms frame of 16 kHz PCM16, and 20 ms is exactly one DPDP frame. A hangover keeps a few frames after speech (word
endings, short closures) so only real pauses are dropped. The receiver learns each pause from the packets (in a DTX
stream the packet after a pause carries its length in packet intervals) and renders silence there.
"""

from __future__ import annotations

import numpy as np

from dpslm_stream.errors import InvalidInput

FRAME_SAMPLES = 320  # 20 ms at 16 kHz: one DPDP frame


def speech_frames(wav: np.ndarray, sr: int, num_frames: int, mode: int = 2, hangover: int = 10) -> np.ndarray:
    """bool [num_frames]: frame i (samples 320 i .. 320 i + 320 at 16 kHz) holds speech, or follows speech by at most
    `hangover` frames (or precedes it by 2)."""
    try:
        import webrtcvad
    except ImportError:
        raise InvalidInput("--dtx needs the VAD: pip install 'dpslm-stream[dtx]' (webrtcvad-wheels)") from None
    import torch

    from dpslm_stream.audio import float_to_pcm16, resample

    if not 0 <= mode <= 3:
        raise InvalidInput(f"VAD mode must be 0..3 (3 drops the most), got {mode}")
    x = np.asarray(wav, dtype=np.float32)
    if sr != 16000:
        x = resample(torch.from_numpy(x), sr, 16000).numpy()
    pcm = float_to_pcm16(np.clip(x, -1.0, 1.0))
    vad = webrtcvad.Vad(mode)
    raw = np.zeros(num_frames, dtype=bool)
    for i in range(num_frames):
        frame = pcm[2 * FRAME_SAMPLES * i : 2 * FRAME_SAMPLES * (i + 1)]
        raw[i] = len(frame) == 2 * FRAME_SAMPLES and vad.is_speech(frame, 16000)
    out = raw.copy()
    for i in np.flatnonzero(raw):
        out[i : i + hangover + 1] = True
        out[max(0, i - 2) : i] = True
    return out


def drop_silence(commits: list, speech: np.ndarray) -> tuple[list, int]:
    """(the commits whose unit touches a speech frame, each with the milliseconds of silence dropped just before it as
    a 4th element; the number of units dropped). Commits are ([u], [d], t_ms) in order."""
    kept, dropped, start, pause = [], 0, 0, 0
    for units, durations, t in commits:
        d = int(durations[0])
        if speech[start : start + d].any():
            kept.append((units, durations, t, pause))
            pause = 0
        else:
            dropped += 1
            pause += 20 * d  # 20 ms frames
        start += d
    return kept, dropped
