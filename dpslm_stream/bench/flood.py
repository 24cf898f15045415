"""Fairness under a flood, and the memory of long full-mode sessions.

Two measurements (tiny set, RANDOM weights, by default):

1. Canary commit lag: one real-time client (paced like a microphone, 20 ms frames) streams speech to a server; its
   commit lag p50/p95/max is measured alone, then again while a second client floods the same server: it sends
   `--flood-seconds` of audio at once in `mode: full` (the whole file, as fast as the server takes it), over and
   over until the canary is done. Fairness means the canary's p95 barely moves (issue 14: within 0.5 s).
2. Peak RSS of one full-mode session of each `--full-seconds` length, each in a fresh child process: the model set is
   loaded and warmed up, then the session's audio is pushed and encoded to the end; reported is the peak RSS above
   the process's RSS just before (ru_maxrss and a 10 ms sampler), with the session's wall time and worker steps.

    dpslm-stream bench flood                                   # tiny set; canary 20 s, flood 120 s; full 120 600 s
    dpslm-stream bench flood --full-seconds 120 --skip-lag     # memory only

The server runs in this process (its model worker is a thread), the clients in a child process, as in
`bench server`. Timings on a shared machine are noisy: repeat (`--repeats`) and read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import threading
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="tiny", help="tiny (default), full (WavLM-Large dimensions, random "
                                                         "weights), release, or a model folder")  # fmt: skip
    parser.add_argument("--canary-seconds", type=float, default=20.0, help="real-time audio of the canary client")
    parser.add_argument("--flood-seconds", type=float, default=120.0, help="audio per flooding session (full mode)")
    parser.add_argument("--full-seconds", type=float, nargs="*", default=[120.0, 600.0],
                        help="lengths of the full-mode sessions whose memory is measured (none: skip)")
    parser.add_argument("--repeats", type=int, default=1, help="canary runs per condition (medians reported)")
    parser.add_argument("--skip-lag", action="store_true", help="only the memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")


def cpu_description() -> str:
    """CPU model and the flags that change kernel choice (AMX / AVX-512 BF16), for every printed figure."""
    model, flags = platform.processor() or "?", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    except (OSError, AttributeError):
        pass
    have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(have) or 'no avx512/amx'}"


def _speech(seconds: float, seed: int) -> np.ndarray:
    from dpslm_stream.signals import speech_like

    return speech_like(seconds, 16000, seed=seed).astype(np.float32)


# --- the clients (child process) -------------------------------------------------------------------------------------


def _clients_main(url: str, canary_s: float, flood_s: float, flood: bool, conn) -> None:
    """Child process: one real-time canary, and (with `flood`) one client sending full-mode files at once."""
    from dpslm_stream.client.stream import stream_audio

    canary = _speech(canary_s, seed=11)
    bulk = _speech(flood_s, seed=12)

    async def main():
        done = asyncio.Event()
        floods: list[float] = []

        async def flooder():
            await asyncio.sleep(1.0)  # the canary is under way
            while not done.is_set():
                res = await stream_audio(url, bulk, 16000, realtime=False, chunk_ms=5000, format="float32",
                                         options={"mode": "full"})  # fmt: skip
                floods.append(res.wall_s)

        task = asyncio.create_task(flooder()) if flood else None
        res = await stream_audio(url, canary, 16000, realtime=True, chunk_ms=20, options={"mode": "cached"})
        done.set()
        if task is not None:
            await task  # the flood in progress finishes: it must end well too
        return {"lags": [u.lag_s for u in res.units], "units": [u.unit for u in res.units],
                "reason": res.end.reason if res.end else None, "floods": floods}  # fmt: skip

    try:
        conn.send(asyncio.run(main()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which prints it
        conn.send({"error": repr(e)})
    conn.close()


def run_canary(url: str, args, flood: bool) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_clients_main, args=(url, args.canary_seconds, args.flood_seconds, flood, child))
    proc.start()
    out = parent.recv()
    proc.join()
    if "error" in out:
        raise RuntimeError(out["error"])
    lags = np.array(out["lags"])
    return {"flood": flood, "units": len(lags), "lag_p50": float(np.percentile(lags, 50)),
            "lag_p95": float(np.percentile(lags, 95)), "lag_max": float(lags.max()), "reason": out["reason"],
            "floods_done": len(out["floods"]), "flood_wall_s": out["floods"], "unit_ids": out["units"]}  # fmt: skip


# --- memory of one full-mode session (child process) -----------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def _full_main(models: str, seconds: float, threads: int | None, conn) -> None:
    import torch

    from dpslm_stream.bench._models import encoder_worker
    from dpslm_stream.stream.events import EndEvent

    if threads:
        torch.set_num_threads(threads)
    worker = encoder_worker(models)
    from dpslm_stream.server.encoder_thread import warm_up

    warm_up(worker, 500, 4500)
    audio = _speech(seconds, seed=13)
    session = worker.open_session(16000, 500, 4500, mode="full")
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    for i in range(0, len(audio), 16000):
        session.push(audio[i : i + 16000])
    session.end()
    steps, longest, units = 0, 0.0, 0
    while not session.closed:
        s0 = time.perf_counter()
        worker.step([session], full_slice_s=0.05)  # as the server's model worker does
        longest = max(longest, time.perf_counter() - s0)
        steps += 1
        for ev in session.poll():
            units += not isinstance(ev, EndEvent)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    conn.send({"seconds": seconds, "peak_mb": (max(peak[0], maxrss) - base) / 2**20, "wall_s": wall,
               "steps": steps, "longest_step_s": longest, "units": units})  # fmt: skip
    conn.close()


def run_full(models: str, seconds: float, threads: int | None) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_full_main, args=(models, seconds, threads, child))
    proc.start()
    out = parent.recv() if parent.poll(3600) else {"seconds": seconds, "error": "no answer"}
    proc.join()
    if proc.exitcode:
        out = {"seconds": seconds, "error": f"child exited with {proc.exitcode} (killed for memory?)"}
    return out


# --- the benchmark -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    import torch

    from dpslm_stream.bench._models import encoder_worker
    from dpslm_stream.server.app import ServerConfig, ServerThread

    if args.threads:
        torch.set_num_threads(args.threads)
    label = {"full": "WavLM-Large dimensions, RANDOM weights", "tiny": "tiny set, RANDOM weights"}.get(args.models,
                                                                                                        args.models)
    print(f"flood bench: {label}; CPU: {cpu_description()}; {torch.get_num_threads()} torch threads; load average "
          f"before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine inflates every figure)")
    result: dict = {"label": label, "cpu": cpu_description(), "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_lag:
        cfg = ServerConfig(port=0, models=args.models if args.models != "full" else "tiny", max_sessions=4,
                           idle_timeout_s=120, max_full_s=max(600.0, args.flood_seconds))  # fmt: skip
        rows = []
        with ServerThread(cfg, encoder=encoder_worker(args.models)) as srv:
            print(f"canary: {args.canary_seconds:g} s real time (cached/low-latency, 20 ms frames); flood: "
                  f"{args.flood_seconds:g} s full-mode files sent at once, back to back")
            print(f"{'condition':>10} {'run':>3} {'units':>5} {'lag p50':>8} {'p95':>6} {'max':>6} {'floods':>6} "
                  f"{'flood wall s':>12}")  # fmt: skip
            for rep in range(args.repeats):
                for flood in (False, True):
                    r = run_canary(srv.url, args, flood)
                    rows.append(r)
                    walls = " ".join(f"{w:.1f}" for w in r["flood_wall_s"]) or "-"
                    print(f"{'flooded' if flood else 'alone':>10} {rep:3d} {r['units']:5d} {r['lag_p50']:8.3f} "
                          f"{r['lag_p95']:6.3f} {r['lag_max']:6.2f} {r['floods_done']:6d} {walls:>12}"
                          f"   load {os.getloadavg()[0]:.1f}", flush=True)
        med = {f: statistics.median(r["lag_p95"] for r in rows if r["flood"] is f) for f in (False, True)}
        same = all(r["unit_ids"] == rows[0]["unit_ids"] for r in rows)
        print(f"canary p95 (median of {args.repeats}): alone {med[False]:.3f} s, flooded {med[True]:.3f} s, "
              f"difference {med[True] - med[False]:+.3f} s; canary units identical in every run: {same}")
        result.update(canary=rows, p95_alone=med[False], p95_flooded=med[True], canary_units_identical=same)
    if args.full_seconds:
        print("full-mode session memory (fresh process each; peak RSS above the RSS after loading and warm-up)")
        print(f"{'audio s':>8} {'peak MB':>8} {'wall s':>7} {'steps':>6} {'longest step s':>14} {'units':>6}")
        mem = []
        for seconds in args.full_seconds:
            r = run_full(args.models, seconds, args.threads)
            mem.append(r)
            if "error" in r:
                print(f"{seconds:8.0f}  {r['error']}", flush=True)
            else:
                print(f"{seconds:8.0f} {r['peak_mb']:8.1f} {r['wall_s']:7.1f} {r['steps']:6d} "
                      f"{r['longest_step_s']:14.2f} {r['units']:6d}", flush=True)
        result["full_mode_memory"] = mem
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    run(_parser.parse_args())
