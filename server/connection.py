"""One WebSocket connection on the event loop: the asyncio shell around its session core (server/session.py).

It only moves data: frames from the socket become the core's events, the core's actions become frames on the socket
and calls on the backends (server/backends.py), and one timer per connection fires ``tick`` at the core's next
deadline. The backends report through the sink methods (``on_events``, ``on_resynth_events``, ...), which are events
of the core too. Any exception while handling one of this connection's events ends this session alone with
``internal_error`` and an ``end`` carrying the units already sent (``Session.failed``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput, UnknownModel

from dpslm_stream.codec.link import Transmitter

from . import actions as A
from .backends import EncoderSlot, Progress, ResynthStream
from .pair_budget import PairsInUse
from .session import Session

if TYPE_CHECKING:
    from .backends import EncoderBackend, ResynthBackend
    from .config import ServerConfig
    from .metrics import Metrics
    from .session import ServerInfo
    from .transmit import CodecService

log = logging.getLogger("dpslm_stream.server")
E = P.ErrorCode


class _Close:
    """The outgoing queue's last item: close with this code once everything before it was written."""

    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason


class ConnectionHost(Protocol):
    """What a connection uses of the server that holds it (server/app.py's ``Server`` implements it); declared here
    so this module does not import the app that imports it."""

    @property
    def config(self) -> ServerConfig: ...
    @property
    def info(self) -> ServerInfo: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def senders(self) -> dict[str, Connection]: ...  # started sender sessions by id
    @property
    def resumable(self) -> dict[str, Connection]: ...  # sender sessions by resume token (parked or not)
    def release(self, conn: Connection) -> None: ...  # the session is over: free its slot, count it
    def hold_pair(self, pair: tuple[int, int]) -> None: ...  # raises PairsInUse (server/pair_budget.py)
    async def pair_unloaded(self, pair: tuple[int, int]) -> None: ...
    def release_pair(self, pair: tuple[int, int]) -> None: ...
    @property
    def encoder_backend(self) -> EncoderBackend | None: ...
    @property
    def resynth_backend(self) -> ResynthBackend | None: ...
    @property
    def codec(self) -> CodecService | None: ...


class Connection:
    """Implements SlotSink and ResynthSink (server/backends.py) for its session."""

    def __init__(self, server: ConnectionHost, ws: ServerConnection, resume_only: bool = False):
        self.server = server
        self.ws: ServerConnection | None = ws  # None while the session is parked (server/resume.py)
        self.loop = asyncio.get_running_loop()
        self.id = uuid.uuid4().hex[:12]
        self.core = Session(self.id, server.config, server.info, self.loop.time(), server.metrics, resume_only)
        self.slot: EncoderSlot | None = None
        self.rstream: ResynthStream | None = None
        self.transmitter: Transmitter | None = None  # start.transmit (runs on the server's codec thread)
        self.listeners: set[Connection] = set()  # sender: its listeners
        self.sender: Connection | None = None  # listener: its sender
        self.out: asyncio.Queue = asyncio.Queue()
        self._readable = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._send_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._transport = 0  # counts the transports that carried this session (a resume brings a new one)
        self._handed_to: tuple[Connection, P.Resume] | None = None  # this transport resumed that session
        self._released = False
        self.pair_held: tuple[int, int] | None = None  # the (k, lambda) whose large models this session holds loaded

    @property
    def buffered_s(self) -> float:
        start = self.core.start
        return self.core.queued_samples / start.sample_rate if start is not None else 0.0

    # --- the loop ----------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve this connection's transport; when its first message resumed another session, serve that one on it."""
        ws = self.ws
        assert ws is not None
        await self.serve(ws, None)
        if self._handed_to is not None:
            conn, msg = self._handed_to
            await conn.serve(ws, msg)

    async def serve(self, ws: ServerConnection, resume: P.Resume | None) -> None:
        """Carry this session over ``ws`` until it closes. ``resume``: ``ws`` takes the session over (from a parked
        state, or from an older transport, which is closed)."""
        if resume is not None and self.core.resume_refusal(resume) is not None:
            await ws.close(P.CLOSE_POLICY, E.RESUME_FAILED.value)  # it ended since the check: the client retries
            return
        old, self.ws = self.ws, ws
        self._transport += 1
        transport = self._transport
        self.out = out = asyncio.Queue[Any]()
        if old is not None and old is not ws:  # a takeover: the old transport's loops see they are no longer current
            self._spawn(old.close(P.CLOSE_POLICY, "the session was resumed on another connection"))
            self._readable.set()
        send_task = self._send_task = asyncio.create_task(self._send_loop(ws, out))
        if resume is not None:
            self.handle(self.core.resume, resume)
        self._arm_timer()
        try:
            await self._receive_loop(ws, transport)
        finally:
            if not send_task.done():
                # The socket is closed: nothing queued can be written any more. Stop at once (the slot is released).
                send_task.cancel()
            if transport == self._transport:  # not taken over meanwhile
                self.ws = None
                clean = ws.protocol.close_rcvd is not None  # the client closed with a handshake: no resume
                self.handle(self.core.transport_lost, clean)

    def _release(self) -> None:
        """The session is over (gone): drop it from the server, stop its timer and helper tasks."""
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
        if self.server.senders.get(self.id) is self:
            del self.server.senders[self.id]
        token = self.core.resume_token
        if token is not None and self.server.resumable.get(token) is self:
            del self.server.resumable[token]
        for task in list(self._tasks):
            task.cancel()
        self._drop_pair()
        self.server.release(self)

    async def _receive_loop(self, ws: ServerConnection, transport: int) -> None:
        while transport == self._transport:
            while not self.core.reading:
                if self.core.state.value == "gone" or transport != self._transport:
                    return
                self._readable.clear()
                await self._readable.wait()
            if transport != self._transport:
                return
            try:
                data = await ws.recv()
            except ConnectionClosed:
                return
            if transport != self._transport:
                return
            if isinstance(data, str):
                self.handle(self.core.receive_text, data)
            else:
                self.handle(self.core.receive_binary, data)
            if self._handed_to is not None:
                return

    async def _send_loop(self, ws: ServerConnection, out: asyncio.Queue) -> None:
        try:
            while True:
                item = await out.get()
                if isinstance(item, _Close):
                    await ws.close(item.code, item.reason)
                    return
                data, nbytes = item
                await ws.send(data)
                self.core.sent(nbytes)
        except ConnectionClosed:
            pass
        except Exception:  # a bug must not leave the connection hanging: close it, keep serving the others
            log.exception("session %s: sending failed", self.id)
            await ws.close(P.CLOSE_INTERNAL, "internal_error")

    def handle(self, event: Callable[..., list], *args: Any, **options: Any) -> None:
        """Feed one event to the core (``now`` is appended to ``args``) and carry out its actions."""
        now = self.loop.time()
        try:
            self.execute(event(*args, now, **options))
        except Exception as e:  # noqa: BLE001 - one session's bug ends that session, with its units
            log.exception("session %s: handling %s failed", self.id, getattr(event, "__name__", event))
            try:
                self.execute(self.core.failed(e, now))
            except Exception:  # noqa: BLE001 - even that failed: drop the connection
                log.exception("session %s: could not end the session cleanly", self.id)
                self._abort(P.CLOSE_INTERNAL, "internal_error")
        if self.core.reading:
            self._readable.set()
        if self.core.state.value == "gone":
            self._release()
        else:
            self._arm_timer()

    def _arm_timer(self) -> None:
        """One timer per connection, at the core's next deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.core.next_deadline()
        if deadline != float("inf") and (not self.core.finished or self.core.parked is not None):
            self._timer = self.loop.call_at(deadline, self.handle, self.core.tick)

    # --- actions -----------------------------------------------------------------------------------------------------

    def execute(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, A.Send):
                self.out.put_nowait((a.data, a.nbytes))
            elif isinstance(a, A.Close):
                self.out.put_nowait(_Close(a.code, a.reason))
            elif isinstance(a, A.Abort):
                self._abort(a.code, a.reason)
            elif isinstance(a, A.FeedAudio):
                assert self.slot is not None
                self.slot.add_audio(a.samples)
                self._wake_encoder()
            elif isinstance(a, A.RequestEnd):
                assert self.slot is not None
                self.slot.request_end()
                self._wake_encoder()
            elif isinstance(a, A.CancelSlot):
                if self.slot is not None:
                    self.slot.cancel()
            elif isinstance(a, A.PushUnits):
                assert self.rstream is not None and self.server.resynth_backend is not None
                try:
                    self.rstream.push_units(list(a.units), list(a.end_s))
                except InvalidInput as e:  # cannot happen for the encoder's own units; do not lose the session
                    log.error("session %s: resynthesis refused a unit: %s", self.id, e)
                self.server.resynth_backend.wake()
            elif isinstance(a, A.EndResynth):
                assert self.rstream is not None and self.server.resynth_backend is not None
                self.rstream.end()
                self.server.resynth_backend.wake()
            elif isinstance(a, A.CloseResynth):
                self._close_resynth(self.rstream)
            elif isinstance(a, A.Relay):
                for listener in list(self.listeners):
                    listener.handle(listener.core.relay_unit, a.unit)
            elif isinstance(a, A.ListenersDone):
                for listener in list(self.listeners):
                    listener.handle(listener.core.sender_done, a.gone)
            elif isinstance(a, A.Unsubscribe):
                if self.sender is not None:
                    self.sender.listeners.discard(self)
                    self.sender.core.listeners = len(self.sender.listeners)
            elif isinstance(a, (A.Transmit, A.TransmitTick, A.TransmitEnd)):
                self._transmit(a)
            elif isinstance(a, A.RelayBits):
                for listener in list(self.listeners):
                    listener.handle(listener.core.relay_bits, a.part, a.data)
            elif isinstance(a, A.Register):
                self.server.senders[self.id] = self
                if a.resume_token is not None:
                    self.server.resumable[a.resume_token] = self
            elif isinstance(a, A.Resume):
                self._resume(a.msg)
            elif isinstance(a, A.OpenSession):
                self._spawn(self._open(a))
            elif isinstance(a, A.Subscribe):
                self._spawn(self._subscribe(a))
            else:
                raise TypeError(f"unknown action {a!r}")

    def _transmit(self, a: A.Transmit | A.TransmitTick | A.TransmitEnd) -> None:
        """Run one transmitter call on the codec thread; its packets come back to the core in order."""
        tx, codec = self.transmitter, self.server.codec
        if tx is None or codec is None:
            return
        done = isinstance(a, A.TransmitEnd)

        def call() -> list[bytes]:
            assert tx is not None
            if isinstance(a, A.Transmit):
                return tx.on_units(list(a.units), None if a.durations is None else list(a.durations), a.at)
            return tx.finish(a.at) if done else tx.tick(a.at)

        def back(future: Any) -> None:
            if future.cancelled():
                return
            if future.exception() is not None:
                self.handle(self.core.transmit_failed, future.exception())
            else:
                packets, deadline, stats = future.result()
                self.handle(self.core.transmitted, packets, deadline, stats, done)

        codec.submit(tx, call, a.at, back)

    def _wake_encoder(self) -> None:
        if self.server.encoder_backend is not None:
            self.server.encoder_backend.wake()

    def _resume(self, msg: P.Resume) -> None:
        """This connection's first message resumes the session with ``msg.token``: hand this transport over to it
        (``run`` serves it next), or refuse (resume_failed, fatal)."""
        conn = self.server.resumable.get(msg.token)
        refusal = "no session with that resume token (expired, ended, or never issued)" if conn is None else \
            conn.core.resume_refusal(msg)  # fmt: skip
        if refusal is not None:
            self.handle(self.core.resume_failed, refusal)
            return
        assert conn is not None
        self._handed_to = (conn, msg)
        self.handle(self.core.handed_over)

    def _abort(self, code: int, reason: str) -> None:
        while not self.out.empty():
            self.out.get_nowait()
        if self._send_task is not None:
            self._send_task.cancel()
        if self.ws is not None:
            self._spawn(self.ws.close(code, reason))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        """A helper task (opening the backends, a close) ended: a bug in it ends this session like any other."""
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("session %s: a task failed: %r", self.id, error)
            self.handle(self.core.failed, error)

    # --- opening the backends ----------------------------------------------------------------------------------------

    async def _opening(self, what: str, opener: Callable[[], Awaitable[Any]],
                       release: Callable[[Any], None]) -> tuple[Any, tuple | None]:  # fmt: skip
        """Await one backend open: (its result, None), or (None, (error code, message)) when it is refused (unknown
        model, bad settings) or fails (a failing model load must not take the server down). When the connection
        gives up first (gone, or the core's open deadline closed it), what opens later is ``release``d."""
        opening = asyncio.ensure_future(opener())
        try:
            return await asyncio.shield(opening), None
        except asyncio.CancelledError:  # the connection went away (e.g. after the open deadline): release it later
            opening.add_done_callback(lambda f: None if f.cancelled() or f.exception() else release(f.result()))
            raise
        except UnknownModel as e:
            return None, (E.UNKNOWN_MODEL, f"{what}: {e}")
        except InvalidInput as e:
            return None, (E.BAD_SETTINGS, f"{what}: {e}")
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", what)
            return None, (E.INTERNAL_ERROR, f"{what} failed: {type(e).__name__}: {e}")

    async def _hold_pair(self, pair: tuple[int, int]) -> PairsInUse | None:
        """Hold ``pair``'s large models loaded for this session (server/pair_budget.py): None, or the refusal (busy)
        when every pair the server may keep loaded is in use by other sessions."""
        if self.pair_held != pair:
            self._drop_pair()
            try:
                self.server.hold_pair(pair)
            except PairsInUse as e:
                return e
            self.pair_held = pair
        await self.server.pair_unloaded(pair)
        return None

    def _drop_pair(self) -> None:
        if self.pair_held is not None:
            self.server.release_pair(self.pair_held)
            self.pair_held = None

    def _refused(self, event: Callable[..., list], *args: Any, **options: Any) -> None:
        """A start or subscribe that did not open: the pair it held is free again (the client may start another)."""
        self._drop_pair()
        self.handle(event, *args, **options)

    def _close_resynth(self, rstream: ResynthStream | None) -> None:
        if rstream is not None and self.server.resynth_backend is not None:
            self.server.resynth_backend.close(rstream)

    async def _open(self, a: A.OpenSession) -> None:
        k, lmbda = a.settings["k"], a.settings["lmbda"]
        rstream, slot = None, None
        resynth, encoder = self.server.resynth_backend, self.server.encoder_backend
        assert encoder is not None and (a.resynth is None or resynth is not None)
        transmit = self.core.transmit
        if a.settings.get("score") is True or a.resynth is not None or (transmit or {}).get("coder") == "ulm":
            busy = await self._hold_pair((k, lmbda))
            if busy is not None:
                return self._refused(self.core.open_failed, E.BUSY, str(busy), retry_after_s=busy.retry_after_s)
        try:
            if a.resynth is not None and resynth is not None:
                options = a.resynth
                rstream, refused = await self._opening("resynthesis", lambda: resynth.open(k, lmbda, options, self),
                                                 self._close_resynth)  # fmt: skip
                if refused:
                    return self._refused(self.core.open_failed, *refused)
            slot, refused = await self._opening("encoder session",
                                                lambda: encoder.open_slot(self.id, a.sample_rate, a.settings, self),
                                                lambda slot: slot.cancel())  # fmt: skip
            if refused:
                self._close_resynth(rstream)
                return self._refused(self.core.open_failed, *refused)
        except asyncio.CancelledError:  # the connection went away while the models loaded
            self._close_resynth(rstream)
            if slot is not None:
                slot.cancel()
            raise
        self.slot, self.rstream = slot, rstream
        self.handle(self.core.opened, slot.info, rstream)
        if transmit is not None and not self.core.finished:
            codec = self.server.codec
            try:  # the first use of a (k, lambda) loads its ULM (on the codec's loading thread); units wait in the core
                if codec is None:
                    raise RuntimeError("this server has no codec thread")
                opening = codec.open(transmit, slot.info.k, slot.info.lmbda, self.loop.time())
                self.transmitter = await asyncio.wait_for(opening, self.server.config.open_timeout_s)
            except Exception as e:  # noqa: BLE001 - the bitstream is lost, not the session
                return self.handle(self.core.transmit_failed, e)
            self.handle(self.core.transmit_opened, self.transmitter.header_bytes())

    async def _subscribe(self, a: A.Subscribe) -> None:
        """Listener mode: receive a running sender's units, and audio made from those units alone."""
        cfg = self.server.config
        sender = self.server.senders.get(a.session)
        token = sender.core.listen_token if sender is not None else None
        token_ok = token is not None and hmac.compare_digest(a.token.encode(), token.encode())
        if sender is None or not token_ok or not sender.core.accepts_listeners:
            return self._refused(self.core.subscribe_failed, E.UNKNOWN_SESSION,
                               f"no running session {a.session!r} with that listen token")  # fmt: skip
        if len(sender.listeners) >= cfg.max_listeners:
            return self._refused(self.core.subscribe_failed, E.BUSY,
                               f"session {a.session} already has {cfg.max_listeners} listeners")  # fmt: skip
        assert sender.core.info is not None
        k, lmbda = sender.core.info.k, sender.core.info.lmbda
        rstream: ResynthStream | None = None
        resynth = self.server.resynth_backend
        if a.resynth is not None and resynth is not None:
            options = a.resynth
            busy = await self._hold_pair((k, lmbda))
            refused = None if busy is None else (E.BUSY, str(busy))
            if busy is None:
                rstream, refused = await self._opening("resynthesis", lambda: resynth.open(k, lmbda, options, self),
                                                     self._close_resynth)  # fmt: skip
            if refused:
                return self._refused(self.core.subscribe_failed, *refused)
        if a.bitstream and sender.core.transmit is None:
            return self._refused(self.core.subscribe_failed, E.UNSUPPORTED_OPTION,
                               f"session {a.session} does not transmit a bitstream (its start has no transmit)")  # fmt: skip
        if not sender.core.accepts_listeners or self.server.senders.get(a.session) is not sender:
            self._close_resynth(rstream)
            return self._refused(self.core.subscribe_failed, E.SENDER_GONE,
                               f"session {a.session} ended while the listener was starting")  # fmt: skip
        self.sender, self.rstream = sender, rstream
        sender.listeners.add(self)
        sender.core.listeners = len(sender.listeners)
        self.handle(self.core.subscribed, sender.id, k, lmbda, rstream)
        if a.bitstream and sender.core.tx_header is not None:  # the header first; packets follow as they are made
            self.handle(self.core.relay_bits, "header", sender.core.tx_header)

    # --- sinks (called on the loop by the backends) -------------------------------------------------------------------

    def on_events(self, events: list, progress: Progress) -> None:
        self.handle(self.core.encoder_events, events, progress)

    def on_consumed(self) -> None:
        self.handle(self.core.consumed, self.slot.queued_samples if self.slot is not None else 0)

    def on_failure(self, error: BaseException) -> None:
        self.handle(self.core.failed, error)

    def on_resynth_events(self, events: list, stats: Any) -> None:
        self.handle(self.core.resynth_events, events, stats)

    def on_resynth_failure(self, error: BaseException) -> None:
        self.handle(self.core.resynth_failed, error)

    # --- the server ----------------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        self.handle(self.core.shutdown)
