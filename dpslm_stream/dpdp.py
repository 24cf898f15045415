"""Exact DPDP quantisation: offline, batched, and streaming with partial traceback.

DPDP (duration-penalised dynamic programming, Kamper arXiv 2202.11929) turns a sequence of feature frames
x_0..x_{T-1} into codebook indices u_0..u_{T-1} that minimise

    J(u) = sum_t ||x_t - c_{u_t}||^2 + lmbda * #{t > 0 : u_t != u_{t-1}},

with each frame restricted to its `num_neighbors` nearest codes. The upstream quantizer (nicolvisser/dpdp) solves
this as a segmental DP in O(T^2 K). Here it is a Viterbi recursion over units, O(T K) per utterance:

    cost[t, k] = q[t, k] + min(cost[t-1, k], min_j cost[t-1, j] + lmbda)

so each step needs only the previous column and its minimum. A state's best path is "stay in k since its segment
start s", preceded by the best path overall at frame s-1. Storing, per frame, the argmin state and that state's
segment start is therefore enough to trace the whole optimum back in O(T) memory.

The recursion is causal, which is what makes exact streaming possible: a frame's unit is final as soon as every
state that can still lie on the optimal path ("live": cost <= min + lmbda; any other state is strictly beaten by
switching from the argmin) traces back through the same unit there. `StreamingDPDP` commits exactly that common
prefix after every chunk, so for every chunking its output equals `dpdp()` on the whole sequence, bit for bit.

Bitwise equality needs the squared distances of a frame not to depend on how frames are chunked. A float GEMM's
rounding depends on the matrix shape (and, for MKL, on memory alignment), so distances are always computed in
blocks of exactly `BLOCK_FRAMES` rows copied into an aligned scratch buffer, with frame t at row t % BLOCK_FRAMES:
every frame then goes through the very same GEMM call whether it arrives alone or in a 2000-frame utterance.
Costs are accumulated in float64; the compiled (numba) inner loop, shared by the offline and streaming paths, is in
dpslm_stream/dpdp_kernels.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from dpslm_stream.dpdp_kernels import _COMMITTED, _FORCED, _dpdp_kernel, _flush_kernel, _stream_kernel
from dpslm_stream.errors import InvalidInput
from dpslm_stream.validate import check_number, is_int

__all__ = [
    "BLOCK_FRAMES",
    "DPDPQuantizer",
    "Segment",
    "StreamingDPDP",
    "deduplicate",
    "dpdp",
    "dpdp_batch",
    "dpdp_cost",
    "segments_from_units",
]

# Rows per distance GEMM. Every frame's distances come out of a GEMM of exactly this shape, so they are identical
# however the frames were chunked. 64 keeps a 1-frame streaming push cheap (~0.3 ms at K=500, D=1024) while
# costing offline only ~20% over one big GEMM.
BLOCK_FRAMES = 64


# ----------------------------------------------------------------------------------------------------------------
# Segments and deduplication


@dataclass(frozen=True)
class Segment:
    """A run of frames [start, end) (end exclusive, frame indices from the start of the stream) with one unit."""

    unit: int
    start: int
    end: int

    @property
    def duration(self) -> int:
        """Number of frames in the segment."""
        return self.end - self.start


def _as_unit_tensor(units: Tensor | Sequence[int]) -> Tensor:
    """Units as a 1-D int64 CPU tensor, or InvalidInput."""
    if isinstance(units, Tensor):
        if units.dim() != 1:
            raise InvalidInput(f"units must be 1-D (T,), got shape {tuple(units.shape)}")
        if units.is_floating_point() or units.is_complex() or units.dtype == torch.bool:
            raise InvalidInput(f"units must be an integer tensor, got dtype {units.dtype}")
        return units.detach().to(device="cpu", dtype=torch.int64)
    try:
        return torch.as_tensor(list(units), dtype=torch.int64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidInput(f"units must be a sequence of integers: {err}") from None


def deduplicate(units: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Collapses runs of repeated units: returns (units, durations), both int64, as textlesslib's encoder does.

    `durations[i]` is the number of frames unit `units[i]` lasted; `durations.sum()` is the input length.
    """
    u = _as_unit_tensor(units)
    if u.numel() == 0:
        return u.clone(), torch.zeros(0, dtype=torch.int64)
    deduped, durations = torch.unique_consecutive(u, return_counts=True)
    return deduped, durations.to(torch.int64)


def segments_from_units(units: Tensor | Sequence[int]) -> list[Segment]:
    """The per-frame units as a list of Segments (one per run of equal units), in order."""
    deduped, durations = deduplicate(units)
    segments = []
    start = 0
    for unit, duration in zip(deduped.tolist(), durations.tolist()):
        segments.append(Segment(unit, start, start + duration))
        start += duration
    return segments


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _check_codebook(codebook: Tensor) -> None:
    if not isinstance(codebook, Tensor):
        raise InvalidInput(f"codebook must be a torch.Tensor of shape (K, D), got {type(codebook).__name__}")
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise InvalidInput(f"codebook must have shape (K, D) with K, D >= 1, got {tuple(codebook.shape)}")
    if not codebook.is_floating_point():
        raise InvalidInput(f"codebook must be a floating-point tensor, got dtype {codebook.dtype}")
    if not bool(torch.isfinite(codebook).all()):
        raise InvalidInput("codebook contains NaN or Inf values; expected finite centroids")


def _check_lmbda(lmbda: float) -> float:
    return check_number("lmbda (a penalty per unit change)", lmbda, 0.0, what="finite real number")


def _check_num_neighbors(num_neighbors: int | None, num_codes: int) -> int:
    """The effective neighbour count: num_codes when None."""
    if num_neighbors is None:
        return num_codes
    if not is_int(num_neighbors):
        raise InvalidInput(f"num_neighbors must be None or an int in 1..{num_codes}, got {num_neighbors!r}")
    if not 1 <= int(num_neighbors) <= num_codes:
        raise InvalidInput(
            f"num_neighbors must be in 1..K={num_codes} (codes each frame may take), got {int(num_neighbors)}"
        )
    return int(num_neighbors)


def _check_features(features: Tensor, dim: int, what: str = "features", allow_empty: bool = False) -> None:
    if not isinstance(features, Tensor):
        raise InvalidInput(f"{what} must be a torch.Tensor of shape (T, {dim}), got {type(features).__name__}")
    if features.dim() != 2:
        raise InvalidInput(f"{what} must have shape (T, D={dim}), got {tuple(features.shape)}")
    if features.shape[1] != dim:
        raise InvalidInput(f"{what} have D={features.shape[1]} but the codebook has D={dim}; they must match")
    if features.shape[0] == 0 and not allow_empty:
        raise InvalidInput(f"{what} are empty (T=0); expected at least one frame")
    if not features.is_floating_point():
        raise InvalidInput(f"{what} must be a floating-point tensor, got dtype {features.dtype}")


def _work_dtype(codebook: Tensor) -> torch.dtype:
    """float64 for a float64 codebook, else float32: the same rule offline and streaming, whatever the features."""
    return torch.float64 if codebook.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Distances


class _Distances:
    """Squared Euclidean distances to a fixed codebook, identical per frame however the frames are chunked.

    Frames are copied into a (BLOCK_FRAMES, D) scratch buffer, frame t at row t % BLOCK_FRAMES, and every block goes
    through the same GEMM call on an aligned buffer of that shape: rounding then cannot depend on the chunk's shape or
    on the caller's memory alignment (MKL's results may depend on both). The expansion ||x||^2 - 2 x.c + ||c||^2 is
    the one torch.cdist uses for large inputs (and thus upstream).
    """

    def __init__(self, codebook: Tensor):
        dtype = _work_dtype(codebook)
        c = codebook.detach().to(dtype)
        self.codebook_t = c.t().contiguous()  # (D, K), made contiguous once so every GEMM sees the same layout
        self.codebook_sq = (c * c).sum(dim=1)  # (K,)
        self.num_codes, self.dim = c.shape
        self.dtype = dtype
        self.device = c.device

    def __call__(self, x: Tensor, first_frame: int) -> tuple[Tensor, int]:
        """Distances for frames first_frame .. first_frame + len(x) - 1.

        Returns (q, offset): q has whole blocks of rows; the frames are q[offset : offset + len(x)].
        Raises InvalidInput (and changes nothing) if a frame holds NaN/Inf or is too large to square.
        """
        n = x.shape[0]
        x = x.detach().to(device=self.device, dtype=self.dtype)
        offset = first_frame % BLOCK_FRAMES
        num_blocks = (offset + n + BLOCK_FRAMES - 1) // BLOCK_FRAMES
        q = torch.empty(num_blocks * BLOCK_FRAMES, self.num_codes, dtype=self.dtype, device=self.device)
        sq_norms = torch.empty(num_blocks * BLOCK_FRAMES, dtype=self.dtype, device=self.device)
        # A fresh buffer per call (64-byte aligned like every torch allocation), not a kept one: a tensor kept across
        # calls would break when the caller switches in or out of torch.inference_mode between them.
        scratch = torch.empty(BLOCK_FRAMES, self.dim, dtype=self.dtype, device=self.device)
        for b in range(num_blocks):
            rows = slice(b * BLOCK_FRAMES, (b + 1) * BLOCK_FRAMES)
            lo = max(offset - b * BLOCK_FRAMES, 0)  # first scratch row that holds a frame of x
            hi = min(offset + n - b * BLOCK_FRAMES, BLOCK_FRAMES)
            if lo > 0 or hi < BLOCK_FRAMES:
                scratch.zero_()  # rows outside x: any finite value would do, zero keeps them cheap and finite
            scratch[lo:hi] = x[b * BLOCK_FRAMES + lo - offset : b * BLOCK_FRAMES + hi - offset]
            torch.sum(scratch * scratch, dim=1, out=sq_norms[rows])
            # ||c||^2 - 2 x.c, then + ||x||^2, clamped at 0 as cdist does; all on the cache-resident block.
            torch.addmm(self.codebook_sq, scratch, self.codebook_t, beta=1.0, alpha=-2.0, out=q[rows])
            q[rows].add_(sq_norms[rows, None]).clamp_(min=0.0)
        bad = ~torch.isfinite(sq_norms[offset : offset + n])
        if bool(bad.any()):
            first_bad = first_frame + int(bad.nonzero()[0, 0])
            raise InvalidInput(
                f"features contain NaN/Inf (or values too large to square) at frame {first_bad}; expected finite values"
            )
        return q, offset


def _to_numpy(q: Tensor) -> np.ndarray:
    """A CPU numpy view of q (copied off the GPU when q lives there: the recursion runs on the CPU)."""
    return q.cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Offline API


def dpdp(features: Tensor, codebook: Tensor, lmbda: float, num_neighbors: int | None = None) -> Tensor:
    """DPDP units (T,) int64 for features (T, D): the exact minimiser of J (see the module docstring).

    Each frame may only take one of its `num_neighbors` nearest codes (None: all K), as upstream, where the K - N
    farthest get +inf; ties at the N-th place keep the lowest indices. Distances are computed on the codebook's
    device (float64 for a float64 codebook, else float32, as torch.cdist would); the recursion runs in float64 in
    compiled CPU code, so CUDA distances are copied to the CPU for it. Ties between equal-cost paths resolve the same
    way as in StreamingDPDP: the longer segment, then the lowest code index. The result is on features' device.
    """
    _check_codebook(codebook)
    lmbda = _check_lmbda(lmbda)
    n = _check_num_neighbors(num_neighbors, codebook.shape[0])
    _check_features(features, codebook.shape[1])
    if features.device != codebook.device:
        raise InvalidInput(
            f"features are on {features.device} but the codebook is on {codebook.device}; put them on the same device"
        )
    distances = _Distances(codebook)
    return _dpdp_with(distances, features, lmbda, n)


def _dpdp_with(distances: _Distances, features: Tensor, lmbda: float, n: int) -> Tensor:
    q, offset = distances(features, 0)
    units = _dpdp_kernel(_to_numpy(q)[offset : offset + features.shape[0]], n, lmbda)
    return torch.from_numpy(units).to(features.device)


def dpdp_batch(
    features: Sequence[Tensor] | tuple[Tensor, Tensor | Sequence[int]],
    codebook: Tensor,
    lmbda: float,
    num_neighbors: int | None = None,
) -> list[Tensor]:
    """DPDP units for several sequences: a list of (T_i, D) tensors, or (padded (B, T, D), lengths (B,)).

    Returns one (T_i,) int64 tensor per sequence, identical to calling dpdp() on each (frame t of each sequence goes
    through the same distance computation either way). The codebook's transpose and norms are prepared once.
    """
    _check_codebook(codebook)
    lmbda = _check_lmbda(lmbda)
    n = _check_num_neighbors(num_neighbors, codebook.shape[0])
    sequences = _split_batch(features)
    for i, seq in enumerate(sequences):
        _check_features(seq, codebook.shape[1], what=f"features[{i}]")
        if seq.device != codebook.device:
            raise InvalidInput(
                f"features[{i}] are on {seq.device} but the codebook is on {codebook.device}; use one device"
            )
    distances = _Distances(codebook)
    return [_dpdp_with(distances, seq, lmbda, n) for seq in sequences]


def _split_batch(features: Sequence[Tensor] | tuple[Tensor, Tensor | Sequence[int]]) -> list[Tensor]:
    """The sequences of a batch given as a list, or as (padded (B, T, D), lengths)."""
    if isinstance(features, tuple) and len(features) == 2 and isinstance(features[0], Tensor) \
            and features[0].dim() == 3:
        padded, lengths = features
        lengths_list = (lengths.tolist() if isinstance(lengths, Tensor) else list(lengths))
        if len(lengths_list) != padded.shape[0]:
            raise InvalidInput(f"got {len(lengths_list)} lengths for a padded batch of {padded.shape[0]} sequences")
        for i, length in enumerate(lengths_list):
            if not is_int(length) \
                    or not 1 <= length <= padded.shape[1]:
                raise InvalidInput(f"lengths[{i}] = {length!r}; expected an int in 1..T={padded.shape[1]}")
        return [padded[i, : int(length)] for i, length in enumerate(lengths_list)]
    if isinstance(features, Tensor):
        raise InvalidInput(
            f"dpdp_batch takes a list of (T_i, D) tensors or (padded (B, T, D), lengths); got one tensor of shape "
            f"{tuple(features.shape)} (use dpdp() for a single sequence)"
        )
    return list(features)


def dpdp_cost(features: Tensor, codebook: Tensor, units: Tensor | Sequence[int], lmbda: float) -> float:
    """J(units) in float64: sum_t ||x_t - c_{u_t}||^2 (computed as differences, not the GEMM expansion) plus
    lmbda per unit change. No neighbour restriction applies here."""
    _check_codebook(codebook)
    lmbda = _check_lmbda(lmbda)
    _check_features(features, codebook.shape[1])
    u = _as_unit_tensor(units)
    if u.numel() != features.shape[0]:
        raise InvalidInput(f"got {u.numel()} units for {features.shape[0]} frames; expected one unit per frame")
    if int(u.min()) < 0 or int(u.max()) >= codebook.shape[0]:
        raise InvalidInput(f"units must lie in 0..{codebook.shape[0] - 1}")
    x = features.detach().to(device="cpu", dtype=torch.float64)
    c = codebook.detach().to(device="cpu", dtype=torch.float64)
    frame_cost = ((x - c[u]) ** 2).sum()
    changes = int((u[1:] != u[:-1]).sum())
    return float(frame_cost) + lmbda * changes


class DPDPQuantizer(nn.Module):
    """Drop-in for upstream's torch.hub `dpdp_quantizer_from_codebook`: forward(features) -> (quantized, units).

    `quantized` is the straight-through estimate: its value is codebook[units], its gradient w.r.t. features is the
    identity (features - (features - codebook[units]).detach()), as upstream returns. Features are (T, D).
    """

    def __init__(self, codebook_size: int, codebook_dim: int, lmbda: float, num_neighbors: int | None = None):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(codebook_size, codebook_dim))
        self.lmbda = _check_lmbda(lmbda)
        self.num_neighbors = _check_num_neighbors(num_neighbors, codebook_size) if num_neighbors is not None else None

    @classmethod
    def from_codebook(cls, codebook: Tensor, lmbda: float, num_neighbors: int | None = None) -> "DPDPQuantizer":
        """A quantizer holding a copy of codebook (K, D) (same dtype and device)."""
        _check_codebook(codebook)
        quantizer = cls(codebook.shape[0], codebook.shape[1], lmbda, num_neighbors)
        quantizer.codebook.data = codebook.detach().clone()
        return quantizer

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        units = dpdp(features, self.codebook, self.lmbda, self.num_neighbors)
        quantized = self.codebook[units]
        return features - (features - quantized).detach(), units


# ----------------------------------------------------------------------------------------------------------------
# Streaming API


class StreamingDPDP:
    """Exact streaming DPDP: push feature chunks, get segments back as soon as they are final.

    push(chunk) returns the newly committed Segments, in order and never revised; a segment is emitted once its end
    is known, i.e. once the unit after it is final. flush() commits the rest at end of stream. With max_lag=None the
    emitted segments expand to exactly dpdp(features, codebook, lmbda, num_neighbors) for any chunking. With
    max_lag=M, no frame stays undecided for more than M frames after it arrives: when it would, the current best
    path's prefix is forced (counted in `forced_commits`), which may then differ from offline. Chunks are moved to the
    codebook's device. State: the cost column, per-state segment starts, and two int64 values per undecided frame.
    """

    def __init__(self, codebook: Tensor, lmbda: float, num_neighbors: int | None = None, max_lag: int | None = None):
        _check_codebook(codebook)
        self.lmbda = _check_lmbda(lmbda)
        self.num_neighbors = _check_num_neighbors(num_neighbors, codebook.shape[0])
        if max_lag is not None and (not is_int(max_lag)
                                    or max_lag < 0):
            raise InvalidInput(f"max_lag must be None or an int >= 0 (frames a decision may wait), got {max_lag!r}")
        self.max_lag = None if max_lag is None else int(max_lag)
        self._distances = _Distances(codebook)
        self.reset()

    def reset(self) -> None:
        """Forgets the stream; the next push starts a new one at frame 0."""
        num_codes = self._distances.num_codes
        self._cost = np.full(num_codes, np.inf)
        self._seg_start = np.zeros(num_codes, np.int64)
        self._prev_states = np.arange(self.num_neighbors)  # the last frame's allowed codes
        self._fstate = np.zeros(1, np.float64)  # [min cost of the last column]
        self._istate = np.array([-1, -1, 0, 0, 0, 0], np.int64)  # see dpdp_kernels._OPEN_UNIT etc.
        self._win_unit = np.zeros(32, np.int64)
        self._win_start = np.zeros(32, np.int64)
        self._win_base = 0  # absolute frame index of _win_unit[0]
        self._frames_seen = 0
        self._flushed = False

    @property
    def frames_seen(self) -> int:
        """Frames pushed since the last reset."""
        return self._frames_seen

    @property
    def frames_committed(self) -> int:
        """Frames whose unit is final (a prefix of the stream; their segments may still await their end)."""
        return int(self._istate[_COMMITTED])

    @property
    def forced_commits(self) -> int:
        """How many times max_lag forced a decision before the live paths agreed (0 means output == offline)."""
        return int(self._istate[_FORCED])

    @property
    def state_nbytes(self) -> int:
        """Bytes held between pushes: grows with the undecided stretch only, not with the stream's length."""
        arrays = (self._cost, self._seg_start, self._prev_states, self._fstate, self._istate, self._win_unit,
                  self._win_start)
        return sum(a.nbytes for a in arrays)

    def push(self, features_chunk: Tensor) -> list[Segment]:
        """Feeds frames (t, D); returns the segments that became final, in order. An empty chunk does nothing."""
        if self._flushed:
            raise InvalidInput("this stream was flushed; call reset() before pushing a new stream")
        _check_features(features_chunk, self._distances.dim, what="features_chunk", allow_empty=True)
        num_new = features_chunk.shape[0]
        if num_new == 0:
            return []
        q, offset = self._distances(features_chunk, self._frames_seen)  # raises before any state changes
        q_np = _to_numpy(q)[offset : offset + num_new]

        window = self._frames_seen - self._win_base
        self._ensure_window(window + num_new)
        out = np.empty((window + num_new + 1, 3), np.int64)
        n_out = _stream_kernel(
            q_np, self._frames_seen, self.num_neighbors, self.lmbda, -1 if self.max_lag is None else self.max_lag,
            self._cost, self._seg_start, self._prev_states, self._fstate, self._istate, self._win_unit,
            self._win_start, self._win_base, out, *self._scratch(window + num_new + 1),
        )
        self._frames_seen += num_new
        self._trim_window()
        return [Segment(int(u), int(s), int(e)) for u, s, e in out[:n_out]]

    def flush(self) -> list[Segment]:
        """Ends the stream: commits and returns every remaining segment. Push again only after reset()."""
        if self._flushed or self._frames_seen == 0:
            self._flushed = True
            return []
        window = self._frames_seen - self._win_base
        out = np.empty((window + 2, 3), np.int64)
        _, _, _, chain_u, chain_s = self._scratch(window + 2)
        n_out = _flush_kernel(self._frames_seen, self._seg_start, self._win_unit, self._win_start, self._win_base,
                              self._istate, out, chain_u, chain_s)
        self._flushed = True
        self._trim_window()
        return [Segment(int(u), int(s), int(e)) for u, s, e in out[:n_out]]

    def _scratch(self, chain_len: int) -> tuple[np.ndarray, ...]:
        num_codes = self._distances.num_codes
        return (np.empty(num_codes, np.int64), np.empty(num_codes, np.int64), np.empty(num_codes, np.int64),
                np.empty(chain_len, np.int64), np.empty(chain_len, np.int64))

    def _ensure_window(self, needed: int) -> None:
        if self._win_unit.shape[0] < needed:
            capacity = max(2 * self._win_unit.shape[0], needed)
            for name in ("_win_unit", "_win_start"):
                old = getattr(self, name)
                new = np.zeros(capacity, np.int64)
                new[: old.shape[0]] = old
                setattr(self, name, new)

    def _trim_window(self) -> None:
        """Drops per-frame history no live path can reach: frames before committed - 1."""
        new_base = max(self.frames_committed - 1, 0)
        shift = new_base - self._win_base
        length = self._frames_seen - new_base
        if shift > 0:
            for a in (self._win_unit, self._win_start):
                a[:length] = a[shift : shift + length].copy()
            self._win_base = new_base
        # Give memory back after a long undecided stretch, so the state stays bounded by the current stretch.
        if self._win_unit.shape[0] > 4 * max(length, 32):
            capacity = 2 * max(length, 32)
            self._win_unit = self._win_unit[:capacity].copy()
            self._win_start = self._win_start[:capacity].copy()
