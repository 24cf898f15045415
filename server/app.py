"""The live units server: an asyncio ``websockets`` app (the I/O layer) in front of one model worker thread.

On one port:
    WS_PATH       the session WebSocket (dpslm_stream.protocol)
    /healthz      JSON status (200 serving, 503 draining or worker down)
    /metrics      Prometheus text (token-protected when a token is set)
    /             the browser page (client/web) and its assets

The event loop only moves bytes, validates messages and enforces limits; every model call happens on the
ModelWorker thread (server/worker.py), which batches all sessions into one forward per round, or, for sessions that
asked for audio back (start.resynth) and for listeners, on the ResynthThread (server/resynth.py), which turns the
committed units into 24 kHz audio, batched across sessions, without ever delaying the units. What a connection
may cost is bounded: one slot of ``max_sessions`` (a full server answers ``busy`` at once), ``max_buffer_s`` of queued
audio (the server then stops reading the socket, which is TCP back-pressure on the client, and gives up with
``buffer_full`` if the queue does not move for ``stall_timeout_s``), ``max_outgoing`` queued messages (a client that
does not read is dropped), ``max_message_bytes`` per frame, ``idle_timeout_s`` without a message, and
``max_session_s`` in total.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hmac
import http
import json
import logging
import math
import mimetypes
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import websockets
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import dpslm_stream.client
from dpslm_stream import __version__, hub
from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.pipeline import default_num_neighbors
from dpslm_stream.stream.encoder import PRESETS
from dpslm_stream.stream.events import EndEvent, UnitEvent
from dpslm_stream.stream.resynth import AudioEvent, ResynthEndEvent

from .meters import ArrivalClock, BitrateMeter, LagHistogram
from .metrics import Metrics
from .resynth import ResynthThread
from .worker import ModelWorker, Progress, Slot

log = logging.getLogger("dpslm_stream.server")

# The browser page ships as package data of dpslm_stream.client (client/web in the repository).
WEB_DIR = Path(dpslm_stream.client.__file__).resolve().parent / "web"


@dataclass
class ServerConfig:
    """Everything `dpslm-stream serve` can set. Defaults suit one machine serving a handful of live clients."""

    host: str = "127.0.0.1"
    port: int = 8765  # 0 = an ephemeral port (tests)
    models: str = "release"  # release | tiny | a folder (see dpslm_stream.hub.ModelSet)
    device: str = "cpu"
    dtype: str = "float32"
    pairs: tuple[tuple[int, int], ...] | None = None  # (k, lambda) pairs to serve; None = the encoder's default
    max_sessions: int = 16
    presets: tuple[str, ...] | None = None  # window presets clients may choose; None = all the encoder has
    modes: tuple[str, ...] = P.ENCODER_MODES  # encoder modes clients may choose (sliding costs several times more)
    token: str | None = None  # required from clients when set (?token= or Authorization: Bearer)
    allowed_origins: tuple[str, ...] = ()  # browser Origins allowed besides this server's own page; "*" = any
    idle_timeout_s: float = 30.0  # no message from the client for this long ends the session
    max_session_s: float = 3600.0
    max_full_s: float = 600.0  # audio per session in mode full, which keeps the whole stream until its end
    max_message_bytes: int = 1 << 20  # larger frames are refused with message_too_large
    max_buffer_s: float = 5.0  # queued, not yet encoded audio per session
    stall_timeout_s: float = 10.0  # how long a full buffer may stay full before buffer_full (0: at once)
    max_outgoing: int = 4096  # messages queued for a client that does not read
    stats_interval_s: float = 1.0
    drain_timeout_s: float = 30.0  # SIGTERM: time allowed to finish running sessions
    quantum_s: float = 0.5  # audio per session per worker round (fairness)
    warmup: bool = True  # run one short stream through the models before accepting clients
    busy_retry_after_s: float = 5.0
    resynth: bool = True  # offer live resynthesis (start.resynth, listeners); its models load on first use
    resynth_device: str | None = None  # device of the resynthesis worker (default: device)
    resynth_dtype: str = "float32"  # ELLA-V dtype (bfloat16/float16 are meant for a GPU)
    max_listeners: int = 4  # listeners per sender session
    max_resynth_lag_s: float = 60.0  # a session's resynthesis further behind than this is stopped (units go on)
    allow_tf32: bool = False  # CUDA: TF32 matmuls/convolutions (faster, not exact; see dpslm_stream.device)

    def limits(self) -> dict:
        """The limits every client is told in ``ready``."""
        return {"max_session_s": self.max_session_s, "max_full_s": self.max_full_s, "idle_timeout_s": self.idle_timeout_s,
                "max_message_bytes": self.max_message_bytes, "max_buffer_s": self.max_buffer_s,
                "stall_timeout_s": self.stall_timeout_s}  # fmt: skip


_AUTO = object()  # "build it from the config" (Server's resynth argument)
_CLOSE = object()  # sentinel in a connection's outgoing queue: close after everything before it was sent


class Connection:
    """One WebSocket session on the event loop: protocol state, limits and measurements. Model work goes through
    its Slot to the worker thread; results come back in ``on_events`` (scheduled on the loop by the worker)."""

    def __init__(self, server: "Server", ws: ServerConnection):
        self.server = server
        self.ws = ws
        self.cfg = server.config
        self.id = uuid.uuid4().hex[:12]
        self.start: P.Start | None = None
        self.mode: str | None = None
        self.slot: Slot | None = None
        self.ending: str | None = None  # why no more audio is accepted: "end" or an ErrorCode value
        self.finished = False  # the final end message is queued
        self.out: asyncio.Queue = asyncio.Queue()
        self.room = asyncio.Event()  # set by the worker when it took queued audio
        self.last_rx = time.monotonic()
        self.started_at = time.monotonic()
        self.received_samples = 0
        self.progress = Progress()
        self.clock = ArrivalClock()
        self.lags = LagHistogram()
        self.bits = BitrateMeter()
        self.units = 0
        self.last_unit_end_s = 0.0
        self.last_lag: float | None = None
        self.loglik: float | None = None
        self.num_frames = 0
        self._timers: list[asyncio.TimerHandle] = []
        self.outcome: str | None = None  # how the session ended (the sessions_total metric's label)
        self._stats_sent_at = (-1, -1)
        self.units_done = False  # every unit of the stream has been sent (the encoder's EndEvent, or the sender's)
        self._encoder_end: EndEvent | None = None
        # Resynthesis (start.resynth, or a listener's): units in, audio chunks out, on the ResynthThread.
        self.rsession = None
        self.resynth_end: ResynthEndEvent | None = None
        self.rstats = None
        self.audio_chunks = 0
        self.audio_samples = 0
        # Listener mode: a sender has listeners; a listener has one sender.
        self.role: str | None = None  # "sender" after start, "listener" after subscribe
        self.listen_token: str | None = None
        self.listeners: set[Connection] = set()
        self.sender: Connection | None = None

    # --- outgoing ------------------------------------------------------------------------------------------------

    def send(self, msg: Any) -> None:
        """Queue a message (or _CLOSE); the sender task sends them in order. A client that stops reading is dropped
        once its queue passes ``max_outgoing``: unit messages are never dropped while the connection lives."""
        self.out.put_nowait(msg)
        if self.out.qsize() > self.cfg.max_outgoing and not self.finished:
            self.finished = True
            self.outcome = P.ErrorCode.CLIENT_TOO_SLOW.value
            self.server.metrics.errors_total.labels(P.ErrorCode.CLIENT_TOO_SLOW.value).inc()
            self._cancel_slot()
            asyncio.ensure_future(self.ws.close(P.CLOSE_POLICY, "client_too_slow: messages not read"))

    def error(self, code: P.ErrorCode, message: str, fatal: bool = False, **extra) -> None:
        self.server.metrics.errors_total.labels(code.value).inc()
        self.send(P.Error(code=code.value, message=message, fatal=fatal, **extra))

    async def _send_loop(self) -> None:
        try:
            while True:
                msg = await self.out.get()
                if msg is _CLOSE:
                    code, reason = self._close_with
                    await self.ws.close(code, reason)
                    return
                await self.ws.send(msg if isinstance(msg, bytes) else P.to_json(msg))
        except ConnectionClosed:
            pass
        except Exception:  # a bug must not leave the connection hanging: close it, keep serving the others
            log.exception("session %s: sending failed", self.id)
            await self.ws.close(P.CLOSE_INTERNAL, "internal_error")

    def _close_after_queue(self, code: int, reason: str) -> None:
        self._close_with = (code, reason[:120])  # a close reason must fit in 123 bytes
        self.send(_CLOSE)

    # --- incoming ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            await self._receive_loop()
        finally:
            self._cancel_slot()
            self._detach()
            for t in self._timers:
                t.cancel()
            if not sender.done():
                try:  # let queued messages (e.g. a fatal error) go out before the handler returns
                    await asyncio.wait_for(asyncio.shield(sender), timeout=2.0)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    sender.cancel()

    async def _receive_loop(self) -> None:
        while True:
            # No idle limit once the session is ending (recv() only waits for the client to go away), nor for a
            # listener, which only receives.
            ending = self.ending is not None or self.finished or self.role == "listener"
            timeout = None if ending else max(0.0, self.last_rx + self.cfg.idle_timeout_s - time.monotonic())
            try:
                data = await asyncio.wait_for(self.ws.recv(), timeout)
            except asyncio.TimeoutError:
                self.limit(P.ErrorCode.IDLE_TIMEOUT, f"no message for {self.cfg.idle_timeout_s:g} s")
                continue
            except ConnectionClosed:
                return
            self.last_rx = time.monotonic()
            if isinstance(data, str):
                await self._on_text(data)
            else:
                await self._on_audio(data, self.last_rx)

    async def _on_text(self, text: str) -> None:
        if self.finished:  # the session is over (failed or dropped); the connection is closing
            return
        try:
            msg = P.parse_client_message(text)
        except P.ProtocolError as e:
            self.error(e.code, str(e))
            return
        if self.role == "listener":
            if isinstance(msg, P.End):
                self._leave()
            else:
                self.error(P.ErrorCode.NOT_A_SENDER, f"a listener connection takes no {msg.TYPE}; send end to leave")
        elif isinstance(msg, P.Subscribe):
            if self.role is not None:
                self.error(P.ErrorCode.ALREADY_STARTED, "this connection is a sender; subscribe on a new connection")
            else:
                await self._on_subscribe(msg)
        elif isinstance(msg, P.Start):
            await self._on_start(msg)
        elif self.start is None:
            self.error(P.ErrorCode.NOT_STARTED, "end before start: send a start message first")
        elif self.ending is None:
            self._end("end")

    async def _on_start(self, msg: P.Start) -> None:
        if self.start is not None:
            self.error(P.ErrorCode.ALREADY_STARTED, "this connection already has a session; one start per connection "
                                                    "(open a new connection for a new stream)")  # fmt: skip
            return
        if self.ending is not None:
            return
        if (msg.k is None) != (msg.lmbda is None):
            self.error(P.ErrorCode.BAD_MESSAGE, "give both k and lmbda, or neither (the server's default pair)")
            return
        k, lmbda = (msg.k, msg.lmbda) if msg.k is not None else self.server.default_pair
        if (k, lmbda) not in self.server.pairs:
            served = ", ".join(f"(k={a}, lmbda={b})" for a, b in self.server.pairs)
            self.error(P.ErrorCode.UNKNOWN_MODEL, f"(k={k}, lmbda={lmbda}) is not served here; served: {served}")
            return
        opts = dict(msg.options)
        mode = opts.pop("mode", "cached")
        if mode not in self.cfg.modes or (self.cfg.presets is not None and msg.preset not in self.cfg.presets):
            presets = "any" if self.cfg.presets is None else ", ".join(self.cfg.presets)
            self.error(P.ErrorCode.BAD_SETTINGS, f"mode {mode!r} / preset {msg.preset!r} is not offered here; modes: "
                                                 f"{', '.join(self.cfg.modes)}; presets: {presets}")  # fmt: skip
            return
        if msg.resynth is not None and not await self._open_resynth(k, lmbda, msg.resynth):
            return
        settings = dict(k=k, lmbda=lmbda, mode=mode, preset=msg.preset, score=msg.score, **opts)
        try:
            self.slot = await self.server.worker.open_slot(self.id, msg.sample_rate, settings, self)
        except UnknownModel as e:
            self.error(P.ErrorCode.UNKNOWN_MODEL, str(e))
            return
        except InvalidInput as e:
            self.error(P.ErrorCode.BAD_SETTINGS, str(e))
            return
        except Exception as e:  # noqa: BLE001 (a failing model load must not take the server down)
            log.exception("opening a session failed")
            self.error(P.ErrorCode.INTERNAL_ERROR, f"could not open a session: {type(e).__name__}: {e}")
        finally:
            if self.slot is None:
                self._close_resynth()
        if self.slot is None:
            return
        if self.finished:  # the connection was closed (drain) while the models loaded
            self._cancel_slot()
            return
        self.start = msg
        self.mode = mode
        self.role = "sender"
        self.listen_token = secrets.token_urlsafe(16)
        self.server.senders[self.id] = self
        self.started_at = time.monotonic()
        session = self.slot.session
        settings = {"sample_rate": msg.sample_rate, "format": msg.format, "k": k, "lmbda": lmbda,
                    "preset": msg.preset, "score": msg.score, "frame_rate": P.FRAME_RATE, **_resolved_window(session),
                    "resynth": _resolved_resynth(self.rsession)}  # fmt: skip
        self.send(P.Ready(session=self.id, settings=settings, limits=self.cfg.limits(), models=self.server.models_name,
                          random_weights=self.server.random_weights, server=f"dpslm-stream {__version__}",
                          listen_token=self.listen_token))  # fmt: skip
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.cfg.max_session_s, self.limit, P.ErrorCode.SESSION_TIME_LIMIT,
                                            f"the session reached the {self.cfg.max_session_s:g} s limit"))  # fmt: skip
        self._timers.append(loop.call_later(self.cfg.stats_interval_s, self._stats_tick))

    async def _on_audio(self, data: bytes, arrived: float) -> None:
        if self.finished:
            return
        if self.role == "listener":
            self.error(P.ErrorCode.NOT_A_SENDER, "a listener connection takes no audio; the frame was dropped")
            return
        if self.start is None:
            self.error(P.ErrorCode.NOT_STARTED, "audio before start: send a start message (JSON) first; the frame "
                                                "was dropped")  # fmt: skip
            return
        if self.ending is not None:
            if self.ending == "end":
                self.error(P.ErrorCode.AFTER_END, "audio after end was dropped")
            return
        if len(data) > self.cfg.max_message_bytes:
            self.error(P.ErrorCode.MESSAGE_TOO_LARGE, f"audio frame of {len(data)} bytes exceeds the limit of "
                                                      f"{self.cfg.max_message_bytes}; split it (e.g. 20-100 ms per "
                                                      "frame); the frame was dropped")  # fmt: skip
            return
        try:
            samples = P.decode_audio(data, self.start.format)
        except P.ProtocolError as e:
            self.error(e.code, str(e))
            return
        if self.mode == "full" and self.received_samples + len(samples) > self.cfg.max_full_s * self.start.sample_rate:
            self.limit(P.ErrorCode.SESSION_TIME_LIMIT, f"mode full keeps the whole stream until the end: at most "
                                                       f"{self.cfg.max_full_s:g} s of audio (use cached or sliding "
                                                       "for longer streams)")  # fmt: skip
            return
        # Bounded buffer: stop reading (TCP back-pressure) while the queue is full; give up if it does not move.
        cap = int(self.cfg.max_buffer_s * self.start.sample_rate)
        while self.slot.queued_samples > 0 and self.slot.queued_samples + len(samples) > cap:
            self.room.clear()
            try:
                await asyncio.wait_for(self.room.wait(), self.cfg.stall_timeout_s)
            except asyncio.TimeoutError:
                self.limit(P.ErrorCode.BUFFER_FULL, f"more than {self.cfg.max_buffer_s:g} s of audio queued and the "
                                                    f"server could not take more for {self.cfg.stall_timeout_s:g} s; "
                                                    "send at most real time, or wait for units before sending more")
                return
            if self.ending is not None or self.finished:
                return
        self.received_samples += len(samples)
        self.clock.add(self.received_samples / self.start.sample_rate, arrived)
        self.server.metrics.audio_seconds_total.inc(len(samples) / self.start.sample_rate)
        self.slot.add_audio(samples)
        self.server.worker.wake()

    # --- limits and endings ------------------------------------------------------------------------------------

    def limit(self, code: P.ErrorCode, why: str) -> None:
        """End the session for a fatal reason: tell the client, finish the units of the audio already received,
        send end, close with the code's close code. Before start there is nothing to finish."""
        if self.finished or self.ending is not None:  # already ending: its units are being finished
            return
        if self.role == "listener" and self.sender is not None:
            self.error(code, f"{why}; the audio of the units received follows, then end", fatal=True)
            self.ending = code.value
            self._units_over()
            return
        close_code = P.CLOSE_CODES[code]
        if self.start is None:
            self.error(code, f"{why}; closing", fatal=True)
            self.finished = True
            self.outcome = code.value
            self._close_after_queue(close_code, code.value)
            return
        self.error(code, f"{why}; the units of the audio received so far follow, then end", fatal=True)
        self._end(code.value)

    def _end(self, reason: str) -> None:
        """Stop taking audio and let the worker finish the session (its EndEvent brings the end message). No
        deadline here: a full-mode flush of a long stream legitimately takes a while; a drain has its own."""
        self.ending = reason
        self.slot.request_end()
        self.server.worker.wake()

    def _cancel_slot(self) -> None:
        if self.slot is not None and not self.progress.finished:
            self.slot.cancelled = True  # the worker drops it at its next round

    # --- resynthesis and listeners ---------------------------------------------------------------------------------

    async def _open_resynth(self, k: int, lmbda: int, options: dict) -> bool:
        """Open this connection's resynthesis stream (on the ResynthThread, which may load ELLA-V and WavTokenizer);
        on failure send the error and return False."""
        if self.server.resynth is None:
            self.error(P.ErrorCode.UNSUPPORTED_OPTION, "this server runs without resynthesis (started with "
                                                       "--no-resynth); ask for units only")  # fmt: skip
            return False
        try:
            self.rsession = await self.server.resynth_thread.open(k, lmbda, options, self)
            return True
        except UnknownModel as e:
            self.error(P.ErrorCode.UNKNOWN_MODEL, f"no resynthesis model: {e}")
        except (InvalidInput, TypeError) as e:
            self.error(P.ErrorCode.BAD_SETTINGS, f"resynth options: {e}")
        except Exception as e:  # noqa: BLE001
            log.exception("opening a resynthesis stream failed")
            self.error(P.ErrorCode.INTERNAL_ERROR, f"could not open resynthesis: {type(e).__name__}: {e}")
        return False

    def _close_resynth(self) -> None:
        if self.rsession is not None and self.resynth_end is None:
            self.server.resynth_thread.close(self.rsession)

    def _resynthesize(self, unit: int, end_s: float) -> None:
        if self.rsession is None or self.resynth_end is not None:
            return
        try:
            self.rsession.push_units([unit], [end_s])
        except InvalidInput as e:  # cannot happen for the encoder's own units; do not lose the session over it
            log.error("session %s: resynthesis refused a unit: %s", self.id, e)
            return
        self.server.resynth_thread.wake()

    def _end_resynth(self) -> None:
        if self.rsession is not None and self.resynth_end is None:
            self.rsession.end()
            self.server.resynth_thread.wake()

    async def _on_subscribe(self, msg: P.Subscribe) -> None:
        """Listener mode: receive a running sender's units, and audio made from those units alone."""
        sender = self.server.senders.get(msg.session)
        token_ok = sender is not None and sender.listen_token is not None and hmac.compare_digest(
            msg.token.encode(), sender.listen_token.encode())  # fmt: skip
        if not token_ok or sender.units_done or sender.finished:
            self.limit(P.ErrorCode.UNKNOWN_SESSION, f"no running session {msg.session!r} with that listen token")
            return
        if len(sender.listeners) >= self.cfg.max_listeners:
            self.limit(P.ErrorCode.BUSY, f"session {msg.session} already has {self.cfg.max_listeners} listeners")
            return
        self.role = "listener"  # while the models load, start and audio are refused
        k, lmbda = sender.slot.session.k, sender.slot.session.lmbda
        if msg.resynth is not None and not await self._open_resynth(k, lmbda, msg.resynth):
            self.role = None  # the error is sent; the client may subscribe again with other options
            return
        if sender.units_done or sender.finished or self.server.senders.get(msg.session) is not sender:
            self.limit(P.ErrorCode.SENDER_GONE, f"session {msg.session} ended while the listener was starting")
            return
        self.sender = sender
        sender.listeners.add(self)
        self.started_at = time.monotonic()
        settings = {"sender": sender.id, "k": k, "lmbda": lmbda, "frame_rate": P.FRAME_RATE,
                    "resynth": _resolved_resynth(self.rsession)}  # fmt: skip
        self.send(P.Ready(session=self.id, settings=settings, limits=self.cfg.limits(), models=self.server.models_name,
                          random_weights=self.server.random_weights, server=f"dpslm-stream {__version__}",
                          role="listener"))  # fmt: skip
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.cfg.stats_interval_s, self._stats_tick))

    def relay_unit(self, msg: P.Unit) -> None:
        """Listener: one of the sender's units (only units cross from sender to listener)."""
        if self.finished or self.units_done:
            return
        self.units += 1
        self.bits.add(int(msg.unit))
        self.last_unit_end_s = float(msg.end_s)
        self.num_frames = max(self.num_frames, int(msg.end_frame))
        self.last_lag = msg.lag_s
        self.lags.add(msg.lag_s)
        self.send(msg)
        self._resynthesize(int(msg.unit), float(msg.end_s))

    def on_sender_done(self, gone: bool) -> None:
        """Listener: the sender's stream is over (gone: its connection ended before its last unit)."""
        if self.finished or self.units_done:
            return
        if gone:
            self.error(P.ErrorCode.SENDER_GONE, "the sender's connection ended; the audio of the units received "
                                                "follows, then end", fatal=True)  # fmt: skip
        self.ending = P.ErrorCode.SENDER_GONE.value if gone else "end"
        self._units_over()

    def _leave(self) -> None:
        """Listener sent end: stop receiving units, finish the audio of those received, then end."""
        if self.units_done:
            return
        self.ending = "end"
        self._units_over()

    def _units_over(self) -> None:
        """Every unit this connection will get has been sent: finish the resynthesis, then end."""
        self.units_done = True
        if self.sender is not None:
            self.sender.listeners.discard(self)
        self._end_resynth()
        self._maybe_finish()

    def _detach(self) -> None:
        """The connection is gone: release the resynthesis stream, unregister, tell the listeners."""
        self._close_resynth()
        if self.sender is not None:
            self.sender.listeners.discard(self)
        if self.role == "sender":
            if self.server.senders.get(self.id) is self:
                del self.server.senders[self.id]
            for listener in list(self.listeners):
                listener.on_sender_done(gone=not self.units_done)

    # --- called by the resynthesis thread (on the loop) -----------------------------------------------------------

    def on_resynth_events(self, events: list, stats) -> None:
        try:
            self._take_resynth_events(events, stats)
        except Exception as e:  # a bug here must not leave the session hanging: end it, keep serving the others
            log.exception("session %s: handling resynthesis events failed", self.id)
            self.on_failure(e)

    def _take_resynth_events(self, events: list, stats) -> None:
        self.rstats = stats
        if self.finished:
            return
        m = self.server.metrics
        for ev in events:
            if isinstance(ev, AudioEvent):
                if ev.num_samples == 0:
                    continue
                self.send(P.encode_audio_chunk(self.audio_chunks, self.audio_samples, ev.pcm16()))
                self.audio_chunks += 1
                self.audio_samples += ev.num_samples
                m.resynth_audio_seconds_total.inc(ev.num_samples / P.RESYNTH_SAMPLE_RATE)
                m.resynth_lag.observe(ev.lag_s)
            elif isinstance(ev, ResynthEndEvent):
                self.resynth_end = ev
                if ev.error is not None:
                    self.error(P.ErrorCode.INTERNAL_ERROR, f"resynthesis stopped: {ev.error}; units are unaffected")
                self._maybe_finish()

    def on_resynth_failure(self, error: BaseException) -> None:
        self._stop_resynth(P.ErrorCode.INTERNAL_ERROR, f"{type(error).__name__}: {error}")

    def _stop_resynth(self, code: P.ErrorCode, why: str) -> None:
        """End this session's resynthesis early (the units go on): tell the client, finish if all else is done."""
        if self.resynth_end is not None or self.finished:
            return
        r = self.rstats
        self.resynth_end = ResynthEndEvent(
            units=r.units if r else 0, codec_frames=r.codec_frames if r else 0,
            audio_seconds=self.audio_samples / P.RESYNTH_SAMPLE_RATE, chunks=self.audio_chunks,
            passes=r.passes if r else 0, first_audio_latency_s=r.first_audio_latency_s if r else None,
            latency_mean_s=r.latency_mean_s if r else None, latency_max_s=r.latency_max_s if r else None,
            real_time_factor=r.real_time_factor if r else 0.0, error=why,
        )  # fmt: skip
        self.error(code, f"resynthesis stopped: {why}; units are unaffected")
        self._maybe_finish()

    # --- called by the worker (on the loop) ----------------------------------------------------------------------

    def on_consumed(self) -> None:
        self.room.set()

    def on_failure(self, error: BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        self.outcome = P.ErrorCode.INTERNAL_ERROR.value
        self.error(P.ErrorCode.INTERNAL_ERROR, f"the model worker failed on this session ({type(error).__name__}: "
                                               f"{error}); other sessions are unaffected", fatal=True)  # fmt: skip
        self._close_after_queue(P.CLOSE_INTERNAL, "internal_error")

    def on_events(self, events: list, progress: Progress) -> None:
        self.progress = progress
        if self.finished:
            return
        now = time.monotonic()
        for ev in events:
            if isinstance(ev, UnitEvent):
                self._on_unit(ev, now)
            elif isinstance(ev, EndEvent):
                self._on_end(ev)
            elif isinstance(ev, InvalidInput):  # the encoder refused a chunk; the session goes on
                self.error(P.ErrorCode.BAD_AUDIO, str(ev))

    def _on_unit(self, ev: UnitEvent, now: float) -> None:
        arrived = self.clock.arrival_of(ev.end_s)
        lag = max(0.0, now - arrived) if arrived is not None else 0.0
        self.lags.add(lag)
        self.last_lag = lag
        self.bits.add(int(ev.unit))
        if ev.logprob is not None and math.isfinite(ev.logprob):
            self.loglik = (self.loglik or 0.0) + float(ev.logprob)
        if ev.seq != self.units:  # an encoder bug; the protocol promises 0, 1, 2, ...
            log.error("session %s: unit seq %d after %d units", self.id, ev.seq, self.units)
        self.units += 1
        self.last_unit_end_s = float(ev.end_s)
        self.num_frames = max(self.num_frames, int(ev.end_frame))
        self.server.metrics.units_total.inc()
        self.server.metrics.commit_lag.observe(lag)
        # JSON has no infinities: a log-probability of -inf (probability 0 in float) goes out as null.
        logprob = None if ev.logprob is None or not math.isfinite(ev.logprob) else float(ev.logprob)
        msg = P.Unit(seq=int(ev.seq), unit=int(ev.unit), start_frame=int(ev.start_frame), end_frame=int(ev.end_frame),
                     start_s=float(ev.start_s), end_s=float(ev.end_s), commit_audio_s=float(ev.commit_audio_s),
                     lag_s=round(lag, 4), logprob=logprob)  # fmt: skip
        self.send(msg)
        for listener in list(self.listeners):
            listener.relay_unit(msg)
        self._resynthesize(int(ev.unit), float(ev.end_s))

    def _on_end(self, ev: EndEvent) -> None:
        """The encoder sent every unit: listeners are told, resynthesis finishes, then the end message."""
        self._encoder_end = ev
        self.num_frames = int(ev.frames)
        self.units_done = True
        for listener in list(self.listeners):
            listener.on_sender_done(gone=False)
        self._end_resynth()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Send the end message once every unit and every audio chunk of the session is out, then close."""
        if self.finished or not self.units_done or (self.rsession is not None and self.resynth_end is None):
            return
        self.finished = True
        stats = self.stats()
        reason = self.ending or "end"
        self.outcome = reason
        resynth = None if self.resynth_end is None else _json_safe(dataclasses.asdict(self.resynth_end))
        forced = int(self._encoder_end.forced_commits) if self._encoder_end is not None else 0
        self.send(P.EndMessage(reason=reason, units=self.units, num_frames=self.num_frames, audio_s=stats.audio_s,
                               forced_commits=forced, stats=_fields(stats), resynth=resynth))  # fmt: skip
        self._close_after_queue(P.CLOSE_NORMAL if reason == "end" else P.CLOSE_CODES[P.ErrorCode(reason)], reason)

    # --- stats ---------------------------------------------------------------------------------------------------

    @property
    def buffered_s(self) -> float:
        """Audio received and not yet handed to the encoder (seconds)."""
        return self.slot.queued_samples / self.start.sample_rate if self.slot is not None else 0.0

    def stats(self) -> P.Stats:
        committed_s = self.last_unit_end_s
        resynth = {}
        if self.rsession is not None:
            rtf = self.rstats.real_time_factor if self.rstats is not None else 0.0
            resynth = {"resynth_audio_s": round(self.audio_samples / P.RESYNTH_SAMPLE_RATE, 4),
                       "resynth_lag_s": round(0.0 if self.resynth_end else self.rsession.lag_s, 4),
                       "resynth_rtf": round(rtf, 4)}  # fmt: skip
        if self.role == "listener":  # the link as the receiving side sees it: units in, audio out
            return P.Stats(
                elapsed_s=round(time.monotonic() - self.started_at, 3), audio_s=round(committed_s, 4),
                processed_s=round(committed_s, 4), buffered_s=0.0, units=self.units,
                units_per_s=round(self.units / committed_s, 3) if committed_s > 0 else 0.0,
                bitrate=round(self.bits.bitrate(committed_s), 2), rtf=0.0,
                lag_s=self.last_lag, lag_p95_s=None if self.lags.n == 0 else round(self.lags.quantile(0.95), 4),
                loglikelihood=None, state_nbytes=self.clock.nbytes + 256 * self.out.qsize(), **resynth,
            )  # fmt: skip
        sr = self.start.sample_rate
        processed_s = self.progress.processed_samples / sr
        queued = self.slot.queued_samples if self.slot is not None else 0
        return P.Stats(
            elapsed_s=round(time.monotonic() - self.started_at, 3),
            audio_s=round(self.received_samples / sr, 4),
            processed_s=round(processed_s, 4),
            buffered_s=round(queued / sr, 4),
            units=self.units,
            units_per_s=round(self.units / committed_s, 3) if committed_s > 0 else 0.0,
            bitrate=round(self.bits.bitrate(committed_s), 2),
            rtf=round(self.progress.compute_seconds / self.progress.encoded_seconds, 4)
            if self.progress.encoded_seconds > 0 else 0.0,
            lag_s=None if self.last_lag is None else round(self.last_lag, 4),
            lag_p95_s=None if self.lags.n == 0 else round(self.lags.quantile(0.95), 4),
            loglikelihood=self.loglik,
            state_nbytes=self.progress.state_nbytes + queued * 4 + self.clock.nbytes + 256 * self.out.qsize(),
            listeners=len(self.listeners), **resynth,
        )

    def _stats_tick(self) -> None:
        if self.finished:
            return
        self._check_resynth_lag()
        mark = (self.received_samples, self.units, self.audio_samples)
        if mark != self._stats_sent_at and self.ending in (None, "end"):  # only while something moves
            self._stats_sent_at = mark
            self.send(self.stats())
        self._timers.append(asyncio.get_running_loop().call_later(self.cfg.stats_interval_s, self._stats_tick))

    def _check_resynth_lag(self) -> None:
        """Stop a resynthesis that fell too far behind (e.g. full-size ELLA-V on a CPU): its backlog would only grow
        and hold the session's end back; the units go on, the client is told why the audio stopped."""
        if self.rsession is None or self.resynth_end is not None or self.finished:
            return
        lag = self.rsession.lag_s
        if lag <= self.cfg.max_resynth_lag_s:
            return
        self._close_resynth()
        self._stop_resynth(P.ErrorCode.RESYNTH_BEHIND, f"it fell {lag:.1f} s behind (limit {self.cfg.max_resynth_lag_s:g} "
                                                       "s): this server cannot resynthesize in real time")  # fmt: skip


def _fields(msg: Any) -> dict:
    return {k: v for k, v in json.loads(P.to_json(msg)).items() if k != "type"}


def _json_safe(obj: dict) -> dict:
    """Floats that JSON cannot carry (NaN, Inf) become null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in obj.items()}


def _resolved_window(session: Any) -> dict:
    """The window settings the encoder session actually uses (the preset's values with the client's overrides)."""
    full = session.config.mode == "full"  # one window over the whole stream: the sizes do not apply
    return {"mode": session.config.mode, "left": None if full else session.config.left,
            "hop": None if full else session.config.hop, "lookahead": None if full else session.config.lookahead,
            "max_lag": session.max_lag, "num_neighbors": default_num_neighbors(session.k)}  # fmt: skip


def _resolved_resynth(rsession: Any) -> dict | None:
    """The resynthesis settings a stream actually uses (defaults filled in); None without resynthesis."""
    return None if rsession is None else rsession.settings()


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

    ``encoder`` is an EncoderWorker (built from the config when not given; tests may pass a wrapped one);
    ``resynth`` a ResynthWorker (default: built from the config; None: no resynthesis).
    """

    def __init__(self, config: ServerConfig, encoder: Any | None = None, resynth: Any = _AUTO):
        self.config = config
        self.metrics = Metrics()
        self.metrics.sessions_max.set(config.max_sessions)
        if encoder is None:
            encoder = build_encoder(config)
        self.encoder = encoder
        self.resynth = build_resynth(config, getattr(encoder, "models", None)) if resynth is _AUTO else resynth
        self.senders: dict[str, Connection] = {}  # started sender sessions by id (listeners subscribe to them)
        self.models_name = str(getattr(getattr(encoder, "models", None), "source", config.models))
        self.random_weights = bool(getattr(getattr(encoder, "models", None), "is_random", False))
        self.pairs: list[tuple[int, int]] = [tuple(p) for p in encoder.available_pairs()]
        default = (hub.DEFAULT_K, hub.DEFAULT_LMBDA)
        self.default_pair = default if default in self.pairs or not self.pairs else self.pairs[0]
        self.connections: set[Connection] = set()
        self.draining = False
        self.worker: ModelWorker | None = None
        self.resynth_thread: ResynthThread | None = None
        self._ws_server = None
        self._closed: asyncio.Event | None = None
        self._shutdown_task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        # The encoder backend: in-process (an EncoderWorker on a ModelWorker thread, the default) or any object that
        # makes its own worker with the same interface (server/ray_backend.py: a Ray Serve deployment).
        make_worker = getattr(self.encoder, "model_worker", None)
        if make_worker is not None:
            self.worker = make_worker(loop, self.metrics, self.config.quantum_s)
        else:
            self.worker = ModelWorker(self.encoder, loop, self.metrics, self.config.quantum_s)
        self.worker.start()
        if self.resynth is not None:  # in-process, or a backend that makes its own (server/ray_backend.py)
            make_thread = getattr(self.resynth, "resynth_thread", None)
            if make_thread is not None:
                self.resynth_thread = make_thread(loop, self.metrics)
            else:
                self.resynth_thread = ResynthThread(self.resynth, loop, self.metrics)
            self.resynth_thread.start()
        if self.config.warmup:
            started = time.perf_counter()
            await self.worker.warm_up(*self.default_pair)
            log.info("warm-up took %.2f s", time.perf_counter() - started)
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
            conn.limit(P.ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._ws_server.close(close_connections=True)
        await self._ws_server.wait_closed()
        self.worker.stop()
        if self.resynth_thread is not None:
            self.resynth_thread.stop()
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
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser: CLI clients, curl
            return True
        allowed = self.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        host = request.headers.get("Host", "")
        return origin in (f"http://{host}", f"https://{host}")  # the page this server serves

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
        ok = self.worker is not None and self.worker.alive and not self.draining
        body = {"status": "ok" if ok else ("draining" if self.draining else "worker down"), "version": __version__,
                "protocol": P.PROTOCOL_VERSION, "sessions": len(self.connections),
                "max_sessions": self.config.max_sessions, "models": self.models_name,
                "random_weights": self.random_weights, "pairs": [list(p) for p in self.pairs],
                "default_pair": list(self.default_pair), "modes": list(self.config.modes),
                "resynth": self.resynth is not None,
                "presets": list(self.config.presets or PRESETS),
                "worker_round_age_s": round(time.monotonic() - self.worker.heartbeat, 3) if self.worker else None}  # fmt: skip
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
        if len(self.connections) >= self.config.max_sessions:
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
        conn = Connection(self, ws)
        self.connections.add(conn)
        m.sessions_active.set(len(self.connections))
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            m.sessions_active.set(len(self.connections))
            m.sessions_total.labels(conn.outcome or ("disconnected" if conn.start else "no_session")).inc()


def build_encoder(config: ServerConfig) -> Any:
    """The EncoderWorker for a config (loads WavLM and the served pairs' models)."""
    import torch

    from dpslm_stream.stream.worker import EncoderWorker

    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput(f"unknown dtype {config.dtype!r}; expected float32, bfloat16 or float16")
    return EncoderWorker(hub.ModelSet(config.models), device=config.device, dtype=dtype,
                         pairs=list(config.pairs) if config.pairs else None, allow_tf32=config.allow_tf32)  # fmt: skip


def build_resynth(config: ServerConfig, models: Any = None) -> Any:
    """The ResynthWorker for a config, or None when resynthesis is off. Nothing is loaded here: ELLA-V and
    WavTokenizer load on the resynthesis thread when the first session asks for audio."""
    import torch

    from dpslm_stream.stream.resynth import ResynthWorker

    if not config.resynth:
        return None
    dtype = getattr(torch, config.resynth_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput(f"unknown resynth dtype {config.resynth_dtype!r}; expected float32, bfloat16 or float16")
    return ResynthWorker(models if models is not None else hub.ModelSet(config.models),
                         device=config.resynth_device or config.device, dtype=dtype,
                         allow_tf32=config.allow_tf32)  # fmt: skip


class ServerThread:
    """A Server on a background thread with its own event loop: for tests, benchmarks and embedding.

    with ServerThread(ServerConfig(port=0, models="tiny")) as srv:
        url = srv.url   # ws://127.0.0.1:<port>/v1/stream
    """

    def __init__(self, config: ServerConfig, encoder: Any | None = None, resynth: Any = _AUTO):
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

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout=300)

    def stop(self) -> None:
        """Drain and stop (what SIGTERM does), then join the thread."""
        if self.loop is not None and self._thread.is_alive():
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
