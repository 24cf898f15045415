"""Streaming vs offline on one file: run the streaming encoder over a file in chunks, and measure how far its units
and features are from the offline path's.

    res = stream_encode(worker, wav, sr, k=500, lmbda=4500, mode="cached", preset="low-latency", chunk_s=0.1)
    report = compare(worker, wav, sr, res)     # agreement with offline + the noise floor

The metrics (all against the offline `extract_features` + DPDP of the same audio):
- frame agreement: share of 20 ms frames whose DPDP unit is the same;
- k-means agreement: share of frames whose nearest centroid (DPDP at lambda = 0) is the same;
- unit error rate: edit distance of the deduplicated unit sequences / offline length;
- feature cosine: mean cosine similarity of the layer-11 frames.
The noise floor is the same four numbers for offline vs offline on the audio plus a tiny dither (1 LSB of 16-bit
PCM, seeded): how much the units move when the input barely changes. A streaming mode cannot be expected to do
better than that floor. On random weights every figure only checks the plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dpslm_stream.dpdp import deduplicate, dpdp
from dpslm_stream.stream.events import EndEvent, UnitEvent

DITHER = 1.0 / 32768  # one least-significant bit of 16-bit PCM


@dataclass
class StreamedEncoding:
    """What the streaming encoder produced for one file."""

    units: list[int]
    durations: list[int]
    starts: list[int]
    seconds: float
    commit_lags_s: list[float]  # per unit: audio received after its last frame before it was committed
    forced_commits: int
    unit_logprobs: list[float] | None = None
    features: Tensor | None = field(default=None, repr=False)

    @property
    def frame_units(self) -> list[int]:
        return [u for u, d in zip(self.units, self.durations) for _ in range(d)]

    def to_json(self) -> dict:
        from dpslm_stream.pipeline import FRAME_RATE, bitrate

        out = {
            "units": self.units, "durations": self.durations, "starts": self.starts,
            "start_seconds": [s / FRAME_RATE for s in self.starts], "num_frames": sum(self.durations),
            "seconds": self.seconds, "units_per_second": len(self.units) / self.seconds if self.seconds else 0.0,
            "bitrate": bitrate([self.units], self.seconds), "commit_lag_s": self.commit_lags_s,
            "forced_commits": self.forced_commits,
        }  # fmt: skip
        if self.unit_logprobs is not None:
            out["loglikelihood"] = float(sum(self.unit_logprobs))
            out["unit_logprobs"] = self.unit_logprobs
        return out


def stream_encode(worker, wav: np.ndarray, sr: int, *, k: int, lmbda: int, mode: str = "cached",
                  preset: str | None = None, left: int | None = None, hop: int | None = None,
                  lookahead: int | None = None, chunk_s: float = 0.1, num_neighbors: int | None = None,
                  score: bool = False, keep_features: bool = False) -> StreamedEncoding:  # fmt: skip
    """Push `wav` through one EncoderSession in chunks of `chunk_s` seconds, stepping the worker after each chunk
    as a live server would, and collect the committed units."""
    wav = np.asarray(wav, dtype=np.float32)
    session = worker.open_session(sr, k, lmbda, mode=mode, preset=preset, left=left, hop=hop, lookahead=lookahead,
                                  score=score, num_neighbors=num_neighbors, keep_features=keep_features)  # fmt: skip
    step = max(1, int(round(chunk_s * sr)))
    units: list[UnitEvent] = []
    end: EndEvent | None = None

    def collect() -> None:
        nonlocal end
        for event in session.poll():
            if isinstance(event, UnitEvent):
                units.append(event)
            else:
                end = event

    for start in range(0, len(wav), step):
        session.push(wav[start : start + step])
        worker.step([session])
        collect()
    session.end()
    worker.run_until_idle([session])
    collect()
    assert end is not None, "the session did not end"
    return StreamedEncoding(
        units=[e.unit for e in units], durations=[e.duration for e in units], starts=[e.start_frame for e in units],
        seconds=len(wav) / sr, commit_lags_s=[e.commit_lag_s for e in units], forced_commits=end.forced_commits,
        unit_logprobs=[e.logprob for e in units] if score else None,
        features=session.features() if keep_features else None,
    )  # fmt: skip


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two unit sequences (one row of the table at a time, vectorised)."""
    if not a or not b:
        return max(len(a), len(b))
    b_arr = np.asarray(b)
    prev = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        sub = prev[:-1] + (b_arr != x)
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(sub, prev[1:] + 1)
        # insertions run left to right: cur[j] = min(cur[j], cur[j-1] + 1), a running minimum of cur[j] - j
        cur = np.minimum.accumulate(cur - np.arange(len(cur))) + np.arange(len(cur))
        prev = cur
    return int(prev[-1])


def agreement(features: Tensor, reference: Tensor, codebook: Tensor, lmbda: float, num_neighbors: int) -> dict:
    """The four agreement figures of `features` against `reference` (both [T, D] layer-11 frames of one audio)."""
    t = min(features.shape[0], reference.shape[0])
    if t == 0:  # nothing to compare (DPDP refuses an empty input): nothing disagrees
        return {"frames": 0, "frame_agreement": 1.0, "kmeans_agreement": 1.0, "unit_error_rate": 0.0,
                "feature_cosine": 1.0}  # fmt: skip
    a, b = features[:t].float(), reference[:t].float()
    codebook = codebook.to(a.device)
    a_units, b_units = dpdp(a, codebook, lmbda, num_neighbors), dpdp(b, codebook, lmbda, num_neighbors)
    a_near, b_near = torch.cdist(a, codebook).argmin(1), torch.cdist(b, codebook).argmin(1)
    a_dedup, b_dedup = deduplicate(a_units)[0].tolist(), deduplicate(b_units)[0].tolist()
    return {
        "frames": t,
        "frame_agreement": float((a_units == b_units).float().mean()),
        "kmeans_agreement": float((a_near == b_near).float().mean()),
        "unit_error_rate": edit_distance(a_dedup, b_dedup) / max(1, len(b_dedup)),
        "feature_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()),
    }


def compare(worker, wav: np.ndarray, sr: int, streamed: StreamedEncoding, *, k: int, lmbda: int,
            num_neighbors: int, seed: int = 0) -> dict:  # fmt: skip
    """Agreement of a streamed encoding (made with keep_features=True) with the offline path, and the noise floor."""
    if streamed.features is None:
        raise ValueError("stream_encode(..., keep_features=True) is needed for a comparison")
    codebook = worker._codebook(k)

    def offline(x: np.ndarray) -> Tensor:
        with torch.inference_mode():
            w = torch.from_numpy(np.asarray(x, dtype=np.float32))[None].to(worker.device)
            return worker.extract_features(worker.wavlm, w, sr, layer=11).float().cpu()

    reference = offline(wav)
    dithered = wav + np.random.default_rng(seed).normal(0.0, DITHER, size=wav.shape).astype(np.float32)
    cpu_codebook = codebook.float().cpu()
    return {
        "streaming": agreement(streamed.features, reference, cpu_codebook, lmbda, num_neighbors),
        "noise_floor": agreement(offline(dithered), reference, cpu_codebook, lmbda, num_neighbors),
    }
