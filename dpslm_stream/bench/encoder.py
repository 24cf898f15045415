"""Streaming encoder benchmark: each window mode x preset at WavLM-Large dimensions (RANDOM weights), on this machine.

For every (mode, preset) one session is fed the audio in real time on a simulated clock: audio arrives in 20 ms
frames at its own pace, the worker steps whenever a hop is ready (or as soon as it is free, when it is behind), and
each step takes the wall time it really took. A unit's commit lag is the clock when its step finished minus the
end of its last frame: algorithmic lag (hop + lookahead), DPDP's decision lag, compute and queueing, all included.
Reported per row: real-time factor (compute s / audio s; CPU RTF: this process's CPU seconds per audio second,
less inflated than wall time when other processes share the cores), algorithmic lag of a hop's oldest frame, commit lag
p50/p95/max, the per-hop compute breakdown (front-end, positional conv, attention, FFN, DPDP + rest), and the
session's state in bytes (bounded: it does not grow with the stream).

Then the batched step: N sessions' windows through one forward (same preset), per-stream real-time factor and the
number of streams one worker serves in real time; and one session that fell 1 s behind catching up with several
hops per forward.

The DPDP lag depends on the features, so it is also measured on the tiny set, whose features are scaled like the
real model's (squared distances in the thousands): that row uses the paper's lambda = 4500 for k = 500 meaningfully.

With `--precision exact,fast` every table is run for each precision (the streaming encoder's block linears; the
offline reference stays float32), and `fast` is compared with `exact` on the same audio through the cached
low-latency encoder: feature cosine, frame and k-means unit agreement, unit error rate (RANDOM weights: plumbing).

    dpslm-stream bench encoder                         # all modes and presets, batching, plot
    dpslm-stream bench encoder --modes cached --presets low-latency --sessions 1 2 4 8 --plot docs/bench_encoder.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dpslm_stream.device import setup_model_device
from dpslm_stream.stream.encoder import PRESETS, window_config
from dpslm_stream.stream.events import UnitEvent

FRAME = 320  # samples per 20 ms frame at 16 kHz


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=12.0, help="audio per session (default 12 s)")
    parser.add_argument("--modes", nargs="+", default=["sliding", "cached"], choices=["sliding", "cached"])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="N for the batched table (cached mode; default 1 2 4 8)")
    parser.add_argument("--batch-presets", nargs="+", default=["low-latency", "balanced"], choices=list(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--precision", default="exact", help="comma-separated precisions of the streaming encoder, "
                                                             "e.g. exact,fast (default exact)")  # fmt: skip
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny-set DPDP-lag rows")
    parser.add_argument("--plot", type=Path, default=None, help="write lag vs real-time factor per mode here (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")


def _audio(seconds: float) -> np.ndarray:
    """The bundled speech sample, repeated to `seconds` (at 16 kHz)."""
    from dpslm_stream.audio import load_audio, resample

    wav, sr = load_audio(Path(__file__).resolve().parent.parent / "data" / "sample.wav")
    if sr != 16000:
        wav = resample(torch.from_numpy(wav), sr, 16000).numpy()
    reps = int(np.ceil(seconds * 16000 / len(wav)))
    return np.tile(wav, reps)[: int(seconds * 16000)].astype(np.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def simulate(worker, wav: np.ndarray, sessions: int = 1, **window) -> dict:
    """`sessions` identical real-time streams on one worker, simulated clock (see the module docstring)."""
    opened = [worker.open_session(16000, 500, 4500, **window) for _ in range(sessions)]
    device = worker.device
    runner = worker.runner
    runner.profile, runner.timings = True, type(runner.timings)(float)
    clock = compute = cpu = 0.0
    lags: list[float] = []
    peak_state = 0
    steps = 0
    frames = len(wav) // FRAME
    hop = opened[0].config.hop

    def step() -> None:
        nonlocal clock, compute, cpu, steps, peak_state
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        worker.step(opened)
        _sync(device)
        dt = time.perf_counter() - t0
        cpu += time.process_time() - c0
        clock += dt
        compute += dt
        steps += 1
        for s in opened:
            peak_state = max(peak_state, s.state_nbytes)
            lags.extend(clock - e.end_s for e in s.poll() if isinstance(e, UnitEvent))

    for i in range(frames):
        arrival = (i + 1) * FRAME / 16000
        for s in opened:
            s.push(wav[i * FRAME : (i + 1) * FRAME])
        if (i + 1) % hop == 0:  # a hop's worth of new frames: step (as soon as the worker is free)
            clock = max(clock, arrival)
            step()
    for s in opened:
        s.end()
    while any(s.has_work for s in opened):
        step()
    runner.profile = False
    audio_s = frames * FRAME / 16000
    lags.sort()
    breakdown = {k: v / audio_s / sessions for k, v in runner.timings.items()}
    breakdown["other"] = compute / audio_s / sessions - sum(breakdown.values())  # front-end, DPDP, bookkeeping
    q = (lambda p: float(lags[min(len(lags) - 1, int(p * len(lags)))]) if lags else float("nan"))
    return {"sessions": sessions, "audio_s": audio_s, "rtf": compute / audio_s, "rtf_per_stream": compute / audio_s / sessions,
            "cpu_rtf": cpu / audio_s, "cpu_rtf_per_stream": cpu / audio_s / sessions,
            "lag_p50": q(0.5), "lag_p95": q(0.95), "lag_max": lags[-1] if lags else float("nan"), "units": len(lags),
            "steps": steps, "state_bytes": peak_state, "breakdown": breakdown}  # fmt: skip


def catch_up(worker, wav: np.ndarray, behind_s: float = 1.0, **window) -> dict:
    """One session handed `behind_s` of audio at once: the worker runs its ready hops several per forward."""
    s = worker.open_session(16000, 500, 4500, **window)
    n = int(behind_s * 16000)
    s.push(wav[:n])  # prime the caches first, so the timed part is steady-state
    worker.run_until_idle([s])
    s.push(wav[n : 2 * n])
    _sync(worker.device)
    t0 = time.perf_counter()
    hops = worker.step([s])
    _sync(worker.device)
    return {"hops": hops, "rtf": (time.perf_counter() - t0) / (hops * s.config.hop * 0.02) if hops else float("nan")}


def run(args: argparse.Namespace) -> None:
    from dpslm_stream.bench._models import encoder_worker
    from dpslm_stream.stream.worker import EncoderWorker

    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_model_device(args.device)  # TF32 off on CUDA, as the server
    wav = _audio(args.seconds)
    print(f"streaming encoder bench: WavLM-Large dimensions, RANDOM weights (speed only); device {args.device}"
          f"{f', {torch.get_num_threads()} CPU threads' if device.type == 'cpu' else ''}; torch {torch.__version__}; "
          f"{args.seconds:g} s of audio per session, fed in 20 ms frames on a simulated real-time clock")  # fmt: skip
    precisions = list(dict.fromkeys(p.strip() for p in args.precision.split(",") if p.strip()))
    worker = encoder_worker("full", args.device, max_hops_per_step=8)
    workers = {"exact": worker}
    for p in precisions:  # the same WavLM and codebook, another runner
        if p != "exact":
            workers[p] = EncoderWorker("tiny", device=args.device, pairs=[(500, 4500)], wavlm=worker.wavlm,
                                       codebooks={500: worker._codebook(500)}, max_hops_per_step=8, precision=p)
    for p in precisions:
        print(f"  {p}: {workers[p].runner.precision_plan.describe()}")
    # Offline reference: the whole utterance at once.
    x = torch.from_numpy(wav)[None].to(device)
    with torch.inference_mode():
        worker.extract_features(worker.wavlm, x[:, :16000], 16000, layer=11)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        worker.extract_features(worker.wavlm, x, 16000, layer=11)
        _sync(device)
    offline_rtf = (time.perf_counter() - t0) / args.seconds
    print(f"offline (whole utterance, exact): real-time factor {offline_rtf:.3f}\n")

    rows = []
    head = (f"{'mode':8} {'preset':12} {'L/H/R':>11} {'algo lag s':>10} {'RTF':>6} {'CPU RTF':>7} {'lag p50':>8} "
            f"{'lag p95':>8} "
            f"{'lag max':>8} {'state MB':>9}  per-audio-second compute: front-end+DPDP / pos_conv / attention / FFN")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for mode, preset, precision in ((m, p, q) for m in args.modes for p in args.presets for q in precisions):
        cfg = window_config(mode, preset)
        simulate(workers[precision], wav[: 3 * 16000], mode=mode, preset=preset)  # warm-up: tables, allocator
        r = simulate(workers[precision], wav, mode=mode, preset=preset)
        r.update(mode=mode, preset=preset, window=[cfg.left, cfg.hop, cfg.lookahead],
                 algo_lag_s=cfg.oldest_frame_lag_s, precision=precision)  # fmt: skip
        rows.append(r)
        b = r["breakdown"]
        label = preset if len(precisions) == 1 else f"{preset[:6]} {precision}"
        print(f"{mode:8} {label:12} {f'{cfg.left}/{cfg.hop}/{cfg.lookahead}':>11} {cfg.oldest_frame_lag_s:10.3f} "
              f"{r['rtf']:6.3f} {r['cpu_rtf']:7.3f} {r['lag_p50']:8.3f} {r['lag_p95']:8.3f} {r['lag_max']:8.3f} "
              f"{r['state_bytes'] / 1e6:9.2f}  {b.get('other', 0):.3f} / {b.get('positional', 0):.3f} / "
              f"{b.get('attention', 0):.3f} / {b.get('ffn', 0):.3f}")  # fmt: skip

    batched = []
    if args.sessions:
        print(f"\nbatched cached steps: N sessions' windows per forward ({args.seconds:g} s each, real-time clock)")
        print(f"{'preset':12} {'N':>3} {'RTF/stream':>11} {'RTF total':>10} {'CPU RTF total':>13} {'real time':>10} "
              f"{'lag p95':>8} "
              f"{'capacity (1 / RTF per stream)':>30}")  # fmt: skip
        for preset, precision in ((p, q) for p in args.batch_presets for q in precisions):
            for n in args.sessions:
                r = simulate(workers[precision], wav, sessions=n, mode="cached", preset=preset)
                r.update(preset=preset, precision=precision)
                batched.append(r)
                label = preset if len(precisions) == 1 else f"{preset[:6]} {precision}"
                print(f"{label:12} {n:3d} {r['rtf_per_stream']:11.3f} {r['rtf']:10.3f} {r['cpu_rtf']:13.3f} "
                      f"{'yes' if r['rtf'] <= 1 else 'no':>10} {r['lag_p95']:8.3f} {1 / r['rtf_per_stream']:30.1f}")  # fmt: skip
        c = catch_up(worker, wav, mode="cached", preset=args.batch_presets[0])
        print(f"catch-up, one session 1 s behind ({args.batch_presets[0]}): {c['hops']} hops in one step, "
              f"real-time factor {c['rtf']:.3f} while catching up")  # fmt: skip

    agreement_rows = {}
    for p in precisions:
        if p != "exact":
            agreement_rows[p] = precision_agreement(workers["exact"], workers[p], wav)
            a = agreement_rows[p]
            print(f"\n{p} vs exact, cached low-latency, the same {args.seconds:g} s (RANDOM weights: plumbing): feature "
                  f"cosine {a['feature_cosine']:.5f}, frame agreement {a['frame_agreement']:.3f}, k-means agreement "
                  f"{a['kmeans_agreement']:.3f}, unit error rate {a['unit_error_rate']:.3f}")  # fmt: skip

    tiny_rows = []
    if not args.no_tiny:
        tiny = encoder_worker("tiny", "cpu")
        print("\nDPDP decision lag at k=500, lambda=4500 on the tiny set (features scaled like the real model's; "
              "the lag a unit waits for DPDP's decision, without compute):")  # fmt: skip
        for mode in args.modes:
            for preset in args.presets:
                cfg = window_config(mode, preset)
                r = simulate(tiny, wav, mode=mode, preset=preset)
                # commit lag minus the compute share: what the window and DPDP alone make a unit wait
                r.update(mode=mode, preset=preset, dpdp_lag_p50=r["lag_p50"] - cfg.oldest_frame_lag_s)
                tiny_rows.append(r)
                print(f"  {mode:8} {preset:12} unit commit lag p50 {r['lag_p50']:.3f} s, p95 {r['lag_p95']:.3f} s "
                      f"(algorithmic {cfg.oldest_frame_lag_s:.3f} s; tiny-set compute RTF {r['rtf']:.3f})")  # fmt: skip

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"offline_rtf": offline_rtf, "rows": rows, "batched": batched,
                                         "tiny": tiny_rows, "agreement": agreement_rows}, indent=1))  # fmt: skip
    if args.plot:
        plot(rows, offline_rtf, args.plot)


def precision_agreement(exact, other, wav: np.ndarray) -> dict:
    """`other`'s cached low-latency features and units against `exact`'s on the same audio (stream/compare.py)."""
    from dpslm_stream.pipeline import default_num_neighbors
    from dpslm_stream.stream.compare import agreement, stream_encode

    runs = [stream_encode(w, wav, 16000, k=500, lmbda=4500, mode="cached", preset="low-latency", keep_features=True)
            for w in (exact, other)]  # fmt: skip
    return agreement(runs[1].features, runs[0].features, exact._codebook(500), 4500, default_num_neighbors(500))


def plot(rows: list[dict], offline_rtf: float, path: Path) -> None:
    """p95 commit lag against real-time factor, one marker per mode, each point labelled with its preset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]' in the dpslm-stream checkout); no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for mode, marker in (("sliding", "s"), ("cached", "o")):
        pts = [r for r in rows if r["mode"] == mode]
        if pts:
            ax.scatter([r["rtf"] for r in pts], [r["lag_p95"] for r in pts], marker=marker, label=f"{mode} (p95)")
            for r in pts:
                ax.annotate(r["preset"], (r["rtf"], r["lag_p95"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--", label="real time")
    ax.axvline(offline_rtf, color="green", lw=0.8, ls=":", label=f"offline RTF {offline_rtf:.2f}")
    ax.set_xlabel("real-time factor (compute s / audio s), one session")
    ax.set_ylabel("commit lag p95 (s)")
    ax.set_title("Streaming WavLM-Large L11 + DPDP, 2-core CPU, fp32, random weights", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    run(_parser.parse_args())
