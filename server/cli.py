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
from .config import CONFIG_FIELDS, DTYPES, MODEL_THREADS, PRECISIONS, ServerConfig, flag


def _pair(text: str) -> tuple[int, int]:
    try:
        k, lmbda = text.split(":")
        return int(k), int(lmbda)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:LAMBDA such as 500:4500, got {text!r}") from None


# Older spellings of config flags, still accepted (the flag of a config field is its name with dashes).
ALIASES = {"start_timeout_s": ("--start-timeout",), "idle_timeout_s": ("--idle-timeout",),
           "max_session_s": ("--max-session-time",), "max_full_s": ("--max-full-audio",),
           "max_buffer_s": ("--max-buffer",), "stall_timeout_s": ("--stall-timeout",),
           "drain_timeout_s": ("--drain-timeout",), "max_resynth_lag_s": ("--max-resynth-lag",),
           "open_timeout_s": ("--open-timeout",), "max_exact_resynth_s": ("--max-exact-resynth",),
           "resume_grace_s": ("--resume-grace",), "transmit_tables": ("--transmit-table",),
           "allowed_origins": ("--allow-origin",)}  # fmt: skip


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = ServerConfig()
    p = subparsers.add_parser("serve", help="live units server: WebSocket sessions, /healthz, /metrics, browser page",
                              description=__doc__)  # fmt: skip

    def field(name: str, **kwargs) -> None:
        """The flag of config field ``name`` (and its older spellings); ``--no-NAME`` too for a bool field."""
        if isinstance(getattr(d, name), bool):
            kwargs.setdefault("action", argparse.BooleanOptionalAction)
        p.add_argument(flag(name), *ALIASES.get(name, ()), dest=name, default=kwargs.pop("default", getattr(d, name)),
                       **kwargs)  # fmt: skip

    field("host", help=f"interface to listen on (default {d.host}; 0.0.0.0 for all)")
    field("port", type=int, help=f"TCP port (default {d.port}; 0 = any free port)")
    field("models", metavar="release|tiny|DIR", help="model set (default release)")
    field("device", help="torch device of the encoder (and of resynthesis without --resynth-device): cpu, cuda, ...")
    field("dtype", choices=DTYPES)
    field("pairs", type=_pair, nargs="+", metavar="K:LAMBDA",
          help="(k, lambda) pairs sessions may choose (default: the encoder's default set)")
    field("presets", nargs="+", metavar="PRESET",
          help="window presets clients may choose (default: all: low-latency balanced quality)")
    field("modes", nargs="+", default=list(d.modes), choices=P.ENCODER_MODES,
          help="encoder modes clients may choose (default: all; sliding costs several times cached)")
    field("max_sessions", type=int, help="concurrent sessions; more get 'busy'")
    field("token", help="require this token from clients (?token= or Authorization: Bearer); default "
                        "$DPSLM_STREAM_TOKEN, unset = no token")  # fmt: skip
    field("allowed_origins", action="append", default=[], metavar="ORIGIN",
          help="browser Origin allowed to connect besides this server's own page (repeatable; '*' = any)")
    field("start_timeout_s", type=float,
          help=f"seconds a connection may take to send start or subscribe (default {d.start_timeout_s:g})")
    field("idle_timeout_s", type=float,
          help="seconds a started client may send nothing (time the server does not read is not counted)")
    field("max_session_s", type=float, help="seconds per session")
    field("max_full_s", type=float,
          help="seconds of audio per session in mode full (which keeps the whole stream in memory)")
    field("max_message_bytes", type=int, help=f"largest audio frame (default {d.max_message_bytes})")
    field("max_resampler_taps", type=int,
          help="largest resampling kernel a client's sample rate may need (elements; odd rates such as 47999 Hz "
               f"need hundreds of millions; default {d.max_resampler_taps:,} admits every common rate)")
    field("max_text_bytes", type=int,
          help=f"largest text (JSON) frame, refused before parsing (default {d.max_text_bytes})")
    field("max_json_depth", type=int, help=f"deepest JSON nesting, refused before parsing (default {d.max_json_depth})")
    field("max_buffer_s", type=float,
          help=f"seconds of received, not yet encoded audio per session (default {d.max_buffer_s:g})")
    field("max_buffer_bytes", type=int,
          help=f"the same buffer in bytes of float32 samples (default {d.max_buffer_bytes})")
    field("max_outgoing_bytes", type=int,
          help=f"bytes queued for a client that does not read before it is dropped (default {d.max_outgoing_bytes})")
    field("max_left", type=int, help=f"largest options.left, frames (default {d.max_left})")
    field("min_hop", type=int, help=f"smallest options.hop, frames (default {d.min_hop})")
    field("max_hop", type=int, help=f"largest options.hop, frames (default {d.max_hop})")
    field("max_lookahead", type=int, help=f"largest options.lookahead, frames (default {d.max_lookahead})")
    field("max_lag", type=int, help=f"largest options.max_lag, frames (default {d.max_lag})")
    field("stall_timeout_s", type=float,
          help="seconds a full buffer may stay full before buffer_full (0 = refuse at once)")
    field("stats_interval_s", type=float, help=f"seconds between a session's stats messages (default "
                                               f"{d.stats_interval_s:g})")  # fmt: skip
    field("drain_timeout_s", type=float, help="SIGTERM: seconds to finish sessions")
    field("quantum_s", type=float,
          help=f"seconds of audio per session per encoder round, for fairness (default {d.quantum_s:g})")
    field("warmup", help="run a short stream through the models before accepting clients (default on; --no-warmup "
                         "skips it)")  # fmt: skip
    field("busy_retry_after_s", type=float,
          help=f"seconds a client told 'busy' is asked to wait before retrying (default {d.busy_retry_after_s:g})")
    field("resynth", help="offer live resynthesis (default on; with --no-resynth start.resynth and listeners get "
                          "units only / an error)")  # fmt: skip
    field("resynth_device", help="device of the resynthesis worker (default: --device)")
    field("resynth_dtype", choices=DTYPES, help="ELLA-V dtype on the resynthesis worker (bf16/fp16 for a GPU)")
    field("precision", choices=PRECISIONS,
          help="resynthesis models: exact (float32, default) or fast (int8/bf16 kernels picked for this machine; "
               "printed at start-up and reported in ready.settings.resynth.precision)")
    field("compile_decode",
          help="with --precision fast: run ELLA-V's decode step through torch.compile (about 10%% faster per step "
               "on CPU; compiled during the start-up warm-up, 10-45 s with torch's compile cache warm, minutes "
               "without, or by the first sessions with --no-warmup; needs a C++ compiler)")  # fmt: skip
    field("model_threads", choices=MODEL_THREADS,
          help="shared: the resynthesis worker runs on the encoder's thread, yielding to it between decode steps (one "
               "OpenMP thread team: faster on a CPU); separate: a thread of its own (its own CUDA stream on a GPU); "
               "auto (default): shared when both run on the CPU; the in-process backend only")  # fmt: skip
    field("encoder_precision", choices=PRECISIONS,
          help="streaming encoder (cached/sliding modes): exact (float32, default) or fast (its block "
               "linears in int8 through fbgemm on x86 CPUs without bf16 units, bf16 where there are; "
               "printed at start-up); units then differ slightly from offline")
    field("transmit_tables", action="append", default=[], metavar="FILE",
          help="a unit table (`codec fit`) for start.transmit coder 'table', shipped inside each stream's "
               "header; repeatable, one per k; its k must be a served pair's")  # fmt: skip
    field("max_listeners", type=int, help="listeners per sender session")
    field("max_loaded_pairs", type=int, metavar="N",
          help="(k, lambda) pairs whose unit LM / ELLA-V are loaded at once, the default pair and --pairs included "
               "(~0.8 GB each per model at released size); a start for another pair unloads the least recently used "
               "one no session holds, or is refused with busy when all are held; default 3)")
    field("pair_min_idle_s", type=float, metavar="S",
          help="a loaded pair is unloaded for another only once no session held it for S seconds, so that clients "
               "cannot keep the server loading models (default 30; 0: at once)")
    field("max_resynth_lag_s", type=float,
          help="seconds a session's resynthesis may fall behind before it is stopped (the units go on)")
    field("max_exact_resynth_s", type=float,
          help="seconds of input a resynthesis with unbounded context (resynth.left_context or vocoder_left_context "
               "null, the exact setting) may cover before it is ended (the units go on; 0 = refuse it at start; "
               f"default {d.max_exact_resynth_s:g})")
    field("open_timeout_s", type=float,
          help=f"seconds a session's models may take to open before it ends with internal_error "
               f"(default {d.open_timeout_s:g})")
    field("resume_grace_s", type=float,
          help="seconds a sender session whose connection dropped without end is kept for the client to "
               f"resume it (its slot stays taken; 0 = no resume; default {d.resume_grace_s:g})")
    field("resume_outbox_bytes", type=int,
          help="per resumable session: bytes of recent units/audio kept for a replay, and bytes it may "
               "produce while parked before it ends (a replay, at most twice this, is not counted against "
               "--max-outgoing-bytes; default "
               f"{d.resume_outbox_bytes})")  # fmt: skip
    field("allow_tf32", help="CUDA: let matmuls and convolutions use TF32 (faster on Ampere and later; results then "
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
    values = {name: getattr(args, name) for name in CONFIG_FIELDS}
    for name in ("pairs", "presets"):
        values[name] = tuple(values[name]) if values[name] else None
    values["modes"], values["allowed_origins"] = tuple(values["modes"]), tuple(values["allowed_origins"])
    values["transmit_tables"] = tuple(str(t) for t in values["transmit_tables"])
    values["token"] = values["token"] or os.environ.get("DPSLM_STREAM_TOKEN") or None
    return ServerConfig(**values)


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
    """--backend ray: the whole service on Ray Serve (server/ray_backend.py ``deploy``: the Gateway application and
    its Encoder and Resynth shards); this process only deploys it, waits for SIGTERM/SIGINT, and then deletes it (the
    Gateway drains its sessions)."""
    import threading

    from .ray_backend import deploy

    service = deploy(config, address=args.ray_address, encoder_shards=args.encoder_shards,
                     resynth_shards=args.resynth_shards, gateway_resource=args.gateway_resource,
                     encoder_gpus=args.encoder_gpus, resynth_gpus=args.resynth_gpus)  # fmt: skip
    address = service.address
    assert address is not None  # deployed with its Gateway
    print(f"dpslm-stream serving on Ray Serve (application 'dpslm-stream': Gateway, {args.encoder_shards} encoder "
          f"and {args.resynth_shards if config.resynth else 0} resynthesis shard(s))\n"
          f"  WebSocket  {address['url']}\n  page       {address['http_url']}{P.PAGE_PATH}", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # short waits: the handler runs between them
        pass
    service.delete()  # the Gateway first: it drains its sessions, then the shards go
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
