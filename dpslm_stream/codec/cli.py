"""`dpslm-stream codec encode|decode|fit|eval`: the unit bitstream from the command line.

    codec encode IN.wav... -o OUT.dpsu   audio -> units (the `encode` path) -> a .dpsu stream (-o is a folder
                                          when several inputs are given: <stem>.dpsu each)
    codec decode IN.dpsu [--json J] [-o OUT.wav]   units back (and resynthesized audio when asked)
    codec fit UNITS... -o TABLE          a unigram/bigram table from encode-corpus output, encode --json or text
    codec eval FILES... [--json J]       per (k, lambda) and coder: payload bit/s, with packet overhead, the
                                          authors' unigram-entropy bitrate and the ideal code length, side by side
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dpslm_stream import hub
from dpslm_stream.codec.format import CODERS, TERMINATIONS, Header
from dpslm_stream.codec.models import ModelCache, UnitModel  # noqa: F401  (ModelCache re-exported)
from dpslm_stream.codec.packets import (  # noqa: F401  (commits_* re-exported)
    commits_offline, commits_streamed, decode_stream, encode_stream,
)
from dpslm_stream.codec.tables import UnitTable, fit_table, read_unit_sequences
from dpslm_stream.errors import InvalidInput

# --- encode ----------------------------------------------------------------------------------------------------------


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--packet-ms", type=int, default=100, help="packet interval, 20..200 ms (default 100)")
    p.add_argument("--resync-s", type=float, default=5.0,
                   help="coder context reset period in seconds (0: only at the start; default 5)")  # fmt: skip
    p.add_argument("--durations", action="store_true", help="also code each unit's duration (reported separately)")
    p.add_argument("--termination", choices=TERMINATIONS, default="segment",
                   help="segment (default): one range code per resync segment (within 1 %% of the ideal code "
                        "length; a receiver decodes a unit once later bytes fix it); packet: every packet decodes on "
                        "arrival (about a byte more a packet)")  # fmt: skip
    p.add_argument("--dtx", action="store_true",
                   help="discontinuous transmission: units wholly inside VAD silence are not sent (webrtcvad)")  # fmt: skip
    p.add_argument("--vad-mode", type=int, default=2, help="webrtcvad aggressiveness 0..3 with --dtx (default 2)")


def _header(args, model: UnitModel, table_bytes: bytes | None) -> Header:
    if not 20 <= args.packet_ms <= 200:
        raise InvalidInput(f"--packet-ms must be 20..200, got {args.packet_ms}")
    if not 0 <= args.resync_s <= 3600:
        raise InvalidInput(f"--resync-s must be 0..3600, got {args.resync_s}")
    return Header(k=args.k, lmbda=args.lmbda, coder=model.coder, packet_ms=args.packet_ms,
                  resync_ms=int(round(args.resync_s * 1000)), model_hash=model.model_hash,
                  durations=args.durations, table=table_bytes, dtx=args.dtx,
                  termination=args.termination)  # fmt: skip


def _encode_units(args, files: list[Path]):
    """[(path, units, durations, seconds, commits, speech)] with the `encode` path (or the exact streaming encoder);
    speech: the VAD's per-frame decisions with --dtx, else None."""
    from dpslm_stream.audio import load_audio
    from dpslm_stream.pipeline import Pipeline

    models = hub.ModelSet(args.models)
    out = []

    def vad(wav, sr, num_frames):
        if not args.dtx:
            return None
        from dpslm_stream.codec.dtx import speech_frames

        return speech_frames(wav, sr, num_frames, mode=args.vad_mode)

    if getattr(args, "chunk_ms", None):
        from dpslm_stream.stream.compare import stream_encode
        from dpslm_stream.stream.worker import EncoderWorker

        worker = EncoderWorker(models, args.device, pairs=[(args.k, args.lmbda)])
        for path in files:
            wav, sr = load_audio(path)
            res = stream_encode(worker, wav, sr, k=args.k, lmbda=args.lmbda, mode="full", chunk_s=args.chunk_ms / 1000)
            out.append((path, res.units, res.durations, res.seconds, commits_streamed(res),
                        vad(wav, sr, sum(res.durations))))  # fmt: skip
        return out
    pipe = Pipeline(models, args.k, args.lmbda, args.device)
    for path in files:
        wav, sr = load_audio(path)
        res = pipe.encode(wav, sr, score=False)
        out.append((path, res.units, res.durations, res.seconds, commits_offline(res.units, res.durations),
                    vad(wav, sr, res.num_frames)))  # fmt: skip
    return out


def _cmd_encode(args) -> int:
    from dpslm_stream.pipeline import bitrate

    hub.check_pair(args.k, args.lmbda)
    cache = ModelCache(hub.ModelSet(args.models), args.device, UnitTable.load(args.table) if args.table else None)
    if cache.models.is_random:
        print(f"note: model set '{args.models}' has RANDOM weights; results check the plumbing, they are not speech.",
              file=sys.stderr)  # fmt: skip
    model = cache.model(args.coder, args.k, args.lmbda)
    inline = cache.table.to_bytes() if args.coder == "table" and not args.no_inline_table else None
    header = _header(args, model, inline)
    if len(args.files) > 1:
        args.output.mkdir(parents=True, exist_ok=True)
    for path, units, durations, seconds, commits, speech in _encode_units(args, args.files):
        dtx_note = ""
        if speech is not None:
            from dataclasses import replace

            from dpslm_stream.codec.dtx import drop_silence

            kept, dropped = drop_silence(commits, speech)
            _, full = encode_stream(replace(header, dtx=False), model, commits)
            data, stats = encode_stream(header, model, kept)
            saved = (full.payload_bits + full.duration_bits + full.overhead_bits) - (
                stats.payload_bits + stats.duration_bits + stats.overhead_bits)
            dtx_note = (f"; DTX: {dropped} of {len(units)} units in silence not sent, {saved} bits saved "
                        f"({saved / max(seconds, 1e-9):.1f} bit/s on wire)")  # fmt: skip
        else:
            data, stats = encode_stream(header, model, commits)
        target = args.output / f"{path.stem}.dpsu" if len(args.files) > 1 else args.output
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        s = max(seconds, 1e-9)
        print(f"{path} -> {target}: {len(units)} units in {seconds:.2f} s, {stats.packets} packets; payload "
              f"{stats.payload_bits / s:.1f} bit/s (ideal {stats.ideal_bits / s:.1f}, authors' bitrate "
              f"{bitrate([units], seconds):.1f}), with packet overhead "
              f"{(stats.payload_bits + stats.duration_bits + stats.overhead_bits) / s:.1f} bit/s"
              + (f", durations {stats.duration_bits / s:.1f} bit/s" if args.durations else "") + dtx_note)  # fmt: skip
    return 0


# --- decode ----------------------------------------------------------------------------------------------------------


def _cmd_decode(args) -> int:
    try:
        data = args.input.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read {args.input}: {e.strerror}") from None
    cache = ModelCache(hub.ModelSet(args.models), args.device, UnitTable.load(args.table) if args.table else None)
    out = decode_stream(data, cache.for_header, strict=not args.lossy)
    h = out.header
    print(f"{args.input}: version {h.version}, {h.coder} coder, k={h.k}, lambda={h.lmbda}, {h.packet_ms} ms packets, "
          f"{h.termination} termination; {len(out.units)} units")  # fmt: skip
    if args.lossy:
        print(f"  receiver: {out.report.summary()}")
        for p in out.problems:
            print(f"  lost: {p}")
    if not args.quiet:
        print("  " + " ".join(map(str, out.units)))
    if args.json:
        doc = {"version": h.version, "k": h.k, "lmbda": h.lmbda, "coder": h.coder, "packet_ms": h.packet_ms,
               "resync_ms": h.resync_ms, "termination": h.termination,
               "model_hash": h.model_hash.hex(), "units": out.units, "durations": out.durations,
               "segments": out.segments, "silences_ms": out.silences, "report": out.report.to_json(),
               "problems": out.problems}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    if args.output:
        from dpslm_stream.audio import save_wav
        from dpslm_stream.pipeline import Pipeline

        if not out.units:
            raise InvalidInput("the stream holds no units: nothing to resynthesize")
        import numpy as np

        pipe = Pipeline(cache.models, h.k, h.lmbda, args.device)
        cuts = [0, *[i for i, _ in out.silences], len(out.units)]
        pauses = [0, *[ms for _, ms in out.silences]]
        pieces = []
        for a, b, pause_ms in zip(cuts, cuts[1:], pauses):  # DTX pauses are rendered as silence
            pieces.append(np.zeros(24 * pause_ms, dtype=np.float32))
            if b > a:
                pieces.append(pipe.resynthesize(out.units[a:b], greedy=True)[0][0].squeeze(0).numpy())
        wav = np.concatenate(pieces)[None]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        save_wav(args.output, wav[0], 24000)
        print(f"wrote {args.output} ({wav.shape[-1] / 24000:.2f} s at 24 kHz, greedy ELLA-V)")
    return 0


# --- fit -------------------------------------------------------------------------------------------------------------


def _cmd_fit(args) -> int:
    sequences = [seq for path in args.units for seq in read_unit_sequences(path)]
    table = fit_table(sequences, args.k, args.order)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.save(args.output)
    n = int(table.unigram.sum())
    print(f"wrote {args.output}: {'bigram' if args.order == 2 else 'unigram'} table for k={args.k} from "
          f"{len(sequences)} sequences, {n} units ({len(table.to_bytes())} bytes, hash {table.model_hash.hex()})")  # fmt: skip
    return 0


# --- eval ------------------------------------------------------------------------------------------------------------


def _cmd_eval(args) -> int:
    from dpslm_stream.codec.evaluate import evaluate, format_table

    models = hub.ModelSet(args.models)
    pairs = [hub.check_pair(*map(int, p.split(":"))) for p in args.pairs.split(",")] if args.pairs else [(args.k, args.lmbda)]
    tables = {}
    for spec in args.table or []:
        t = UnitTable.load(spec)
        tables[t.k] = t
    started = time.perf_counter()
    doc = evaluate(models, args.files, pairs, packet_ms=args.packet_ms, resync_s=args.resync_s, tables=tables,
                   device=args.device, durations=True)  # fmt: skip
    doc["elapsed_s"] = time.perf_counter() - started
    print(format_table(doc))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


# --- parser ----------------------------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, pair: bool = True) -> None:
    p.add_argument("--models", default="release", metavar="release|tiny|DIR",
                   help="checkpoints: 'release' (torch.hub cache), 'tiny' (RANDOM weights) or a folder")  # fmt: skip
    if pair:
        p.add_argument("--k", type=int, default=hub.DEFAULT_K, help="codebook size (default 500)")
        p.add_argument("--lmbda", "--lambda", dest="lmbda", type=int, default=hub.DEFAULT_LMBDA,
                       help="DPDP duration penalty (default 4500)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device for the encoder (the ULM coder runs batch-1 steps)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("codec", help="the entropy-coded unit bitstream (.dpsu): encode, decode, fit, eval")
    sub = p.add_subparsers(dest="codec_command", required=True)

    e = sub.add_parser("encode", help="audio file(s) -> units -> a .dpsu bitstream")
    e.add_argument("files", nargs="+", type=Path)
    e.add_argument("-o", "--output", type=Path, required=True, help="OUT.dpsu (a folder for several inputs)")
    e.add_argument("--coder", choices=CODERS, default="ulm")
    e.add_argument("--table", type=Path, default=None, help="unit table for --coder table (from `codec fit`)")
    e.add_argument("--no-inline-table", action="store_true",
                   help="do not ship the table inside the stream (the receiver needs the same --table file)")  # fmt: skip
    e.add_argument("--chunk-ms", type=float, default=None,
                   help="run the exact streaming encoder in chunks of this many ms and packetize by its commit "
                        "times (default: the offline path, a unit committed when its last frame ends)")  # fmt: skip
    _add_stream_args(e)
    _add_model_args(e)

    d = sub.add_parser("decode", help="a .dpsu bitstream -> units (and audio with -o)")
    d.add_argument("input", type=Path)
    d.add_argument("--json", type=Path, default=None, help="write units, segments and the receiver report here")
    d.add_argument("-o", "--output", type=Path, default=None, help="resynthesize the units into this WAV (24 kHz)")
    d.add_argument("--table", type=Path, default=None, help="the table file, when the stream does not carry it")
    d.add_argument("--lossy", action="store_true",
                   help="decode every undamaged resync segment and report what was lost (default: any damage is "
                        "an error)")  # fmt: skip
    d.add_argument("--quiet", action="store_true", help="do not print units")
    _add_model_args(d, pair=False)

    f = sub.add_parser("fit", help="fit a unit frequency table for the table coder")
    f.add_argument("units", nargs="+", type=Path,
                   help="encode-corpus folders (units.txt), `encode --json` files or '<id> <u1> <u2> ...' text files")  # fmt: skip
    f.add_argument("-o", "--output", type=Path, required=True)
    f.add_argument("--k", type=int, default=hub.DEFAULT_K, help="codebook size (default 500)")
    f.add_argument("--order", type=int, choices=(1, 2), default=2, help="1: unigram, 2: bigram (default)")

    v = sub.add_parser("eval", help="bit/s of every coder next to the authors' bitrate and the ideal code length")
    v.add_argument("files", nargs="+", type=Path, help="audio files")
    v.add_argument("--pairs", default=None, help="k:lambda list, e.g. 500:4500,100:0 (default --k:--lmbda)")
    v.add_argument("--table", type=Path, action="append",
                   help="table file(s) per k (default: fitted on the evaluated units, an optimistic oracle)")  # fmt: skip
    v.add_argument("--json", type=Path, default=None)
    v.add_argument("--packet-ms", type=int, default=100)
    v.add_argument("--resync-s", type=float, default=5.0)
    _add_model_args(v)
    return p


def run(args) -> int:
    return {"encode": _cmd_encode, "decode": _cmd_decode, "fit": _cmd_fit, "eval": _cmd_eval}[args.codec_command](args)
