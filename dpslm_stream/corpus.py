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
import json
import math
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from dpslm_stream import hub, raycluster
from dpslm_stream.errors import DPSLMError, InvalidInput

DEFAULT_EXTS = ("wav", "flac", "ogg")
DEFAULT_PART_SIZE = 200
FIELDS = ("id", "path", "units", "durations", "num_frames", "seconds", "loglikelihood", "k", "lmbda")
# Settings that must not change between runs into one OUT (they change the units or what the rows hold).
_CONFIG_KEYS = ("k", "lmbda", "num_neighbors", "models", "score")


class CorpusError(DPSLMError, RuntimeError):
    """An output folder in a state the job cannot continue from (duplicate ids, other settings, unreadable parts)."""


class RayUnavailable(DPSLMError, ImportError):
    """--ray asked for but Ray (or pyarrow) is not installed."""


# --- the corpus ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str


def parse_exts(ext: str | Iterable[str]) -> tuple[str, ...]:
    """'wav,flac' or ['wav', '.FLAC'] -> ('.wav', '.flac')."""
    parts = ext.split(",") if isinstance(ext, str) else list(ext)
    exts = tuple(sorted({"." + p.strip().lstrip(".").lower() for p in parts if p.strip()}))
    if not exts:
        raise InvalidInput("--ext names no extension (expected e.g. wav,flac)")
    return exts


def _utt_id(rel: str) -> str:
    """Relative path -> id: posix separators, extension removed (only the last one: 'a.b.wav' -> 'a.b')."""
    p = Path(rel)
    return p.with_suffix("").as_posix() if p.suffix else p.as_posix()


def _finish(entries: list[tuple[str, str]], source: Path) -> list[Utterance]:
    """(relative path, full path) pairs -> utterances sorted by relative path, ids checked for uniqueness."""
    entries.sort(key=lambda e: e[0])
    utts = [Utterance(_utt_id(rel), full) for rel, full in entries]
    dups = sorted(i for i, c in Counter(u.id for u in utts).items() if c > 1)
    if dups:
        shown = ", ".join(dups[:5]) + (" ..." if len(dups) > 5 else "")
        raise InvalidInput(f"{source}: {len(dups)} utterance id(s) occur more than once (same path up to the "
                           f"extension?): {shown}")  # fmt: skip
    if not utts:
        raise InvalidInput(f"{source}: no utterances found")
    return utts


def scan_dir(root: str | os.PathLike, exts: Iterable[str] = DEFAULT_EXTS) -> list[Utterance]:
    root = Path(os.path.abspath(root))
    wanted = parse_exts(exts)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in wanted:
                full = os.path.join(dirpath, name)
                entries.append((Path(os.path.relpath(full, root)).as_posix(), full))
    if not entries:
        raise InvalidInput(f"no audio files with extension {', '.join(wanted)} under {root} (see --ext)")
    return _finish(entries, root)


def read_manifest(manifest: str | os.PathLike) -> list[Utterance]:
    manifest = Path(manifest)
    try:
        text = manifest.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read manifest {manifest}: {e}") from e
    lines = [ln.rstrip("\r\n") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InvalidInput(f"manifest {manifest} lists no utterances")
    first = lines[0].strip()
    root = None
    if "\t" not in first:
        for cand in (Path(first), manifest.parent / first):
            if cand.is_dir():
                root = cand
                break
    if root is not None:  # fairseq: root, then relpath<TAB>num_samples
        root = os.path.abspath(root)
        entries = []
        for ln in lines[1:]:
            rel = ln.split("\t")[0].strip()
            entries.append((Path(rel).as_posix(), os.path.join(root, rel)))
        return _finish(entries, manifest)
    paths = []
    for ln in lines:
        p = Path(ln.split("\t")[0].strip())
        paths.append(os.path.abspath(p if p.is_absolute() else manifest.parent / p))
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    return _finish([(Path(os.path.relpath(p, common)).as_posix(), p) for p in paths], manifest)


def list_corpus(source: str | os.PathLike, exts: Iterable[str] = DEFAULT_EXTS) -> list[Utterance]:
    """A folder or a manifest (see the module doc) -> utterances in their fixed order (the order sharding uses)."""
    source = Path(source)
    if source.is_dir():
        return scan_dir(source, exts)
    if source.is_file():
        return read_manifest(source)
    raise InvalidInput(f"corpus not found: {source} (expected a folder of audio files or a manifest file)")


def shard(utts: list[Utterance], nshard: int, rank: int) -> list[Utterance]:
    if nshard < 1 or not 0 <= rank < nshard:
        raise InvalidInput(f"--rank must be in 0..{nshard - 1} and --nshard at least 1 (got rank {rank}, nshard {nshard})")
    return utts[rank::nshard]


# --- the output folder -----------------------------------------------------------------------------------------------


def have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("units", pa.list_(pa.int64())),
        ("durations", pa.list_(pa.int64())), ("num_frames", pa.int64()), ("seconds", pa.float64()),
        ("loglikelihood", pa.float64()), ("k", pa.int64()), ("lmbda", pa.int64()),
    ])  # fmt: skip


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then fsync and rename into place: readers see the whole file or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CorpusOutput:
    """The OUT folder: parts, the error log, the config of the job and the merged files."""

    def __init__(self, directory: str | os.PathLike, fmt: str = "auto"):
        self.dir = Path(directory)
        if fmt not in ("auto", "parquet", "jsonl"):
            raise InvalidInput(f"--format must be auto, parquet or jsonl, got {fmt!r}")
        if fmt == "parquet" and not have_pyarrow():
            raise InvalidInput("--format parquet needs pyarrow: pip install pyarrow (or pip install -e '.[ray]' in the checkout)")
        self.fmt = ("parquet" if have_pyarrow() else "jsonl") if fmt == "auto" else fmt

    @property
    def errors_path(self) -> Path:
        return self.dir / "errors.jsonl"

    def prepare(self, config: dict) -> None:
        """Create OUT; record the job's settings on the first run, refuse other settings on a rerun."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "config.json"
        if path.is_file():
            old = json.loads(path.read_text())
            diff = {k: (old.get(k), config.get(k)) for k in _CONFIG_KEYS if old.get(k) != config.get(k)}
            if diff:
                shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                raise CorpusError(f"{self.dir} holds units made with other settings ({shown}); rerun with the same "
                                  f"options or write to another --out")  # fmt: skip
            return
        _write_atomic(path, lambda p: p.write_text(json.dumps(config, indent=1)))

    def config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise CorpusError(f"{self.dir} holds no encode-corpus output (no config.json)")
        return json.loads(path.read_text())

    def parts(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.name.startswith("part-") and p.suffix in (".parquet", ".jsonl"))

    def _read_part(self, path: Path, columns: list[str] | None = None) -> list[dict]:
        if path.suffix == ".jsonl":
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            return rows if columns is None else [{c: r[c] for c in columns} for r in rows]
        if not have_pyarrow():
            raise CorpusError(f"{path} is a Parquet part: install pyarrow to read it (pip install pyarrow)")
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=columns).to_pylist()
        except Exception as e:  # parts are renamed into place only once complete: this is damage from outside
            raise CorpusError(f"cannot read part {path} ({e}); move it away and rerun to encode its utterances again") from e

    def written_ids(self) -> list[str]:
        """Ids in every part, with repetitions (a repetition would be a bug: see `merge`)."""
        return [r["id"] for p in self.parts() for r in self._read_part(p, ["id"])]

    def read_rows(self) -> list[dict]:
        return [r for p in self.parts() for r in self._read_part(p)]

    def write_part(self, rows: list[dict], name: str) -> Path:
        path = self.dir / f"{name}.{'parquet' if self.fmt == 'parquet' else 'jsonl'}"
        if path.exists():
            raise CorpusError(f"part {path} exists already")
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([{f: r[f] for f in FIELDS} for r in rows], schema=_schema())
            _write_atomic(path, lambda p: pq.write_table(table, p))
        else:
            text = "".join(json.dumps({f: r[f] for f in FIELDS}) + "\n" for r in rows)
            _write_atomic(path, lambda p: p.write_text(text))
        return path

    def record_error(self, utt: Utterance, message: str) -> None:
        line = json.dumps({"id": utt.id, "path": utt.path, "error": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        # One write of one line in append mode: shards sharing OUT do not interleave their lines.
        with open(self.errors_path, "a") as f:
            f.write(line + "\n")

    def failed_ids(self) -> set[str]:
        if not self.errors_path.is_file():
            return set()
        out = set()
        for ln in self.errors_path.read_text().splitlines():
            try:
                out.add(json.loads(ln)["id"])
            except (ValueError, KeyError):  # a line cut by a hard kill
                continue
        return out

    def merge(self, corpus: list[Utterance] | None = None) -> dict:
        """Write units.txt, durations.txt and summary.json from the union of the parts; return the summary."""
        from dpslm_stream.pipeline import FRAME_RATE, bitrate

        config = self.config()
        rows = self.read_rows()
        counts = Counter(r["id"] for r in rows)
        dups = sorted(i for i, c in counts.items() if c > 1)
        if dups:
            raise CorpusError(f"{len(dups)} id(s) written more than once in {self.dir}: {', '.join(dups[:5])}; "
                              "two runs of the same shard at once? Remove the newer parts and rerun")  # fmt: skip
        pairs = {(r["k"], r["lmbda"]) for r in rows}
        if len(pairs) > 1:
            raise CorpusError(f"{self.dir} mixes parts of several (k, lambda): {sorted(pairs)}")
        rows.sort(key=lambda r: r["id"])

        def lines(key: str) -> str:
            return "".join(f"{r['id']} {' '.join(map(str, r[key]))}".rstrip() + "\n" for r in rows)

        _write_atomic(self.dir / "units.txt", lambda p: p.write_text(lines("units")))
        _write_atomic(self.dir / "durations.txt", lambda p: p.write_text(lines("durations")))
        seconds = float(sum(r["seconds"] for r in rows))
        n_units = sum(len(r["units"]) for r in rows)
        written = set(counts)
        failed = sorted(self.failed_ids() - written)
        lls = [r["loglikelihood"] for r in rows]
        summary = {
            "count": len(rows), "seconds": seconds, "hours": seconds / 3600, "num_units": n_units,
            "num_frames": int(sum(r["num_frames"] for r in rows)),
            "units_per_second": n_units / seconds if seconds else 0.0,
            "bitrate": bitrate([r["units"] for r in rows], seconds),
            "bitrate_definition": "N_units * H(unigram distribution of the units) / total seconds, over deduplicated "
                                  "units of the whole corpus (ZeroSyl eval/bitrate.py)",
            "loglikelihood_total": float(sum(lls)) if rows and all(v is not None for v in lls) else None,
            "k": config["k"], "lmbda": config["lmbda"], "num_neighbors": config.get("num_neighbors"),
            "models": config["models"], "random_weights": config.get("random_weights"), "score": config.get("score"),
            "frame_rate": FRAME_RATE, "parts": len(self.parts()), "failed": len(failed), "failed_ids": failed[:1000],
        }  # fmt: skip
        if corpus is not None:
            missing = sorted({u.id for u in corpus} - written - set(failed))
            summary["corpus_size"] = len(corpus)
            summary["missing"] = len(missing)
            summary["missing_ids"] = missing[:1000]
        _write_atomic(self.dir / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
        return summary


class PartWriter:
    """Buffers rows and writes them as one part every `part_size` rows (and on flush)."""

    def __init__(self, output: CorpusOutput, rank: int = 0, nshard: int = 1, part_size: int = DEFAULT_PART_SIZE):
        self.output, self.part_size = output, max(1, int(part_size))
        run = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"  # unique per run
        self.prefix = f"part-r{rank:05d}-of-{nshard:05d}-{run}"
        self.rows: list[dict] = []
        self.seq = 0
        self.written = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.output.write_part(self.rows, f"{self.prefix}-{self.seq:06d}")
            self.seq += 1
            self.written += len(self.rows)
            self.rows = []


# --- encoding --------------------------------------------------------------------------------------------------------


def _per_file_errors() -> tuple[type[BaseException], ...]:
    """Failures that concern one utterance (recorded, the job goes on). Anything else stops the job (after writing
    the pending part), so that bugs are seen; a rerun resumes."""
    import torch

    errs: tuple[type[BaseException], ...] = (DPSLMError, OSError)
    oom = getattr(torch.cuda, "OutOfMemoryError", None)  # one very long utterance must not stop every rerun
    return errs + ((oom,) if oom is not None else ())


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
    errors = _per_file_errors()
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


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailable(f"--ray needs Ray Data ({e}): {raycluster.INSTALL_HINT}") from e
    if not have_pyarrow():
        raise RayUnavailable(f"--ray needs pyarrow: {raycluster.INSTALL_HINT}")
    return ray


def _decode_batch(batch):
    """Ray stage 1 (CPU tasks): read each file and resample it to 16 kHz with the exact kernel the model applies
    itself (audio.resample), so the encoder actor computes the same features as Pipeline.encode on the file."""
    import numpy as np
    import pyarrow as pa
    import torch

    from dpslm_stream.audio import load_audio, resample

    errors = _per_file_errors()
    ids, paths = batch.column("id").to_pylist(), batch.column("path").to_pylist()
    audio, seconds, messages = [], [], []
    for path in paths:
        try:
            wav, sr = load_audio(path)
            seconds.append(len(wav) / sr)
            if sr != 16000:
                wav = resample(torch.from_numpy(wav)[None], sr, 16000)[0].numpy()
            audio.append(np.ascontiguousarray(wav, dtype=np.float32))
            messages.append("")
        except errors as e:
            audio.append(np.zeros(0, dtype=np.float32))
            seconds.append(0.0)
            messages.append(f"{type(e).__name__}: {e}")
    return pa.table({
        "id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string()),
        "audio": pa.array(audio, pa.list_(pa.float32())), "seconds": pa.array(seconds, pa.float64()),
        "error": pa.array(messages, pa.string()),
    })  # fmt: skip


class _EncodeActor:
    """Ray stage 2 (an actor pool): holds one pipeline (models on its GPU with --device cuda) and encodes a batch of
    16 kHz utterances one by one (no padding across utterances, so the units equal the per-file path's)."""

    def __init__(self, make_pipeline, score: bool, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.pipe = make_pipeline()
        self.score = score
        self.errors = _per_file_errors()
        self.ready_at = time.time()  # models loaded: the driver's encoding clock starts at the first actor's

    def __call__(self, batch):
        import pyarrow as pa

        cols = {k: [] for k in ("id", "path", "units", "durations", "num_frames", "seconds", "loglikelihood", "error")}
        audio = batch.column("audio")
        for i, (uid, path, secs, err) in enumerate(zip(batch.column("id").to_pylist(), batch.column("path").to_pylist(),
                                                       batch.column("seconds").to_pylist(),
                                                       batch.column("error").to_pylist())):  # fmt: skip
            units, durations, frames, ll = [], [], 0, None
            if not err:
                try:
                    wav = audio[i].values.to_numpy(zero_copy_only=False).copy()  # writable, for torch
                    res = self.pipe.encode(wav, 16000, score=self.score)
                    units, durations, frames, ll = res.units, res.durations, res.num_frames, res.loglikelihood
                except self.errors as e:
                    err = f"{type(e).__name__}: {e}"
            for key, value in (("id", uid), ("path", path), ("units", units), ("durations", durations),
                               ("num_frames", frames), ("seconds", secs), ("loglikelihood", ll), ("error", err)):
                cols[key].append(value)
        return pa.table({
            "id": pa.array(cols["id"], pa.string()), "path": pa.array(cols["path"], pa.string()),
            "units": pa.array(cols["units"], pa.list_(pa.int64())),
            "durations": pa.array(cols["durations"], pa.list_(pa.int64())),
            "num_frames": pa.array(cols["num_frames"], pa.int64()), "seconds": pa.array(cols["seconds"], pa.float64()),
            "loglikelihood": pa.array(cols["loglikelihood"], pa.float64()), "error": pa.array(cols["error"], pa.string()),
            "ready_at": pa.array([self.ready_at] * len(cols["id"]), pa.float64()),
        })  # fmt: skip


def init_ray(address: str | None = None) -> None:
    """Join $RAY_ADDRESS / `address` if given, else start a local Ray on 127.0.0.1 (no dashboard)."""
    _import_ray()
    raycluster.init_ray(address, log_to_driver=True)


def _ray_rows(todo: list[Utterance], make_pipeline, score: bool, *, workers: int, batch_size: int, device: str,
              cpus_per_worker: float | None, decode_cpus: float = 0.25) -> Iterator[dict]:  # fmt: skip
    ray = _import_ray()
    init_ray()
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours counts utterances
    gpu = str(device).startswith("cuda")
    if cpus_per_worker is None:  # fit the pool and a decode task in the cluster (an actor pool waits forever if not)
        total = float(ray.cluster_resources().get("CPU", 1))
        cpus_per_worker = max(0.1, min(1.0, (total - decode_cpus) / max(1, workers)))
    threads = None if gpu else max(1, round(cpus_per_worker))  # torch threads per CPU actor
    n_blocks = max(1, min(math.ceil(len(todo) / batch_size), 1000))
    ds = ray.data.from_items([{"id": u.id, "path": u.path} for u in todo], override_num_blocks=n_blocks)
    ds = ds.map_batches(_decode_batch, batch_size=batch_size, batch_format="pyarrow", num_cpus=decode_cpus)
    ds = ds.map_batches(_EncodeActor, fn_constructor_args=(make_pipeline, score, threads), batch_size=batch_size,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=cpus_per_worker, num_gpus=1 if gpu else 0)  # fmt: skip
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()
    finally:
        ctx.enable_progress_bars = bars


def _encode_ray(todo, make_pipeline, score, writer, output, bar, pair, **ray_kwargs) -> tuple[int, int, float, float]:
    encoded = failed = 0
    audio = 0.0
    ready = math.inf  # wall-clock time the first actor had its models loaded
    by_id = {u.id: u for u in todo}
    for r in _ray_rows(todo, make_pipeline, score, **ray_kwargs):
        ready = min(ready, r["ready_at"])
        utt = by_id.pop(r["id"], None)
        if utt is None:  # a batch Ray retried after a worker died may come back twice: keep its first copy
            continue
        if r["error"]:
            output.record_error(utt, r["error"])
            failed += 1
        else:
            row = {f: r.get(f) for f in FIELDS}
            row["path"], row["k"], row["lmbda"] = utt.path, pair[0], pair[1]
            writer.add(row)
            encoded += 1
            audio += row["seconds"]
        bar.update(1)
        bar.set_postfix(audio_h=f"{audio / 3600:.3f}", failed=failed, refresh=False)
    return encoded, failed, audio, max(0.0, time.time() - ready) if ready < math.inf else 0.0


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
                encoded, failed, audio, wall = _encode_ray(todo, make_pipeline, score, writer, output, bar,
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
        _import_ray()
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
