"""The live units server: an asyncio ``websockets`` app (the I/O layer) in front of the model backends.

On one port:
    WS_PATH       the session WebSocket (dpslm_stream.protocol)
    /healthz      JSON status (200 serving, 503 draining or worker down)
    /metrics      Prometheus text (token-protected when a token is set)
    /             the browser page (client/web) and its assets

Layers: each WebSocket is a ``Connection`` (server/connection.py), the asyncio shell around its sans-I/O session core
(server/session.py), which holds the protocol, the lifecycle and every limit (server/config.py sets them). Model
work runs on the backends declared in server/backends.py: in-process, the EncoderThread thread (server/encoder_thread.py),
which batches all sessions into one forward per round, and the ResynthThread (server/resynth.py), which turns
committed units into 24 kHz audio without ever delaying the units; or Ray Serve deployments
(server/ray_gateway.py, deployed by server/ray_backend.py). This module holds the HTTP side (health, metrics, page, token and Origin checks), the
admission of connections (one slot of ``max_sessions`` each; a full server answers ``busy`` at once) and the drain.
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import http
import ipaddress
import json
import logging
import mimetypes
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import websockets
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import dpslm_stream.client
from dpslm_stream import __version__, hub
from dpslm_stream import protocol as P
from dpslm_stream.device import release_cpu_threads
from dpslm_stream.errors import InvalidInput
from dpslm_stream.stream.encoder import PRESETS

from .backends import EncoderBackend, EncoderProvider, ResynthBackend, ResynthProvider
from .config import ServerConfig
from .connection import Connection
from .metrics import Metrics
from .model_thread import ModelThread
from .pair_budget import PairBudget
from .resynth import InProcessResynth
from .session import ServerInfo
from .encoder_thread import InProcessEncoder
from .transmit import CodecService, load_transmit_tables

__all__ = ["Server", "ServerConfig", "ServerThread", "build_encoder", "build_resynth"]

log = logging.getLogger("dpslm_stream.server")

# The browser page ships as package data of dpslm_stream.client (client/web in the repository).
WEB_DIR = Path(dpslm_stream.client.__file__).resolve().parent / "web"


_AUTO: Any = object()  # "build it from the config" (Server's resynth argument)


def _is_loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback interface (localhost, 127.0.0.0/8, ::1)."""
    try:
        name = urlsplit("//" + host).hostname or ""
    except ValueError:
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _json_response(status: int, obj: Any, extra_headers: tuple = ()) -> Response:
    return _response(status, json.dumps(obj, indent=1).encode(), "application/json", extra_headers)


def _response(status: int, body: bytes, content_type: str, extra_headers: tuple = ()) -> Response:
    s = http.HTTPStatus(status)
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                       ("Content-Length", str(len(body))), ("Content-Type", content_type),
                       ("Cache-Control", "no-store"), *extra_headers])  # fmt: skip
    return Response(s.value, s.phrase, headers, body)


class Server:
    """The server app. ``await start()``, then ``await wait_closed()``; ``request_shutdown()`` (SIGTERM) drains.

    ``encoder``: an EncoderProvider (server/backends.py, e.g. server/ray_gateway.py's RayEncoder) or an EncoderWorker,
    which runs in-process (built from the config when not given; tests may pass a wrapped one). ``resynth``: a
    ResynthProvider or a ResynthWorker (default: built from the config; None: no resynthesis).
    """

    def __init__(self, config: ServerConfig, encoder: Any | None = None, resynth: Any = _AUTO):
        self.config = config
        self.metrics = Metrics()
        self.metrics.sessions_max.set(config.max_sessions)
        if encoder is None:
            encoder = build_encoder(config)
        if resynth is _AUTO:
            resynth = build_resynth(config, encoder.models)
        self.encoder: EncoderProvider = encoder if isinstance(encoder, EncoderProvider) else InProcessEncoder(encoder)
        self.resynth: ResynthProvider | None = (
            None if resynth is None else resynth if isinstance(resynth, ResynthProvider) else InProcessResynth(resynth))
        release_cpu_threads()  # the models run on their own threads from now on (dpslm_stream/device.py says why)
        self.senders: dict[str, Connection] = {}  # started sender sessions by id (listeners subscribe to them)
        self.resumable: dict[str, Connection] = {}  # sender sessions by resume token (server/resume.py)
        models = self.encoder.models
        self.models_name = str(models.source) if models is not None else config.models
        self.random_weights = bool(models.is_random) if models is not None else False
        self.pairs: list[tuple[int, int]] = [(int(k), int(lm)) for k, lm in self.encoder.available_pairs()]
        default = (hub.DEFAULT_K, hub.DEFAULT_LMBDA)
        self.default_pair = default if default in self.pairs or not self.pairs else self.pairs[0]
        tables = load_transmit_tables(config.transmit_tables, self.pairs)
        self.info = ServerInfo(self.models_name, self.random_weights, tuple(self.pairs), self.default_pair,
                               self.resynth is not None, tuple(sorted(tables)))  # fmt: skip
        self.connections: set[Connection] = set()
        # Which pairs' large models stay loaded (server/pair_budget.py); the pairs being unloaded for others meanwhile.
        self.pair_budget = PairBudget(config.max_loaded_pairs, {self.default_pair, *(config.pairs or ())},
                                      config.pair_min_idle_s)  # fmt: skip
        self._unloading: dict[tuple[int, int], asyncio.Future] = {}
        # start.transmit: the sessions' bitstream coders, on one codec thread (models loaded when first asked for)
        self.codec: CodecService | None = CodecService(models if models is not None else config.models, tables)
        self.draining = False
        self.encoder_backend: EncoderBackend | None = None
        self.resynth_backend: ResynthBackend | None = None
        self.resynth_shares_thread = False  # the in-process resynthesis worker runs on the encoder's thread
        self._ws_server: Any = None
        self._closed = asyncio.Event()  # binds to the loop on first use
        self._shutdown_task: asyncio.Future | None = None
        self.port: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.encoder_backend = self.encoder.make_backend(loop, self.metrics, self.config.quantum_s)
        if self.resynth is not None:
            self.resynth_backend = self.resynth.make_backend(loop, self.metrics)
            host, guest = self.encoder_backend, self.resynth_backend
            if isinstance(host, ModelThread) and isinstance(guest, ModelThread) and self._share_thread(host, guest):
                host.host(guest)
                self.resynth_shares_thread = True
                log.info("the resynthesis worker runs on the encoder's thread (--model-threads %s)",
                         self.config.model_threads)  # fmt: skip
        self.encoder_backend.start()
        if self.resynth_backend is not None:
            self.resynth_backend.start()
        if self.config.warmup:
            started = time.perf_counter()
            await self.encoder_backend.warm_up(*self.default_pair)
            log.info("warm-up took %.2f s", time.perf_counter() - started)
            # Resynthesis models otherwise load at their first session, on the resynthesis worker's thread. When that
            # is the encoder's thread, the load (seconds for released models) would hold every session's units.
            if self.resynth_backend is not None and (self.config.compile_decode or self.resynth_shares_thread):
                started = time.perf_counter()
                await self.resynth_backend.warm_up(*self.default_pair)
                log.info("resynthesis warm-up (models loaded%s) took %.2f s",
                         ", decode step compiled" if self.config.compile_decode else "", time.perf_counter() - started)
        cfg = self.config
        self._ws_server = await websockets.serve(
            self._handle, cfg.host, cfg.port, process_request=self._process_request,
            # Frames up to twice the limit reach the server, which answers message_too_large and goes on; larger
            # ones make the library close with 1009 before they are buffered.
            max_size=2 * cfg.max_message_bytes, max_queue=4, close_timeout=2, ping_interval=20, ping_timeout=20,
            compression=None,  # PCM does not compress; deflate would only cost event-loop time
            server_header=f"dpslm-stream/{__version__}",
        )  # fmt: skip
        self.port = self._ws_server.sockets[0].getsockname()[1]

    def _share_thread(self, encoder: ModelThread, resynth: ModelThread) -> bool:
        """Whether the in-process resynthesis worker runs on the encoder's thread (server/model_thread.py)."""
        if self.config.model_threads == "auto":
            return encoder.device.type == resynth.device.type == "cpu"
        return self.config.model_threads == "shared"

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def request_shutdown(self) -> None:
        """Begin a graceful drain (idempotent; safe from a signal handler on the loop)."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self.shutdown())

    async def shutdown(self) -> None:
        """Drain: refuse new sessions (503), finish every running session's units and send its end (close 1001),
        then stop. Sessions that cannot finish within drain_timeout_s are closed."""
        if self.draining:
            await self._closed.wait()
            return
        self.draining = True
        log.info("draining %d session(s)", len(self.connections))
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._ws_server.close(close_connections=True)
        await self._ws_server.wait_closed()
        if self.encoder_backend is not None:
            self.encoder_backend.stop()
        if self.resynth_backend is not None:
            self.resynth_backend.stop()
        if self.codec is not None:
            self.codec.stop()
        self._closed.set()

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def _token_ok(self, request: Request) -> bool:
        if not self.config.token:
            return True
        _, _, query = request.path.partition("?")
        given = parse_qs(query).get(P.TOKEN_QUERY_PARAM, [""])[0]
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.config.token.encode())

    def _origin_ok(self, request: Request) -> bool:
        """Browsers send an Origin; other clients (CLI, curl) do not and are let through (the token guards them).
        Allowed: an allowlisted Origin (--allow-origin), or this server's own page, i.e. Origin equal to the Host
        header; without a token, only on a loopback Host: a page on another name that resolves to this server (DNS
        rebinding) sends its own name as Host, so Host cannot vouch for the page on a public name."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        allowed = self.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        host = request.headers.get("Host", "")
        if not self.config.token and not _is_loopback_host(host):
            return False
        return origin in (f"http://{host}", f"https://{host}")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == P.HEALTH_PATH:
            return self._health()
        if path == P.METRICS_PATH:
            if not self._token_ok(request):
                return _response(401, b"missing or wrong token\n", "text/plain", (("WWW-Authenticate", "Bearer"),))
            self.metrics.buffered_seconds.set(sum(c.buffered_s for c in self.connections))
            return _response(200, self.metrics.render(), self.metrics.content_type)
        if path == P.WS_PATH:
            if not self._token_ok(request):
                self.metrics.rejected_total.labels(P.ErrorCode.UNAUTHORIZED.value).inc()
                return _response(401, b"missing or wrong token: pass ?token=... or 'Authorization: Bearer ...'\n",
                                 "text/plain", (("WWW-Authenticate", "Bearer"),))  # fmt: skip
            if not self._origin_ok(request):
                self.metrics.rejected_total.labels(P.ErrorCode.FORBIDDEN_ORIGIN.value).inc()
                return _response(403, f"origin {request.headers.get('Origin')} is not allowed; start the server "
                                      "with --allow-origin ORIGIN\n".encode(), "text/plain")  # fmt: skip
            if self.draining:
                self.metrics.rejected_total.labels(P.ErrorCode.SHUTTING_DOWN.value).inc()
                return _response(503, b"the server is shutting down\n", "text/plain", (("Retry-After", "5"),))
            return None  # go on with the WebSocket handshake
        return self._static(path)

    def _health(self) -> Response:
        backend = self.encoder_backend
        ok = backend is not None and backend.alive and not self.draining
        body = {"status": "ok" if ok else ("draining" if self.draining else "worker down"), "version": __version__,
                "protocol": P.PROTOCOL_VERSION, "sessions": len(self.connections),
                "max_sessions": self.config.max_sessions, "models": self.models_name,
                "random_weights": self.random_weights, "pairs": [list(p) for p in self.pairs],
                "default_pair": list(self.default_pair), "modes": list(self.config.modes),
                "resynth": self.resynth is not None,
                "presets": list(self.config.presets or PRESETS),
                "worker_round_age_s": round(time.monotonic() - backend.heartbeat, 3) if backend else None}  # fmt: skip
        return _json_response(200 if ok else 503, body)

    def _static(self, path: str) -> Response:
        name = "index.html" if path == P.PAGE_PATH else path.lstrip("/")
        # Only plain file names that exist in the web folder: no paths, so no traversal.
        if "/" in name or name.startswith(".") or not (WEB_DIR / name).is_file():
            return _response(404, f"not found: {path}\n".encode(), "text/plain")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return _response(200, (WEB_DIR / name).read_bytes(), ctype)

    # --- WebSocket -----------------------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        m = self.metrics
        # A parked session keeps its slot; one more connection per parked session is let in to resume it (it may
        # only resume: its start is refused with busy).
        parked = sum(1 for c in self.connections if c.core.parked is not None)
        resume_only = len(self.connections) >= self.config.max_sessions
        if len(self.connections) >= self.config.max_sessions + parked:
            m.rejected_total.labels(P.ErrorCode.BUSY.value).inc()
            m.errors_total.labels(P.ErrorCode.BUSY.value).inc()
            err = P.Error(code=P.ErrorCode.BUSY.value, fatal=True, retry_after_s=self.config.busy_retry_after_s,
                          message=f"all {self.config.max_sessions} session slots are in use; try again later")  # fmt: skip
            try:
                await ws.send(P.to_json(err))
                await ws.close(P.CLOSE_TRY_AGAIN, "busy")
            except ConnectionClosed:
                pass
            return
        if self.draining:
            await ws.close(P.CLOSE_GOING_AWAY, "shutting_down")
            return
        conn = Connection(self, ws, resume_only)
        self.connections.add(conn)
        m.sessions_active.set(len(self.connections))
        await conn.run()  # the connection releases itself (``release``) when its session is over, maybe later (parked)

    def hold_pair(self, pair: tuple[int, int]) -> None:
        """A session needs ``pair``'s large models (scores, resynthesis, the ulm coder): hold it in the budget and
        start unloading what it evicts (await ``pair_unloaded`` before loading). Raises PairsInUse, holding nothing,
        when every pair the server may keep loaded is in use."""
        for victim in self.pair_budget.acquire(pair, time.monotonic()):
            log.info("unloading the models of (k, lambda) = %s for %s (--max-loaded-pairs %d)", victim, pair,
                     self.config.max_loaded_pairs)  # fmt: skip
            self._unloading[victim] = unloading = asyncio.ensure_future(self._unload_pair(victim))
            unloading.add_done_callback(self._unloaded)

    def _unloaded(self, unloading: asyncio.Future) -> None:
        for pair, f in list(self._unloading.items()):
            if f is unloading:
                del self._unloading[pair]

    async def pair_unloaded(self, pair: tuple[int, int]) -> None:
        """Return once ``pair`` is not being unloaded (to make room for another): a load meanwhile would race it."""
        if pair in self._unloading:
            await asyncio.shield(self._unloading[pair])

    def release_pair(self, pair: tuple[int, int]) -> None:
        self.pair_budget.release(pair, time.monotonic())

    async def _unload_pair(self, pair: tuple[int, int]) -> None:
        """Every holder of the pair's large models drops them; a failure is logged (the memory stays taken)."""
        for holder in (self.encoder_backend, self.resynth_backend, self.codec):
            try:
                if holder is not None:
                    await holder.unload_pair(*pair)
            except Exception:  # noqa: BLE001 - a backend that cannot unload keeps serving
                log.exception("unloading (k, lambda) = %s failed", pair)

    def release(self, conn: Connection) -> None:
        """A session is over: free its slot and count how it ended (a connection that resumed another is not one)."""
        self.connections.discard(conn)
        self.metrics.sessions_active.set(len(self.connections))
        if conn.core.outcome != "handed_over":
            self.metrics.sessions_total.labels(conn.core.outcome or "disconnected").inc()


def build_encoder(config: ServerConfig) -> Any:
    """The EncoderWorker for a config (loads WavLM and the served pairs' models)."""
    import torch

    from dpslm_stream.stream.worker import EncoderWorker

    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput(f"unknown dtype {config.dtype!r}; expected float32, bfloat16 or float16")
    worker = EncoderWorker(hub.ModelSet(config.models), device=config.device, dtype=dtype,
                           pairs=list(config.pairs) if config.pairs else None, allow_tf32=config.allow_tf32,
                           precision=config.encoder_precision)  # fmt: skip
    if config.encoder_precision != "exact":
        log.info("encoder precision %s: %s", config.encoder_precision, worker.runner.precision_plan.describe())
    return worker


def build_resynth(config: ServerConfig, models: Any = None, **options: Any) -> Any:
    """The ResynthWorker for a config, or None when resynthesis is off (``options``: more ResynthWorker arguments).
    Nothing is loaded here: ELLA-V and WavTokenizer load on the resynthesis worker's thread, in the start-up warm-up
    when that is the encoder's thread (Server.start), otherwise when the first session asks for audio."""
    import torch

    from dpslm_stream.stream.resynth_worker import ResynthWorker

    if not config.resynth:
        return None
    dtype = getattr(torch, config.resynth_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput(f"unknown resynth dtype {config.resynth_dtype!r}; expected float32, bfloat16 or float16")
    worker = ResynthWorker(models if models is not None else hub.ModelSet(config.models),
                           device=config.resynth_device or config.device, dtype=dtype, precision=config.precision,
                           compile_decode=config.compile_decode, allow_tf32=config.allow_tf32, **options)  # fmt: skip
    if config.precision != "exact":
        plans = worker.precision_plans
        log.info("resynthesis precision %s: %s; %s", config.precision, plans["ellav"], plans["wavtokenizer"])
    return worker


class ServerThread:
    """A Server on a background thread with its own event loop: for tests, benchmarks and embedding.

    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        url = srv.url   # ws://127.0.0.1:<port>/v1/stream
    """

    def __init__(self, config: ServerConfig, encoder: Any | None = None, resynth: Any = _AUTO):
        release_cpu_threads()  # whoever built `encoder` / `resynth` on this thread is done with its CPU threads
        self.config = config
        self._encoder = encoder
        self._resynth = resynth
        self.server: Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="dpslm-server", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.server = Server(self.config, self._encoder, self._resynth)
            await self.server.start()
            self.loop = asyncio.get_running_loop()
            self._ready.set()
            await self.server.wait_closed()

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 (reported to the starting thread)
            self._error = e
            self._ready.set()

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None, "the server is not started"
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}{P.WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def call(self, fn, *args) -> Any:
        """Run ``fn(*args)`` on the server's loop and return its result (a coroutine function is awaited)."""

        async def wrapper():
            out = fn(*args)
            return await out if asyncio.iscoroutine(out) else out

        assert self.loop is not None, "the server is not started"
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout=300)

    def stop(self) -> None:
        """Drain and stop (what SIGTERM does), then join the thread."""
        if self.loop is not None and self.server is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(
                    timeout=self.config.drain_timeout_s + 30)
            except RuntimeError:
                pass
        self._thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
