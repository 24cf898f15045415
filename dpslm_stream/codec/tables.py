"""Unit frequency tables for the `table` coder: fitted from a units corpus, serialized compactly, hashed.

A table holds integer counts: unigram [K], and for a bigram table also counts [K, K] of (previous, next) pairs
within utterances. Sources it is fitted from: `encode-corpus` output folders (units.txt), `encode --json` files,
or text files of lines `<id> <u1> <u2> ...` (fairseq / textlesslib style) or bare `<u1> <u2> ...` lines.

File / inline format (version 1; zlib-compressed): b"DPST", version u8, order u8 (1 unigram, 2 bigram), K u16,
then K varint unigram counts, then for a bigram table, per previous unit: the number of non-zero next units
(varint) and (gap to the previous non-zero column, count) varint pairs. The model hash is blake2b-128 of those
bytes, so one table has one hash whatever file it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dpslm_stream.codec.format import BitstreamError, read_varint, write_varint
from dpslm_stream.errors import InvalidInput

TABLE_MAGIC = b"DPST"
TABLE_VERSION = 1
MAX_BIGRAM_K = 4096  # a bigram table is K x K int64 in memory (128 MiB at this bound; K is at most 1000 in DP-SLM)
MAX_RAW_BYTES = 256 << 20  # decompressed size bound (a table from a stream header is untrusted input)


@dataclass(frozen=True)
class UnitTable:
    k: int
    unigram: np.ndarray  # int64 [K]
    bigram: np.ndarray | None = None  # int64 [K, K] or None

    @property
    def order(self) -> int:
        return 1 if self.bigram is None else 2

    def to_bytes(self) -> bytes:
        out = bytearray(TABLE_MAGIC + struct.pack(">BBH", TABLE_VERSION, self.order, self.k))
        for c in self.unigram.tolist():
            out += write_varint(int(c))
        if self.bigram is not None:
            for row in self.bigram:
                cols = np.flatnonzero(row)
                out += write_varint(len(cols))
                prev = -1
                for c in cols.tolist():
                    out += write_varint(c - prev - 1) + write_varint(int(row[c]))
                    prev = c
        return zlib.compress(bytes(out), 9)

    @property
    def model_hash(self) -> bytes:
        return hashlib.blake2b(self.to_bytes(), digest_size=16).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UnitTable":
        try:
            inflate = zlib.decompressobj()
            raw = inflate.decompress(data, MAX_RAW_BYTES)
        except zlib.error:
            raise BitstreamError("not a unit table (.dpst): the data is not zlib-compressed") from None
        if inflate.unconsumed_tail:
            raise BitstreamError(f"unit table larger than {MAX_RAW_BYTES >> 20} MiB uncompressed: refused")
        if raw[:4] != TABLE_MAGIC or len(raw) < 8:
            raise BitstreamError("not a unit table (.dpst): the magic bytes 'DPST' are missing")
        version, order, k = struct.unpack_from(">BBH", raw, 4)
        if version != TABLE_VERSION or order not in (1, 2) or k < 1 or (order == 2 and k > MAX_BIGRAM_K):
            raise BitstreamError(f"unsupported unit table (version {version}, order {order}, k {k})")
        pos = 8
        uni = np.zeros(k, dtype=np.int64)
        for i in range(k):
            uni[i], pos = read_varint(raw, pos, 1 << 48)
        bi = None
        if order == 2:
            bi = np.zeros((k, k), dtype=np.int64)
            for r in range(k):
                n, pos = read_varint(raw, pos, k)
                c = -1
                for _ in range(n):
                    gap, pos = read_varint(raw, pos, k)
                    c += gap + 1
                    if c >= k:
                        raise BitstreamError("corrupted unit table: a column index past K")
                    bi[r, c], pos = read_varint(raw, pos, 1 << 48)
        if pos != len(raw):
            raise BitstreamError("corrupted unit table: trailing bytes")
        return cls(k, uni, bi)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UnitTable":
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise InvalidInput(f"cannot read unit table {path}: {e.strerror}") from None
        return cls.from_bytes(data)


def fit_table(sequences: Iterable[Sequence[int]], k: int, order: int = 2) -> UnitTable:
    """Count unigrams (and bigrams within each sequence) of deduplicated unit sequences."""
    if order not in (1, 2):
        raise InvalidInput(f"table order must be 1 (unigram) or 2 (bigram), got {order}")
    if not 1 <= k <= (MAX_BIGRAM_K if order == 2 else 65535):
        raise InvalidInput(f"k={k} is out of range for an order-{order} table")
    uni = np.zeros(k, dtype=np.int64)
    bi = np.zeros((k, k), dtype=np.int64) if order == 2 else None
    for seq in sequences:
        u = np.asarray(seq, dtype=np.int64)
        if len(u) == 0:
            continue
        if u.min() < 0 or u.max() >= k:
            raise InvalidInput(f"unit ids must lie in 0..{k - 1} for a k={k} table; got {u.min()}..{u.max()}")
        np.add.at(uni, u, 1)
        if bi is not None and len(u) > 1:
            np.add.at(bi, (u[:-1], u[1:]), 1)
    return UnitTable(k, uni, bi)


def read_unit_sequences(path: str | os.PathLike) -> list[list[int]]:
    """Unit sequences from an encode-corpus folder (units.txt), an `encode --json` file or a units text file."""
    path = Path(path)
    if path.is_dir():
        path = path / "units.txt"
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidInput(f"cannot read units from {path}: {e.strerror}") from None
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
            files = doc["files"] if "files" in doc else {"": doc}
            return [[int(u) for u in entry["units"]] for entry in files.values()]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput(f"{path} is not an `encode --json` file ({e})") from None
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if not fields[0].lstrip("-").isdigit():  # "<id> u1 u2 ..."
            fields = fields[1:]
        try:
            out.append([int(f) for f in fields])
        except ValueError:
            raise InvalidInput(f"{path}: lines must be '<id> <u1> <u2> ...' or '<u1> <u2> ...'") from None
    return out
