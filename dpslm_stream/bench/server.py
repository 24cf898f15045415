"""Load benchmark of the live units server: N concurrent real-time clients on loopback.

For each N, N clients stream speech (the bundled sample, each from its own offset) to one server, paced in real
time in 20 ms frames as a microphone would, all at once. Reported per N: commit lag p50/p95/max over every unit of
every session (wall clock: unit sent minus arrival of its audio), the sessions' real-time factor (model compute per
second of audio), the worker's load (busy fraction of wall time), the mean batch (sessions per encoder forward), CPU
seconds per second of audio per session (of the server, and of the clients' process beside it), and memory per
session (encoder state, and RSS growth of the server process / N). A load is "real time" when every session's p95
commit lag stays under --lag-budget.

The server (and its encoder thread) runs in this process; the clients run in a child process, so their
event loop does not compete with the server's for the GIL.

    dpslm-stream bench server                                    # tiny set (random weights), N = 1 2 4 8 16 24
    dpslm-stream bench server --models full --clients 1 2 3 4    # WavLM-Large dimensions (random weights)
    python -m dpslm_stream.bench.server --plot docs/bench_server.png

`--models full` builds a WavLM-Large-sized model with RANDOM weights and a codebook of its own features: speed and
latency do not depend on the weight values, but the units are meaningless; the unit-level DPDP lag differs from
real checkpoints (reported separately as `algo lag`: audio received after a unit's end before it committed).

`--resynth`: every client also asks for its units resynthesized, so the server's resynthesis worker (ELLA-V +
WavTokenizer; with `--models full` both at released size, RANDOM weights) shares the machine with the encoder, as a
live resynthesis demo does: on the encoder's thread or on its own (`--model-threads`, as `serve`). Per N it adds the
first-audio latency after the first units, the unit-to-audio latency, the resynthesis compute per second of audio
made and how long after its input the last session finished. A random
ELLA-V rarely ends a unit early, so it makes several seconds of audio per input second where a trained one makes
about one: compute per audio second is the figure that carries over, not whether it kept up.

    dpslm-stream bench server --models full --clients 1 --seconds 10 --precision fast --resynth
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import re
import statistics
import threading
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="tiny", help="tiny (default), full (WavLM-Large dimensions, random "
                                                         "weights), release, or a model folder")  # fmt: skip
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24], help="values of N")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per client (default 20 s)")
    parser.add_argument("--preset", default="low-latency", help="encoder preset (default low-latency)")
    parser.add_argument("--mode", default="cached", choices=("cached", "sliding"), help="encoder mode")
    parser.add_argument("--precision", default="exact", choices=("exact", "fast"),
                        help="the streaming encoder's precision (serve --encoder-precision; default exact)")
    parser.add_argument("--frame-ms", type=float, default=20.0, help="client frame length (default 20 ms)")
    parser.add_argument("--lag-budget", type=float, default=1.0, help="p95 commit lag (s) that counts as real time")
    parser.add_argument("--device", default="cpu", help="torch device of the model worker")
    parser.add_argument("--backend", default="inprocess", choices=("inprocess", "ray"),
                        help="encoder in a thread of the server (default) or in a Ray Serve deployment on a local Ray "
                             "(needs the ray extra; rtf/load/cpu columns then count only the gateway process)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--resynth", action="store_true",
                        help="every client also asks for its units resynthesized (ELLA-V + WavTokenizer on the "
                             "server's resynthesis worker; with --models full, both at released size, RANDOM "
                             "weights): adds first-audio latency, unit-to-audio latency, the resynthesis real-time "
                             "factor and how long after its input each session finished")  # fmt: skip
    parser.add_argument("--resynth-precision", default=None, choices=("exact", "fast"),
                        help="ELLA-V and vocoder precision (serve --precision; default: --precision)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="with --resynth-precision fast: ELLA-V's decode step compiled (serve --compile-decode; "
                             "compiled before the clients start)")  # fmt: skip
    parser.add_argument("--model-threads", default="auto", choices=("auto", "shared", "separate"),
                        help="with --resynth: the resynthesis worker on the encoder's thread or on its own (serve "
                             "--model-threads; default auto: shared on a CPU)")  # fmt: skip
    parser.add_argument("--stop-after-miss", action="store_true", help="stop at the first N that is not real time")
    parser.add_argument("--plot", type=Path, default=None, help="write a plot of lag vs N here (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")


# --- the encoder -----------------------------------------------------------------------------------------------------


# --- the clients (child process) -----------------------------------------------------------------------------------


def _clients_main(url: str, n: int, wav_path: str, seconds: float, frame_ms: float, preset: str, mode: str,
                  resynth: bool, conn) -> None:  # fmt: skip
    """Child process: N real-time clients at once; sends back per-session figures."""
    from dpslm_stream import protocol as P
    from dpslm_stream.audio import load_audio, resample
    from dpslm_stream.client.stream import stream_audio

    wav, sr = load_audio(wav_path)
    if sr != 16000:
        import torch

        wav = resample(torch.from_numpy(wav), sr, 16000).numpy()
    need = int(seconds * 16000)
    reps = int(np.ceil((need + 16000 * n) / len(wav))) + 1
    long = np.tile(wav, reps)

    async def one(i: int):
        await asyncio.sleep(i * frame_ms / 1000 / max(n, 1))  # spread the frame phases, as independent mics are
        start = (i * 16000) % len(wav)
        backlog = [0.0]

        def watch(msg):
            if isinstance(msg, P.Stats):
                backlog[0] = max(backlog[0], msg.buffered_s)

        res = await stream_audio(url, long[start : start + need], 16000, realtime=True, chunk_ms=frame_ms,
                                 preset=preset, options={"mode": mode}, on_message=watch,
                                 resynth={} if resynth else None)  # fmt: skip
        return {"lags": [u.lag_s for u in res.units], "algo": [u.commit_audio_s - u.end_s for u in res.units],
                "units": len(res.units), "rtf": res.end.stats["rtf"], "state": res.end.stats["state_nbytes"],
                "backlog": backlog[0], "wall": res.wall_s, "reason": res.end.reason,
                "resynth": res.end.resynth}  # fmt: skip

    async def main():
        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)

    cpu0 = time.process_time()
    out = asyncio.run(main())
    conn.send(([r if isinstance(r, dict) else {"error": repr(r)} for r in out], time.process_time() - cpu0))
    conn.close()


# --- the benchmark -------------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def _metric(srv, name: str) -> float:
    return srv.server.metrics.registry.get_sample_value(name) or 0.0


def run_load(srv, n: int, args, wav_path: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    before = {m: _metric(srv, m) for m in ("dpslm_batch_sessions_sum", "dpslm_batch_sessions_count",
                                           "dpslm_worker_busy_seconds_total", "dpslm_step_seconds_sum")}  # fmt: skip
    rss0, peak = _rss(), [0]
    stop = threading.Event()

    def sample_rss():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.1)

    watcher = threading.Thread(target=sample_rss, daemon=True)
    watcher.start()
    cpu0, t0 = time.process_time(), time.monotonic()
    proc = ctx.Process(target=_clients_main, args=(srv.url, n, wav_path, args.seconds, args.frame_ms, args.preset,
                                                   args.mode, args.resynth, child))  # fmt: skip
    proc.start()
    sessions, client_cpu = parent.recv()
    proc.join()
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    stop.set()
    watcher.join()
    after = {m: _metric(srv, m) for m in before}
    failed = [s["error"] for s in sessions if "error" in s]
    ok = [s for s in sessions if "error" not in s]
    lags = np.concatenate([s["lags"] for s in ok]) if ok else np.zeros(0)
    algo = np.concatenate([s["algo"] for s in ok]) if ok else np.zeros(0)
    p95s = [float(np.percentile(s["lags"], 95)) for s in ok if s["lags"]]
    steps = after["dpslm_batch_sessions_count"] - before["dpslm_batch_sessions_count"]
    pct = (lambda a, q: float(np.percentile(a, q)) if a.size else float("nan"))  # noqa: E731
    return {
        "n": n, "failed": len(failed), "errors": failed[:3], "units": int(lags.size),
        "lag_p50": pct(lags, 50), "lag_p95": pct(lags, 95), "lag_max": float(lags.max()) if lags.size else float("nan"),
        "worst_session_p95": max(p95s) if p95s else float("nan"), "algo_p50": pct(algo, 50),
        "rtf": statistics.mean(s["rtf"] for s in ok) if ok else float("nan"),
        "load": (after["dpslm_worker_busy_seconds_total"] - before["dpslm_worker_busy_seconds_total"]) / wall,
        "batch": (after["dpslm_batch_sessions_sum"] - before["dpslm_batch_sessions_sum"]) / max(steps, 1),
        "step_ms": 1000 * (after["dpslm_step_seconds_sum"] - before["dpslm_step_seconds_sum"]) / max(steps, 1),
        "cpu_per_session": cpu / (n * args.seconds), "client_cpu_per_session": client_cpu / (n * args.seconds),
        "backlog": max((s["backlog"] for s in ok), default=0.0),
        "state_mb": statistics.mean(s["state"] for s in ok) / 2**20 if ok else float("nan"),
        "rss_mb_per_session": max(0, peak[0] - rss0) / n / 2**20, "wall": wall,
        "realtime": not failed and bool(p95s) and max(p95s) < args.lag_budget,
        **(_resynth_figures(ok, args.seconds) if args.resynth else {}),
    }  # fmt: skip


def _resynth_figures(sessions: list[dict], seconds: float) -> dict:
    """Per load: the worst session's first-audio latency, mean and max unit-to-audio latency, resynthesis compute
    per second of audio made (the sessions' mean), and how long after its input's end the slowest session finished
    (its end message, so all its audio, arrived): small and flat in `--seconds` when resynthesis keeps up."""
    totals = [s["resynth"] for s in sessions if s.get("resynth")]
    worst = (lambda key: max((t[key] for t in totals if t.get(key) is not None), default=float("nan")))  # noqa: E731
    return {"first_audio_s": worst("first_audio_latency_s"), "audio_latency_mean_s": worst("latency_mean_s"),
            "audio_latency_max_s": worst("latency_max_s"),
            "resynth_rtf": statistics.mean(t["real_time_factor"] for t in totals) if totals else float("nan"),
            "audio_per_input": statistics.mean(t["audio_seconds"] for t in totals) / seconds if totals else 0.0,
            "finish_after_input_s": max((s["wall"] - seconds for s in sessions), default=float("nan")),
            "resynth_errors": [t["error"] for t in totals if t.get("error")][:3]}  # fmt: skip


def run(args: argparse.Namespace) -> None:
    import torch

    from dpslm_stream.bench._models import encoder_worker
    from dpslm_stream.server.app import ServerConfig, ServerThread

    if args.threads:
        torch.set_num_threads(args.threads)
    wav_path = str(Path(__file__).resolve().parent.parent / "data" / "sample.wav")
    started = time.perf_counter()
    label = {"full": "WavLM-Large dimensions, RANDOM weights", "tiny": "tiny set, RANDOM weights"}.get(args.models,
                                                                                                        args.models)
    cfg = ServerConfig(port=0, models=args.models if args.models != "full" else "tiny",
                       max_sessions=max(args.clients) + 1, idle_timeout_s=120, device=args.device)  # fmt: skip
    if args.backend == "ray":
        from dpslm_stream.server.ray_backend import deploy

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        encoder = deploy(dataclasses.replace(cfg, models=args.models, pairs=((500, 4500),), resynth=False,
                                             encoder_precision=args.precision),
                         name="dpslm-bench", gateway=False, num_cpus=os.cpu_count(), shard_cpus=1.0).encoder  # fmt: skip
        label += ", encoder on Ray Serve (local, one replica)"
    else:
        encoder = encoder_worker(args.models, args.device, precision=args.precision)
        label += f", encoder {encoder.runner.precision_plan.describe()}"
    resynth = None
    if args.resynth:
        resynth = _resynth_worker(args)
        label += f"; resynthesis {resynth.precision_plans['ellav']}; {resynth.precision_plans['wavtokenizer']}"
        cfg = dataclasses.replace(cfg, precision=resynth.precision, compile_decode=resynth.compile_decode,
                                  model_threads=args.model_threads)  # fmt: skip
    rows = []
    with ServerThread(cfg, encoder=encoder, resynth=resynth) as srv:
        if args.resynth:
            where = "the encoder's thread" if srv.server.resynth_shares_thread else "a thread of its own"
            label += f"; resynthesis on {where} (--model-threads {args.model_threads})"
        print(f"server bench: {label}; {args.mode}/{args.preset}, k=500 lambda=4500, no scoring; "
              f"{args.seconds:g} s of real-time audio per client in {args.frame_ms:g} ms frames; device {args.device}, "
              f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; set-up {time.perf_counter() - started:.1f} s")
        print("lag = wall clock from a unit's audio arriving to the unit being sent; algo = audio after a unit's end "
              "before it committed (window + DPDP)\nrtf = model compute per audio second per session; load = worker "
              "busy fraction; batch = sessions per encoder forward; cpu = server CPU s per audio s per session; "
              "cl cpu = the same for the clients' process (it shares this machine's cores); RSS MB/ses = the server's peak "
              "resident memory growth during the run per session (older outputs label it RSS MB/s)")  # fmt: skip
        header = (f"{'N':>3} {'lag p50':>8} {'p95':>6} {'max':>6} {'worst p95':>9} {'algo p50':>8} {'rtf':>6} "
                  f"{'load':>5} {'batch':>5} {'step ms':>7} {'cpu':>5} {'cl cpu':>6} {'backlog':>7} {'state MB':>8} "
                  f"{'RSS MB/ses':>10} {'real time':>9}")  # fmt: skip
        print(header)
        print("-" * len(header))
        for n in args.clients:
            r = run_load(srv, n, args, wav_path)
            rows.append(r)
            print(f"{n:3d} {r['lag_p50']:8.3f} {r['lag_p95']:6.3f} {r['lag_max']:6.2f} {r['worst_session_p95']:9.3f} "
                  f"{r['algo_p50']:8.3f} {r['rtf']:6.3f} {r['load']:5.2f} {r['batch']:5.1f} {r['step_ms']:7.1f} "
                  f"{r['cpu_per_session']:5.2f} {r['client_cpu_per_session']:6.2f} {r['backlog']:7.2f} "
                  f"{r['state_mb']:8.2f} {r['rss_mb_per_session']:10.1f} {'yes' if r['realtime'] else 'NO':>9}"
                  + (f"  ({r['failed']} failed: {r['errors']})" if r["failed"] else ""), flush=True)  # fmt: skip
            if args.resynth:
                print(f"    resynthesis: first audio {r['first_audio_s']:.2f} s after the first units (worst session), "
                      f"unit-to-audio latency mean {r['audio_latency_mean_s']:.2f} s / max "
                      f"{r['audio_latency_max_s']:.2f} s, compute {r['resynth_rtf']:.2f} s per audio second, "
                      f"{r['audio_per_input']:.1f} s of audio per input second, last session finished "
                      f"{r['finish_after_input_s']:.1f} s after its input"
                      + (f"; stopped early: {r['resynth_errors']}" if r["resynth_errors"] else ""), flush=True)  # fmt: skip
            if args.stop_after_miss and not r["realtime"]:
                break
    ok = [r["n"] for r in rows if r["realtime"]]
    print(f"largest N served in real time (every session's p95 lag < {args.lag_budget:g} s): "
          f"{max(ok) if ok else 'none'} of those tried {[r['n'] for r in rows]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"label": label, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))  # fmt: skip
    if args.plot:
        plot(rows, args, label)


def _resynth_worker(args: argparse.Namespace):
    """The server's ResynthWorker: for --models full, ELLA-V and WavTokenizer at released size with RANDOM weights
    (bench/resynth.py make_worker); otherwise from the model set. With --compile-decode the server's warm-up
    compiles the decode step before the clients start (ServerConfig.compile_decode)."""
    from dpslm_stream.bench.resynth import make_worker
    from dpslm_stream.stream.resynth_worker import ResynthWorker

    precision = args.resynth_precision or args.precision
    if args.compile_decode and precision != "fast":
        raise SystemExit("--compile-decode needs --resynth-precision fast (or --precision fast)")
    if args.models == "full":
        spec = argparse.Namespace(device=args.device, dtype="float32", vocoder_dtype="float32",
                                  compile_decode=args.compile_decode)  # fmt: skip
        return make_worker("full", spec, max_batch=16, precision=precision)
    return ResynthWorker(args.models, args.device, precision=precision, compile_decode=args.compile_decode)


def plot(rows: list[dict], args: argparse.Namespace, label: str) -> None:
    """Commit lag (p50, p95, max) against N, with the real-time budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]' in the dpslm-stream checkout); no plot written")
        return
    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, style in (("lag_p50", "o-"), ("lag_p95", "s-"), ("lag_max", "^:")):
        ax.plot(ns, [r[key] for r in rows], style, label=key.replace("lag_", ""))
    ax.axhline(args.lag_budget, color="grey", lw=0.8, ls="--", label=f"budget {args.lag_budget:g} s")
    ax.set_xlabel("concurrent real-time clients N")
    ax.set_ylabel("commit lag (s)")
    ax.set_yscale("log")
    ax.set_title(f"{label}\n{args.mode}/{args.preset}, {args.device}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    run(_parser.parse_args())
