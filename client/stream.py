"""`dpslm-stream stream FILE... --url ws://HOST:PORT/v1/stream`: stream audio files to a live units server.

Each file is one session, sent in chunks either paced in real time (``--pace realtime``, as a microphone would) or as
fast as the server takes them (``--pace fast``, the default; the server's back-pressure sets the speed). Units are
printed as they commit; ``--json`` writes the same document as ``dpslm-stream encode --json`` (so the two can be
compared directly: in ``--mode full`` they are equal), with the stream's lag figures added per file.
``--resynth`` asks for the units resynthesized back into speech (ELLA-V + WavTokenizer on the server) and
``--audio-out OUT.wav`` writes that 24 kHz audio (one file per input: OUT_1.wav, ... after the first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpslm_stream import protocol as P
from dpslm_stream.errors import DPSLMError

from .api import SessionError, UnitsClient, chunked

DEFAULT_URL = f"ws://127.0.0.1:8765{P.WS_PATH}"


@dataclass
class StreamResult:
    """Everything one streamed session returned."""

    ready: P.Ready
    units: list[P.Unit] = field(default_factory=list)
    stats: list[P.Stats] = field(default_factory=list)
    errors: list[P.Error] = field(default_factory=list)
    audio: list[P.AudioChunk] = field(default_factory=list)  # resynthesized 24 kHz chunks, in order
    end: P.EndMessage | None = None
    seconds: float = 0.0  # duration of the input audio
    wall_s: float = 0.0  # connect to end message

    @property
    def processed_seconds(self) -> float:
        """Audio the server took: its end message's count (less than `seconds` when it ended the session early)."""
        return self.end.audio_s if self.end is not None else 0.0

    def lag_quantiles(self) -> dict:
        lags = np.array([u.lag_s for u in self.units]) if self.units else np.zeros(0)
        if lags.size == 0:
            return {"lag_p50_s": None, "lag_p95_s": None, "lag_max_s": None}
        return {"lag_p50_s": float(np.percentile(lags, 50)), "lag_p95_s": float(np.percentile(lags, 95)),
                "lag_max_s": float(lags.max())}  # fmt: skip

    def to_encode_json(self) -> dict:
        """This file's entry in the `encode --json` format (pipeline.EncodeResult.to_json) plus stream figures."""
        from dpslm_stream.pipeline import EncodeResult

        score = self.ready.settings.get("score")
        res = EncodeResult(
            units=[u.unit for u in self.units],
            durations=[u.end_frame - u.start_frame for u in self.units],
            num_frames=self.end.num_frames if self.end else (self.units[-1].end_frame if self.units else 0),
            seconds=self.seconds if self.end is None or self.end.reason == "end" else self.processed_seconds,
            unit_logprobs=[u.logprob for u in self.units] if score else None,
        )  # fmt: skip
        return res.to_json(session=self.ready.session, end_reason=self.end.reason if self.end else None,
                           wall_seconds=self.wall_s, **self.lag_quantiles())  # fmt: skip


async def stream_audio(url: str, wav: np.ndarray, sr: int, *, realtime: bool = False, chunk_ms: float = 100.0,
                       on_message=None, **client_kwargs) -> StreamResult:  # fmt: skip
    """Stream one signal through the server; ``on_message(msg)`` sees every server message as it arrives."""
    started = time.monotonic()
    async with UnitsClient(url, sample_rate=sr, **client_kwargs) as client:
        result = StreamResult(ready=client.ready, seconds=len(wav) / sr)
        if on_message is not None:
            on_message(client.ready)
        async for msg in client.stream(chunked(wav, sr, chunk_ms), realtime=realtime):
            if isinstance(msg, P.Unit):
                result.units.append(msg)
            elif isinstance(msg, P.Stats):
                result.stats.append(msg)
            elif isinstance(msg, P.Error):
                result.errors.append(msg)
            elif isinstance(msg, P.AudioChunk):
                result.audio.append(msg)
            elif isinstance(msg, P.EndMessage):
                result.end = msg
            if on_message is not None:
                on_message(msg)
    result.wall_s = time.monotonic() - started
    return result


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("stream", help="stream audio files to a live units server (`dpslm-stream serve`); "
                                             "writes the `encode --json` format")  # fmt: skip
    p.add_argument("files", nargs="+", type=Path, help="audio files (any format soundfile reads; any sample rate)")
    add_connection_args(p)
    p.add_argument("--pace", choices=("fast", "realtime"), default="fast",
                   help="fast: as fast as the server takes it (back-pressure); realtime: paced like a microphone")
    p.add_argument("--chunk-ms", type=float, default=100.0, help="audio per chunk (default 100 ms)")
    p.add_argument("--json", type=Path, default=None, help="write units/durations/starts/scores as JSON here")
    p.add_argument("--quiet", action="store_true", help="do not print units as they arrive")
    p.add_argument("--resynth", action="store_true", help="ask for the units resynthesized into 24 kHz speech")
    p.add_argument("--resynth-options", type=json.loads, default=None, metavar="JSON",
                   help='resynthesis options, e.g. \'{"holdback": 2, "left_context": 32, "greedy": false, "seed": 1}\'')
    p.add_argument("--audio-out", type=Path, default=None, help="write the resynthesized audio here (WAV, 24 kHz); "
                                                                "implies --resynth")  # fmt: skip
    return p


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the stream and mic clients."""
    p.add_argument("--url", default=DEFAULT_URL, help=f"server WebSocket URL (default {DEFAULT_URL})")
    p.add_argument("--token", default=None, help="access token, if the server requires one "
                                                 "(default: $DPSLM_STREAM_TOKEN)")  # fmt: skip
    p.add_argument("--k", type=int, default=None, help="codebook size (default: the server's default pair)")
    p.add_argument("--lmbda", "--lambda", dest="lmbda", type=int, default=None, help="DPDP duration penalty")
    p.add_argument("--preset", default="low-latency", help="encoder window preset: low-latency, balanced, quality")
    p.add_argument("--mode", default=None, choices=P.ENCODER_MODES,
                   help="encoder mode (default cached; full = exact offline units, all at the end)")
    p.add_argument("--score", action="store_true", help="ask for ULM log-probabilities per unit")
    p.add_argument("--format", default="pcm16", choices=P.SAMPLE_FORMATS, help="wire sample format")
    p.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                   help="do not reconnect and resume the session when the connection drops (default: reconnect with "
                        "backoff, resending the audio the server has not acknowledged)")  # fmt: skip


def client_kwargs(args: argparse.Namespace) -> dict:
    """UnitsClient keyword arguments from add_connection_args' options (the URL checked first)."""
    import os

    if not isinstance(args.url, str) or not args.url.startswith(("ws://", "wss://")):
        from dpslm_stream.errors import InvalidInput

        raise InvalidInput(f"--url must be a WebSocket URL such as {DEFAULT_URL}, got {args.url!r}")

    return {"k": args.k, "lmbda": args.lmbda, "preset": args.preset, "score": args.score, "format": args.format,
            "options": {"mode": args.mode} if args.mode else {}, "reconnect": args.reconnect,
            "token": args.token or os.environ.get("DPSLM_STREAM_TOKEN") or None}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from dpslm_stream.audio import load_audio
    from dpslm_stream.pipeline import bitrate, default_num_neighbors

    from dpslm_stream.audio import save_wav

    from dpslm_stream.cli import output_folder

    kwargs = client_kwargs(args)
    output_folder(args.json)
    output_folder(getattr(args, "audio_out", None))
    options = getattr(args, "resynth_options", None)
    if getattr(args, "resynth", False) or getattr(args, "audio_out", None) or options is not None:
        kwargs["resynth"] = dict(options or {})
    results: dict[str, StreamResult] = {}
    failed: dict[str, str] = {}
    told_random = False
    line = {"open": False}  # whether a line of units is being printed

    def end_line() -> None:
        if line["open"]:
            print(flush=True)
            line["open"] = False

    def printer(msg, path) -> None:
        nonlocal told_random
        if isinstance(msg, P.Ready) and msg.random_weights and not told_random:
            told_random = True
            print(f"note: the server's models ({msg.models}) have RANDOM weights: its units are plumbing checks, "
                  f"not speech", file=sys.stderr, flush=True)  # fmt: skip
        if args.quiet:
            return
        if isinstance(msg, P.Unit):
            if not line["open"]:
                print(f"{path}: units ", end="", flush=True)
                line["open"] = True
            print(msg.unit, end=" ", flush=True)
        elif isinstance(msg, P.Error):
            end_line()
            print(f"[server error {msg.code}] {msg.message}", file=sys.stderr, flush=True)

    for path in args.files:
        try:  # a bad file or a refused session is reported and skipped; the other files are still streamed
            wav, sr = load_audio(path, notify=lambda m: print(f"note: {m}", file=sys.stderr))
            res = asyncio.run(stream_audio(args.url, wav, sr, realtime=args.pace == "realtime",
                                           chunk_ms=args.chunk_ms, on_message=lambda m: printer(m, path),
                                           **kwargs))  # fmt: skip
        except (SessionError, DPSLMError) as e:
            end_line()
            failed[str(path)] = str(e)
            print(f"{path}: error: {e}", file=sys.stderr)
            continue
        end_line()
        results[str(path)] = res
        q = res.lag_quantiles()
        lag = "n/a" if q["lag_p50_s"] is None else f"p50 {q['lag_p50_s']:.2f} s, p95 {q['lag_p95_s']:.2f} s"
        out = sys.stderr if args.quiet else sys.stdout
        if res.end is not None and res.end.reason != "end":  # the server ended it early (drain, limit, error)
            print(f"{path}: the server ended the session early ({res.end.reason}) after {res.end.audio_s:.2f} of "
                  f"{res.seconds:.2f} s of audio", file=sys.stderr)  # fmt: skip
        elif res.end is None:
            print(f"{path}: the connection closed before the session's end message", file=sys.stderr)
        print(f"{path}: {len(res.units)} units in {res.processed_seconds:.2f} s of audio, streamed in "
              f"{res.wall_s:.2f} s; commit lag {lag}; session {res.ready.session}", file=out)  # fmt: skip
        if "resynth" in kwargs and res.end is not None and res.end.resynth is not None:
            r = res.end.resynth
            audio = np.concatenate([c.samples for c in res.audio]) if res.audio else np.zeros(0, np.float32)
            note = f"; resynthesis stopped: {r['error']}" if r.get("error") else ""
            first = r["first_audio_latency_s"]
            print(f"{path}: resynthesized {len(audio) / P.RESYNTH_SAMPLE_RATE:.2f} s of 24 kHz audio in "
                  f"{len(res.audio)} chunks; first audio after {'n/a' if first is None else f'{first:.2f} s'}, "
                  f"resynthesis real-time factor {r['real_time_factor']:.2f}{note}",
                  file=sys.stderr if args.quiet else sys.stdout)  # fmt: skip
            if getattr(args, "audio_out", None):
                i = len(results) - 1
                out = args.audio_out if i == 0 else args.audio_out.with_name(
                    f"{args.audio_out.stem}_{i}{args.audio_out.suffix}")  # fmt: skip
                save_wav(out, audio, P.RESYNTH_SAMPLE_RATE)
                print(f"wrote {out}", file=sys.stderr if args.quiet else sys.stdout)
    if args.json and results:
        first = next(iter(results.values())).ready
        k, lmbda = first.settings["k"], first.settings["lmbda"]
        total_s = sum(r.to_encode_json()["seconds"] for r in results.values())
        doc = {
            "k": k, "lmbda": lmbda, "num_neighbors": first.settings.get("num_neighbors", default_num_neighbors(k)),
            "models": first.models, "random_weights": first.random_weights, "frame_rate": P.FRAME_RATE,
            "bitrate": bitrate([[u.unit for u in r.units] for r in results.values()], total_s),
            "files": {p: r.to_encode_json() for p, r in results.items()},
            "stream": {"url": args.url, "settings": first.settings, "pace": args.pace},
        }  # fmt: skip
        if failed:
            doc["errors"] = failed
        args.json.write_text(json.dumps(doc, indent=1))
    if failed:
        print(f"{len(failed)} of {len(args.files)} file(s) failed (see above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpslm-stream")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["stream", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
