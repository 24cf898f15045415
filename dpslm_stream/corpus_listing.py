"""The utterances of an `encode-corpus` input (a folder, a fairseq-style manifest or a plain list; see
dpslm_stream/corpus.py for the rules), their ids, and the static sharding `--nshard/--rank`."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dpslm_stream.errors import InvalidInput

DEFAULT_EXTS = ("wav", "flac", "ogg")


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
