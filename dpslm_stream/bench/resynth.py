"""Live resynthesis benchmark: unit-commit -> audio latency, first-audio latency, real-time factor, concurrent
streams, and the deviation of streamed from offline resynthesis for a few (C, L).

Every model here has RANDOM weights: the tiny set (dpslm_stream.tiny) and, for "full", the released dimensions
(ELLA-V K=500: 210.8 M parameters; WavTokenizer decoder: 63.8 M) with random values. Speed does not depend on the
weight values; what a random ELLA-V generates does (it rarely emits EOP, so units mostly get the capped M+1 codec
tokens), and the deviation figures are plumbing checks, not quality. Input units are random (deduplicated), with
20 ms-multiple durations averaging 1/U s, arriving when they end, as the encoder commits them.

Sections:
1. throughput: N streams replayed in 100 ms input ticks, the worker catching up after each tick. Worker RTF =
   worker compute / input seconds; N streams can run live when it is <= 1. A random ELLA-V makes ~2-3x more audio
   than input (units mostly get the capped M+1 = 11 frames), a trained one about as much as the input, so the
   compute per second of *audio* per stream (RTF audio) is the fairer estimate of a trained model's RTF.
   rows/step: passes per batched decode step; ms/step: one batched decode step; prefill/decode/vocoder: shares of
   the wall time; voc rows: vocoder windows per backbone forward (streams whose windows had equal lengths share one).
2. live: N streams in real time (units arrive on the wall clock); per-unit latency = arrival of a unit -> its
   audio complete (hold-back wait + vocoder lookahead + compute), first-audio latency, final resynthesis lag.
   First audio of one stream also on a CPU clock (units arrive on a clock that advances by the worker's CPU time
   only: what an unloaded single-thread machine would show; CPU devices only), split into waiting for units,
   prefill, decode steps and vocoder, for the settings given and for the schedule before the first-audio changes
   (first window at min_step, no early end of a step's decode steps, the first unit waiting for L like every unit).
3. deviation (tiny ELLA-V with an EOP bias so that durations vary, float32): per (C, L), the streamed codec ids
   against offline greedy generation, and the streamed audio against the whole-sequence decode of the same codes;
   seams = largest sample-to-sample jump at chunk joins over the signal's 99.9th-percentile jump (the same
   positions in the whole-sequence decode as control).

    dpslm-stream bench resynth [--sizes tiny full] [--streams 1 2 4 8] [--plot resynth.png]
    python -m dpslm_stream.bench.resynth
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import torch

from dpslm_stream import hub
from dpslm_stream.bench.options import precision_list
from dpslm_stream.models import ellav as E
from dpslm_stream.device import setup_model_device
from dpslm_stream.device import synchronize as _sync
from dpslm_stream.models import wavtokenizer as W
from dpslm_stream.models.precision import machine_summary
from dpslm_stream.stream.ellav_stage import IncrementalELLAV
from dpslm_stream.stream.resynth_defaults import (
    DEFAULT_HOLDBACK, DEFAULT_LEFT_CONTEXT, DEFAULT_VOCODER_FIRST_STEP, DEFAULT_VOCODER_LEFT_CONTEXT,
    DEFAULT_VOCODER_LOOKAHEAD, DEFAULT_VOCODER_MIN_STEP,
)
from dpslm_stream.stream.resynth_events import AudioEvent, ResynthEndEvent
from dpslm_stream.stream.resynth_worker import ResynthWorker
from dpslm_stream.stream.vocoder import IncrementalVocoder

K, LMBDA = 500, 4500
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TICK_S = 0.1


_precisions = precision_list()


def _opt_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _setting(text: str) -> tuple[int | None, int | None]:
    c, l_ = text.split(",")
    return _opt_int(c), _opt_int(l_)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", choices=["tiny", "full"], default=["tiny", "full"],
                        help="model sizes to time (default: tiny full)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="ELLA-V dtype (default float32)")
    parser.add_argument("--vocoder-dtype", choices=sorted(_DTYPES), default="float32",
                        help="WavTokenizer backbone dtype (default float32)")
    parser.add_argument("--precision", type=_precisions, default=["exact"],
                        help="precisions side by side, e.g. exact,fast (default exact; fast needs the float32 dtypes)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="fast rows: ELLA-V's decode step through torch.compile (compiled in a warm-up first)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="concurrent streams, tiny set (default: 1 2 4 8)")
    parser.add_argument("--full-streams", type=int, nargs="+", default=[1, 2],
                        help="concurrent streams, full size (default: 1 2)")
    parser.add_argument("--seconds", type=float, default=6.0, help="input seconds per stream, tiny (default 6)")
    parser.add_argument("--full-seconds", type=float, default=1.0, help="input seconds per stream, full (default 1)")
    parser.add_argument("--units-per-second", type=float, default=12.0,
                        help="U, deduplicated units per input second (default 12)")
    parser.add_argument("--left-context", type=_opt_int, default=DEFAULT_LEFT_CONTEXT, help="C in units (or none)")
    parser.add_argument("--holdback", type=_opt_int, default=DEFAULT_HOLDBACK, help="L in units (or none)")
    parser.add_argument("--first-holdback", type=_opt_int, default=None,
                        help="units the first unit waits for (default none: L)")
    parser.add_argument("--trigger-units", type=int, default=1, help="units per pass at least (default 1)")
    parser.add_argument("--vocoder-left-context", type=_opt_int, default=DEFAULT_VOCODER_LEFT_CONTEXT)
    parser.add_argument("--vocoder-lookahead", type=int, default=DEFAULT_VOCODER_LOOKAHEAD)
    parser.add_argument("--vocoder-min-step", type=int, default=DEFAULT_VOCODER_MIN_STEP)
    parser.add_argument("--vocoder-first-step", type=int, default=DEFAULT_VOCODER_FIRST_STEP)
    parser.add_argument("--first-audio-repeats", type=int, default=3,
                        help="runs per setting of the CPU-clock first-audio measurement (default 3; 0: skip it)")
    parser.add_argument("--deviation", type=_setting, nargs="*",
                        default=[_setting(s) for s in ("none,none", "none,3", "32,3", "8,2", "4,1", "2,0")],
                        help="(C, L) settings for the deviation table, e.g. 32,3 none,none (default: six)")
    parser.add_argument("--deviation-units", type=int, default=60, help="units per deviation run (default 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write a PNG with the figures to this path")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and models


def unit_stream(seconds: float, units_per_second: float, rng: random.Random) -> list[tuple[int, float]]:
    """Random deduplicated units with end times: durations are whole 20 ms frames, geometric with mean 1/U s."""
    out, t, last = [], 0, None
    p = min(1.0, 1.0 / (50.0 / units_per_second))
    while True:
        frames = 1
        while rng.random() > p:
            frames += 1
        t += frames
        if t / 50 > seconds:
            return out
        u = rng.randrange(K)
        while u == last:
            u = rng.randrange(K)
        out.append((u, t / 50))
        last = u


def _random_full_ellav(device: torch.device, dtype: torch.dtype) -> E.ELLAV:
    from dpslm_stream.bench.ulm import random_model

    return random_model(lambda: E.ELLAV(E.config_for_k(K), E.ELLAVTokenizer.for_units(K)), device, dtype)


def _random_full_wavtokenizer() -> W.WavTokenizer:
    torch.manual_seed(0)
    model = W.WavTokenizer(W.FULL).eval()
    with torch.no_grad():
        for layer in model.feature_extractor.encodec.quantizer.vq.layers:
            layer._codebook.embed.normal_()
    return model


def make_worker(size: str, args: argparse.Namespace, max_batch: int, precision: str = "exact",
                clock=time.perf_counter) -> ResynthWorker:  # fmt: skip
    device = torch.device(args.device)
    dtype, vdtype = _DTYPES[args.dtype], _DTYPES[args.vocoder_dtype]
    compiled = precision == "fast" and args.compile_decode
    common = dict(vocoder_dtype=vdtype, max_batch=max_batch, precision=precision, clock=clock, compile_decode=compiled)
    if size == "tiny":
        worker = ResynthWorker("tiny", device, dtype, pairs=[(K, LMBDA)], **common)
    else:
        worker = ResynthWorker("tiny", device, dtype, pairs=[(K, LMBDA)], **common,
                               ellavs={(K, LMBDA): _random_full_ellav(device, dtype)},
                               wavtokenizer=_random_full_wavtokenizer())  # fmt: skip
    if compiled:  # the compilation is not part of any figure
        worker.warm_up(K, LMBDA)
    return worker


def session_options(args: argparse.Namespace) -> dict:
    return dict(left_context=args.left_context, holdback=args.holdback, first_holdback=args.first_holdback,
                trigger_units=args.trigger_units, vocoder_left_context=args.vocoder_left_context,
                vocoder_lookahead=args.vocoder_lookahead, vocoder_min_step=args.vocoder_min_step,
                vocoder_first_step=args.vocoder_first_step)  # fmt: skip


def before_first_audio_changes(options: dict) -> dict:
    """The same options with the first-audio schedule as it was: the first window waits for min_step frames and
    the first unit for L more units (run with ResynthWorker.eager_first_window off)."""
    return {**options, "first_holdback": None, "vocoder_first_step": options["vocoder_min_step"]}


# ----------------------------------------------------------------------------------------------------------------------
# Runs


def replay(worker: ResynthWorker, streams: list[list[tuple[int, float]]], options: dict, seconds: float) -> dict:
    """Feed every stream in 100 ms input ticks, stepping the worker until it has caught up after each tick."""
    sessions = [worker.open_session(K, LMBDA, **options) for _ in streams]
    nxt = [0] * len(streams)
    ends: list[ResynthEndEvent] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    ticks = int(math.ceil(seconds / TICK_S))
    for tick in range(1, ticks + 1):
        for i, (s, units) in enumerate(zip(sessions, streams)):
            j = nxt[i]
            while nxt[i] < len(units) and units[nxt[i]][1] <= tick * TICK_S:
                nxt[i] += 1
            if nxt[i] > j:
                s.push_units([u for u, _ in units[j : nxt[i]]])
            if tick == ticks:
                s.end()
        worker.run_until_idle(sessions)
        ends += [e for s in sessions for e in s.poll() if isinstance(e, ResynthEndEvent)]
    _sync(worker.device)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    audio_s = float(np.mean([e.audio_seconds for e in ends]))
    return {"wall": wall, "rtf": wall / seconds, "audio_s": audio_s, "rtf_audio": wall / audio_s,
            "cpu_rtf": cpu / seconds, "cpu_rtf_audio": cpu / audio_s,
            "rows": worker.tokens_decoded / max(1, worker.decode_steps),
            "ms_per_step": 1e3 * worker.decode_seconds / max(1, worker.decode_steps),
            "voc_rows": worker.vocoder_runner.windows / max(1, worker.vocoder_runner.forwards),
            "split": [t / cpu for t in (worker.prefill_seconds, worker.decode_seconds, worker.vocoder_seconds)]}


def live(worker: ResynthWorker, streams: list[list[tuple[int, float]]], options: dict) -> dict:
    """Streams in real time: units are pushed when the wall clock passes their end time. A unit's latency is
    measured here, from its push to the poll that returns the chunk completing it (AudioEvent.units_done)."""
    sessions = [worker.open_session(K, LMBDA, **options) for _ in streams]
    nxt = [0] * len(streams)
    pushed: list[list[float]] = [[] for _ in streams]
    latencies: list[list[float]] = [[] for _ in streams]
    t0 = time.perf_counter()
    lag_trace, ends = [], [None] * len(streams)
    while not all(s.closed for s in sessions):
        now = time.perf_counter() - t0
        for i, (s, units) in enumerate(zip(sessions, streams)):
            j = nxt[i]
            while nxt[i] < len(units) and units[nxt[i]][1] <= now:
                nxt[i] += 1
            if nxt[i] > j:
                s.push_units([u for u, _ in units[j : nxt[i]]])
                pushed[i] += [now] * (nxt[i] - j)
            if nxt[i] == len(units) and not s.ended:
                s.end()
        if any(s.has_work for s in sessions):
            worker.step(sessions)
        else:
            upcoming = [units[nxt[i]][1] for i, units in enumerate(streams) if nxt[i] < len(units)]
            time.sleep(max(0.0, min(upcoming, default=now) - (time.perf_counter() - t0)))
        now = time.perf_counter() - t0
        lag_trace.append((now, max(s.lag_s for s in sessions)))
        for i, s in enumerate(sessions):
            for e in s.poll():
                if isinstance(e, ResynthEndEvent):
                    ends[i] = e
                elif isinstance(e, AudioEvent):
                    done = len(latencies[i])
                    latencies[i] += [now - t for t in pushed[i][done : e.units_done]]
    return {"ends": ends, "lag_trace": lag_trace, "latencies": latencies}


def first_audio_cpu(worker: ResynthWorker, units: list[tuple[int, float]], options: dict) -> dict:
    """One stream until its first audio, on a clock that advances by the worker's CPU time (this thread's) and jumps
    to the next unit's arrival when the worker is idle: the first audio an unloaded one-thread machine would give,
    whatever else runs on this one. The worker's clock must be time.thread_time (its prefill/decode/vocoder
    counters then count CPU time too)."""
    before = (worker.prefill_seconds, worker.decode_seconds, worker.vocoder_seconds, worker.decode_steps)
    s = worker.open_session(K, LMBDA, **options)
    now, nxt, busy, first = 0.0, 0, 0.0, None
    while not s.closed and first is None:
        while nxt < len(units) and units[nxt][1] <= now:
            s.push_units([units[nxt][0]])
            nxt += 1
        if nxt == len(units) and not s.ended:
            s.end()
        if s.has_work:
            started = time.thread_time()
            worker.step([s])
            spent = time.thread_time() - started
            now, busy = now + spent, busy + spent
            if any(isinstance(e, AudioEvent) and e.pcm.size for e in s.poll()):
                first = now
        elif nxt < len(units):
            now = units[nxt][1]
        else:
            break
    s.close()
    after = (worker.prefill_seconds, worker.decode_seconds, worker.vocoder_seconds, worker.decode_steps)
    prefill, decode, vocoder, steps = (b - a for a, b in zip(before, after))
    first = math.nan if first is None else first - units[0][1]
    return {"first": first, "cpu": busy, "wait": first - busy, "prefill": prefill, "decode": decode,
            "steps": steps, "vocoder": vocoder}


def _first_audio_section(args: argparse.Namespace, size: str, precision: str, options: dict, units) -> dict:
    """First audio of one stream on the CPU clock, before / after the first-audio changes, interleaved runs."""
    worker = make_worker(size, args, max_batch=1, precision=precision, clock=time.thread_time)
    settings = {"before": (before_first_audio_changes(options), False), "now": (options, True)}
    if options.get("first_holdback") is None and options.get("holdback") is not None:
        settings["now, first_holdback 0"] = ({**options, "first_holdback": 0}, True)
    first_audio_cpu(worker, units, options)  # warm-up: first calls of each shape are slower
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.first_audio_repeats):
        for name, (opts, eager) in settings.items():
            worker.eager_first_window = eager
            runs[name].append(first_audio_cpu(worker, units, opts))
    header = (f"{'schedule':>22} {'first audio s':>13} {'= wait units':>12} {'+ CPU':>6} {'prefill':>7} "
              f"{'decode (steps)':>14} {'vocoder':>7}")  # fmt: skip
    print(f"\n[{size}, {precision}] first audio of one stream on a CPU clock (medians of "
          f"{args.first_audio_repeats}; seconds after the first unit)")
    print(header)
    print("-" * len(header))
    out = {}
    for name, rs in runs.items():
        m = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        out[name] = m
        print(f"{name:>22} {m['first']:>13.3f} {m['wait']:>12.3f} {m['cpu']:>6.3f} {m['prefill']:>7.3f} "
              f"{m['decode']:>8.3f} ({m['steps']:>3.0f}) {m['vocoder']:>7.3f}")  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Deviation from offline


def _snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    n = min(len(ref), len(x))
    noise = float(np.sum((ref[:n] - x[:n]) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref[:n] ** 2)) / noise)


def _seam_ratio(x: np.ndarray, joins: list[int]) -> float:
    """Largest |x[n] - x[n-1]| at the joins over the 99.9th percentile of all sample-to-sample jumps."""
    jumps = np.abs(np.diff(x))
    at = [jumps[n - 1] for n in joins if 0 < n < len(x)]
    return float(max(at) / np.percentile(jumps, 99.9)) if at else float("nan")


def deviation(args: argparse.Namespace, wt: W.WavTokenizer) -> list[dict]:
    torch.manual_seed(0)
    model = E.random_model(K, E.TINY)
    with torch.no_grad():
        model.output.bias[E.ELLAVTokenizer.EOP_id] = 1.4  # the random model then ends units itself (0..M+1 frames)
    rng = random.Random(args.seed + 99)
    units: list[int] = []
    while len(units) < args.deviation_units:
        u = rng.randrange(K)
        if not units or u != units[-1]:
            units.append(u)
    (offline,), _ = model.generate_ids([units], 100_000, 10, 1.0, 0.0)
    rows = []
    for C, L in args.deviation:
        stage = IncrementalELLAV(model, C, L, max_pass_units=None if C is None else max(32, (L or 0) + 1))
        vocoder = IncrementalVocoder(wt, left_context=args.vocoder_left_context, lookahead=args.vocoder_lookahead,
                                       min_step=args.vocoder_min_step)  # fmt: skip
        codes, chunks = [], []
        for i, u in enumerate(units):  # one unit at a time, the worker caught up after each
            new = stage.push([u]) if i < len(units) - 1 else stage.push([u]) + stage.flush()
            codes += new
            if new:
                chunks.append(vocoder.push(torch.tensor(new)).numpy())
        chunks.append(vocoder.flush().numpy())
        audio = np.concatenate(chunks)
        whole = W.decode(wt, torch.tensor(codes)[None, None])[0].numpy()
        joins = list(np.cumsum([len(c) for c in chunks if len(c)])[:-1])
        n = max(len(codes), len(offline))
        same = sum(a == b for a, b in zip(codes, offline))
        first_diff = next((i for i, (a, b) in enumerate(zip(codes, offline)) if a != b), min(len(codes), len(offline)))
        rows.append({
            "C": C, "L": L, "agree": same / n, "identical_s": first_diff / 40, "frames": len(codes),
            "offline_frames": len(offline), "vocoder_snr": _snr_db(whole, audio),
            "seam": _seam_ratio(audio, joins), "seam_control": _seam_ratio(whole, joins),
        })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Report


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _run_size(args: argparse.Namespace, size: str, precision: str, options: dict, streams_for) -> dict:
    """Throughput and live sections for one model size at one precision."""
    seconds = args.seconds if size == "tiny" else args.full_seconds
    counts = args.streams if size == "tiny" else args.full_streams
    label = f"{size}, {precision}"
    print(f"\n[{label}] throughput: streams replayed in {TICK_S * 1e3:.0f} ms ticks, {seconds:g} s of input each")
    plans = make_worker("tiny", args, 1, precision).precision_plans
    print(f"precision {precision}: {plans['ellav']}; {plans['wavtokenizer']}")
    header = (f"{'streams':>7} {'units/stream':>12} {'audio s/stream':>14} {'wall s':>8} {'RTF input':>9} "
              f"{'RTF audio':>9} {'CPU RTF in':>10} {'CPU RTF au':>10} {'rows/step':>9} {'CPU ms/step':>11} "
              f"{'prefill/decode/vocoder':>22} {'voc rows':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    sweep = []
    for n in counts:
        # CPU-time clock: the worker's ms/step and shares count this process's CPU time, not time it was descheduled
        worker = make_worker(size, args, max_batch=max(counts), precision=precision, clock=time.process_time)
        streams = streams_for(n, seconds)
        r = replay(worker, streams, options, seconds)
        del worker
        r["units"] = np.mean([len(x) for x in streams])
        sweep.append((n, r))
        split = "/".join(f"{100 * x:.0f}%" for x in r["split"])
        print(f"{n:>7} {r['units']:>12.1f} {r['audio_s']:>14.2f} {r['wall']:>8.2f} {r['rtf']:>9.3f} "
              f"{r['rtf_audio']:>9.3f} {r['cpu_rtf']:>10.3f} {r['cpu_rtf_audio']:>10.3f} {r['rows']:>9.2f} "
              f"{r['ms_per_step']:>11.2f} {split:>22} {r['voc_rows']:>8.2f}")  # fmt: skip
    live_ok = [n for n, r in sweep if r["rtf"] <= 1.0]
    audio_ok = [n for n, r in sweep if r["rtf_audio"] <= 1.0]
    print(f"real-time streams on this worker (of {max(counts)} tried): {max(live_ok, default=0)} for this "
          f"random model's input (RTF input <= 1), {max(audio_ok, default=0)} at one second of audio per "
          f"second of input (RTF audio <= 1)")  # fmt: skip

    live_counts = sorted({1, max(live_ok)}) if live_ok else [1]
    print(f"\n[{label}] live: units arrive in real time; latency = unit arrival -> its audio complete")
    header = (f"{'streams':>8} {'first audio s':>12} {'latency mean':>12} {'p95':>6} {'max':>6} "
              f"{'max lag s':>9} {'RTF':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    lives = []
    # One stream also with the first-audio schedule as it was (label "1 before"), in the same run
    runs = [(n, str(n), options, True) for n in live_counts] + [(1, "1 before", before_first_audio_changes(options),
                                                                 False)]  # fmt: skip
    for n, name, opts, eager in runs:
        worker = make_worker(size, args, max_batch=max(counts), precision=precision)
        worker.eager_first_window = eager
        r = live(worker, streams_for(n, seconds), opts)
        del worker
        if name == str(n):
            lives.append((n, r))
        ends = r["ends"]
        lat = np.concatenate([np.asarray(x) for x in r["latencies"]])
        first = np.mean([e.first_audio_latency_s for e in ends if e.first_audio_latency_s is not None])
        rtf = np.mean([e.real_time_factor for e in ends])
        print(f"{name:>8} {first:>12.3f} {lat.mean():>12.3f} {np.percentile(lat, 95):>6.3f} {lat.max():>6.3f} "
              f"{max(lag for _, lag in r['lag_trace']):>9.3f} {rtf:>6.2f}")  # fmt: skip
    first_audio = None
    if args.first_audio_repeats > 0 and torch.device(args.device).type == "cpu":  # a CPU clock: CPU only
        first_audio = _first_audio_section(args, size, precision, options, streams_for(1, seconds)[0])
    return {"sweep": sweep, "live": lives, "first_audio": first_audio}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = setup_model_device(args.device)  # TF32 off on CUDA, as the server
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    print("Live resynthesis (ELLA-V re-prompting + windowed WavTokenizer), RANDOM weights: speed and plumbing only")
    print(f"device {name}{threads}, {machine_summary(device)}, ELLA-V {args.dtype}, vocoder {args.vocoder_dtype}, "
          f"torch {torch.__version__}; precision {', '.join(args.precision)}")
    print(f"session: C={args.left_context} L={args.holdback} units, trigger every {args.trigger_units} unit(s); "
          f"vocoder left {args.vocoder_left_context} / lookahead {args.vocoder_lookahead} / step "
          f"{args.vocoder_min_step} frames; input: random units, U = {args.units_per_second}/s")  # fmt: skip
    options = session_options(args)
    results: dict[str, dict] = {}

    def streams_for(n: int, seconds: float) -> list[list[tuple[int, float]]]:
        # stream i is the same in every run, so runs with more streams only add streams
        return [unit_stream(seconds, args.units_per_second, random.Random(args.seed * 1000 + i)) for i in range(n)]

    for size in args.sizes:
        for precision in args.precision:
            results[f"{size} {precision}"] = _run_size(args, size, precision, options, streams_for)

    if not args.deviation:
        if args.plot:
            _plot(args.plot, results, [])
            print(f"\nplot written to {args.plot}")
        return
    print("\n[deviation] tiny ELLA-V (random, EOP-biased) and tiny WavTokenizer; one unit per pass, worker caught up")
    wt = hub.ModelSet("tiny").wavtokenizer()[0]
    header = (f"{'C':>5} {'L':>5} {'token agree':>11} {'identical s':>11} {'frames':>7} {'offline':>7} "
              f"{'vocoder SNR dB':>14} {'seam':>6} {'control':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    dev = deviation(args, wt)
    for r in dev:
        print(f"{str(r['C']):>5} {str(r['L']):>5} {r['agree']:>11.3f} {r['identical_s']:>11.2f} {r['frames']:>7} "
              f"{r['offline_frames']:>7} {r['vocoder_snr']:>14.1f} {r['seam']:>6.2f} {r['seam_control']:>7.2f}")
    print("token agree: streamed codec ids equal to offline greedy ones, position by position; identical s: audio "
          "seconds before the first difference;\nvocoder SNR: streamed audio vs the whole-sequence decode of the "
          "same codes; seam: largest jump at chunk joins / 99.9th-pct jump (control: same joins in the whole decode)")
    if args.plot:
        _plot(args.plot, results, dev)
        print(f"\nplot written to {args.plot}")


def _plot(path: str, results: dict, dev: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4 if dev else 3, figsize=(19 if dev else 14, 4.2))
    for size, r in results.items():
        ns = [n for n, _ in r["sweep"]]
        line, = ax[0].plot(ns, [x["rtf"] for _, x in r["sweep"]], "o-", label=f"{size}: per input second")
        ax[0].plot(ns, [x["rtf_audio"] for _, x in r["sweep"]], "s--", color=line.get_color(),
                   label=f"{size}: per audio second")  # fmt: skip
        for n, x in r["live"]:
            lat = np.sort(np.concatenate([np.asarray(v) for v in x["latencies"]]))
            ax[1].plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{size}, {n} stream(s)")
            t, lag = zip(*x["lag_trace"])
            ax[2].plot(t, lag, label=f"{size}, {n} stream(s)")
    ax[0].axhline(1.0, color="gray", ls="--")
    ax[0].set(xlabel="concurrent streams", ylabel="worker compute / stream second", yscale="log",
              title="throughput, random weights (<= 1: real time)")  # fmt: skip
    ax[1].set(xlabel="unit arrival -> audio complete (s)", ylabel="fraction of units", xscale="log",
              title="unit-commit -> audio latency")  # fmt: skip
    ax[2].set(xlabel="wall time (s)", ylabel="resynthesis lag (s)", title="lag reported to the client")
    for a in ax[:3]:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    if dev:
        _plot_deviation(ax[3], dev)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_deviation(ax, dev: list[dict]) -> None:
    labels = [f"C={r['C']}\nL={r['L']}" for r in dev]
    x = np.arange(len(dev))
    ax.bar(x - 0.2, [r["agree"] for r in dev], 0.4, label="token agreement with offline")
    twin = ax.twinx()
    twin.bar(x + 0.2, [min(r["vocoder_snr"], 60) for r in dev], 0.4, color="tab:orange", label="vocoder SNR dB")
    ax.set(xticks=x, xticklabels=labels, ylabel="token agreement", title="deviation (tiny, random weights)")
    twin.set_ylabel("vocoder SNR vs whole decode (dB, capped 60)")
    ax.legend(fontsize=8, loc="upper right")
    twin.legend(fontsize=8, loc="center right")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args())
