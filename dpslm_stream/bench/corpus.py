"""Corpus encoding throughput (`dpslm-stream encode-corpus`): hours of audio encoded per hour of wall time, without
Ray and with Ray Data at 1 and 2 encoder actors, at WavLM-Large dimensions with RANDOM weights (speed does not depend
on the weight values; the units are meaningless).

The corpus is synthetic speech-like audio (dpslm_stream.signals.speech_like), utterances of about --utterance-seconds
(lengths vary +-30 %), a quarter of them at 22.05 kHz so that resampling is part of the work. Each configuration
encodes the whole corpus into a fresh output folder through `dpslm_stream.corpus.encode_corpus`, the same code as
the command. The model is WavLM-Large's 11 first blocks with seeded random weights and a codebook of 500 of its own
layer-11 frames, DPDP at (500, 4500); `--score` adds the tiny set's ULM (small: not the real ULM's cost).

Reported per configuration: set-up (model construction; for Ray also starting the workers and the actor pool until
the first actor has its models), encoding time, hours of audio per hour for the encoding alone and for the whole job, and whether the units
equal the path without Ray. Ray's own start-up (`ray.init`) is reported once, apart.

    dpslm-stream bench corpus                              # 120 s of audio: no Ray, Ray x1, Ray x2
    dpslm-stream bench corpus --audio-seconds 600 --workers 1 2 4 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-seconds", type=float, default=120.0, help="total audio in the corpus (default 120 s)")
    parser.add_argument("--utterance-seconds", type=float, default=10.0, help="mean utterance length (default 10 s)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                        help="Ray encoder actors to time (default: 1 2; none: skip Ray)")  # fmt: skip
    parser.add_argument("--no-ray", action="store_true", help="only the path without Ray")
    parser.add_argument("--batch-size", type=int, default=2, help="utterances per Ray batch (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--score", action="store_true", help="also score with the (tiny) ULM")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")


def full_size_pipeline(device: str = "cpu"):
    """A Pipeline for (500, 4500) whose WavLM is WavLM-Large-sized (11 blocks) with seeded RANDOM weights and whose
    codebook is 500 of that model's own layer-11 frames (so DPDP sees distances of the features' own scale); its ULM,
    if used, is the tiny set's. Module-level so Ray actors can build it; every call builds the same weights."""
    from dpslm_stream.models import wavlm
    from dpslm_stream.pipeline import Pipeline
    from dpslm_stream.signals import speech_like

    torch.manual_seed(0)
    model = wavlm.WavLM(dataclasses.replace(wavlm.FULL, encoder_layers=11)).eval().to(device)
    with torch.inference_mode():
        feats = wavlm.extract_features(model, torch.from_numpy(speech_like(10.0, 16000, seed=5))[None], 16000, layer=11)
    codebook = feats[torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(0))[:500]].clone()
    pipe = Pipeline("tiny", 500, 4500, device)
    pipe._cache["wavlm"] = (model, wavlm.extract_features)  # RANDOM full-size weights in place of a checkpoint
    pipe._cache["codebook"] = codebook
    return pipe


def _make_corpus(root: Path, total_s: float, utt_s: float) -> float:
    import soundfile as sf

    from dpslm_stream.signals import speech_like

    rng = np.random.default_rng(0)
    done, i = 0.0, 0
    while done < total_s - 1e-6:
        seconds = min(float(utt_s * rng.uniform(0.7, 1.3)), total_s - done)
        seconds = max(seconds, 1.0)
        sr = 22050 if i % 4 == 3 else 16000
        path = root / f"spk{i % 3}" / f"utt{i:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, speech_like(seconds, sr, seed=100 + i), sr)
        done += seconds
        i += 1
    return done


def run(args: argparse.Namespace) -> None:
    from dpslm_stream import corpus as C

    workers = [] if args.no_ray else list(args.workers)
    ncpu = os.cpu_count() or 1
    print(f"encode-corpus throughput, WavLM-Large dimensions with RANDOM weights (speed only; units meaningless), "
          f"(k, lambda) = (500, 4500){', tiny ULM score' if args.score else ', no ULM score'}; device {args.device}, "
          f"{ncpu} CPUs, torch {torch.__version__}")  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="dpslm-bench-corpus-") as tmp:
        tmp = Path(tmp)
        audio_s = _make_corpus(tmp / "corpus", args.audio_seconds, args.utterance_seconds)
        utts = C.list_corpus(tmp / "corpus")
        print(f"corpus: {len(utts)} utterances, {audio_s:.1f} s of audio ({audio_s / 3600:.4f} h)")
        make = functools.partial(full_size_pipeline, args.device)
        config = {"k": 500, "lmbda": 4500, "num_neighbors": 25, "models": "full-size RANDOM (bench)",
                  "random_weights": True}  # fmt: skip
        units = {}

        def one(label: str, n_workers: int | None, **kw) -> None:
            out = tmp / f"out-{len(results)}"
            t0 = time.perf_counter()
            rep = C.encode_corpus(utts, out, make, config=config, score=args.score, progress=False,
                                  device=args.device, **kw)  # fmt: skip
            total = time.perf_counter() - t0
            text = (out / "units.txt").read_text()
            units.setdefault("reference", text)
            row = {"path": label, "workers": n_workers, "utterances": rep.encoded, "failed": rep.failed,
                   "audio_s": rep.audio_seconds, "setup_s": total - rep.wall_s, "encode_s": rep.wall_s,
                   "total_s": total, "hours_per_hour_encode": rep.audio_seconds / rep.wall_s if rep.wall_s else None,
                   "hours_per_hour_total": rep.audio_seconds / total, "rtf_total": total / rep.audio_seconds,
                   "units_equal_to_no_ray": text == units["reference"]}  # fmt: skip
            results.append(row)
            print(f"  {label:12s} {n_workers or '-':>7} {row['setup_s']:8.1f} {row['encode_s']:9.1f} "
                  f"{row['total_s']:8.1f} {row['hours_per_hour_encode'] or 0:11.1f} {row['hours_per_hour_total']:10.1f} "
                  f"{row['rtf_total']:9.3f}  {'yes' if row['units_equal_to_no_ray'] else 'NO'}", flush=True)  # fmt: skip

        header = (f"  {'path':12s} {'workers':>7} {'set-up s':>8} {'encode s':>9} {'total s':>8} {'h/h encode':>11} "
                  f"{'h/h total':>10} {'RTF total':>9}  units = no-Ray")  # fmt: skip
        print(header)
        print("  " + "-" * (len(header) - 2))
        one("no Ray", None)
        ray_init_s = None
        if workers:
            try:
                import ray  # noqa: F401
            except ImportError:
                print("  (Ray not installed: pip install -e '.[ray]' in the dpslm-stream checkout to time the Ray rows)")
                workers = []
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                from dpslm_stream.raycluster import init_ray

                t0 = time.perf_counter()
                init_ray()
                ray_init_s = time.perf_counter() - t0
        for w in workers:
            # Each actor gets an equal share of the CPUs (minus a quarter CPU for the decode tasks) as torch threads.
            cpus = None if args.device.startswith("cuda") else max(0.1, (ncpu - 0.25) / w)
            one("Ray Data", w, use_ray=True, workers=w, batch_size=args.batch_size, cpus_per_worker=cpus)
        if ray_init_s is not None:
            print(f"  ray.init (local, not counted above): {ray_init_s:.1f} s")
            import ray

            ray.shutdown()
    print("h/h = hours of audio encoded per hour of wall time; 'encode' starts when the models are loaded (Ray: in "
          "the first actor), 'total' includes model loading and the actor pool's start-up.")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "cpus": ncpu, "torch": torch.__version__,
                                         "audio_seconds": audio_s, "utterances": len(utts), "score": args.score,
                                         "ray_init_s": ray_init_s, "random_weights": True, "results": results},
                                        indent=1))  # fmt: skip


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    run(_parser.parse_args())
