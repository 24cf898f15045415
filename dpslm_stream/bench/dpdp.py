"""Benchmark: exact DPDP (Viterbi, compiled) vs the upstream segmental O(T^2 K) algorithm, and streaming lag.

Run as `dpslm-stream bench dpdp` or `python -m dpslm_stream.bench.dpdp`. Prints two tables:

1. offline: time of `dpdp()` vs a segmental reference that follows nicolvisser/dpdp's algorithm (float32 cdist**2,
   the K-N farthest codes set to +inf, for every segment end a reversed cumulative sum over all starts), and vs the
   bare T x K distance matrix (`torch.cdist(x, c) ** 2`, the floor), with the float64 cost J of both answers;
2. streaming: `StreamingDPDP` pushed chunk by chunk: time per push, frame commit lag (frames between a frame's
   arrival and the push after which its unit is final) and segment lag (until its segment is emitted, which needs
   the segment's end), p50/p95/max, and whether the output equals offline.

Features are synthetic but speech-like (see `speech_like_features`). Timings are the minimum over repeats, taken
interleaved so that load from other processes hits both sides alike; the numba kernels are compiled (or loaded from
the on-disk cache) by a warm-up call first, and that first-call time is printed separately.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import Tensor

from dpslm_stream.dpdp import StreamingDPDP, deduplicate, dpdp, dpdp_cost


def speech_like_features(
    num_frames: int,
    num_codes: int = 500,
    dim: int = 1024,
    *,
    latent_dim: int = 8,
    code_scale: float = 1.3,
    noise: float = 12.0,
    walk_neighbors: int = 10,
    max_run: int = 7,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic (features (T, D), codebook (K, D), true units (T,)), float32, shaped like DPDP's input.

    Real k-means centroids of WavLM features lie near a low-dimensional manifold, and consecutive speech sounds are
    acoustically close. So: codes c = z W with z ~ N(0, I_latent) and W ~ N(0, code_scale^2) (latent_dim x D); the
    unit sequence is a random walk that moves to one of the current code's `walk_neighbors` nearest codes, holding
    each for 1..max_run frames; each frame is its code plus N(0, noise^2) per dimension. With the defaults (D=1024,
    K=500) the median squared distance from a code to its nearest code is ~3.7e3 and the noise cross-terms make ~8%
    of frames' nearest code wrong, so every lambda in 0..7000 changes the units.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_codes, latent_dim, generator=g)
    codebook = z @ (code_scale * torch.randn(latent_dim, dim, generator=g))
    neighbors = torch.cdist(z, z).topk(min(walk_neighbors, num_codes - 1) + 1, largest=False).indices[:, 1:]
    units: list[int] = []
    unit = int(torch.randint(num_codes, (1,), generator=g))
    while len(units) < num_frames:
        units += [unit] * int(torch.randint(1, max_run + 1, (1,), generator=g))
        if neighbors.shape[1] > 0:
            unit = int(neighbors[unit, int(torch.randint(neighbors.shape[1], (1,), generator=g))])
    truth = torch.tensor(units[:num_frames])
    features = codebook[truth] + noise * torch.randn(num_frames, dim, generator=g)
    return features, codebook, truth


def segmental_dpdp_reference(
    features: Tensor, codebook: Tensor, lmbda: float, num_neighbors: int | None = None
) -> Tensor:
    """The segmental DPDP algorithm of nicolvisser/dpdp, O(T^2 K) time, float32 as upstream (reference only).

    best[t] = min over segment starts s < t and codes k of best[s] + sum_{s<=tau<t} d[tau, k] + lmbda * (1 - (t - s)),
    where d = cdist(x, c)**2 with each frame's K - N farthest codes at +inf. Ties: earliest start, then lowest code.
    """
    num_frames, num_codes = features.shape[0], codebook.shape[0]
    d = torch.cdist(features, codebook, p=2.0) ** 2
    if num_neighbors is not None and num_neighbors < num_codes:
        farthest = d.topk(num_codes - num_neighbors, dim=1, largest=True).indices
        d.scatter_(1, farthest, float("inf"))
    best = torch.zeros(num_frames + 1, dtype=d.dtype)
    seg_start = torch.zeros(num_frames + 1, dtype=torch.int64)
    seg_unit = torch.zeros(num_frames + 1, dtype=torch.int64)
    for t in range(1, num_frames + 1):
        # sums[s, k] = d[s:t, k].sum(): a cumulative sum over the reversed prefix, reversed back.
        sums = torch.cumsum(d[:t].flip(0), dim=0).flip(0)
        seg_cost, seg_code = sums.min(dim=1)
        durations = torch.arange(t, 0, -1, dtype=d.dtype)
        total = best[:t] + seg_cost + lmbda * (1.0 - durations)
        s = int(torch.argmin(total))
        best[t] = total[s]
        seg_start[t] = s
        seg_unit[t] = seg_code[s]
    units = torch.empty(num_frames, dtype=torch.int64)
    t = num_frames
    while t > 0:
        s = int(seg_start[t])
        units[s:t] = seg_unit[t]
        t = s
    return units


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    return f"{np.percentile(a, 50):.0f}/{np.percentile(a, 95):.0f}/{a.max()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, nargs="+", default=[500, 1000, 2000], help="offline lengths T")
    parser.add_argument("--codes", type=int, default=500, help="codebook size K")
    parser.add_argument("--neighbors", type=int, default=25, help="num_neighbors N")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension D")
    parser.add_argument("--lmbda", type=float, default=4500.0, help="lambda for the offline table")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0, 600, 1500, 4500, 7000],
                        help="lambdas for the streaming table")
    parser.add_argument("--noise", type=float, default=12.0, help="per-dimension noise of the synthetic features")
    parser.add_argument("--stream-frames", type=int, default=3000, help="frames per streaming run (50 Hz)")
    parser.add_argument("--chunk", type=int, default=1, help="frames per push in the streaming table")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (min is reported)")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow segmental reference")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's default); 1 gives steadier figures on a busy machine")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    k, n, dim = args.codes, args.neighbors, args.dim
    print(f"DPDP benchmark: K={k}, N={n}, D={dim}, torch threads={torch.get_num_threads()}, "
          f"speech-like features (noise={args.noise})")

    warm_x, warm_c, _ = speech_like_features(64, k, dim, noise=args.noise, seed=args.seed)
    start = time.perf_counter()
    dpdp(warm_x, warm_c, args.lmbda, n)
    stream = StreamingDPDP(warm_c, args.lmbda, n)
    stream.push(warm_x)
    stream.flush()
    print(f"first calls (numba JIT compile, or load from its on-disk cache): {time.perf_counter() - start:.2f} s")

    print(f"\nOffline, lambda={args.lmbda:g} (ms; min of {args.repeats}, reference run once)")
    header = (f"{'T':>6} {'segmental':>10} {'fast':>8} {'speed-up':>9} {'cdist**2':>9} {'fast/cdist':>10} "
              f"{'J fast':>14} {'J segmental':>14} {'frames differ':>13}")
    print(header)
    for num_frames in args.frames:
        x, c, _ = speech_like_features(num_frames, k, dim, noise=args.noise, seed=args.seed + num_frames)
        fast_t = cdist_t = float("inf")
        for _ in range(args.repeats):
            cdist_t = min(cdist_t, _best_time(lambda: torch.cdist(x, c) ** 2, 1))
            fast_t = min(fast_t, _best_time(lambda: dpdp(x, c, args.lmbda, n), 1))
        units = dpdp(x, c, args.lmbda, n)
        j_fast = dpdp_cost(x, c, units, args.lmbda)
        if args.no_reference:
            ref_t, j_ref, differ = float("nan"), float("nan"), "-"
        else:
            start = time.perf_counter()
            ref_units = segmental_dpdp_reference(x, c, args.lmbda, n)
            ref_t = time.perf_counter() - start
            j_ref = dpdp_cost(x, c, ref_units, args.lmbda)
            differ = str(int((ref_units != units).sum()))
        print(f"{num_frames:>6} {ref_t * 1e3:>10.0f} {fast_t * 1e3:>8.2f} {ref_t / fast_t:>8.0f}x "
              f"{cdist_t * 1e3:>9.2f} {fast_t / cdist_t:>10.2f} {j_fast:>14.1f} {j_ref:>14.1f} {differ:>13}")

    print(f"\nStreaming, {args.stream_frames} frames in pushes of {args.chunk} "
          f"(push time in ms; lags in frames, p50/p95/max; unit rate in units/s at 50 Hz)")
    print(f"{'lambda':>7} {'push p50':>9} {'push p95':>9} {'push max':>9} {'commit lag':>11} {'segment lag':>12} "
          f"{'units/s':>8} {'state B max':>11} {'== offline':>10}")
    x, c, _ = speech_like_features(args.stream_frames, k, dim, noise=args.noise, seed=args.seed + 1)
    for lmbda in args.lambdas:
        offline = dpdp(x, c, lmbda, n)
        stream = StreamingDPDP(c, lmbda, n)
        push_times: list[float] = []
        commit_lag: list[int] = []
        segment_lag: list[int] = []
        segments = []
        committed = 0
        state_max = 0
        for first in range(0, args.stream_frames, args.chunk):
            chunk = x[first : first + args.chunk]
            start = time.perf_counter()
            new = stream.push(chunk)
            push_times.append(time.perf_counter() - start)
            newest = first + chunk.shape[0] - 1  # the push's time, in frames
            commit_lag += [newest - f for f in range(committed, stream.frames_committed)]
            committed = stream.frames_committed
            segment_lag += [newest - f for seg in new for f in range(seg.start, seg.end)]
            segments += new
            state_max = max(state_max, stream.state_nbytes)
        segments += stream.flush()  # frames decided only by end of stream are left out of the lag figures
        units = torch.cat([torch.full((s.duration,), s.unit) for s in segments])
        same = "yes" if torch.equal(units, offline) else "NO"
        p = np.percentile(np.asarray(push_times) * 1e3, [50, 95])
        rate = len(deduplicate(offline)[0]) / args.stream_frames * 50
        print(f"{lmbda:>7g} {p[0]:>9.3f} {p[1]:>9.3f} {max(push_times) * 1e3:>9.3f} {_percentiles(commit_lag):>11} "
              f"{_percentiles(segment_lag):>12} {rate:>8.1f} {state_max:>11} {same:>10}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
