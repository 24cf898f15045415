"""`dpslm-stream live`: the live demo in one command. Starts the units server in this process, streams the bundled
speech sample through it in real time (or the microphone with --mic), and shows the units as they commit, with the
commit lag, real-time factor and bitrate. Everything goes through the real server and protocol on loopback.

Works offline on a fresh machine: it uses the released checkpoints when they are in the torch.hub cache
(`dpslm-stream download --encoder-only`) and otherwise the tiny random-weight set (units are then not speech).
--keep-serving leaves the server up afterwards, e.g. for the browser page it prints. --resynth OUT.wav also asks
the server to resynthesize the units (ELLA-V + WavTokenizer) and writes the 24 kHz audio that streams back.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from dpslm_stream import SAMPLE_WAV, hub
from dpslm_stream import protocol as P

from .api import SessionError, UnitsClient, chunked
from .mic import LiveLine

def default_models() -> str:
    """release when the encoder-side checkpoints of the default pair are cached, else tiny."""
    return "release" if hub.release_cached(encoder_only=True) else "tiny"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("live", help="live demo: serve + stream the bundled sample (or --mic) through the real "
                                           "server, units shown as they commit", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("input", nargs="?", type=Path, default=None, help="audio file (default: the bundled sample)")
    p.add_argument("--mic", action="store_true", help="stream the microphone instead (needs sounddevice)")
    p.add_argument("--models", default=None, help="release | tiny | DIR (default: release if cached, else tiny)")
    p.add_argument("--preset", default="low-latency", help="encoder preset (low-latency, balanced, quality)")
    p.add_argument("--mode", default="cached", choices=P.ENCODER_MODES, help="encoder mode (default cached)")
    p.add_argument("--score", action="store_true", help="ULM log-probabilities per unit")
    p.add_argument("--port", type=int, default=0, help="server port (default: any free port)")
    p.add_argument("--seconds", type=float, default=None, help="--mic: stop after this long")
    p.add_argument("--keep-serving", action="store_true", help="keep the server up afterwards (Ctrl-C to stop)")
    p.add_argument("--resynth", type=Path, default=None, metavar="OUT.wav",
                   help="also resynthesize the units on the server and write the audio that streams back here")
    return p


async def _stream_file(url: str, path: Path, args: argparse.Namespace) -> P.EndMessage:
    from dpslm_stream.audio import load_audio

    from dpslm_stream.cli import note

    wav, sr = load_audio(path, notify=note)
    line = LiveLine()
    audio = []
    resynth = {} if args.resynth else None
    async with UnitsClient(url, sample_rate=sr, preset=args.preset, score=args.score, options={"mode": args.mode},
                           resynth=resynth) as client:  # fmt: skip
        r = client.ready
        print(f"streaming {path.name} ({len(wav) / sr:.1f} s at {sr} Hz) in real time: session {r.session}, "
              f"k={r.settings['k']} lambda={r.settings['lmbda']}, {r.settings['mode']}/{r.settings['preset']}")  # fmt: skip
        async for msg in client.stream(chunked(wav, sr, 20), realtime=True):
            if isinstance(msg, P.AudioChunk):
                audio.append(msg.samples)
            else:
                line.update(msg)
    if args.resynth:
        from dpslm_stream.audio import save_wav

        import numpy as np

        samples = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        save_wav(args.resynth, samples, P.RESYNTH_SAMPLE_RATE)
        r = client.end_message.resynth or {}
        first = r.get("first_audio_latency_s")
        print(f"\nresynthesized {len(samples) / P.RESYNTH_SAMPLE_RATE:.2f} s of audio from the units (first audio "
              f"{'n/a' if first is None else f'{first:.2f} s'} after the first unit; resynthesis real-time factor "
              f"{r.get('real_time_factor', 0):.2f}); wrote {args.resynth}")  # fmt: skip
    return client.end_message


def run(args: argparse.Namespace) -> int:
    from dpslm_stream.server.app import ServerConfig, ServerThread

    from dpslm_stream.server.cli import check_port_free

    from dpslm_stream.cli import output_folder

    # Everything that can fail fast is checked before the server loads its models.
    check_port_free("127.0.0.1", args.port)
    output_folder(args.resynth)
    if args.mic:
        from .mic import import_sounddevice, input_device

        input_device(import_sounddevice(), None)  # MicUnavailable: says how to install PortAudio / sounddevice
    elif args.input is not None:
        from dpslm_stream.audio import load_audio

        load_audio(args.input)  # a missing or unreadable file fails now, not after the server started
    models = args.models or default_models()
    path = args.input or SAMPLE_WAV
    print(f"== dpslm-stream live: models {models}"
          + (" (RANDOM weights: the units check the plumbing, they are not speech)"
             if hub.ModelSet(models).is_random else ""))  # fmt: skip
    started = time.perf_counter()
    with ServerThread(ServerConfig(port=args.port, models=models)) as srv:
        print(f"server up in {time.perf_counter() - started:.1f} s: {srv.url}  (browser page: {srv.http_url}/)")
        try:
            if args.mic:
                from .mic import run as mic_run

                mic_args = argparse.Namespace(url=srv.url, token=None, k=None, lmbda=None, preset=args.preset,
                                              mode=args.mode, score=args.score, format="pcm16", device=None,
                                              list_devices=False, seconds=args.seconds, block_ms=20.0, json=None,
                                              reconnect=True)  # fmt: skip
                code = mic_run(mic_args)
            else:
                end = asyncio.run(_stream_file(srv.url, path, args))
                s = end.stats
                print(f"\n{end.units} units in {end.audio_s:.2f} s of audio ({s['units_per_s']:.1f} units/s, "
                      f"{s['bitrate']:.0f} bit/s); commit lag p95 {s['lag_p95_s']} s; real-time factor {s['rtf']:.3f}")  # fmt: skip
                code = 0
            if args.keep_serving:
                print(f"serving until Ctrl-C: {srv.http_url}/")
                while True:
                    time.sleep(3600)
        except SessionError as e:
            print(f"dpslm-stream live: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return code
