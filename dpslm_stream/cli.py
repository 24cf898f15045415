"""The `dpslm-stream` command (also `python -m dpslm_stream`).

Each subcommand is a pair of functions here (`_add_<name>` builds its parser, `_cmd_<name>` runs it) or lives in the
module that owns the work (benchmarks in dpslm_stream.bench, the server in dpslm_stream.server).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from dpslm_stream import __version__, hub
from dpslm_stream.errors import DPSLMError, InvalidInput
from dpslm_stream.tiny import TINY_PAIRS
from dpslm_stream.validate import is_int


def _add_model_args(p: argparse.ArgumentParser, pair: bool = True) -> None:
    p.add_argument("--models", default="release", metavar="release|tiny|DIR",
                   help="where checkpoints come from: 'release' (torch.hub cache, downloaded on first use), 'tiny' "
                        "(small RANDOM-weight set built locally, works offline; it holds k:lambda "
                        + ", ".join(f"{k}:{lm}" for k, lm in TINY_PAIRS) + "), or a folder of upstream-named files "
                        "(default: release)")  # fmt: skip
    if pair:
        p.add_argument("--k", type=int, default=hub.DEFAULT_K, help="codebook size (default 500)")
        p.add_argument("--lmbda", "--lambda", dest="lmbda", type=int, default=hub.DEFAULT_LMBDA,
                       help="DPDP duration penalty (default 4500)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--precision", choices=("exact", "fast"), default="exact",
                   help="unit LM, ELLA-V and WavTokenizer: exact (float32, upstream's numbers; default) or fast "
                        "(int8/bf16 kernels picked for this machine, printed; the WavLM encoder stays float32)")


def note(message: str) -> None:
    """A one-line remark on stderr (random weights, channels mixed down, a folder created)."""
    print(f"note: {message}", file=sys.stderr)


def output_folder(path: Path | None, is_dir: bool = False) -> None:
    """Make sure an output can be written, before any work: its folder is created (and that is said) or the error
    says why it cannot be."""
    if path is None:
        return
    folder = path if is_dir else path.parent
    if folder.is_dir():
        return
    try:
        folder.mkdir(parents=True)
    except OSError as e:
        raise InvalidInput(f"cannot create the output folder {folder}: {e.strerror or e}") from None
    note(f"created folder {folder}")


def _warn_random(models: hub.ModelSet) -> None:
    if models.is_random:
        print(f"note: model set '{models.source}' has RANDOM weights; results check the plumbing, they are not speech.",
              file=sys.stderr)  # fmt: skip


# --- download --------------------------------------------------------------------------------------------------------


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="pre-fetch the released checkpoints of a (k, lambda) set into the torch.hub cache")
    p.add_argument("--k", type=int, default=hub.DEFAULT_K)
    p.add_argument("--lmbda", "--lambda", dest="lmbda", type=int, default=hub.DEFAULT_LMBDA)
    p.add_argument("--encoder-only", action="store_true", help="only WavLM, the codebook and the ULM")
    p.add_argument("--list", action="store_true", help="list every released file with its URL and exit")


def _cmd_download(args) -> int:
    if args.list:
        for r in hub.all_releases():
            print(f"{r.filename}\t{r.url}")
        return 0
    what = ("wavlm", "codebook", "ulm") if args.encoder_only else ("wavlm", "codebook", "ulm", "ellav", "wavtokenizer")
    hub.download(args.k, args.lmbda, what=what, on_file=lambda p: print(f"ok  {p}"))
    return 0


# --- encode ----------------------------------------------------------------------------------------------------------


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="audio file(s) -> deduplicated DP-SLM units with durations, times, bitrate, score")
    p.add_argument("files", nargs="+", type=Path, help="audio files (any format soundfile reads; any sample rate)")
    _add_model_args(p)
    p.add_argument("--num-neighbors", type=int, default=None, help="DPDP neighbours per frame (default int(0.05 k))")
    p.add_argument("--no-score", action="store_true", help="skip the ULM log-likelihood")
    p.add_argument("--json", type=Path, default=None, help="write units/durations/starts/scores as JSON here")
    p.add_argument("--npy", type=Path, default=None, help="write <stem>.units.npy and <stem>.durations.npy here")
    p.add_argument("--quiet", action="store_true", help="do not print units")
    g = p.add_argument_group("streaming (run the live encoder over the file in chunks)")
    g.add_argument("--stream", choices=("full", "sliding", "cached"), default=None, metavar="MODE",
                   help="full (exact, = offline), sliding or cached windows")
    g.add_argument("--preset", default=None, help="window preset: low-latency (default), balanced, quality")
    g.add_argument("--left", type=int, default=None, help="left context L in 20 ms frames (overrides the preset)")
    g.add_argument("--hop", type=int, default=None, help="hop H in frames (overrides the preset)")
    g.add_argument("--lookahead", type=int, default=None, help="lookahead R in frames (overrides the preset)")
    g.add_argument("--chunk-ms", type=float, default=100.0, help="audio per pushed chunk (default 100 ms)")
    g.add_argument("--compare", action="store_true",
                   help="also report agreement with the offline path and its noise floor (offline vs dithered)")


def _cmd_encode(args) -> int:
    output_folder(args.json)
    output_folder(args.npy, is_dir=True)
    if args.stream is None:
        for name in ("preset", "left", "hop", "lookahead", "compare"):
            if getattr(args, name) not in (None, False):
                raise InvalidInput(f"--{name} needs --stream MODE")
        return _encode_offline(args)
    return _encode_streaming(args)


def _encode_offline(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from dpslm_stream.audio import load_audio
    from dpslm_stream.pipeline import Pipeline, bitrate

    models = hub.ModelSet(args.models)
    _warn_random(models)
    pipe = Pipeline(models, args.k, args.lmbda, args.device, args.num_neighbors, precision=args.precision)
    pipe.wavlm, pipe.codebook  # load before timing (a missing checkpoint fails here, before any file is read)
    if not args.no_score:
        pipe.ulm
    results, failed = {}, {}
    started = time.perf_counter()
    for path in tqdm(args.files, desc="encode", unit="file", disable=len(args.files) < 2, file=sys.stderr):
        try:  # one unreadable or too-short file is reported and skipped; the others are still encoded
            wav, sr = load_audio(path, notify=note)
            res = pipe.encode(wav, sr, score=not args.no_score)
        except DPSLMError as e:
            failed[str(path)] = str(e)
            print(f"{path}: error: {e}", file=sys.stderr)
            continue
        results[str(path)] = res
        if not args.quiet:
            ll = "" if res.loglikelihood is None else f"  loglik {res.loglikelihood:.2f}"
            print(f"{path}: {len(res.units)} units in {res.seconds:.2f} s  "
                  f"({len(res.units) / max(res.seconds, 1e-9):.1f} units/s){ll}")  # fmt: skip
            print("  " + " ".join(map(str, res.units)))
        if args.npy:
            np.save(args.npy / f"{path.stem}.units.npy", np.asarray(res.units, dtype=np.int64))
            np.save(args.npy / f"{path.stem}.durations.npy", np.asarray(res.durations, dtype=np.int64))
    total_s = sum(r.seconds for r in results.values())
    rate = bitrate([r.units for r in results.values()], total_s) if results else None
    elapsed = time.perf_counter() - started
    if results:  # no figures over no audio
        print(f"bitrate {rate:.1f} bit/s over {total_s:.2f} s of audio (k={pipe.k}, lambda={pipe.lmbda}); "
              f"encoded in {elapsed:.2f} s (real-time factor {elapsed / max(total_s, 1e-9):.3f}, models loaded)")  # fmt: skip
    if args.json:
        doc = {
            "k": pipe.k, "lmbda": pipe.lmbda, "num_neighbors": pipe.num_neighbors, "models": models.source,
            "random_weights": models.is_random, "frame_rate": 50, "bitrate": rate,
            "files": {p: r.to_json() for p, r in results.items()},
        }  # fmt: skip
        if failed:
            doc["errors"] = failed
        args.json.write_text(json.dumps(doc, indent=1))
    if failed:
        print(f"{len(failed)} of {len(args.files)} file(s) failed (see above)", file=sys.stderr)
        return 1
    return 0


def _encode_streaming(args) -> int:
    from dpslm_stream.audio import load_audio
    from dpslm_stream.pipeline import bitrate, default_num_neighbors
    from dpslm_stream.stream.compare import compare, stream_encode
    from dpslm_stream.stream.worker import EncoderWorker

    models = hub.ModelSet(args.models)
    _warn_random(models)
    k, lmbda = hub.check_pair(args.k, args.lmbda)
    num_neighbors = args.num_neighbors or default_num_neighbors(k)
    worker = EncoderWorker(models, args.device, pairs=[(k, lmbda)])
    results, reports, failed = {}, {}, {}
    for path in args.files:
        try:  # as offline: a bad file is reported and skipped, the others are still encoded
            wav, sr = load_audio(path, notify=note)
        except DPSLMError as e:
            failed[str(path)] = str(e)
            print(f"{path}: error: {e}", file=sys.stderr)
            continue
        started = time.perf_counter()
        res = stream_encode(worker, wav, sr, k=k, lmbda=lmbda, mode=args.stream, preset=args.preset, left=args.left,
                            hop=args.hop, lookahead=args.lookahead, chunk_s=args.chunk_ms / 1000,
                            num_neighbors=num_neighbors, score=not args.no_score, keep_features=args.compare)  # fmt: skip
        elapsed = time.perf_counter() - started
        results[str(path)] = res
        lags = sorted(res.commit_lags_s) or [0.0]
        print(f"{path}: {len(res.units)} units in {res.seconds:.2f} s, streamed ({args.stream}, "
              f"{args.chunk_ms:g} ms chunks) in {elapsed:.2f} s (real-time factor {elapsed / max(res.seconds, 1e-9):.3f}); "
              f"commit lag without compute p50 {lags[len(lags) // 2]:.2f} s, max {lags[-1]:.2f} s; "
              f"forced DPDP commits {res.forced_commits}")  # fmt: skip
        if not args.quiet:
            print("  " + " ".join(map(str, res.units)))
        if args.compare:
            report = reports[str(path)] = compare(worker, wav, sr, res, k=k, lmbda=lmbda, num_neighbors=num_neighbors)
            label = " (RANDOM weights: plumbing check only, not a quality figure)" if models.is_random else ""
            print(f"  agreement with offline{label}:")
            for name, r in report.items():
                print(f"    {name:12s} frames {r['frame_agreement']:.4f}  k-means {r['kmeans_agreement']:.4f}  "
                      f"unit error rate {r['unit_error_rate']:.4f}  feature cosine {r['feature_cosine']:.6f}")  # fmt: skip
    total_s = sum(r.seconds for r in results.values())
    rate = bitrate([r.units for r in results.values()], total_s) if results else None
    if results:
        print(f"bitrate {rate:.1f} bit/s over {total_s:.2f} s of audio (k={k}, lambda={lmbda})")
    if args.json:
        doc = {
            "k": k, "lmbda": lmbda, "num_neighbors": num_neighbors, "models": models.source,
            "random_weights": models.is_random, "frame_rate": 50, "bitrate": rate,
            "stream": {"mode": args.stream, "window": worker.open_session(16000, k, lmbda, mode=args.stream,
                       preset=args.preset, left=args.left, hop=args.hop, lookahead=args.lookahead).config.describe(),
                       "chunk_ms": args.chunk_ms},
            "files": {p: {**r.to_json(), **({"compare": reports[p]} if p in reports else {})}
                      for p, r in results.items()},
        }  # fmt: skip
        if failed:
            doc["errors"] = failed
        args.json.write_text(json.dumps(doc, indent=1))
    if failed:
        print(f"{len(failed)} of {len(args.files)} file(s) failed (see above)", file=sys.stderr)
        return 1
    return 0


# --- score -----------------------------------------------------------------------------------------------------------


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="ULM log-likelihood of deduplicated unit sequences")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--units", help="space-separated unit ids, e.g. '12 7 301'")
    src.add_argument("--json", type=Path, help="a JSON written by `encode --json`")
    src.add_argument("--text", type=Path, help="lines '<id> <u1> <u2> ...' (fairseq-style); writes '<id> <loglik>'")
    _add_model_args(p)


def _cmd_score(args) -> int:
    from dpslm_stream.pipeline import Pipeline

    models = hub.ModelSet(args.models)
    _warn_random(models)
    items = _score_items(args)  # parse before loading models: a typo fails at once
    pipe = Pipeline(models, args.k, args.lmbda, args.device, precision=args.precision)
    for name, units in items.items():
        print(f"{name} {sum(pipe.score(units)):.4f}")
    return 0


def _unit_ids(text: str, where: str) -> list[int]:
    try:
        return [int(u) for u in text.split()]
    except ValueError:
        raise InvalidInput(f"{where}: unit ids must be integers separated by spaces (e.g. '12 7 301'), got {text!r}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read {path}: {e}") from None


def _units_json(path: Path) -> dict:
    """The files of a JSON written by `encode --json` (or one entry), checked: name -> entry with 'units'."""
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path} is not JSON ({e}); expected the output of `dpslm-stream encode --json`") from None
    entries = doc.get("files", {"units": doc}) if isinstance(doc, dict) else None
    if isinstance(doc, dict) and "files" not in doc:
        entries = {str(path): doc}
    if not isinstance(entries, dict) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("units"), list) for e in entries.values()):  # fmt: skip
        raise InvalidInput(f"{path} holds no units; expected the output of `dpslm-stream encode --json`")
    for name, entry in entries.items():
        if not all(is_int(u, int) for u in entry["units"]):
            raise InvalidInput(f"{path}: the units of {name} must be integers")
    return entries


def _score_items(args) -> dict[str, list[int]]:
    if args.units is not None:
        return {"units": _unit_ids(args.units, "--units")}
    if args.json is not None:
        return {name: entry["units"] for name, entry in _units_json(args.json).items()}
    items = {}
    for n, line in enumerate(_read_text(args.text).splitlines(), 1):
        if line.strip():
            name, *units = line.split()
            items[name] = _unit_ids(" ".join(units), f"{args.text} line {n}")
    return items


# --- resynth ---------------------------------------------------------------------------------------------------------


def _add_resynth(sub) -> None:
    p = sub.add_parser("resynth", help="audio or units -> DP-SLM units -> ELLA-V -> WavTokenizer -> 24 kHz WAV")
    p.add_argument("input", type=Path, help="an audio file, or a JSON written by `encode --json` (with --from-units)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output WAV (24 kHz; sample i>0 gets a _i suffix); a missing folder is created (and said)")
    _add_model_args(p)
    p.add_argument("--from-units", action="store_true", help="INPUT is a units JSON (`encode --json`), not audio")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (top_p=0, as the paper's WER figures)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling (dp-slm README default 0.8)")
    p.add_argument("--max-codec-tokens-per-phone", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (runs are reproducible)")


def _cmd_resynth(args) -> int:
    from dpslm_stream.audio import load_audio, save_wav
    from dpslm_stream.pipeline import FRAME_RATE, Pipeline, bitrate

    models = hub.ModelSet(args.models)
    _warn_random(models)
    pipe = Pipeline(models, args.k, args.lmbda, args.device, precision=args.precision)
    if args.num_samples < 1:
        raise InvalidInput("--num-samples must be at least 1")
    output_folder(args.output)
    if args.from_units:
        entry = next(iter(_units_json(args.input).values()))
        units, durations = entry["units"], entry.get("durations")
        seconds = entry.get("seconds") or (sum(durations) / FRAME_RATE if durations else 0.0)
        logprobs = pipe.score(units)
    else:
        wav, sr = load_audio(args.input, notify=note)
        res = pipe.encode(wav, sr)
        units, durations, seconds, logprobs = res.units, res.durations, res.seconds, res.unit_logprobs
    started = time.perf_counter()
    outputs = pipe.resynthesize(units, greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                                max_codec_tokens_per_phone=args.max_codec_tokens_per_phone,
                                num_samples=args.num_samples, seed=args.seed)  # fmt: skip
    elapsed = time.perf_counter() - started
    report = {
        "input": str(args.input), "k": pipe.k, "lmbda": pipe.lmbda, "models": models.source,
        "random_weights": models.is_random, "units": units, "durations": durations, "seconds": seconds,
        "bitrate": bitrate([units], seconds) if seconds else None, "loglikelihood": float(sum(logprobs)),
        "greedy": args.greedy, "seed": args.seed, "samples": [],
    }  # fmt: skip
    for i, (wav, codes, finished) in enumerate(outputs):
        out = args.output if i == 0 else args.output.with_name(f"{args.output.stem}_{i}{args.output.suffix}")
        save_wav(out, wav.squeeze(0).numpy(), 24000)
        report["samples"].append({"wav": str(out), "codec_ids": codes, "finished": finished,
                                  "audio_seconds": wav.shape[-1] / 24000})  # fmt: skip
        print(f"wrote {out} ({wav.shape[-1] / 24000:.2f} s at 24 kHz, {len(codes)} codec tokens, "
              f"{'finished' if finished else 'NOT finished (hit max_tokens)'})")  # fmt: skip
    report["resynthesis_seconds"] = elapsed
    report["precision"] = {"precision": args.precision, **pipe.precision_plans()}
    if args.precision != "exact":
        print("precision: " + "; ".join(pipe.precision_plans().values()))
    report_path = args.output.with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=1))
    print(f"{len(units)} units, {report['bitrate'] or 0:.1f} bit/s, log-likelihood {report['loglikelihood']:.2f}; "
          f"report in {report_path}")  # fmt: skip
    return 0


# --- demo ------------------------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the quick-start demo on the bundled speech sample (tiny set unless the real "
                                    "checkpoints are cached)")  # fmt: skip
    p.add_argument("--models", default=None, help="default: release if cached, else tiny")
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for the demo outputs")


def _demo_models() -> str:
    return "release" if hub.release_cached() else "tiny"


def _cmd_demo(args) -> int:
    from dpslm_stream import SAMPLE_WAV as sample

    models = args.models or _demo_models()
    print(f"== dpslm-stream demo: bundled sample {sample.name} (espeak-ng speech), models: {models}")
    # The two steps exactly as a user would type them (parsed by the real parser, so every default applies).
    parser = build_parser("demo")  # encode and resynth are this module's: no other module is imported
    code = _cmd_encode(parser.parse_args(["encode", str(sample), "--models", models,
                                          "--json", str(args.out / "units.json")]))  # fmt: skip
    if code:
        return code
    return _cmd_resynth(parser.parse_args(["resynth", str(sample), "-o", str(args.out / "resynth.wav"),
                                           "--models", models, "--greedy"]))  # fmt: skip


# --- bench -----------------------------------------------------------------------------------------------------------


def _bench_modules() -> list[str]:
    import dpslm_stream.bench as bench

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (print numbers; see README for the figures)", add_help=False)
    p.add_argument("-h", "--help", action="store_true", dest="bench_help", help="list the benchmarks")
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(_bench_modules())}")
    p.add_argument("rest", nargs=argparse.REMAINDER)


def _cmd_bench(args) -> int:
    names = _bench_modules()
    usage = (f"usage: dpslm-stream bench NAME [options]; NAME is one of: {', '.join(names)}; "
             f"`dpslm-stream bench NAME --help` lists its options")  # fmt: skip
    if args.name is None and args.bench_help:
        print(usage)
        return 0
    if args.name not in names:
        print(usage, file=sys.stderr)
        return 2
    module = importlib.import_module(f"dpslm_stream.bench.{args.name}")
    parser = argparse.ArgumentParser(prog=f"dpslm-stream bench {args.name}", description=module.__doc__)
    module.add_arguments(parser)
    bench_args = parser.parse_args(args.rest)
    if isinstance(getattr(bench_args, "device", None), str):
        hub.check_device(bench_args.device, "--device")
    module.run(bench_args)
    return 0


# --- main ------------------------------------------------------------------------------------------------------------

# Subcommands that live in other modules: name -> module with add_parser(subparsers) and run(args). `main` imports
# only the module of the command on its command line (`build_parser(command)`), so `dpslm-stream encode` does not pay
# for the server's imports; the other external commands get a placeholder parser (so the list of choices stays whole).
_EXTERNAL = {
    "live": "dpslm_stream.client.live",
    "serve": "dpslm_stream.server.cli",
    "stream": "dpslm_stream.client.stream",
    "mic": "dpslm_stream.client.mic",
    "encode-corpus": "dpslm_stream.corpus",
    "codec": "dpslm_stream.codec.cli",
    "receive": "dpslm_stream.client.receive",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser (every external command's module imported), or with `command` (a subcommand name) one that
    parses that command fully and imports no other external command's module."""
    parser = argparse.ArgumentParser(prog="dpslm-stream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dpslm-stream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("demo", "download", "encode", "score", "resynth", "bench"):
        globals()[f"_add_{name}"](sub)
    for name, module in _EXTERNAL.items():
        if command is None or command == name:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=f"see `dpslm-stream {name} --help`")
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named on a command line (its first word that is not an option), if it is one; else None."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in _EXTERNAL or f"_cmd_{word}" in globals() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_in(argv)).parse_args(argv)
    try:
        for name in ("device", "resynth_device"):  # torch devices (mic's --device is an audio device: its own check)
            if args.command != "mic" and isinstance(getattr(args, name, None), str):
                hub.check_device(getattr(args, name), "--" + name.replace("_", "-"))
        if args.command in _EXTERNAL:
            return int(importlib.import_module(_EXTERNAL[args.command]).run(args) or 0)
        return int(globals()[f"_cmd_{args.command}"](args) or 0)
    except DPSLMError as e:  # a user-facing failure: its message says what to do; no traceback
        print(f"dpslm-stream {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
