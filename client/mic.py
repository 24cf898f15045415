"""`dpslm-stream mic --url ws://HOST:PORT/v1/stream`: stream the microphone to a live units server.

Captures mono float32 at the input device's own sample rate (the server resamples; no client-side resampling) and
shows one live line: the newest units, the commit lag, the real-time factor, the live bitrate and how much audio
waits in the server's buffer. Ctrl-C (or --seconds) ends the stream; the remaining units arrive before the summary.

Needs the optional ``sounddevice`` package and the PortAudio library:
    pip install 'dpslm-stream[mic]'      and on Debian/Ubuntu:   apt-get install libportaudio2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque
from pathlib import Path


from dpslm_stream import protocol as P
from dpslm_stream.errors import DPSLMError

from .api import SessionError, UnitsClient
from .stream import add_connection_args, client_kwargs

INSTALL_HINT = ("the microphone client needs the 'sounddevice' package and the PortAudio library: "
                "pip install 'dpslm-stream[mic]' (or pip install sounddevice), and on Debian/Ubuntu "
                "apt-get install libportaudio2")  # fmt: skip


class MicUnavailable(DPSLMError):
    """No usable microphone: sounddevice/PortAudio missing, or no input device."""


def import_sounddevice():
    """Import sounddevice lazily (an optional extra) with a message that says how to install it."""
    try:
        import sounddevice
    except ImportError as e:  # sounddevice itself missing
        raise MicUnavailable(f"{INSTALL_HINT} ({e})") from None
    except OSError as e:  # sounddevice installed, libportaudio missing: "PortAudio library not found"
        raise MicUnavailable(f"{INSTALL_HINT} ({e})") from None
    return sounddevice


def input_device(sd, device: str | int | None) -> tuple[object, int]:
    """The input device to use and its native sample rate; MicUnavailable when there is none."""
    try:
        info = sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as e:
        raise MicUnavailable(f"no usable audio input device ({e}); list devices with `dpslm-stream mic "
                             "--list-devices` and pick one with --device") from None  # fmt: skip
    if info.get("max_input_channels", 0) < 1:
        raise MicUnavailable(f"device {info.get('name')!r} has no input channels; pick another with --device")
    return info.get("index", device), int(round(info["default_samplerate"]))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("mic", help="stream the microphone to a live units server and show units live",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_connection_args(p)
    p.add_argument("--device", default=None, help="input device name or index (default: the system default)")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--block-ms", type=float, default=20.0, help="capture block (default 20 ms)")
    p.add_argument("--json", type=Path, default=None, help="write the session's units (encode --json format)")
    return p


class LiveLine:
    """The one status line: newest units, lag, rtf, bitrate, buffered audio."""

    def __init__(self, out=sys.stdout, width: int = 24):
        self.out = out
        self.recent: deque[int] = deque(maxlen=width)
        self.stats: P.Stats | None = None
        self.lag: float | None = None
        self.n = 0

    def update(self, msg) -> None:
        if isinstance(msg, P.Unit):
            self.recent.append(msg.unit)
            self.lag = msg.lag_s
            self.n += 1
        elif isinstance(msg, P.Stats):
            self.stats = msg
        elif isinstance(msg, P.Error):
            print(f"\n[server {msg.code}] {msg.message}", file=sys.stderr, flush=True)
            return
        else:
            return
        if not self.out.isatty():  # a log or a pipe: no cursor control, just the units as they come
            if isinstance(msg, P.Unit):
                self.out.write(f"{msg.unit} ")
                self.out.flush()
            return
        s = self.stats
        lag = "-" if self.lag is None else f"{self.lag:4.2f}s"
        rtf = "-" if s is None else f"{s.rtf:4.2f}"
        rate = "-" if s is None else f"{s.bitrate:5.0f}"
        buf = "" if s is None or s.buffered_s < 0.5 else f"  BEHIND {s.buffered_s:.1f}s"
        units = " ".join(map(str, self.recent))
        self.out.write(f"\r\x1b[K{self.n:6d} units | lag {lag} | rtf {rtf} | {rate} bit/s{buf} | {units}")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    sd = import_sounddevice()
    if args.list_devices:
        print(sd.query_devices())
        return 0
    device = int(args.device) if args.device is not None and args.device.isdigit() else args.device
    device, sr = input_device(sd, device)
    try:
        return asyncio.run(_session(sd, device, sr, args))
    except KeyboardInterrupt:
        return 130


async def _session(sd, device, sr: int, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    captured: asyncio.Queue = asyncio.Queue()
    stop = asyncio.Event()

    def on_audio(indata, frames, time_info, status) -> None:  # PortAudio thread: hand the block to the loop
        loop.call_soon_threadsafe(captured.put_nowait, indata[:, 0].copy())

    async def blocks():
        t_end = None if args.seconds is None else time.monotonic() + args.seconds
        while not stop.is_set() and (t_end is None or time.monotonic() < t_end):
            try:
                yield await asyncio.wait_for(captured.get(), timeout=0.25)
            except asyncio.TimeoutError:
                continue

    line = LiveLine()
    units: list[P.Unit] = []
    end: P.EndMessage | None = None
    client = UnitsClient(args.url, sample_rate=sr, frame_ms=args.block_ms, **client_kwargs(args))
    try:
        await client.connect()
    except SessionError as e:
        print(f"dpslm-stream mic: {e}", file=sys.stderr)
        return 1
    r = client.ready
    print(f"session {r.session}: k={r.settings['k']} lambda={r.settings['lmbda']} preset={r.settings['preset']} "
          f"mode={r.settings['mode']}, capturing at {sr} Hz; Ctrl-C to stop"
          + ("  [RANDOM-weight models: units are not speech]" if r.random_weights else ""), file=sys.stderr)  # fmt: skip
    loop.add_signal_handler(2, stop.set)  # SIGINT: end the stream cleanly, then wait for the last units
    started = time.monotonic()
    try:
        with sd.InputStream(device=device, channels=1, samplerate=sr, dtype="float32",
                            blocksize=max(1, int(sr * args.block_ms / 1000)), callback=on_audio):  # fmt: skip
            async for msg in client.stream(blocks()):
                line.update(msg)
                if isinstance(msg, P.Unit):
                    units.append(msg)
                elif isinstance(msg, P.EndMessage):
                    end = msg
                    print(f"\nended ({msg.reason}): {msg.units} units, {msg.audio_s:.1f} s of audio, "
                          f"bitrate {msg.stats.get('bitrate', 0):.0f} bit/s, lag p95 {msg.stats.get('lag_p95_s')} s")  # fmt: skip
    except sd.PortAudioError as e:
        raise MicUnavailable(f"cannot open the input device: {e}") from None
    finally:
        loop.remove_signal_handler(2)
        await client.close()
    if args.json:
        from dpslm_stream.pipeline import EncodeResult

        res = EncodeResult(units=[u.unit for u in units], durations=[u.end_frame - u.start_frame for u in units],
                           num_frames=end.num_frames if end else (units[-1].end_frame if units else 0),
                           seconds=end.audio_s if end else time.monotonic() - started)  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"k": r.settings["k"], "lmbda": r.settings["lmbda"], "models": r.models,
                                         "random_weights": r.random_weights, "frame_rate": P.FRAME_RATE,
                                         "files": {"microphone": res.to_json(session=r.session)}}, indent=1))  # fmt: skip
    return 0
