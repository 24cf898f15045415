"""`dpslm-stream mic --url ws://HOST:PORT/v1/stream`: stream the microphone to a live units server.

Captures mono float32 at the input device's own sample rate (the server resamples; no client-side resampling) and
shows one live line: the newest units, the commit lag, the real-time factor, the live bitrate and how much audio
waits in the server's buffer. Ctrl-C (or --seconds) ends the stream; the remaining units arrive before the summary.

``--resynth`` asks for audio back: the server resynthesizes the units into 24 kHz speech (ELLA-V + WavTokenizer)
and streams it; it plays on the output device through a small jitter buffer (--jitter-ms), and the live line shows
the audio received and the resynthesis lag.

``--format opus`` (``--opus-bitrate``, default 24000) sends the microphone Opus-compressed, in 100 ms Ogg pages
(PyAV, ``pip install -e '.[opus]'``); the summary reports the uplink bytes.

Use headphones: the microphone would otherwise hear the playback. After
the end message the remaining audio plays out; a second Ctrl-C cuts it short.

Needs the optional ``sounddevice`` package and the PortAudio library:
    pip install -e '.[mic]' (in the dpslm-stream checkout), and PortAudio: apt-get install libportaudio2 (Debian/Ubuntu)
    or brew install portaudio (macOS)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections import deque
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from dpslm_stream import protocol as P
from dpslm_stream.errors import DPSLMError

from .api import SessionError, UnitsClient
from .stream import add_connection_args, client_kwargs, uplink_summary

INSTALL_HINT = ("the microphone client needs the 'sounddevice' package and the PortAudio library: "
                "pip install sounddevice (from a checkout: pip install -e '.[mic]'), and PortAudio: "
                "apt-get install libportaudio2 (Debian/Ubuntu) or brew install portaudio (macOS)")  # fmt: skip


class MicUnavailable(DPSLMError):
    """No usable microphone (or, with --resynth, speaker): sounddevice/PortAudio missing, or no such device."""


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


def output_device(sd, device: str | int | None) -> object:
    """The output device for --resynth playback; MicUnavailable when there is none."""
    try:
        info = sd.query_devices(device, kind="output")
    except (ValueError, sd.PortAudioError) as e:
        raise MicUnavailable(f"no usable audio output device for --resynth ({e}); list devices with `dpslm-stream "
                             "mic --list-devices` and pick one with --output-device") from None  # fmt: skip
    if info.get("max_output_channels", 0) < 1:
        raise MicUnavailable(f"device {info.get('name')!r} has no output channels; pick another with --output-device")
    return info.get("index", device)


def _device_arg(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


class JitterBuffer:
    """Resynthesized audio between the WebSocket (``push``, on the event loop) and the output device (``pull``, on
    the PortAudio thread). Playback starts once ``prebuffer`` samples wait (or the stream has finished); when it
    runs dry it plays silence and waits for ``prebuffer`` samples again (an underrun), so late audio is delayed
    rather than chopped into clicks."""

    def __init__(self, prebuffer: int):
        self.prebuffer = max(0, int(prebuffer))
        self._chunks: deque[np.ndarray] = deque()
        self._offset = 0  # samples of _chunks[0] already played
        self._size = 0  # samples waiting
        self._lock = threading.Lock()
        self.playing = False
        self.finished = False  # no more audio will come: play out what is left
        self.underruns = 0
        self.played = 0  # samples of audio (not silence) handed to the device

    def push(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if len(samples):
            with self._lock:
                self._chunks.append(samples)
                self._size += len(samples)

    def finish(self) -> None:
        with self._lock:
            self.finished = True

    @property
    def buffered(self) -> int:
        """Samples waiting to be played."""
        return self._size

    @property
    def drained(self) -> bool:
        return self.finished and self._size == 0

    def pull(self, n: int) -> np.ndarray:
        """``n`` samples for the device: audio while there is some, silence otherwise."""
        out = np.zeros(n, dtype=np.float32)
        with self._lock:
            if not self.playing:
                if self._size == 0 or (self._size < self.prebuffer and not self.finished):
                    return out
                self.playing = True
            filled = 0
            while filled < n and self._chunks:
                head = self._chunks[0]
                take = min(n - filled, len(head) - self._offset)
                out[filled : filled + take] = head[self._offset : self._offset + take]
                filled += take
                self._offset += take
                if self._offset == len(head):
                    self._chunks.popleft()
                    self._offset = 0
            self._size -= filled
            self.played += filled
            if filled < n:  # ran dry: rebuffer (after finish, the stream is simply over)
                self.playing = False
                if not self.finished:
                    self.underruns += 1
        return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("mic", help="stream the microphone to a live units server and show units live",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_connection_args(p)
    p.add_argument("--device", default=None, help="input device name or index (default: the system default)")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--block-ms", type=float, default=20.0, help="capture block (default 20 ms)")
    p.add_argument("--json", type=Path, default=None, help="write the session's units (encode --json format)")
    p.add_argument("--resynth", action="store_true", help="audio back: ask for the units resynthesized into 24 kHz "
                                                          "speech and play it (use headphones)")  # fmt: skip
    p.add_argument("--resynth-options", type=json.loads, default=None, metavar="JSON",
                   help='resynthesis options (implies --resynth), e.g. \'{"holdback": 2, "left_context": 32}\'')
    p.add_argument("--output-device", default=None, help="--resynth: output device name or index "
                                                         "(default: the system default)")  # fmt: skip
    p.add_argument("--jitter-ms", type=float, default=150.0,
                   help="--resynth: audio buffered before playback starts and after an underrun (default 150 ms)")
    return p


class LiveLine:
    """The one status line: newest units, lag, rtf, bitrate, buffered audio; with --resynth also the audio received
    and the resynthesis lag."""

    def __init__(self, out=sys.stdout, width: int = 24, resynth: bool = False):
        self.out = out
        self.recent: deque[int] = deque(maxlen=width)
        self.stats: P.Stats | None = None
        self.lag: float | None = None
        self.n = 0
        self.resynth = resynth
        self.audio_samples = 0  # resynthesized 24 kHz samples received
        self._drawn = 0.0

    def update(self, msg) -> None:
        if isinstance(msg, P.Unit):
            self.recent.append(msg.unit)
            self.lag = msg.lag_s
            self.n += 1
        elif isinstance(msg, P.AudioChunk):
            self.audio_samples += len(msg.samples)
            if time.monotonic() - self._drawn < 0.1:  # chunks come often: redraw at most ten times a second
                return
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
        audio = ""
        if self.resynth:
            rlag = "-" if s is None or s.resynth_lag_s is None else f"{s.resynth_lag_s:4.2f}s"
            audio = f" | audio {self.audio_samples / P.RESYNTH_SAMPLE_RATE:5.1f}s rlag {rlag}"
        units = " ".join(map(str, self.recent))
        self.out.write(f"\r\x1b[K{self.n:6d} units | lag {lag} | rtf {rtf} | {rate} bit/s{buf}{audio} | {units}")
        self.out.flush()
        self._drawn = time.monotonic()


def resynth_options(args: argparse.Namespace) -> dict | None:
    """start.resynth from --resynth / --resynth-options (None: units only)."""
    options = getattr(args, "resynth_options", None)
    if options is not None and not isinstance(options, dict):
        raise DPSLMError(f"--resynth-options must be a JSON object, got {json.dumps(options)}")
    if options is None and not getattr(args, "resynth", False):
        return None
    return dict(options or {})


def resynth_summary(totals: dict, jitter: JitterBuffer | None = None) -> str:
    """The end message's resynthesis totals as one line."""

    def num(name: str) -> str:
        value = totals.get(name)
        return "-" if value is None else f"{value:.2f}"

    text = (f"audio back: {num('audio_seconds')} s in {totals.get('chunks', '-')} chunks, first audio after "
            f"{num('first_audio_latency_s')} s, unit-to-audio latency mean {num('latency_mean_s')} s, max "
            f"{num('latency_max_s')} s, resynthesis real-time factor {num('real_time_factor')}")  # fmt: skip
    if jitter is not None:
        text += f", playback underruns {jitter.underruns}"
    if totals.get("error"):
        text += f"; resynthesis stopped: {totals['error']}"
    return text


def run(args: argparse.Namespace) -> int:
    from dpslm_stream.cli import output_folder

    resynth = resynth_options(args)
    client_kwargs(args)  # the URL and options, checked before the microphone opens
    output_folder(getattr(args, "json", None))
    sd = import_sounddevice()
    if args.list_devices:
        print(sd.query_devices())
        return 0
    device, sr = input_device(sd, _device_arg(args.device))
    out_device = output_device(sd, _device_arg(getattr(args, "output_device", None))) if resynth is not None else None
    try:
        return asyncio.run(_session(sd, device, sr, args, resynth, out_device))
    except KeyboardInterrupt:
        return 130


async def _session(sd, device, sr: int, args: argparse.Namespace, resynth: dict | None = None,
                   out_device=None) -> int:  # fmt: skip
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

    jitter_ms = getattr(args, "jitter_ms", 150.0)
    jitter = None if resynth is None else JitterBuffer(int(P.RESYNTH_SAMPLE_RATE * jitter_ms / 1000))

    def on_output(outdata, frames, time_info, status) -> None:  # PortAudio thread: the jitter buffer feeds it
        outdata[:, 0] = jitter.pull(frames)

    line = LiveLine(resynth=jitter is not None)
    units: list[P.Unit] = []
    end: P.EndMessage | None = None
    client = UnitsClient(args.url, sample_rate=sr, frame_ms=args.block_ms, resynth=resynth, **client_kwargs(args))
    try:
        await client.connect()
    except SessionError as e:
        print(f"dpslm-stream mic: {e}", file=sys.stderr)
        return 1
    r = client.ready
    print(f"session {r.session}: k={r.settings['k']} lambda={r.settings['lmbda']} preset={r.settings['preset']} "
          f"mode={r.settings['mode']}, capturing at {sr} Hz; Ctrl-C to stop"
          + ("  [RANDOM-weight models: units are not speech]" if r.random_weights else ""), file=sys.stderr)  # fmt: skip
    if jitter is not None:
        print(f"audio back: resynthesized speech plays at {P.RESYNTH_SAMPLE_RATE} Hz after a {jitter_ms:.0f} ms "
              "jitter buffer; use headphones", file=sys.stderr)  # fmt: skip
    if r.listen_token:
        print(f"listeners subscribe with session {r.session} and listen token {r.listen_token}", file=sys.stderr)
    loop.add_signal_handler(2, stop.set)  # SIGINT: end the stream cleanly, then wait for the last units
    started = time.monotonic()
    try:
        with ExitStack() as devices:
            if jitter is not None:
                try:
                    devices.enter_context(sd.OutputStream(device=out_device, channels=1, dtype="float32",
                                                          samplerate=P.RESYNTH_SAMPLE_RATE,
                                                          callback=on_output))  # fmt: skip
                except sd.PortAudioError as e:
                    raise MicUnavailable(f"cannot open the output device at {P.RESYNTH_SAMPLE_RATE} Hz for "
                                         f"--resynth: {e}") from None  # fmt: skip
            try:
                devices.enter_context(sd.InputStream(device=device, channels=1, samplerate=sr, dtype="float32",
                                                     blocksize=max(1, int(sr * args.block_ms / 1000)),
                                                     callback=on_audio))  # fmt: skip
            except sd.PortAudioError as e:
                raise MicUnavailable(f"cannot open the input device: {e}") from None
            async for msg in client.stream(blocks()):
                line.update(msg)
                if isinstance(msg, P.Unit):
                    units.append(msg)
                elif isinstance(msg, P.AudioChunk):
                    if jitter is not None:
                        jitter.push(msg.samples)
                elif isinstance(msg, P.EndMessage):
                    end = msg
                    print(f"\nended ({msg.reason}): {msg.units} units, {msg.audio_s:.1f} s of audio, "
                          f"bitrate {msg.stats.get('bitrate', 0):.0f} bit/s, lag p95 {msg.stats.get('lag_p95_s')} s; "
                          f"uplink {uplink_summary(client.uplink_bytes, msg.audio_s, args.format)}")  # fmt: skip
                    if msg.resynth:
                        print(resynth_summary(msg.resynth, jitter), file=sys.stderr)
            if jitter is not None and jitter.buffered:  # the end comes after the last chunk: let it play out
                jitter.finish()
                cut = asyncio.Event()
                loop.add_signal_handler(2, cut.set)  # a (second) Ctrl-C cuts the play-out short
                print(f"playing the last {jitter.buffered / P.RESYNTH_SAMPLE_RATE:.1f} s of audio back "
                      "(Ctrl-C to skip)", file=sys.stderr)  # fmt: skip
                deadline = time.monotonic() + jitter.buffered / P.RESYNTH_SAMPLE_RATE + 1.0
                while not jitter.drained and not cut.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
    finally:
        loop.remove_signal_handler(2)
        await client.close()
    if args.json:
        from dpslm_stream.pipeline import EncodeResult

        res = EncodeResult(units=[u.unit for u in units], durations=[u.end_frame - u.start_frame for u in units],
                           num_frames=end.num_frames if end else (units[-1].end_frame if units else 0),
                           seconds=end.audio_s if end else time.monotonic() - started)  # fmt: skip
        args.json.write_text(json.dumps({"k": r.settings["k"], "lmbda": r.settings["lmbda"], "models": r.models,
                                         "random_weights": r.random_weights, "frame_rate": P.FRAME_RATE,
                                         "files": {"microphone": res.to_json(session=r.session)}}, indent=1))  # fmt: skip
    return 0
