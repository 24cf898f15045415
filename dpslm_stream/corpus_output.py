"""The output folder of `encode-corpus` (parts written atomically, errors.jsonl, config.json, and the merged
units.txt / durations.txt / summary.json; the layout is described in dpslm_stream/corpus.py), and which failures
concern one utterance (recorded there, the job goes on)."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from dpslm_stream.corpus_listing import Utterance
from dpslm_stream.errors import DPSLMError, InvalidInput

DEFAULT_PART_SIZE = 200
FIELDS = ("id", "path", "units", "durations", "num_frames", "seconds", "loglikelihood", "k", "lmbda")
# Settings that must not change between runs into one OUT (they change the units or what the rows hold).
_CONFIG_KEYS = ("k", "lmbda", "num_neighbors", "models", "score")


class CorpusError(DPSLMError, RuntimeError):
    """An output folder in a state the job cannot continue from (duplicate ids, other settings, unreadable parts)."""


def per_file_errors() -> tuple[type[BaseException], ...]:
    """Failures that concern one utterance (recorded, the job goes on). Anything else stops the job (after writing
    the pending part), so that bugs are seen; a rerun resumes."""
    import torch

    errs: tuple[type[BaseException], ...] = (DPSLMError, OSError)
    oom = getattr(torch.cuda, "OutOfMemoryError", None)  # one very long utterance must not stop every rerun
    return errs + ((oom,) if oom is not None else ())


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
