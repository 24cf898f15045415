"""`dpslm-stream receive`: the receiving end of a unit-bitstream link, decoding and resynthesizing on its own side.

    dpslm-stream receive --url ws://HOST:PORT/v1/stream --session ID --listen-token T [--audio-out RX.wav] [--play]
    dpslm-stream receive --url ... --send speech.wav --coder ulm [--loss 0.05 --burst 3 --jitter-ms 40 --seed 1]

The receiver subscribes to a sender's session with the bitstream format: it gets the stream header, then every
packet the server emits for that session (binary frames), nothing else about the units. Packets pass through the
simulated channel (`--loss`, `--burst`, `--jitter-ms`, `--seed`: dpslm_stream.codec.channel), are decoded with the
receiver's own copy of the coder's model (`--models`; the header's hash must match) and, with `--audio-out` or
`--play`, resynthesized locally (ELLA-V + WavTokenizer, greedy) segment by segment, 100 ms of silence where packets
were lost. `--send FILE` runs a whole experiment: it also opens the sender session (with `start.transmit`), streams
FILE and compares what arrived with the units the sender got back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput

from .api import ListenerClient, UnitsClient, chunked
from .stream import DEFAULT_URL


async def _listen(listener: ListenerClient, receiver, units_out: list) -> None:
    async for msg in listener:
        if isinstance(msg, P.BitstreamFrame):
            if msg.part == "header":
                receiver.on_header(msg.data)
                continue
            for got in receiver.on_packet(msg.data, time.monotonic()):
                if got.units:
                    units_out.extend(got.units)
                    print(" ".join(map(str, got.units)), end=" ", flush=True)
        elif isinstance(msg, P.Error):
            print(f"\nserver: {msg.code}: {msg.message}", file=sys.stderr)
    for got in receiver.drain():
        units_out.extend(got.units)


async def _send(sender: UnitsClient, wav: np.ndarray, sr: int, realtime: bool, sent_units: list) -> None:
    async for msg in sender.stream(chunked(wav, sr), realtime=realtime):
        if isinstance(msg, P.Unit):
            sent_units.append(int(msg.unit))


async def _run(args, receiver) -> dict:
    received: list[int] = []
    out: dict = {}
    if args.send is None:
        listener = ListenerClient(args.url, session=args.session, listen_token=args.listen_token, audio=False,
                                  format="bitstream", token=args.token)  # fmt: skip
        await listener.connect()
        await _listen(listener, receiver, received)
        return out
    from dpslm_stream.audio import load_audio

    wav, sr = load_audio(args.send)
    transmit = {"coder": args.coder, "packet_ms": args.packet_ms, "resync_s": args.resync_s,
                "termination": args.termination}
    sender = UnitsClient(args.url, sample_rate=sr, k=args.k, lmbda=args.lmbda, token=args.token, transmit=transmit)
    ready = await sender.connect()
    listener = ListenerClient(args.url, session=ready.session, listen_token=ready.listen_token, audio=False,
                              format="bitstream", token=args.token)  # fmt: skip
    await listener.connect()
    sent: list[int] = []
    await asyncio.gather(_send(sender, wav, sr, args.pace == "realtime", sent), _listen(listener, receiver, received))
    text = " " + " ".join(map(str, sent)) + " "
    segments = receiver.stream.segments
    out["sender_units"] = len(sent)
    out["exact"] = received == sent
    out["segments_match_sender"] = all(" " + " ".join(map(str, s)) + " " in text for s in segments)
    out["units_lost"] = len(sent) - len(received)
    return out


def _resynthesize(models, header, segments, gaps) -> np.ndarray:
    from dpslm_stream.pipeline import Pipeline

    pipe = Pipeline(models, header.k, header.lmbda)
    pieces = []
    for seg, gap in zip(segments, gaps):
        if gap or pieces:
            pieces.append(np.zeros(2400, dtype=np.float32))  # 100 ms at 24 kHz between segments / after a loss
        wav, _, _ = pipe.resynthesize(seg, greedy=True)[0]
        pieces.append(wav.squeeze(0).numpy())
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("receive", help="receive a session's unit bitstream, decode and resynthesize it locally "
                                              "(optionally through a lossy, jittery channel)")  # fmt: skip
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--token", default=None, help="the server's access token, if it has one")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--session", help="the sender's session id (its ready.session)")
    who.add_argument("--send", type=Path, help="also be the sender: stream this audio file with start.transmit")
    p.add_argument("--listen-token", help="the sender's ready.listen_token (with --session)")
    g = p.add_argument_group("sender (with --send)")
    g.add_argument("--coder", default="uniform", choices=("uniform", "table", "ulm"),
                   help="table: the server's --transmit-table for the pair's k (the table travels in the header)")
    g.add_argument("--packet-ms", type=int, default=100)
    g.add_argument("--resync-s", type=float, default=5.0)
    g.add_argument("--termination", choices=("packet", "segment"), default="packet",
                   help="packet (default): each packet decodes on arrival; segment: one range code per resync segment "
                        "(fewer bits; a unit decodes once later bytes arrive)")  # fmt: skip
    g.add_argument("--k", type=int, default=None)
    g.add_argument("--lmbda", "--lambda", dest="lmbda", type=int, default=None)
    g.add_argument("--pace", choices=("realtime", "fast"), default="realtime")
    c = p.add_argument_group("channel between sender and receiver")
    c.add_argument("--loss", type=float, default=0.0, help="packet loss probability")
    c.add_argument("--burst", type=float, default=None, help="mean loss burst length in packets (Gilbert-Elliott)")
    c.add_argument("--jitter-ms", type=float, default=0.0, help="uniform extra delay 0..J ms (order kept)")
    c.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="release", metavar="release|tiny|DIR",
                   help="the receiver's own models: the coder's ULM (its hash must match the stream's) and, for audio, "
                        "ELLA-V + WavTokenizer")  # fmt: skip
    p.add_argument("--audio-out", type=Path, default=None, help="write the locally resynthesized audio (24 kHz WAV)")
    p.add_argument("--play", action="store_true", help="play the resynthesized audio (needs the mic extra)")
    p.add_argument("--json", type=Path, default=None, help="write units, segments and the loss report here")
    return p


def run(args) -> int:
    from dpslm_stream import hub
    from dpslm_stream.codec.channel import Channel
    from dpslm_stream.codec.models import ModelCache
    from dpslm_stream.codec.link import Receiver

    if args.session is not None and not args.listen_token:
        raise InvalidInput("--session needs --listen-token (both are in the sender's ready message)")
    models = hub.ModelSet(args.models)
    channel = Channel(args.loss, args.burst, args.jitter_ms, args.seed) if (args.loss or args.jitter_ms) else None
    receiver = Receiver(ModelCache(models).for_header, channel)
    out = asyncio.run(_run(args, receiver))  # a refused or lost session is a SessionError: one line, exit 1
    print()
    if receiver.header is None:
        raise InvalidInput("no bitstream arrived (is the sender's session transmitting? start.transmit)")
    report = receiver.report()
    rep = receiver.decoder.report
    print(f"received: {rep.summary()}")
    if "channel" in report:
        ch = report["channel"]
        print(f"channel: {ch['packets_dropped']} of {ch['packets_sent']} packets dropped, max delay "
              f"{ch['max_delay_ms']:.0f} ms")  # fmt: skip
    if out:
        print(f"sender: {out['sender_units']} units; received {len(receiver.stream.units)}; exact: {out['exact']}; "
              f"every received segment matches the sender: {out['segments_match_sender']}")  # fmt: skip
    doc = {"header": {"k": receiver.header.k, "lmbda": receiver.header.lmbda, "coder": receiver.header.coder,
                      "packet_ms": receiver.header.packet_ms, "resync_ms": receiver.header.resync_ms,
                      "termination": receiver.header.termination},
           "units": receiver.stream.units, "segments": receiver.stream.segments, **report, **out}  # fmt: skip
    if args.audio_out or args.play:
        wav = _resynthesize(models, receiver.header, receiver.stream.segments, receiver.stream.gaps_before)
        if args.audio_out:
            from dpslm_stream.audio import save_wav

            args.audio_out.parent.mkdir(parents=True, exist_ok=True)
            save_wav(args.audio_out, wav, 24000)
            print(f"wrote {args.audio_out} ({len(wav) / 24000:.2f} s, resynthesized here)")
        if args.play:
            try:
                import sounddevice
            except ImportError:
                raise InvalidInput("--play needs sounddevice: pip install 'dpslm-stream[mic]'") from None
            sounddevice.play(wav, 24000, blocking=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    return 0
