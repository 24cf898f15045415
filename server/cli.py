"""`dpslm-stream serve`: run the live units server until SIGTERM/SIGINT, which drain it gracefully."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys

from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput

from .app import Server
from .config import ServerConfig


def _pair(text: str) -> tuple[int, int]:
    try:
        k, lmbda = text.split(":")
        return int(k), int(lmbda)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:LAMBDA such as 500:4500, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = ServerConfig()
    p = subparsers.add_parser("serve", help="live units server: WebSocket sessions, /healthz, /metrics, browser page",
                              description=__doc__)  # fmt: skip
    p.add_argument("--host", default=d.host, help=f"interface to listen on (default {d.host}; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port}; 0 = any free port)")
    p.add_argument("--models", default=d.models, metavar="release|tiny|DIR", help="model set (default release)")
    p.add_argument("--device", default=d.device, help="torch device of the model worker (cpu, cuda, ...)")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--pairs", type=_pair, nargs="+", default=None, metavar="K:LAMBDA",
                   help="(k, lambda) pairs sessions may choose (default: the encoder's default set)")
    p.add_argument("--presets", nargs="+", default=None, metavar="PRESET",
                   help="window presets clients may choose (default: all: low-latency balanced quality)")
    p.add_argument("--modes", nargs="+", default=list(d.modes), choices=P.ENCODER_MODES,
                   help="encoder modes clients may choose (default: all; sliding costs several times cached)")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help="concurrent sessions; more get 'busy'")
    p.add_argument("--token", default=None, help="require this token from clients (?token= or Authorization: "
                                                 "Bearer); default $DPSLM_STREAM_TOKEN, unset = no token")  # fmt: skip
    p.add_argument("--allow-origin", dest="allowed_origins", action="append", default=[], metavar="ORIGIN",
                   help="browser Origin allowed to connect besides this server's own page (repeatable; '*' = any)")
    p.add_argument("--start-timeout", type=float, default=d.start_timeout_s,
                   help=f"seconds a connection may take to send start or subscribe (default {d.start_timeout_s:g})")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                   help="seconds a started client may send nothing (time the server does not read is not counted)")
    p.add_argument("--max-session-time", type=float, default=d.max_session_s, help="seconds per session")
    p.add_argument("--max-full-audio", type=float, default=d.max_full_s,
                   help="seconds of audio per session in mode full (which keeps the whole stream in memory)")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help=f"largest audio frame (default {d.max_message_bytes})")
    p.add_argument("--max-resampler-taps", type=int, default=d.max_resampler_taps,
                   help="largest resampling kernel a client's sample rate may need (elements; odd rates such as "
                        f"47999 Hz need hundreds of millions; default {d.max_resampler_taps:,} admits every common rate)")
    p.add_argument("--max-text-bytes", type=int, default=d.max_text_bytes,
                   help=f"largest text (JSON) frame, refused before parsing (default {d.max_text_bytes})")
    p.add_argument("--max-json-depth", type=int, default=d.max_json_depth,
                   help=f"deepest JSON nesting, refused before parsing (default {d.max_json_depth})")
    p.add_argument("--max-buffer", type=float, default=d.max_buffer_s,
                   help=f"seconds of received, not yet encoded audio per session (default {d.max_buffer_s:g})")
    p.add_argument("--max-buffer-bytes", type=int, default=d.max_buffer_bytes,
                   help=f"the same buffer in bytes of float32 samples (default {d.max_buffer_bytes})")
    p.add_argument("--max-outgoing-bytes", type=int, default=d.max_outgoing_bytes,
                   help=f"bytes queued for a client that does not read before it is dropped (default {d.max_outgoing_bytes})")
    p.add_argument("--max-left", type=int, default=d.max_left, help=f"largest options.left, frames (default {d.max_left})")
    p.add_argument("--min-hop", type=int, default=d.min_hop, help=f"smallest options.hop, frames (default {d.min_hop})")
    p.add_argument("--max-hop", type=int, default=d.max_hop, help=f"largest options.hop, frames (default {d.max_hop})")
    p.add_argument("--max-lookahead", type=int, default=d.max_lookahead,
                   help=f"largest options.lookahead, frames (default {d.max_lookahead})")
    p.add_argument("--max-lag", type=int, default=d.max_lag, help=f"largest options.max_lag, frames (default {d.max_lag})")
    p.add_argument("--stall-timeout", type=float, default=d.stall_timeout_s,
                   help="seconds a full buffer may stay full before buffer_full (0 = refuse at once)")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, help="SIGTERM: seconds to finish sessions")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up stream at start-up")
    p.add_argument("--no-resynth", action="store_true",
                   help="offer no live resynthesis (start.resynth and listeners get units only / an error)")
    p.add_argument("--resynth-device", default=None, help="device of the resynthesis worker (default: --device)")
    p.add_argument("--resynth-dtype", default=d.resynth_dtype, choices=("float32", "bfloat16", "float16"),
                   help="ELLA-V dtype on the resynthesis worker (bf16/fp16 for a GPU)")
    p.add_argument("--precision", default=d.precision, choices=("exact", "fast"),
                   help="resynthesis models: exact (float32, default) or fast (int8/bf16 kernels picked for this "
                        "machine; printed at start-up and reported in ready.settings.resynth.precision)")
    p.add_argument("--max-listeners", type=int, default=d.max_listeners, help="listeners per sender session")
    p.add_argument("--max-resynth-lag", type=float, default=d.max_resynth_lag_s,
                   help="seconds a session's resynthesis may fall behind before it is stopped (the units go on)")
    p.add_argument("--max-exact-resynth", type=float, default=d.max_exact_resynth_s,
                   help="seconds of input a resynthesis with unbounded context (resynth.left_context or "
                        "vocoder_left_context null, the exact setting) may cover before it is ended (the units go on; "
                        f"0 = refuse it at start; default {d.max_exact_resynth_s:g})")
    p.add_argument("--open-timeout", type=float, default=d.open_timeout_s,
                   help="seconds a session's models may take to open before it ends with internal_error "
                        f"(default {d.open_timeout_s:g})")
    p.add_argument("--resume-grace", type=float, default=d.resume_grace_s,
                   help="seconds a sender session whose connection dropped without end is kept for the client to "
                        f"resume it (its slot stays taken; 0 = no resume; default {d.resume_grace_s:g})")
    p.add_argument("--resume-outbox-bytes", type=int, default=d.resume_outbox_bytes,
                   help="per resumable session: bytes of recent units/audio kept for a replay, and bytes it may "
                        "produce while parked before it ends (at most half of --max-outgoing-bytes; default "
                        f"{d.resume_outbox_bytes})")  # fmt: skip
    p.add_argument("--allow-tf32", action="store_true",
                   help="CUDA: let matmuls and convolutions use TF32 (faster on Ampere and later; results then "
                        "differ from the exact fp32 path at ~1e-3; default off)")  # fmt: skip
    p.add_argument("--backend", default="inprocess", choices=("inprocess", "ray"),
                   help="inprocess (default): this process serves, models on worker threads; ray: the service as a "
                        "Ray Serve application (pip install -e '.[ray]' in the dpslm-stream checkout)")  # fmt: skip
    p.add_argument("--ray-address", default=None, help="--backend ray: join this Ray cluster (default: start a "
                                                       "local Ray)")  # fmt: skip
    p.add_argument("--encoder-shards", type=int, default=1, help="--backend ray: encoder applications (one replica, "
                                                                  "e.g. one GPU, each); sessions are pinned to one")  # fmt: skip
    p.add_argument("--resynth-shards", type=int, default=1, help="--backend ray: resynthesis applications (one "
                                                                  "replica each); sessions are pinned to one")  # fmt: skip
    p.add_argument("--encoder-gpus", type=float, default=None, metavar="F",
                   help="--backend ray: GPUs each encoder shard asks Ray for (default: every CUDA shard shares one "
                        "GPU, e.g. 0.5 each for one encoder and one resynthesis shard)")  # fmt: skip
    p.add_argument("--resynth-gpus", type=float, default=None, metavar="F",
                   help="--backend ray: GPUs each resynthesis shard asks Ray for (default: as --encoder-gpus)")
    p.add_argument("--gateway-resource", default=None, metavar="NAME",
                   help="--backend ray: a Ray custom resource that pins the Gateway (the WebSocket listener) to the "
                        "node(s) that have it, e.g. the one behind your load balancer")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed flags (ServerConfig validates every value and names the flag)."""
    from dpslm_stream.stream.encoder import PRESETS

    unknown = sorted(set(args.presets or ()) - set(PRESETS))
    if unknown:
        raise InvalidInput(f"unknown preset(s) {unknown}; expected some of {sorted(PRESETS)}")
    return ServerConfig(
        host=args.host, port=args.port, models=args.models, device=args.device, dtype=args.dtype,
        pairs=tuple(args.pairs) if args.pairs else None, max_sessions=args.max_sessions,
        presets=tuple(args.presets) if args.presets else None, modes=tuple(args.modes),
        token=args.token or os.environ.get("DPSLM_STREAM_TOKEN") or None,
        allowed_origins=tuple(args.allowed_origins), start_timeout_s=args.start_timeout,
        idle_timeout_s=args.idle_timeout, max_session_s=args.max_session_time, max_full_s=args.max_full_audio,
        max_message_bytes=args.max_message_bytes, max_text_bytes=args.max_text_bytes,
        max_resampler_taps=args.max_resampler_taps,
        max_json_depth=args.max_json_depth, max_buffer_s=args.max_buffer, max_buffer_bytes=args.max_buffer_bytes,
        max_outgoing_bytes=args.max_outgoing_bytes, max_left=args.max_left, min_hop=args.min_hop,
        max_hop=args.max_hop, max_lookahead=args.max_lookahead, max_lag=args.max_lag,
        stall_timeout_s=args.stall_timeout, drain_timeout_s=args.drain_timeout, warmup=not args.no_warmup,
        resynth=not args.no_resynth, resynth_device=args.resynth_device, resynth_dtype=args.resynth_dtype,
        precision=args.precision, allow_tf32=args.allow_tf32,
        max_listeners=args.max_listeners, max_resynth_lag_s=args.max_resynth_lag,
        max_exact_resynth_s=args.max_exact_resynth, open_timeout_s=args.open_timeout,
        resume_grace_s=args.resume_grace, resume_outbox_bytes=args.resume_outbox_bytes,
    )  # fmt: skip


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then drain it."""
    server = Server(config)
    if server.random_weights:
        print(f"note: model set '{server.models_name}' has RANDOM weights; units are plumbing checks, not speech.",
              file=sys.stderr)  # fmt: skip
    try:
        await server.start()
    except OSError as e:  # the port was taken between check_port_free and now
        raise InvalidInput(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}; pick another port with "
                           f"--port N (--port 0 = any free port)") from None  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown)
    host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    pairs = ", ".join(f"{k}:{lm}" for k, lm in server.pairs)
    print(f"dpslm-stream serving (k:lambda {pairs}; default {server.default_pair[0]}:{server.default_pair[1]}; "
          f"up to {config.max_sessions} sessions)\n"
          f"  WebSocket  ws://{host}:{server.port}{P.WS_PATH}\n"
          f"  page       http://{host}:{server.port}{P.PAGE_PATH}\n"
          f"  health     http://{host}:{server.port}{P.HEALTH_PATH}   metrics http://{host}:{server.port}{P.METRICS_PATH}",
          flush=True)  # fmt: skip
    await server.wait_closed()
    print("dpslm-stream: drained and stopped", file=sys.stderr, flush=True)


def check_port_free(host: str, port: int) -> None:
    """Fail at once, before any model is loaded, when host:port cannot be listened on (in use, no permission, no
    such interface). The server binds the same way (SO_REUSEADDR, as asyncio does on Unix); port 0 is always free."""
    import socket

    if port == 0:
        return
    if not 0 < port < 65536:
        raise InvalidInput(f"--port must be in 1..65535 (or 0 for any free port), got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidInput(f"cannot listen on {host!r}: {e.strerror}; use an address of this machine "
                           f"(127.0.0.1, 0.0.0.0)") from None  # fmt: skip
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            hint = ("another process listens there (a running `dpslm-stream serve`?)" if e.errno == errno.EADDRINUSE
                    else e.strerror)  # fmt: skip
            raise InvalidInput(f"cannot listen on {host}:{port}: {hint}; pick another port with --port N "
                               f"(--port 0 = any free port)") from None  # fmt: skip


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection is too much
    config = config_from_args(args)
    check_port_free(config.host, config.port)  # before the models load: a busy port fails in a second, not a minute
    if args.backend == "ray":
        return serve_on_ray(config, args)
    asyncio.run(serve(config))
    return 0


def serve_on_ray(config: ServerConfig, args: argparse.Namespace) -> int:
    """--backend ray: the whole service as one Ray Serve application (Gateway + Encoder and Resynth shards); this
    process only deploys it, waits for SIGTERM/SIGINT, and then deletes it (the Gateway drains its sessions)."""
    import threading

    from .ray_backend import import_ray, run_service

    _, serve = import_ray()  # a clear error (DPSLMError) when the ray extra is not installed

    handle, address = run_service(config, address=args.ray_address, encoder_shards=args.encoder_shards,
                                  resynth_shards=args.resynth_shards, gateway_resource=args.gateway_resource,
                                  encoder_gpus=args.encoder_gpus, resynth_gpus=args.resynth_gpus)  # fmt: skip
    print(f"dpslm-stream serving on Ray Serve (application 'dpslm-stream': Gateway, {args.encoder_shards} encoder "
          f"and {args.resynth_shards if config.resynth else 0} resynthesis shard(s))\n"
          f"  WebSocket  {address['url']}\n  page       {address['http_url']}{P.PAGE_PATH}", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # short waits: the handler runs between them
        pass
    serve.delete("dpslm-stream")
    print("dpslm-stream: drained and stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpslm-stream")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    from dpslm_stream.errors import DPSLMError

    try:
        return run(args)
    except DPSLMError as e:
        print(f"dpslm-stream serve: error: {e}", file=sys.stderr)
        return 1
