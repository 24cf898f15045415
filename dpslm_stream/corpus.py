"""`dpslm-stream encode-corpus INPUT --out OUT`: a whole corpus -> DP-SLM units, resumable, shardable, optionally on Ray.

Every utterance goes through exactly the offline path of `dpslm-stream encode` (Pipeline.encode: WavLM-Large layer 11
-> DPDP -> deduplicate -> optional ULM score), so its units and durations equal what `encode` gives for that file.

INPUT is one of
  - a folder: every file under it (recursively) whose extension is in --ext (default wav,flac,ogg; case-insensitive),
    sorted by relative path. The utterance id is the relative path without its extension, '/' kept
    ("spk1/chapter2/utt3").
  - a fairseq-style manifest (as HuBERT's dump scripts read): the first line is the root folder, then one line
    `relpath<TAB>num_samples` per utterance (num_samples may be left out; it is not used). Ids as for a folder.
  - a plain list: one audio path per line (relative paths are taken from the manifest's folder). The id is the path
    relative to the deepest folder common to all listed files, without its extension.
  A manifest whose first line is an existing folder is read as fairseq-style, otherwise as a plain list; blank lines
  and lines starting with '#' are skipped. Utterances are sorted by the relative path their id comes from; ids must
  be unique (a.wav next to a.flac is refused before anything runs).

OUT (shared by every shard and every rerun of one job):
  part-*.parquet  one row per utterance: id, path, units list<int64>, durations list<int64> (20 ms frames per unit),
                  num_frames, seconds, loglikelihood (natural log; null with --no-score), k, lmbda. When pyarrow is
                  not installed (it comes with the `ray` extra) the parts are JSON lines, part-*.jsonl, with the same
                  fields; `--format` forces one. Both kinds are read back, so a folder may hold both.
  units.txt       `<id> <u1> <u2> ...` per utterance, sorted by id (fairseq / textlesslib style)
  durations.txt   `<id> <d1> <d2> ...` in the same order
  summary.json    count, seconds, hours, bitrate (the authors' definition, pipeline.bitrate, over the whole corpus),
                  units per second, k, lambda, models, random_weights, failed and missing utterances
  errors.jsonl    one line {"id", "path", "error"} per utterance that could not be encoded (missing or unreadable
                  file, too short, ...): the job goes on and exits with status 1. It is a log: a rerun retries those
                  utterances, and summary.json counts only the ones still failing.
  config.json     k, lambda, models, ... of the first run: a rerun with other settings into the same OUT is refused.

Resume: results are written in parts of --part-size utterances, each under a temporary name (starting with '.') and
renamed into place (os.replace), so a part is either complete or absent; the pending part is also written when the
job stops on an error or Ctrl-C. Rerunning the same command reads the ids of every existing part and encodes only the
others: nothing is written twice, and units.txt / durations.txt / summary.json are built from the union of the parts
(which must hold every id at most once; a duplicate is an error). A hard kill loses at most one part of work.

Static sharding (Slurm arrays, one process per GPU, as fairseq's HuBERT dump): `--nshard N --rank R` encodes the
utterances whose index in the sorted list is R mod N. All shards write into the same OUT (part names carry the rank;
each run skips the ids any shard already wrote). The run that finds every utterance of the corpus written (or
failed) writes units.txt, durations.txt and summary.json; `--merge` writes them from the parts there are, without
encoding anything (e.g. as a final job that depends on the array).

Ray (`--ray`, needs `pip install -e '.[ray]' in the dpslm-stream checkout`): a Ray Data pipeline over the utterances not yet written:
from_items -> map_batches(decode + resample to 16 kHz, CPU tasks) -> map_batches(an actor class that holds the models
and runs WavLM + DPDP (+ ULM) per utterance, compute=ActorPoolStrategy(size=--workers), one GPU per actor with
--device cuda) -> the driver writes the (small) unit rows in atomic parts, exactly as without Ray, so resume, the
part layout and the final files are the same. It joins the cluster in $RAY_ADDRESS (or --ray-address) if any, else
starts a local one on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dpslm_stream import hub
from dpslm_stream.corpus_listing import DEFAULT_EXTS, Utterance, list_corpus, parse_exts, shard
from dpslm_stream.corpus_output import DEFAULT_PART_SIZE, CorpusOutput, PartWriter, have_pyarrow, per_file_errors
from dpslm_stream.errors import InvalidInput

__all__ = ["CorpusOutput", "PartWriter", "Utterance", "add_parser", "build_pipeline", "encode_corpus",
           "encode_utterance", "have_pyarrow", "list_corpus", "make_row", "run"]  # what the tests and bench use


# --- encoding --------------------------------------------------------------------------------------------------------


def build_pipeline(models: str, k: int, lmbda: int, device: str = "cpu", num_neighbors: int | None = None,
                   score: bool = True):  # fmt: skip
    """A Pipeline with its encoder-side models loaded (module-level, so Ray can ship `functools.partial`s of it)."""
    from dpslm_stream.pipeline import Pipeline

    pipe = Pipeline(hub.ModelSet(models), k, lmbda, device, num_neighbors)
    pipe.wavlm, pipe.codebook  # load now: a missing checkpoint fails before the first utterance
    if score:
        pipe.ulm
    return pipe


def make_row(utt: Utterance, res, seconds: float, k: int, lmbda: int) -> dict:
    return {"id": utt.id, "path": utt.path, "units": [int(u) for u in res.units],
            "durations": [int(d) for d in res.durations], "num_frames": int(res.num_frames), "seconds": float(seconds),
            "loglikelihood": res.loglikelihood, "k": int(k), "lmbda": int(lmbda)}  # fmt: skip


def encode_utterance(pipe, utt: Utterance, score: bool = True) -> dict:
    """One utterance through Pipeline.encode, as `dpslm-stream encode` runs it -> one output row."""
    from dpslm_stream.audio import load_audio

    wav, sr = load_audio(utt.path)
    res = pipe.encode(wav, sr, score=score)
    return make_row(utt, res, res.seconds, pipe.k, pipe.lmbda)


@dataclass
class RunReport:
    todo: int  # utterances this run set out to encode
    skipped: int  # utterances of this shard already written by an earlier run
    encoded: int
    failed: int
    audio_seconds: float  # of the encoded utterances
    wall_s: float  # encoding: from the models loaded (Ray: in the first actor) to the last row
    setup_s: float  # the rest: model loading, Ray pool start-up, reading the parts
    merged: bool
    summary: dict | None = None

    @property
    def hours_per_hour(self) -> float:
        return self.audio_seconds / self.wall_s if self.wall_s > 0 else 0.0


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="utt", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def _encode_local(todo, make_pipeline, score, writer, output, bar) -> tuple[int, int, float, float]:
    pipe = make_pipeline()
    errors = per_file_errors()
    t0 = time.perf_counter()
    encoded = failed = 0
    audio = 0.0
    for utt in todo:
        try:
            row = encode_utterance(pipe, utt, score)
        except errors as e:
            output.record_error(utt, f"{type(e).__name__}: {e}")
            failed += 1
        else:
            writer.add(row)
            encoded += 1
            audio += row["seconds"]
        bar.update(1)
        bar.set_postfix(audio_h=f"{audio / 3600:.3f}", failed=failed, refresh=False)
    return encoded, failed, audio, time.perf_counter() - t0


def encode_corpus(corpus: list[Utterance], out: str | os.PathLike, make_pipeline: Callable[[], object], *,
                  config: dict, score: bool = True, nshard: int = 1, rank: int = 0,
                  part_size: int = DEFAULT_PART_SIZE, fmt: str = "auto", use_ray: bool = False, workers: int = 1,
                  batch_size: int = 8, device: str = "cpu", cpus_per_worker: float | None = None,
                  progress: bool = True) -> RunReport:  # fmt: skip
    """Encode this shard's utterances that OUT does not hold yet; merge when the whole corpus is accounted for.

    `make_pipeline()` returns an object with `encode(wav, sr, score)` -> EncodeResult, `k` and `lmbda` (a Pipeline);
    with `use_ray` it must be picklable (a functools.partial of a module-level function) and is called once per
    actor. `config` holds k, lmbda, num_neighbors, models, random_weights (recorded in OUT/config.json)."""
    config = {**config, "score": bool(score)}
    output = CorpusOutput(out, fmt)
    output.prepare(config)
    mine = shard(corpus, nshard, rank)
    done = set(output.written_ids())
    todo = [u for u in mine if u.id not in done]
    writer = PartWriter(output, rank, nshard, part_size)
    setup0 = time.perf_counter()
    desc = "encode-corpus" + (f" {rank}/{nshard}" if nshard > 1 else "") + (" (ray)" if use_ray else "")
    encoded = failed = 0
    audio = wall = 0.0
    with _progress(len(todo), progress and bool(todo), desc) as bar:
        try:
            if todo and use_ray:
                from dpslm_stream.corpus_ray import encode_on_ray

                encoded, failed, audio, wall = encode_on_ray(todo, make_pipeline, score, writer, output, bar,
                                                    (config["k"], config["lmbda"]), workers=workers,
                                                    batch_size=batch_size, device=device,
                                                    cpus_per_worker=cpus_per_worker)  # fmt: skip
            elif todo:
                encoded, failed, audio, wall = _encode_local(todo, make_pipeline, score, writer, output, bar)
        finally:  # also on an error or Ctrl-C: what was encoded is kept and skipped by the rerun
            writer.flush()
    setup = max(0.0, time.perf_counter() - setup0 - wall)
    report = RunReport(todo=len(todo), skipped=len(mine) - len(todo), encoded=encoded, failed=failed,
                       audio_seconds=audio, wall_s=wall, setup_s=setup, merged=False)  # fmt: skip
    if {u.id for u in corpus} <= set(output.written_ids()) | output.failed_ids():
        report.summary = output.merge(corpus)
        report.merged = True
    return report


# --- the command -----------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dpslm_stream.cli import _add_model_args

    p = subparsers.add_parser(
        "encode-corpus", help="a folder or manifest of audio -> units in Parquet/JSONL parts + units.txt, durations.txt, "
                              "summary.json; resumable, --nshard/--rank, --ray",
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("input", type=Path, metavar="MANIFEST|DIR", help="a folder of audio files or a manifest (see below)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; reruns resume in it)")
    _add_model_args(p)
    p.add_argument("--num-neighbors", type=int, default=None, help="DPDP neighbours per frame (default int(0.05 k))")
    p.add_argument("--no-score", action="store_true", help="skip the ULM log-likelihood")
    p.add_argument("--ext", default=",".join(DEFAULT_EXTS), help="extensions taken from a folder (default wav,flac,ogg)")
    p.add_argument("--part-size", type=int, default=DEFAULT_PART_SIZE,
                   help=f"utterances per output part; a hard kill loses at most one part (default {DEFAULT_PART_SIZE})")
    p.add_argument("--format", dest="fmt", choices=("auto", "parquet", "jsonl"), default="auto",
                   help="part format (default: parquet when pyarrow is installed, else jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("static sharding (one process per GPU / Slurm array task)")
    g.add_argument("--nshard", type=int, default=1, help="number of shards (default 1)")
    g.add_argument("--rank", type=int, default=0, help="this shard: utterances whose index is RANK mod NSHARD")
    g.add_argument("--merge", action="store_true", help="encode nothing: write units.txt, durations.txt and "
                                                        "summary.json from the parts in OUT")  # fmt: skip
    g = p.add_argument_group("Ray Data (pip install -e '.[ray]' in the dpslm-stream checkout)")
    g.add_argument("--ray", action="store_true", help="run on Ray Data (joins $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--ray-address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local)")
    g.add_argument("--workers", type=int, default=1, help="encoder actors (each loads the models; 1 GPU each with "
                                                          "--device cuda) (default 1)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=8, help="utterances per Ray batch (default 8)")
    g.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per encoder actor, and its torch threads on CPU (rounded) (default: 1, "
                        "less when the cluster is smaller)")
    return p


def run(args: argparse.Namespace) -> int:
    from dpslm_stream.cli import _warn_random

    models = hub.ModelSet(args.models)
    k, lmbda = hub.check_pair(args.k, args.lmbda)  # an unknown pair fails before anything else
    if args.workers < 1 or args.batch_size < 1 or args.part_size < 1:
        raise InvalidInput("--workers, --batch-size and --part-size must be at least 1")
    corpus = list_corpus(args.input, parse_exts(args.ext))
    shard(corpus, args.nshard, args.rank)
    output = CorpusOutput(args.out, args.fmt)
    if args.merge:
        summary = output.merge(corpus)
        _print_summary(args.out, summary)
        return 0 if summary["failed"] == 0 and summary["missing"] == 0 else 1
    _warn_random(models)
    if output.fmt == "jsonl" and args.fmt == "auto":
        from dpslm_stream.cli import note

        note(f"pyarrow is not installed: the parts in {args.out} are JSON lines (part-*.jsonl), not Parquet "
             f"(pip install pyarrow for Parquet)")  # fmt: skip
    source = args.models if args.models in ("release", "tiny") else str(Path(args.models).resolve())
    from dpslm_stream.pipeline import default_num_neighbors

    num_neighbors = args.num_neighbors or default_num_neighbors(k)
    config = {"k": k, "lmbda": lmbda, "num_neighbors": num_neighbors, "models": source,
              "random_weights": models.is_random}  # fmt: skip
    score = not args.no_score
    make = functools.partial(build_pipeline, source, k, lmbda, args.device, num_neighbors, score)
    if args.ray:
        from dpslm_stream.corpus_ray import import_ray_data, init_ray

        import_ray_data()
        _check_checkpoints(models, k, lmbda, score)  # on the driver: a missing file fails before the cluster starts
        init_ray(args.ray_address)
    report = encode_corpus(corpus, args.out, make, config=config, score=score, nshard=args.nshard, rank=args.rank,
                           part_size=args.part_size, fmt=args.fmt, use_ray=args.ray, workers=args.workers,
                           batch_size=args.batch_size, device=args.device, cpus_per_worker=args.cpus_per_worker,
                           progress=not args.quiet)  # fmt: skip
    print(f"encoded {report.encoded} utterances ({report.audio_seconds / 3600:.4f} h of audio) in {report.wall_s:.1f} s "
          f"({report.hours_per_hour:.1f} h of audio per hour, after {report.setup_s:.1f} s of set-up); "
          f"{report.skipped} already written, {report.failed} failed"
          + (f" (see {output.errors_path})" if report.failed else ""))  # fmt: skip
    if report.merged:
        _print_summary(args.out, report.summary)
    else:
        print(f"not every utterance of the corpus is in {args.out} yet (other shards?): units.txt is written by the "
              f"last shard to finish, or by rerunning with --merge")  # fmt: skip
    return 1 if report.failed else 0


def _check_checkpoints(models: hub.ModelSet, k: int, lmbda: int, score: bool) -> None:
    releases = [hub.WAVLM_LARGE, hub.CODEBOOKS[hub.check_codebook_k(k)]] + ([hub.ULM_1K[(k, lmbda)]] if score else [])
    for r in releases:
        models.path(r)


def _print_summary(out: Path, s: dict) -> None:
    random = " (RANDOM weights: plumbing check, not speech)" if s.get("random_weights") else ""
    print(f"{out}: {s['count']} utterances, {s['hours']:.4f} h, {s['num_units']} units, bitrate {s['bitrate']:.1f} "
          f"bit/s (k={s['k']}, lambda={s['lmbda']}){random}; wrote units.txt, durations.txt, summary.json"
          + (f"; {s['failed']} failed" if s.get("failed") else "")
          + (f"; {s['missing']} not encoded yet" if s.get("missing") else ""))  # fmt: skip
