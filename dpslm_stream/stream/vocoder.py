"""The streaming vocoder: codec ids in, 24 kHz audio out, chunk by chunk (the models' WavTokenizer decoder run on
overlapping windows).

`StreamingISTFT` reproduces the whole-sequence iSTFT chunk by chunk (bit-equal on CPU: same summation order), and
`IncrementalVocoder` decodes overlapping windows of codes and stitches their spectra through it; its deviation from
the whole-sequence decode is a property of the backbone and is measured, never zero by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpslm_stream.errors import InvalidInput
from dpslm_stream.models.wavtokenizer import WavTokenizer, check_codes, envelope, overlap_add, windowed_frames

from dpslm_stream.stream.resynth_defaults import (
    DEFAULT_VOCODER_FIRST_STEP, DEFAULT_VOCODER_LEFT_CONTEXT, DEFAULT_VOCODER_LOOKAHEAD, DEFAULT_VOCODER_MIN_STEP,
)
from dpslm_stream.validate import check_int


class StreamingISTFT:
    """Chunk-wise iSTFT whose concatenated output equals `models.wavtokenizer.istft` of all frames at once.

    push() takes the next spectral frames (B, n_fft/2+1, T) and returns every sample that no later frame can
    change: after N frames, output samples [0, hop*N - pad) are final (pad = (n_fft - hop) / 2, the iSTFT's
    algorithmic delay: 900 samples = 37.5 ms at hop 600). flush() returns the last `pad` samples, normalised by the
    partial end envelope, and resets. State: R-1 partial blocks of `hop` samples (R = n_fft / hop), bounded.
    """

    def __init__(self, window: Tensor, hop_length: int):
        n_fft = window.shape[0]
        if n_fft % hop_length != 0 or (n_fft - hop_length) % 2 != 0:
            raise InvalidInput(f"window length {n_fft} must be a multiple of hop {hop_length} with even difference")
        self.window = window.float() if window.dtype not in (torch.float32, torch.float64) else window
        self.hop = hop_length
        self.overlap = n_fft // hop_length
        self.pad = (n_fft - hop_length) // 2
        # Envelope of the first R blocks (the first R-1 are partial, block R-1 and later are full), summed in
        # exactly the order `istft` uses, so the division is bit-identical too.
        self._env_start = envelope(self.window, hop_length, self.overlap)[: self.overlap]
        self.reset()

    def reset(self) -> None:
        """Forget all frames; the next push starts a new signal."""
        self._carry: Tensor | None = None  # (B, R-1, hop) partial sums of the not-yet-final blocks
        self._batch: int | None = None
        self.frames_pushed = 0
        self.samples_emitted = 0

    @property
    def state_nbytes(self) -> int:
        """Bytes held between calls (the carried partial blocks); constant for a fixed batch size."""
        return 0 if self._carry is None else self._carry.numel() * self._carry.element_size()

    def push(self, spec: Tensor) -> Tensor:
        """Add frames (B, n_fft/2+1, T) complex; return the newly final samples (B, n) real (n may be 0)."""
        n_bins = self.window.shape[0] // 2 + 1
        if spec.dim() != 3 or spec.shape[1] != n_bins or not spec.is_complex():
            raise InvalidInput(
                f"spectra must be complex of shape (B, {n_bins}, T), got {spec.dtype} {tuple(spec.shape)}"
            )
        if self._batch is not None and spec.shape[0] != self._batch:
            raise InvalidInput(f"batch size changed from {self._batch} to {spec.shape[0]}; call reset()")
        self._batch = spec.shape[0]
        t = spec.shape[2]
        if t == 0:
            return self.window.new_zeros(spec.shape[0], 0)
        blocks = overlap_add(windowed_frames(spec, self.window, self.hop), self._carry)
        self._carry = blocks[:, t:].clone()  # a copy, so the state does not pin the whole chunk's storage
        j0 = self.frames_pushed  # absolute index of the first block finalised now
        env = self._startenvelope(j0, t)
        self.frames_pushed += t
        return self._emit((blocks[:, :t] / env).flatten(1), first_sample=j0 * self.hop)

    def flush(self) -> Tensor:
        """Return the remaining samples (normalised by the end envelope) and reset. Total output = hop * frames."""
        if self._carry is None:  # no frames: nothing to say
            out = self.window.new_zeros(self._batch or 1, 0)
            self.reset()
            return out
        t = self.frames_pushed
        # The last R-1 blocks depend only on the last min(T, R) frames: shift-invariance of the envelope.
        env = envelope(self.window, self.hop, min(t, self.overlap))[-(self.overlap - 1):]
        out = self._emit((self._carry / env).flatten(1), first_sample=t * self.hop)
        self.reset()
        return out

    def _startenvelope(self, j0: int, t: int) -> Tensor:
        """Envelope of blocks j0 .. j0+t-1 as long as no end is known (start partial, then full)."""
        idx = torch.arange(j0, j0 + t, device=self.window.device).clamp(max=self.overlap - 1)
        return self._env_start[idx]

    def _emit(self, samples: Tensor, first_sample: int) -> Tensor:
        """Map pre-trim samples starting at `first_sample` to output: drop the leading pad, cap at hop*frames."""
        start = self.samples_emitted + self.pad - first_sample  # output index n is pre-trim sample n + pad
        stop = start + self.hop * self.frames_pushed - self.samples_emitted
        out = samples[:, start:stop]
        self.samples_emitted += out.shape[1]
        return out


@dataclass
class VocoderWindow:
    """One backbone run a stream needs: its codes from absolute index `start` on, and the frames up to `commit_to`
    it commits; `spectra` (1, n_fft/2+1, len(codes)) is filled by VocoderRunner.run."""

    codes: Tensor  # 1-D int64, on the CPU
    start: int
    commit_to: int
    spectra: Tensor | None = None


class VocoderRunner:
    """Runs the backbone windows of many streams: windows of equal length share one forward (rows of one batch).

    Only equal lengths batch: padding would change every frame, since the pos_net's GroupNorms and its attention
    see the whole window. A batched row is the same arithmetic as a window run alone; on the CPU the result is
    bit-equal at the released widths (measured: docs/design.md), while at small widths (the tiny test set) oneDNN
    may pick another convolution kernel for a batch and rows differ in the last bits (~3e-7 after the first conv).
    `max_batch` bounds the rows of one forward (memory and one forward's time).
    """

    def __init__(self, model: WavTokenizer, max_batch: int = 16):
        self.model = model
        self.max_batch = max_batch
        self.forwards = 0  # backbone forwards run
        self.windows = 0  # windows they computed

    @torch.inference_mode()
    def run(self, windows: list[VocoderWindow]) -> None:
        """Fill every window's spectra, one forward per group of equal-length windows (at most max_batch each)."""
        groups: dict[int, list[VocoderWindow]] = {}
        for w in windows:
            groups.setdefault(w.codes.numel(), []).append(w)
        device = self.model.head.out.weight.device
        for group in groups.values():
            for i in range(0, len(group), self.max_batch):
                rows = group[i : i + self.max_batch]
                codes = torch.stack([w.codes for w in rows]).to(device)
                spectra = self.model.spectra(codes[None])  # (B, F, L)
                for j, w in enumerate(rows):
                    w.spectra = spectra[j : j + 1]
                self.forwards += 1
                self.windows += len(rows)


class IncrementalVocoder:
    """Codes in, audio out, for one stream: windowed decoding with exact iSTFT stitching.

    To commit frames [a, b) it decodes codes [max(0, a - left_context), n) where n = codes received and
    b = n - lookahead, keeps the spectra of [a, b) and pushes them into a StreamingISTFT. The backbone runs only
    once at least `min_step` frames can be committed (`first_step` for the stream's first window, so that its first
    audio comes as soon as the lookahead exists; first_step = min_step is the uniform schedule). flush() commits the
    rest with the final window. With
    lookahead >= the stream length (nothing committed before flush) the output equals `decode` of the whole stream.
    Otherwise GroupNorm statistics and attention see a window instead of the whole sequence, so it deviates from
    `decode` (measure it; the model was trained on 3 s = 120-frame crops). Latency: (lookahead + 1.5) hops.
    left_context=None means unlimited (every window starts at code 0: cost and state grow with the stream).
    """

    def __init__(self, model: WavTokenizer, left_context: int | None = DEFAULT_VOCODER_LEFT_CONTEXT,
                 lookahead: int = DEFAULT_VOCODER_LOOKAHEAD, min_step: int = DEFAULT_VOCODER_MIN_STEP,
                 first_step: int = DEFAULT_VOCODER_FIRST_STEP):
        check_int("lookahead (frames)", lookahead, 0, kind=int)
        check_int("min_step (frames)", min_step, 1, kind=int)
        check_int("first_step (frames)", first_step, 1, kind=int)
        if left_context is not None:  # None: unlimited
            check_int("left_context (frames)", left_context, 0, kind=int)
        self.model = model
        self.left_context = left_context
        self.lookahead = lookahead
        self.min_step = min_step
        self.first_step = first_step
        self.istft = StreamingISTFT(model.head.istft.window, model.config.hop_length)
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self._codes = torch.zeros(0, dtype=torch.long)  # codes from absolute index self._base on
        self._base = 0
        self.committed = 0  # frames whose spectra are in the iSTFT
        self.istft.reset()

    @property
    def received(self) -> int:
        return self._base + self._codes.numel()

    @property
    def state_nbytes(self) -> int:
        """Bytes held between calls: retained codes (<= left_context + lookahead + min_step + last push) + iSTFT."""
        return self._codes.numel() * self._codes.element_size() + self.istft.state_nbytes

    def push(self, codes: Tensor) -> Tensor:
        """Append 1-D codes; return the audio samples (1-D, float32) that became final."""
        self.add(codes)
        window = self.plan()
        if window is None:
            return self.istft.window.new_zeros(0)
        VocoderRunner(self.model).run([window])
        return self.complete(window)

    def flush(self) -> Tensor:
        """Commit every remaining frame, return the rest of the audio (1-D) and reset."""
        window = self.plan(final=True)
        out = []
        if window is not None:
            VocoderRunner(self.model).run([window])
            out.append(self.complete(window))
        out.append(self.istft.flush()[0])
        self.reset()
        return torch.cat(out)

    # -- split form, for a worker that batches the windows of many streams (push = add + plan + run + complete) --

    def add(self, codes: Tensor) -> None:
        """Append 1-D codes (validated; no compute)."""
        if not isinstance(codes, Tensor) or codes.dim() != 1:
            raise InvalidInput(f"push() takes a 1-D integer tensor of new codes, got {getattr(codes, 'shape', codes)}")
        if codes.numel():
            check_codes(self.model, codes[None, None, :])  # validates dtype and range
            self._codes = torch.cat([self._codes, codes.to("cpu", torch.long)])

    def plan(self, final: bool = False) -> VocoderWindow | None:
        """The backbone window to run now, or None: once at least `min_step` frames past the lookahead can be
        committed (`first_step` before the first commit), or with `final` (end of stream) whatever is left. Changes
        nothing until `complete`."""
        stop = self.received if final else self.received - self.lookahead
        if stop <= self.committed or (not final and stop - self.committed < self.step_due):
            return None
        start = self._window_start()
        return VocoderWindow(codes=self._codes[start - self._base :], start=start, commit_to=stop)

    def complete(self, window: VocoderWindow) -> Tensor:
        """Commit the planned frames from the window's spectra (VocoderRunner.run filled them); return the audio."""
        if window.spectra is None or window.start != self._window_start():
            raise InvalidInput("complete() takes this stream's last plan(), after VocoderRunner.run")
        spec = window.spectra[:, :, self.committed - window.start : window.commit_to - window.start]
        audio = self.istft.push(spec)[0]
        self.committed = window.commit_to
        # Drop the codes no later window reads (none when the left context is unlimited)
        keep_from = self._window_start()
        self._codes = self._codes[keep_from - self._base :]
        self._base = keep_from
        return audio

    @property
    def step_due(self) -> int:
        """Frames past the lookahead the next window waits for: `first_step` (or `min_step` if smaller) until the
        first commit, then `min_step`."""
        return min(self.first_step, self.min_step) if self.committed == 0 else self.min_step

    def first_window_ready(self, pending: int = 0) -> bool:
        """No window committed yet, and `pending` more codes would let plan() give the first one."""
        return self.committed == 0 and self.received + pending - self.lookahead >= self.step_due

    def _window_start(self) -> int:
        """First code of the next window: `left_context` codes before the first uncommitted frame."""
        return 0 if self.left_context is None else max(0, self.committed - self.left_context)

