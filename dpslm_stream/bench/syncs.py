"""Device hygiene on a CPU-only machine: the pipeline, the streaming encoder, the batched resynthesis worker and the
ULM scorer run on a simulated accelerator (bench/_simdevice.py), and this counts what would break or stall on a
GPU: mixed-device operations and `.numpy()` of device tensors (both must be zero; tests/test_device_hygiene.py
asserts it) and host syncs (`.item()`/`bool()`, `.tolist()`, copies to the host, explicit synchronizes) per ELLA-V
decode step and per encoder hop. Tiny random-weight models: the counts depend on the code paths, not on the sizes.

    dpslm-stream bench syncs [--seconds 3] [--streams 3] [--markdown docs/device_syncs.md]
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from pathlib import Path

import torch

from dpslm_stream import hub
from dpslm_stream.bench._simdevice import SIM, SYNC_KINDS, SimulatedCuda, active
from dpslm_stream.signals import speech_like

K, LMBDA = 500, 4500


def _loaded(load, device):
    """`load("cpu")` with the simulation paused, then the result moved to `device`."""
    sim = active()
    with sim.paused() if sim is not None else contextlib.nullcontext():
        obj = load("cpu")
    return _to(obj, device)


def _to(obj, device):
    if isinstance(obj, (torch.nn.Module, torch.Tensor)):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


class LoadThenMove(hub.ModelSet):
    """A ModelSet that loads every checkpoint on the CPU and then moves it to the asked device (a simulated device
    cannot be a map_location)."""

    def wavlm(self, map_location="cpu"):
        return _loaded(super().wavlm, map_location)

    def codebook(self, k, map_location="cpu"):
        return _loaded(lambda d: super(LoadThenMove, self).codebook(k, d), map_location)

    def ulm(self, k, lmbda, map_location="cpu"):
        return _loaded(lambda d: super(LoadThenMove, self).ulm(k, lmbda, d), map_location)

    def ellav(self, k, lmbda, map_location="cpu"):
        return _loaded(lambda d: super(LoadThenMove, self).ellav(k, lmbda, d), map_location)

    def wavtokenizer(self, map_location="cpu"):
        return _loaded(super().wavtokenizer, map_location)


def _delta(sim: SimulatedCuda, before: Counter) -> Counter:
    return Counter({k: sim.counts[k] - before[k] for k in sim.counts if sim.counts[k] != before[k]})


def run_pipeline(sim: SimulatedCuda, models: hub.ModelSet, seconds: float) -> dict:
    from dpslm_stream.pipeline import Pipeline

    pipe = Pipeline(models, K, LMBDA, SIM)
    before = sim.snapshot()
    res = pipe.encode(speech_like(seconds, 22050, seed=1), 22050)
    encode = _delta(sim, before)
    before = sim.snapshot()
    pipe.resynthesize(res.units[:12])
    return {"units": len(res.units), "encode": encode, "resynthesize": _delta(sim, before)}


def run_encoder(sim: SimulatedCuda, models: hub.ModelSet, seconds: float, streams: int) -> dict:
    from dpslm_stream.stream.events import EndEvent
    from dpslm_stream.stream.worker import EncoderWorker

    worker = EncoderWorker(models, SIM, pairs=[(K, LMBDA)])
    sessions = [worker.open_session(16000, K, LMBDA, score=True) for _ in range(streams)]
    audio = [speech_like(seconds, 16000, seed=10 + i) for i in range(streams)]
    before, hops, chunk = sim.snapshot(), 0, 3200  # 200 ms pushes
    for start in range(0, len(audio[0]), chunk):
        for s, a in zip(sessions, audio):
            s.push(a[start : start + chunk])
        hops += worker.step(sessions)
    for s in sessions:
        s.end()
    for _ in range(100):
        hops += worker.step(sessions)
        if all(any(isinstance(e, EndEvent) for e in s.poll()) for s in sessions if not s.closed):
            break
    return {"hops": hops, "counts": _delta(sim, before)}


def run_resynth(sim: SimulatedCuda, models: hub.ModelSet, streams: int) -> dict:
    import random

    from dpslm_stream.stream.resynth_worker import ResynthWorker

    worker = ResynthWorker(models, SIM, pairs=[(K, LMBDA)])
    sessions = [worker.open_session(K, LMBDA) for _ in range(streams)]
    rng = random.Random(0)
    before = sim.snapshot()
    for _ in range(6):
        for s in sessions:
            s.push_units([rng.randrange(K) for _ in range(4)])
        worker.step(sessions)
    for s in sessions:
        s.end()
    worker.run_until_idle(sessions)
    for s in sessions:
        s.poll()
    return {"decode_steps": worker.decode_steps, "tokens": worker.tokens_decoded, "counts": _delta(sim, before)}


def run_scorer(sim: SimulatedCuda, models: hub.ModelSet, streams: int) -> dict:
    from dpslm_stream.models.ulm import IncrementalScorer, ScoringPool, score_blocks

    ulm, _ = models.ulm(K, LMBDA, SIM)
    pool = ScoringPool(ulm, 64)  # the sessions' shared cache, as in the encoder worker
    scorers = [IncrementalScorer(ulm, max_context=64, pool=pool) for _ in range(streams)]
    before, blocks = sim.snapshot(), 0
    for b in range(8):
        score_blocks(scorers, [[(7 * b + 3 * i + j) % K for j in range(12)] for i in range(streams)])
        blocks += 1
    return {"blocks": blocks, "counts": _delta(sim, before)}


def measure(models: str = "tiny", seconds: float = 3.0, streams: int = 3) -> dict:
    """Run the four paths under one simulated device; returns the per-path counts and the violations."""
    source = LoadThenMove(models)
    with SimulatedCuda() as sim:
        out = {
            "pipeline": run_pipeline(sim, source, seconds),
            "encoder": run_encoder(sim, source, seconds, streams),
            "resynth": run_resynth(sim, source, streams),
            "scorer": run_scorer(sim, source, streams),
        }
    out["violations"] = {k: sim.counts[k] for k in ("mixed", "numpy")}
    out["sites"] = sim.sites
    out["where"] = sim.where
    return out


def _syncs(c: Counter) -> int:
    return sum(c.get(k, 0) for k in SYNC_KINDS)


def _kinds(c: Counter) -> str:
    return ", ".join(f"{k} {c[k]}" for k in SYNC_KINDS if c.get(k)) or "none"


def report(m: dict, seconds: float, streams: int) -> str:
    enc, res, sc, pipe = m["encoder"], m["resynth"], m["scorer"], m["pipeline"]
    lines = [
        f"Simulated device, tiny random-weight models, {streams} streams of {seconds:g} s; torch {torch.__version__}.",
        "",
        f"Violations: mixed-device ops {m['violations']['mixed']}, .numpy() of device tensors "
        f"{m['violations']['numpy']}" + (f" at {m['where']}" if m["where"] else ""),
        "",
        "| path | work | host syncs | per unit of work | by kind |",
        "|---|---|---|---|---|",
        f"| streaming encoder (EncoderWorker.step, scores on) | {enc['hops']} hops | {_syncs(enc['counts'])} | "
        f"{_syncs(enc['counts']) / max(1, enc['hops']):.2f} per hop | {_kinds(enc['counts'])} |",
        f"| batched resynthesis (ResynthWorker.step) | {res['decode_steps']} ELLA-V decode steps "
        f"({res['tokens']} tokens) | {_syncs(res['counts'])} | "
        f"{_syncs(res['counts']) / max(1, res['decode_steps']):.2f} per decode step | {_kinds(res['counts'])} |",
        f"| ULM scorer (score_blocks, {streams} sessions) | {sc['blocks']} batched blocks | {_syncs(sc['counts'])} | "
        f"{_syncs(sc['counts']) / max(1, sc['blocks']):.2f} per block | {_kinds(sc['counts'])} |",
        f"| Pipeline.encode (offline, {pipe['units']} units) | 1 call | {_syncs(pipe['encode'])} | | "
        f"{_kinds(pipe['encode'])} |",
        f"| Pipeline.resynthesize (12 units) | 1 call | {_syncs(pipe['resynthesize'])} | | "
        f"{_kinds(pipe['resynthesize'])} |",
    ]  # fmt: skip
    lines += ["", "Where the host syncs are (all paths above, most frequent first):", "", "| syncs | kind and site |",
              "|---|---|"] + [f"| {n} | `{site}` |" for site, n in m["sites"].most_common(12)]  # fmt: skip
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per encoder stream (default 3 s)")
    parser.add_argument("--streams", type=int, default=3, help="concurrent streams per worker (default 3)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    m = measure("tiny", args.seconds, args.streams)
    text = report(m, args.seconds, args.streams)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
