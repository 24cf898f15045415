"""Audio I/O and resampling: the first stage of the pipeline, before WavLM sees a sample.

Upstream resamples every input to 16 kHz with ``torchaudio.functional.resample(wav, sr, 16000)`` at its defaults
(Hann-windowed sinc, ``lowpass_filter_width=6``, ``rolloff=0.99``, rates reduced by their gcd). We do not depend on
torchaudio (each release pins one torch release), so this module re-implements that one kernel and applies it in two
ways that share the same arithmetic:

- ``resample``: offline, the same padding / strided conv1d / truncation as torchaudio. The kernel is even built in
  the waveform's dtype, as torchaudio builds it, so float32 output equals torchaudio's bit for bit (checked once
  against torchaudio 2.11 at 8/11.025/12.345/22.05/24/32/44.1/48 -> 16 kHz and 16 -> 24 kHz). That float32 kernel is
  itself ~1e-5 off the exact formula at rates with a large gcd-reduced base (11.025, 22.05 kHz); float64 input is
  exact to ~1e-13.
- ``StreamingResampler``: the kernel is a finite polyphase FIR, so output block j (``new/g`` samples) depends only on
  input samples ``[j*orig/g - width, (j+1)*orig/g + width)``. The stream emits a block as soon as its last input
  sample has arrived and carries only the input tail that later blocks still need (< ``2*width + orig/g`` samples).
  Concatenating everything it emits equals ``resample(whole)`` to float rounding, with the exact output length.

Also here: PCM byte <-> float conversions for the wire protocol, a finiteness check, and soundfile-based file I/O.
"""

from __future__ import annotations

import math
import os
from typing import Union

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor

from dpslm_stream.errors import InvalidInput
from dpslm_stream.validate import is_int

# Range of input sample rates the product accepts (telephone band to studio rate).
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000

# torchaudio.functional.resample defaults, which upstream uses (wavlm.md §2 step 1).
LOWPASS_FILTER_WIDTH = 6  # zero crossings of the sinc kept on each side
ROLLOFF = 0.99  # cutoff as a fraction of the lower Nyquist frequency

ArrayLike = Union[Tensor, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers


def _check_rate(sr: object, what: str) -> int:
    """Return ``sr`` as an int if it is a positive integer (Python or numpy), else raise InvalidInput."""
    # bool is an Integral subclass, but True is certainly not a sample rate.
    if not is_int(sr):
        raise InvalidInput(f"{what} must be an integer number of samples per second, got {sr!r} ({type(sr).__name__})")
    if sr <= 0:
        raise InvalidInput(f"{what} must be a positive integer, got {sr}")
    return int(sr)


def check_sample_rate(sr: object) -> int:
    """Validate an input sample rate against the product range; return it as an int.

    Any integer rate in [8000, 48000] Hz is accepted (the resampler handles arbitrary integer ratios).
    """
    sr = _check_rate(sr, "sample rate")
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise InvalidInput(f"sample rate {sr} Hz is out of range: expected an integer in "
                           f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz")
    return sr


def check_finite(x: ArrayLike, what: str = "audio") -> None:
    """Raise InvalidInput if ``x`` (tensor or array) contains NaN or +-Inf; ``what`` names it in the message."""
    finite = torch.isfinite(x) if isinstance(x, Tensor) else np.isfinite(np.asarray(x))
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise InvalidInput(f"{what} contains {n_bad} non-finite value(s) (NaN or Inf); expected finite samples")


# ----------------------------------------------------------------------------------------------------------------
# The windowed-sinc kernel (torchaudio's sinc_interp_hann) and its application


def _reduced_rates(orig_sr: int, new_sr: int) -> tuple[int, int]:
    """Divide both rates by their gcd: the kernel has one phase per output sample of a period of new/g samples."""
    g = math.gcd(orig_sr, new_sr)
    return orig_sr // g, new_sr // g


def _sinc_kernel(orig: int, new: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, int]:
    """Polyphase kernel for gcd-reduced rates ``orig -> new``: a ``[new, 1, 2*width + orig]`` conv1d weight, and width.

    Row i holds the weights that produce output sample ``j*new + i`` from input samples
    ``j*orig - width ... j*orig + orig + width - 1``:
    ``w(t) = (base/orig) * sinc(pi*t) * cos(pi*t / (2*L))**2`` with ``t = base*(s/orig - m/new)`` clamped to [-L, L],
    ``base = min(orig, new) * rolloff`` and L the lowpass filter width.

    The operations and their order follow torchaudio's ``_get_sinc_resample_kernel`` and are done in ``dtype`` (the
    waveform's dtype, as torchaudio does), so that float32 output matches upstream's to the last bits, not just
    to float rounding.
    """
    base = min(orig, new) * ROLLOFF
    # Enough input taps on each side to cover L zero crossings of a sinc dilated to the lower rate.
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base)
    idx = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new + idx
    t *= base
    t = t.clamp_(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t *= math.pi
    scale = base / orig  # unit DC gain: the kernel sums to ~1 over each phase
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernel *= window * scale
    return kernel, width


def resampler_kernel_size(orig_sr: int, new_sr: int = 16000) -> int:
    """Elements of the polyphase kernel that resampling ``orig_sr -> new_sr`` builds (``_sinc_kernel``), computed
    without building it. It grows with the gcd-reduced rates: 76k at 44.1 kHz, but 769M at 47999 Hz (3 GB of float32
    and tens of seconds to build), so a server bounds it before it opens a stream (``serve --max-resampler-taps``)."""
    orig, new = _reduced_rates(_check_rate(orig_sr, "orig_sr"), _check_rate(new_sr, "new_sr"))
    if orig == new:
        return 0
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * ROLLOFF))
    return new * (2 * width + orig)


def _apply_kernel(padded: Tensor, kernel: Tensor, orig: int) -> Tensor:
    """Run the polyphase kernel over already-padded input ``[B, L]``; return ``[B, n_blocks * new]``.

    Block j reads ``padded[:, j*orig : j*orig + kernel_len]``; a stride-``orig`` conv1d computes every phase of
    every block at once, and the transpose interleaves phases into time order. This is the only place where the
    resampling arithmetic happens; offline and streaming both call it.
    """
    out = F.conv1d(padded[:, None], kernel, stride=orig)  # [B, new, n_blocks]
    return out.transpose(1, 2).reshape(padded.shape[0], -1)


def _output_length(n_in: int, orig: int, new: int) -> int:
    """ceil(new * n_in / orig) in exact integer arithmetic (torchaudio computes it in float64; same for any
    length below ~1e13 samples)."""
    return -(-new * n_in // orig)


def resample(wav: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """Resample ``wav [..., T]`` from ``orig_sr`` to ``new_sr`` Hz exactly as ``torchaudio.functional.resample``
    does with its defaults; the output has ``ceil(new_sr * T / orig_sr)`` samples.

    Equal rates return ``wav`` itself, unchanged (torchaudio does the same, and upstream's 16 kHz path relies on it).
    """
    orig_sr = _check_rate(orig_sr, "orig_sr")
    new_sr = _check_rate(new_sr, "new_sr")
    if not isinstance(wav, Tensor):
        raise InvalidInput(f"wav must be a torch.Tensor of shape [..., T], got {type(wav).__name__}")
    if wav.ndim == 0:
        raise InvalidInput("wav must have a time dimension: expected shape [..., T], got a 0-d tensor")
    if not wav.is_floating_point():
        raise InvalidInput(f"wav must be a floating-point tensor, got {wav.dtype}; convert PCM with pcm16_to_float")
    if orig_sr == new_sr:
        return wav

    orig, new = _reduced_rates(orig_sr, new_sr)
    kernel, width = _sinc_kernel(orig, new, wav.dtype, wav.device)
    length = wav.shape[-1]
    # Explicit batch size (not -1) so that an empty signal (T = 0) still reshapes; it resamples to 0 samples.
    flat = wav.reshape(math.prod(wav.shape[:-1]), length)
    # Zeros before and after: `width` so the first/last outputs see a full window, plus one extra block (`orig`)
    # on the right so the last partial block is still produced; the surplus is cut off below.
    padded = F.pad(flat, (width, width + orig))
    out = _apply_kernel(padded, kernel, orig)[:, : _output_length(length, orig, new)]
    return out.reshape(wav.shape[:-1] + out.shape[-1:])


class StreamingResampler:
    """Exact streaming form of ``resample`` for one mono stream.

    ``push(chunk)`` returns every output sample that no future input can change; ``flush()`` returns the rest and
    resets the stream. For any chunking, ``cat(push outputs..., flush())`` equals ``resample(cat(chunks))`` to float
    rounding, with the same length. The state is the input tail the next block still needs (fewer than
    ``2*width + orig/g`` samples; 474 samples / 1.9 KB at 44.1 kHz) plus a sample counter.

    Chunks are converted to ``dtype`` on ``device`` (fixed per stream; the kernel is built once, in that dtype).
    """

    def __init__(self, orig_sr: int, new_sr: int = 16000, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.orig_sr = _check_rate(orig_sr, "orig_sr")
        self.new_sr = _check_rate(new_sr, "new_sr")
        if not dtype.is_floating_point:
            raise InvalidInput(f"dtype must be a floating-point torch dtype, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device)
        self._orig, self._new = _reduced_rates(self.orig_sr, self.new_sr)
        self._identity = self.orig_sr == self.new_sr
        if not self._identity:
            self._kernel, self._width = _sinc_kernel(self._orig, self._new, dtype, self.device)
        self.reset()

    def reset(self) -> None:
        """Forget all input: the next push starts a new stream."""
        self._n_in = 0  # input samples received so far (fixes the final output length)
        self._n_out = 0  # output samples emitted so far
        # Padded input from the start of the next block onwards. The stream begins with the left zero padding.
        pad = 0 if self._identity else self._width
        self._buf = torch.zeros(pad, dtype=self.dtype, device=self.device)

    @property
    def state_nbytes(self) -> int:
        """Bytes of carried signal state (the input tail); bounded by ``(2*width + orig/g) * itemsize``."""
        return self._buf.numel() * self._buf.element_size()

    def _as_chunk(self, chunk: ArrayLike) -> Tensor:
        """Validate a pushed chunk and return it as a 1-D tensor in the stream's dtype and device."""
        if isinstance(chunk, np.ndarray):
            if not np.issubdtype(chunk.dtype, np.floating):
                raise InvalidInput(f"chunk must hold float samples in [-1, 1], got numpy {chunk.dtype}; "
                                   "convert PCM with pcm16_to_float")
            chunk = torch.from_numpy(np.ascontiguousarray(chunk))
        elif not isinstance(chunk, Tensor):
            raise InvalidInput(f"chunk must be a 1-D torch.Tensor or numpy array, got {type(chunk).__name__}")
        elif not chunk.is_floating_point():
            raise InvalidInput(f"chunk must hold float samples in [-1, 1], got {chunk.dtype}; "
                               "convert PCM with pcm16_to_float")
        if chunk.ndim != 1:
            raise InvalidInput(f"chunk must be 1-D (mono samples), got shape {tuple(chunk.shape)}")
        return chunk.to(dtype=self.dtype, device=self.device)

    def _emit(self, n_blocks: int) -> Tensor:
        """Compute the next ``n_blocks`` output blocks from the buffer and drop the input they no longer need."""
        if n_blocks <= 0:
            return self._buf.new_zeros(0)
        kernel_len = self._kernel.shape[-1]
        used = (n_blocks - 1) * self._orig + kernel_len
        out = _apply_kernel(self._buf[None, :used], self._kernel, self._orig)[0]
        # clone() so the small tail does not keep the whole (possibly large) pushed buffer alive.
        self._buf = self._buf[n_blocks * self._orig:].clone()
        return out

    def push(self, chunk: ArrayLike) -> Tensor:
        """Add input samples; return the output samples that are now final (possibly none)."""
        chunk = self._as_chunk(chunk)
        self._n_in += chunk.numel()
        if self._identity:
            self._n_out += chunk.numel()
            return chunk.clone()  # never hand back a view of the caller's (possibly reused) buffer
        self._buf = torch.cat([self._buf, chunk])
        # Block j (counted from the buffer start) is complete once its whole kernel span has arrived.
        kernel_len = self._kernel.shape[-1]
        n_blocks = (self._buf.numel() - kernel_len) // self._orig + 1 if self._buf.numel() >= kernel_len else 0
        out = self._emit(n_blocks)
        self._n_out += out.numel()
        return out

    def flush(self) -> Tensor:
        """End the stream: return the remaining output (the right edge sees zero padding), then reset."""
        if self._identity:
            self.reset()
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        # The same right padding as offline: width zeros plus one block, so the last partial block is produced.
        self._buf = torch.cat([self._buf, self._buf.new_zeros(self._width + self._orig)])
        kernel_len = self._kernel.shape[-1]
        n_blocks = (self._buf.numel() - kernel_len) // self._orig + 1
        remaining = _output_length(self._n_in, self._orig, self._new) - self._n_out
        out = self._emit(n_blocks)[:remaining]
        self.reset()
        return out


# ----------------------------------------------------------------------------------------------------------------
# PCM conversions (wire formats)

# int16 full scale. Dividing by 32768 (not 32767) maps every int16 to [-1, 1) exactly, as soundfile/torchaudio do.
_PCM16_SCALE = 32768.0


def _as_bytes(b: object, what: str) -> memoryview:
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"{what} must be bytes, got {type(b).__name__}")
    return memoryview(b).cast("B")


def pcm16_to_float(b: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM bytes -> float32 samples in [-1, 1) (divided by 32768)."""
    view = _as_bytes(b, "PCM16 data")
    if len(view) % 2:
        raise InvalidInput(f"PCM16 data must have an even number of bytes (2 per sample), got {len(view)}")
    return np.frombuffer(view, dtype="<i2").astype(np.float32) / np.float32(_PCM16_SCALE)


def float_to_pcm16(x: ArrayLike) -> bytes:
    """Float samples -> little-endian 16-bit PCM bytes: scaled by 32768, rounded to nearest (ties to even) and
    clipped to [-32768, 32767], so ``pcm16_to_float`` followed by this is the identity. Rejects NaN/Inf."""
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise InvalidInput(f"samples must be floats in [-1, 1], got dtype {a.dtype}")
    check_finite(a, "samples")
    q = np.clip(np.rint(a.astype(np.float64) * _PCM16_SCALE), -32768, 32767)
    return q.astype("<i2").tobytes()


def float32le_to_float(b: bytes) -> np.ndarray:
    """Little-endian IEEE float32 bytes -> float32 samples (a writable copy; values are not checked: see
    ``check_finite``)."""
    view = _as_bytes(b, "float32 data")
    if len(view) % 4:
        raise InvalidInput(f"float32 data must have a multiple of 4 bytes (4 per sample), got {len(view)}")
    return np.frombuffer(view, dtype="<f4").astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Files


def load_audio(path: str | os.PathLike, mono: str = "mean", notify=None) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile; return ``(float32 samples [T], sample_rate)``.

    Integer formats are scaled to [-1, 1) (PCM16 divided by 32768, as torchaudio.load did upstream). Multi-channel
    audio is made mono: ``mono="mean"`` averages the channels (keeps both sides of a stereo recording; upstream
    accepted only 1-channel input), ``mono="first"`` takes channel 0. The rate is returned as-is, not validated.
    ``notify(message)``, if given, is told when channels were mixed down (the commands print it: never silently).
    """
    if mono not in ("mean", "first"):
        raise InvalidInput(f"mono must be 'mean' or 'first', got {mono!r}")
    if not os.path.isfile(path):
        raise InvalidInput(f"audio file not found: {os.fspath(path)!r}")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # [T, channels]
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InvalidInput(f"cannot read audio file {os.fspath(path)!r}: {e}; expected a format libsndfile "
                           "reads (WAV, FLAC, OGG, ...)") from e
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise InvalidInput(f"audio file {os.fspath(path)!r} contains no samples")
    wav = data.mean(axis=1, dtype=np.float32) if mono == "mean" else data[:, 0]
    if notify is not None and data.shape[1] > 1:
        how = "averaged to mono" if mono == "mean" else "channel 0 kept"
        notify(f"{os.fspath(path)} has {data.shape[1]} channels: {how}")
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr)


def save_wav(path: str | os.PathLike, wav: ArrayLike, sr: int) -> None:
    """Write mono float samples ``[T]`` (or ``[1, T]``) as a 16-bit PCM WAV file (quantised by float_to_pcm16)."""
    sr = _check_rate(sr, "sr")
    a = wav.detach().cpu().numpy() if isinstance(wav, Tensor) else np.asarray(wav)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise InvalidInput(f"wav must be mono, shape [T] or [1, T], got shape {a.shape}")
    pcm = np.frombuffer(float_to_pcm16(a), dtype="<i2")
    # Writing int16 data with subtype PCM_16 stores it verbatim (no second, libsndfile-side quantisation).
    sf.write(path, pcm, sr, subtype="PCM_16", format="WAV")
