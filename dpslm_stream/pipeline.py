"""The offline DP-SLM flow, as the upstream README runs it, on one loaded model set.

    audio -> WavLM-Large layer 11 (50 Hz) -> DPDP units (k, lambda, N = int(0.05 k)) -> deduplicate -> ULM log-lik
    units -> ELLA-V codec ids (40 Hz) -> WavTokenizer -> 24 kHz audio

`Pipeline` owns the loaded models for one (k, lambda); `encode` and `resynthesize` are the offline paths the CLI and
the tests use, and the reference the streaming stages are compared against.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from dpslm_stream import hub
from dpslm_stream.device import setup_model_device
from dpslm_stream.errors import InvalidInput
from dpslm_stream.models.precision import check_precision, transformer_precision
from dpslm_stream.models.wavtokenizer import apply_precision as apply_wavtokenizer_precision

FRAME_RATE = 50  # WavLM frames per second (hop 320 at 16 kHz)


def default_num_neighbors(k: int) -> int:
    """DP-SLM's README restricts each frame to its int(0.05 k) nearest codes (25 for k=500)."""
    return max(1, int(0.05 * k))


def bitrate(unit_sequences: Iterable[Sequence[int]], total_seconds: float) -> float:
    """The authors' definition (ZeroSyl eval/bitrate.py): N_units * H(unigram distribution) / total seconds, in bit/s,
    over deduplicated units, with the unigram distribution estimated on the same units."""
    counts = Counter()
    for seq in unit_sequences:
        counts.update(int(u) for u in seq)
    n = sum(counts.values())
    if n == 0 or total_seconds <= 0:
        return 0.0
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    return n * entropy / total_seconds


@dataclass
class EncodeResult:
    """Deduplicated units of one utterance, textlesslib style (units + durations), with times and scores."""

    units: list[int]
    durations: list[int]  # frames (20 ms) per unit
    num_frames: int
    seconds: float
    frame_units: list[int] = field(repr=False, default_factory=list)  # one unit per frame, before deduplication
    unit_logprobs: list[float] | None = None  # ULM log p(u_i | BOS, u_<i), natural log
    features: torch.Tensor | None = field(repr=False, default=None)

    @property
    def starts(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.durations)[:-1]]).astype(int).tolist() if self.units else []

    @property
    def loglikelihood(self) -> float | None:
        return None if self.unit_logprobs is None else float(sum(self.unit_logprobs))

    def to_json(self, **extra) -> dict:
        out = {
            "units": self.units,
            "durations": self.durations,
            "starts": self.starts,
            "start_seconds": [s / FRAME_RATE for s in self.starts],
            "num_frames": self.num_frames,
            "seconds": self.seconds,
            "units_per_second": len(self.units) / self.seconds if self.seconds else 0.0,
            "bitrate": bitrate([self.units], self.seconds),
        }
        if self.unit_logprobs is not None:
            out["loglikelihood"] = self.loglikelihood
            out["unit_logprobs"] = self.unit_logprobs
        out.update(extra)
        return out


class Pipeline:
    """Models for one (k, lambda) from one model set, loaded lazily (the encoder never loads the decoder)."""

    def __init__(self, models: hub.ModelSet | str = "release", k: int = hub.DEFAULT_K, lmbda: int = hub.DEFAULT_LMBDA,
                 device: str | torch.device = "cpu", num_neighbors: int | None = None,
                 precision: str = "exact", allow_tf32: bool = False):  # fmt: skip
        """precision: "exact" (float32, upstream's numbers) or "fast" for the unit LM, ELLA-V and WavTokenizer
        (models/precision.py picks the kernels for this machine; the WavLM encoder stays float32).
        allow_tf32: CUDA TF32 matmuls/convolutions (faster, not exact; off by default)."""
        self.models = hub.ModelSet(models) if isinstance(models, str) else models
        self.precision = check_precision(precision)
        self.k, self.lmbda = hub.check_pair(k, lmbda)
        self.device = setup_model_device(device, allow_tf32)  # TF32 off on CUDA: offline results stay exact
        self.num_neighbors = default_num_neighbors(self.k) if num_neighbors is None else num_neighbors
        self._cache: dict[str, object] = {}

    def _get(self, name: str, load):
        if name not in self._cache:
            self._cache[name] = load()
        return self._cache[name]

    @property
    def wavlm(self):
        return self._get("wavlm", lambda: self.models.wavlm(self.device))

    @property
    def codebook(self) -> torch.Tensor:
        return self._get("codebook", lambda: self.models.codebook(self.k, self.device))

    @property
    def ulm(self):
        def load():
            model, tokenizer = self.models.ulm(self.k, self.lmbda, self.device)
            return self._converted(model, "ulm"), tokenizer

        return self._get("ulm", load)

    @property
    def ellav(self):
        return self._get("ellav", lambda: self._converted(self.models.ellav(self.k, self.lmbda, self.device), "ellav"))

    @property
    def wavtokenizer(self):
        def load():
            loaded = self.models.wavtokenizer(self.device)
            apply_wavtokenizer_precision(loaded[0], self.precision)
            return loaded

        return self._get("wavtokenizer", load)

    def _converted(self, model, kind: str):
        transformer_precision(model, self.precision, kind)
        return model

    def precision_plans(self) -> dict:
        """What each model loaded so far runs in (models/precision.py)."""
        loaded = {"ulm": (self._cache.get("ulm") or (None,))[0], "ellav": self._cache.get("ellav"),
                  "wavtokenizer": (self._cache.get("wavtokenizer") or (None,))[0]}  # fmt: skip
        return {name: m.precision_plan.describe() for name, m in loaded.items() if m is not None}

    @torch.inference_mode()
    def features(self, wav: torch.Tensor | np.ndarray, sr: int) -> torch.Tensor:
        """Layer-11 features [N, D] exactly as upstream's extract_features (any rate in, 16 kHz inside)."""
        model, extract = self.wavlm
        wav = torch.as_tensor(wav, dtype=torch.float32).cpu()
        if wav.dim() == 1:
            wav = wav[None]
        # Resampled on the CPU (extract_features moves the 16 kHz audio to the model): every path (corpus, server,
        # this) resamples with the same kernel on the same device, so units cannot differ by path.
        return extract(model, wav, sr, layer=11)

    @torch.inference_mode()
    def quantize(self, features: torch.Tensor) -> torch.Tensor:
        from dpslm_stream.dpdp import dpdp

        return dpdp(features, self.codebook, self.lmbda, self.num_neighbors)

    @torch.inference_mode()
    def score(self, units: Sequence[int]) -> list[float]:
        """Per-unit ULM log-probs of deduplicated units; they sum to upstream's ulm.loglikelihood(encode(units))."""
        ulm, tokenizer = self.ulm
        if len(units) == 0:
            return []
        ids = tokenizer.encode(list(units)).to(self.device)
        return ulm.unit_logprobs(ids).tolist()

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor | np.ndarray, sr: int, score: bool = True, keep_features: bool = False) -> EncodeResult:
        from dpslm_stream.dpdp import deduplicate

        feats = self.features(wav, sr)
        frame_units = self.quantize(feats)
        units, durations = deduplicate(frame_units)
        n = int(feats.shape[0])
        res = EncodeResult(
            units=units.tolist(), durations=durations.tolist(), num_frames=n,
            seconds=torch.as_tensor(wav).shape[-1] / sr, frame_units=frame_units.tolist(),
            features=feats if keep_features else None,
        )  # fmt: skip
        if score:
            res.unit_logprobs = self.score(res.units)
        return res

    @torch.inference_mode()
    def resynthesize(self, units: Sequence[int], *, greedy: bool = True, temperature: float = 1.0, top_p: float = 0.8,
                     max_codec_tokens_per_phone: int = 10, max_tokens: int | None = None, num_samples: int = 1,
                     seed: int | None = None) -> list[tuple[torch.Tensor, list[int], bool]]:  # fmt: skip
        """Deduplicated units -> [(wav[1, 600 L] at 24 kHz, codec ids, finished)] per sample, as dp-slm's example."""
        units = [int(u) for u in units]
        if not units:
            raise InvalidInput("cannot resynthesize an empty unit sequence")
        if min(units) < 0 or max(units) >= self.k:
            raise InvalidInput(f"unit ids must be in 0..{self.k - 1} for k={self.k}; got {min(units)}..{max(units)}")
        ellav = self.ellav
        wt, _, vocode = self.wavtokenizer
        if max_tokens is None:  # room for every unit's own tokens plus its codec tokens
            max_tokens = len(units) * (max_codec_tokens_per_phone + 3) + 8
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        codes, finished = ellav.generate_ids(
            [units] * num_samples, max_tokens=max_tokens, max_codec_tokens_per_phone=max_codec_tokens_per_phone,
            temperature=temperature, top_p=0.0 if greedy else top_p, generator=gen,
        )  # fmt: skip
        out = []
        for ids, done in zip(codes, finished):
            if len(ids) == 0:
                wav = torch.zeros(1, 0)
            else:
                wav, _ = vocode(wt, torch.tensor(ids, device=self.device)[None, None, :])
            out.append((wav.cpu(), list(ids), bool(done)))
        return out
