"""The session core: one WebSocket connection's protocol, lifecycle and limits, sans I/O.

A ``Session`` is fed events (a text or binary frame, ``tick(now)``, the encoder's and the resynthesis stream's
output, the I/O layer's reports) and returns actions (server/actions.py: frames to send, a close, backend requests).
It never touches a socket, a thread or a clock: every event carries ``now``. server/app.py's ``Connection`` is the
asyncio loop around it (python-websockets' split: the protocol is bytes and events in, events and bytes out).

Lifecycle (``State``)::

    CONNECTED --start--> OPENING --opened--> STREAMING --end / a limit--> ENDING --last unit+audio--> CLOSED --> GONE
        |                   \\--open_failed--> CONNECTED (error; may start again)
        \\--subscribe--> OPENING --subscribed--> LISTENING --end / sender done / a limit--> ENDING --> CLOSED
    any state: a fatal limit before ready, client_too_slow, or the transport going away --> CLOSED / GONE

Every limit is one rule, in ``Limits`` order below, each tested alone (tests/test_session_core.py):
start deadline, idle, session time, buffer (seconds and bytes, including hops waiting inside the encoder), stall,
outgoing bytes, message and text sizes, window sizes and max_lag, full-mode audio, resynthesis lag, exact
(unbounded-context) resynthesis length, the open deadline (backends that do not open in time).
The I/O layer reads frames only while ``reading`` is true: the core stops reading while its backends open and while
the audio buffer is full (TCP back-pressure); that time is not the client's, so it counts toward neither the idle
nor the start deadline.
"""


from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from typing import Any

import numpy as np

from dpslm_stream import __version__
from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput
from dpslm_stream.opus import OpusDataError, OpusUplinkDecoder
from dpslm_stream.stream.events import EndEvent, UnitEvent
from dpslm_stream.stream.resynth_events import AudioEvent, ResynthEndEvent

from . import actions as A
from . import limits, resume
from . import start as start_rules
from .backends import EncoderSessionInfo, Progress, ResynthStream
from .session_state import SessionState, State
from .start import ServerInfo

__all__ = ["ServerInfo", "Session", "State"]

log = logging.getLogger("dpslm_stream.server")
E = P.ErrorCode


class Session(SessionState):
    """The session core: events in, actions out (see the module docstring; the state is ``SessionState``)."""

    # ---------------------------------------------------------------------------------------------------------------
    # Events from the client

    def receive_text(self, text: str, now: float) -> list[A.Action]:
        self._client_active(now)
        if self.finished:
            return []
        try:
            msg = P.parse_client_message(text, self.cfg.max_text_bytes, self.cfg.max_json_depth)
        except P.ProtocolError as e:
            return self._error(e.code, str(e))
        if self.role == "listener":
            if isinstance(msg, P.End):
                return self._leave(now)
            return self._error(E.NOT_A_SENDER, f"a listener connection takes no {msg.TYPE}; send end to leave")
        if isinstance(msg, P.Resume):
            if self.role is not None:
                return self._error(E.ALREADY_STARTED, "resume is the first message of a new connection")
            self.role = "resuming"
            return [A.Resume(msg)]
        if self.resume_only and isinstance(msg, (P.Start, P.Subscribe)):
            return self._limit(E.BUSY, "all session slots are in use (this connection may only resume)", now)
        if isinstance(msg, P.Subscribe):
            if self.role is not None:
                return self._error(E.ALREADY_STARTED, "this connection is a sender; subscribe on a new connection")
            return self._on_subscribe(msg, now)
        if isinstance(msg, P.Start):
            if self.role is not None:
                return self._error(E.ALREADY_STARTED, "this connection already has a session; one start per connection "
                                                      "(open a new connection for a new stream)")  # fmt: skip
            return self._on_start(msg, now)
        if self.start is None:
            return self._error(E.NOT_STARTED, "end before start: send a start message first")
        if self.state == State.STREAMING:
            truncated = self.opus.truncation() if self.opus is not None else None
            return (self._error(E.BAD_AUDIO, truncated) if truncated else []) + self._end("end")
        return []

    def receive_binary(self, data: bytes, now: float) -> list[A.Action]:
        self._client_active(now)
        if self.finished:
            return []
        if self.role == "listener":
            return self._error(E.NOT_A_SENDER, "a listener connection takes no audio; the frame was dropped")
        if self.start is None:
            return self._error(E.NOT_STARTED, "audio before start: send a start message (JSON) first; the frame was "
                                              "dropped")  # fmt: skip
        if self.state != State.STREAMING:
            return self._error(E.AFTER_END, "audio after end was dropped") if self.reason == "end" else []
        if len(data) > self.cfg.max_message_bytes:
            return self._error(E.MESSAGE_TOO_LARGE, f"audio frame of {len(data)} bytes exceeds the limit of "
                                                    f"{self.cfg.max_message_bytes}; split it (e.g. 20-100 ms per "
                                                    "frame); the frame was dropped")  # fmt: skip
        try:
            samples = P.decode_audio(data, self.start.format) if self.opus is None else self.opus.push(data)
        except OpusDataError as e:  # the Opus stream cannot go on: the units of the audio decoded so far follow
            return self._limit(E.BAD_AUDIO, f"{e}", now)
        except P.ProtocolError as e:
            return self._error(e.code, str(e))
        dropped = [] if self.opus is None else [a for why in self.opus.take_dropped() for a in self._error(E.BAD_AUDIO, why)]
        if len(samples) == 0:  # Opus headers, or a page not yet complete
            return dropped
        if self._skip_samples:  # audio resent after a resume that the server had already accepted
            skipped = min(self._skip_samples, len(samples))
            samples, self._skip_samples = samples[skipped:], self._skip_samples - skipped
            if not len(samples):
                return dropped
        sr = self.start.sample_rate
        assert self.info is not None
        if self.info.mode == "full" and limits.full_mode_exceeded(self.cfg, self.received_samples, len(samples), sr):
            return dropped + self._limit(E.SESSION_TIME_LIMIT, f"mode full keeps the whole stream until the end: at "
                                                               f"most {self.cfg.max_full_s:g} s of audio (use cached or "
                                                               "sliding for longer streams)", now)  # fmt: skip
        if not self._has_room(len(samples)):
            self._held = (samples, now)
            self._pause(now)
            if self.cfg.stall_timeout_s == 0:
                return dropped + self._buffer_full(now)
            return dropped
        return dropped + self._accept(samples, now)

    # ---------------------------------------------------------------------------------------------------------------
    # Events from the backends and the I/O layer

    def opened(self, info: EncoderSessionInfo, resynth: ResynthStream | None, now: float) -> list[A.Action]:
        """The sender's backends are open (OpenSession)."""
        if self.state != State.OPENING:  # closed (drain, a limit) while the models loaded: undo
            return [A.CancelSlot(), *([A.CloseResynth()] if resynth is not None else [])]
        self._resume(now)
        self.info, self.resynth = info, resynth
        assert self.start is not None
        if self.start.format == "opus":  # a message decodes to at most the buffer's worth of audio (Opus bombs)
            max_samples = int(max(self.cfg.max_buffer_s, 0.5) * P.OPUS_SAMPLE_RATE)
            self.opus = OpusUplinkDecoder(self.start.container or "auto", max_samples)
        self.resynth_settings = resynth.settings() if resynth is not None else None
        self.state = State.STREAMING
        self.started_at = now
        self._next_stats = now + self.cfg.stats_interval_s
        self.listen_token = secrets.token_urlsafe(16)
        # A bitstream is not replayable, and an Opus stream cannot be resent from a sample offset (its decoder state
        # and container framing run on from the bytes already decoded): those sessions get no resume token.
        if self.cfg.resume_grace_s > 0 and self.start.transmit is None and self.opus is None:
            self.resume_token = secrets.token_urlsafe(16)
            self.replay = resume.ReplayLog(self.cfg.resume_outbox_bytes)
        settings = start_rules.sender_settings(self.start, info, self.resynth_settings)
        ready = self._ready(settings, "sender", self.listen_token)
        return [A.Register(self.listen_token, self.resume_token), *self._send(ready)]

    def open_failed(self, code: P.ErrorCode, message: str, now: float,
                    retry_after_s: float | None = None) -> list[A.Action]:  # fmt: skip
        """Opening failed (the backend refused the settings or failed, or the pair's models cannot be loaded now:
        busy, with when to try again: ``retry_after_s`` when known, else busy_retry_after_s): the connection may
        start again."""
        if self.state != State.OPENING:
            return []
        self._resume(now)
        self.state, self.role, self.start = State.CONNECTED, None, None
        if code == P.ErrorCode.BUSY:
            retry = self.cfg.busy_retry_after_s if retry_after_s is None else max(0.0, retry_after_s)
            return self._error(code, message, retry_after_s=retry)
        return self._error(code, message)

    def subscribed(self, sender_id: str, k: int, lmbda: int, resynth: ResynthStream | None, now: float) -> list[A.Action]:
        """The listener is attached to its sender (Subscribe)."""
        if self.state != State.OPENING:
            return [A.Unsubscribe(), *([A.CloseResynth()] if resynth is not None else [])]
        self._resume(now)
        self.sender_id, self.k_lmbda, self.resynth = sender_id, (k, lmbda), resynth
        self.resynth_settings = resynth.settings() if resynth is not None else None
        self.state = State.LISTENING
        self.started_at = now
        self._next_stats = now + self.cfg.stats_interval_s
        settings = {"sender": sender_id, "k": k, "lmbda": lmbda, "frame_rate": P.FRAME_RATE,
                    "resynth": self.resynth_settings}  # fmt: skip
        return self._send(self._ready(settings, "listener", None))

    def subscribe_failed(self, code: P.ErrorCode, message: str, now: float) -> list[A.Action]:
        """The sender is unknown, full or gone (fatal), or the listener's resynthesis could not open (not fatal)."""
        if self.state != State.OPENING:
            return []
        self._resume(now)
        self.state, self.role = State.CONNECTED, None
        if code in P.CLOSE_CODES:
            return self._limit(code, message, now)
        return self._error(code, message)

    def consumed(self, queued_samples: int, now: float) -> list[A.Action]:
        """The encoder took queued audio; ``queued_samples`` is what is still queued."""
        self.queued_samples = min(self.queued_samples, queued_samples)
        return self._retry_held(now)

    def encoder_events(self, events: list, progress: Progress, now: float) -> list[A.Action]:
        self.progress = progress
        if self.finished or self.role != "sender":
            return []
        out: list[A.Action] = []
        for ev in events:
            if isinstance(ev, UnitEvent):
                out += self._on_unit(ev, now)
            elif isinstance(ev, EndEvent):
                self.report.num_frames = int(ev.frames)
                self.forced_commits = int(ev.forced_commits)
                out += self._units_over(now)
            elif isinstance(ev, InvalidInput):  # the encoder refused a chunk; the session goes on
                out += self._error(E.BAD_AUDIO, str(ev))
        return out + self._retry_held(now)

    def failed(self, error: BaseException, now: float) -> list[A.Action]:
        """This session's backend work (or the server's own handling of it) failed: internal_error, then end with
        the units already sent; other sessions are unaffected."""
        if self.finished:
            return []
        log.error("session %s failed: %s: %s", self.id, type(error).__name__, error)
        self._held = None
        out = self._error(E.INTERNAL_ERROR, f"this session failed ({type(error).__name__}: {error}); the units "
                                            "already sent stand; other sessions are unaffected", fatal=True)  # fmt: skip
        if self.role is None or self.state in (State.CONNECTED, State.OPENING):
            return out + self._close(P.CLOSE_INTERNAL, E.INTERNAL_ERROR.value)
        self.reason = E.INTERNAL_ERROR.value
        out += [A.CancelSlot()] if self.role == "sender" else [A.Unsubscribe()]
        if self.role == "sender" and not self.units_done:
            out.append(A.ListenersDone(gone=True))
        self.units_done = True
        if self.resynth is not None and self.resynth_end is None:
            out.append(A.CloseResynth())
            self.resynth_end = self.report.resynth_end_event(f"the session failed: {type(error).__name__}")
        return out + self._maybe_finish(now)

    def resynth_events(self, events: list, stats: Any, now: float) -> list[A.Action]:
        self.report.rstats = stats
        if self.finished:
            return []
        out: list[A.Action] = []
        for ev in events:
            if isinstance(ev, AudioEvent):
                if ev.num_samples > 0:
                    start = self.report.audio_samples
                    frame = self.report.audio_chunk(ev)
                    if self.replay is not None:
                        self.replay.audio(start, ev.num_samples, frame)
                    out += self._send_bytes(frame, logged=self.replay is not None)
            elif isinstance(ev, ResynthEndEvent):
                self.resynth_end = ev if self._resynth_cut is None else dataclasses.replace(ev, error=self._resynth_cut)
                if ev.error is not None:
                    out += self._error(E.INTERNAL_ERROR, f"resynthesis stopped: {ev.error}; units are unaffected")
                out += self._maybe_finish(now)
        return out

    def resynth_failed(self, error: BaseException, now: float) -> list[A.Action]:
        return self._stop_resynth(E.INTERNAL_ERROR, f"{type(error).__name__}: {error}", now)

    def relay_unit(self, msg: P.Unit, now: float) -> list[A.Action]:
        """Listener: one of the sender's units (only units cross from sender to listener)."""
        if self.state != State.LISTENING:
            return []
        if self.bitstream_listener:  # it gets the bits only, and counts the units for its stats
            self.report.relayed(msg)
            return []
        self.report.relayed(msg)
        return self._send(msg) + self._resynthesize(int(msg.unit), float(msg.end_s))

    def sender_done(self, gone: bool, now: float) -> list[A.Action]:
        """Listener: the sender's stream is over (gone: its connection ended before its last unit)."""
        if self.state != State.LISTENING:
            return []
        self.reason, self.state = (E.SENDER_GONE.value if gone else "end"), State.ENDING
        out: list[A.Action] = []
        if gone:
            out += self._error(E.SENDER_GONE, "the sender's connection ended; the audio of the units received follows, "
                                              "then end", fatal=True)  # fmt: skip
        return out + self._units_over(now)

    def transmit_opened(self, header: bytes, now: float) -> list[A.Action]:
        """The sender's transmitter is ready: the stream header goes out first (to the sender and its listeners)."""
        if self.finished or self.transmit is None or self.tx_done:
            return []
        self.tx_header = header
        waiting, self.tx_waiting = self.tx_waiting, []
        out = self._send_bytes(P.encode_bitstream_frame("header", header)) + [A.RelayBits("header", header)]
        return out + waiting + ([A.TransmitEnd(now)] if self.units_done else [])

    def transmitted(self, packets: list[bytes], deadline: float, stats: dict, done: bool, now: float) -> list[A.Action]:
        """Packets the transmitter made (in order): to the sender and its bitstream listeners."""
        if self.finished or self.tx_done:
            return []
        out: list[A.Action] = []
        for packet in packets:
            out += self._send_bytes(P.encode_bitstream_frame("packet", packet))
            out.append(A.RelayBits("packet", packet))
        self.tx_deadline, self.tx_stats = deadline, stats
        if done:
            self.tx_done = True
            out += [A.ListenersDone(gone=False)] if self.role == "sender" and self.units_done else []
            out += self._maybe_finish(now)
        return out

    def transmit_failed(self, error: BaseException, now: float) -> list[A.Action]:
        """The transmitter failed (or could not open): the units go on without the bitstream."""
        if self.finished or (self.tx_done and self.tx_header is not None):
            return []
        log.error("session %s: transmission failed: %s: %s", self.id, type(error).__name__, error)
        was_pending = not self.tx_done
        self.tx_done, self.tx_waiting = True, []
        out = self._error(E.INTERNAL_ERROR, f"the bitstream stopped ({type(error).__name__}: {error}); units go on")
        if was_pending and self.units_done and self.role == "sender":
            out.append(A.ListenersDone(gone=False))  # _units_over left it to the last packet
        return out + self._maybe_finish(now)

    def relay_bits(self, part: str, data: bytes, now: float) -> list[A.Action]:
        """Bitstream listener: one of the sender's frames."""
        if self.state != State.LISTENING or not self.bitstream_listener:
            return []
        return self._send_bytes(P.encode_bitstream_frame(part, data))

    def sent(self, nbytes: int) -> None:
        """The I/O layer wrote ``nbytes`` of queued frames to the socket."""
        self.outgoing_bytes = max(0, self.outgoing_bytes - nbytes)

    def tick(self, now: float) -> list[A.Action]:
        """Apply the time rules; send stats when due; let a due packet leave."""
        cfg = self.cfg
        if self.parked is not None:
            if now >= self.parked.deadline:
                return self._expire_park("resume_expired")
            if self.state in (State.STREAMING, State.ENDING) and now >= self.started_at + cfg.max_session_s:
                return self._limit(E.SESSION_TIME_LIMIT, f"the session reached the {cfg.max_session_s:g} s limit", now)
            return []
        out: list[A.Action] = []
        if self.replay is not None and self.received_samples > self.acked and not self.finished and (
                now >= self._acked_at + resume.ACK_INTERVAL_S):
            out += self._ack(now)
        if not self.tx_done and not self.finished and now >= self.tx_deadline:
            self.tx_deadline = math.inf  # until the transmitter reports its next one
            out.append(A.TransmitTick(now))
        if self.state == State.CONNECTED:
            if now >= self.connected_at + self._paused_total + cfg.start_timeout_s:
                return self._limit(E.START_TIMEOUT, f"no start or subscribe within {cfg.start_timeout_s:g} s of "
                                                    "connecting", now)  # fmt: skip
            if now >= self._client_clock_from + cfg.idle_timeout_s:
                return self._limit(E.IDLE_TIMEOUT, f"no message for {cfg.idle_timeout_s:g} s", now)
        if self.state == State.OPENING and now >= self._open_deadline:
            return self._open_expired(now)
        if self.state in (State.STREAMING, State.LISTENING) and now >= self.started_at + cfg.max_session_s:
            out += self._limit(E.SESSION_TIME_LIMIT, f"the session reached the {cfg.max_session_s:g} s limit", now)
        if self.state == State.STREAMING:
            if self._held is not None and now >= self._held[1] + cfg.stall_timeout_s:
                out += self._buffer_full(now)
            elif self._held is None and now >= self._client_clock_from + cfg.idle_timeout_s:
                out += self._limit(E.IDLE_TIMEOUT, f"no message for {cfg.idle_timeout_s:g} s", now)
        if now >= self._next_stats and not self.finished:
            self._next_stats = now + cfg.stats_interval_s
            out += self._check_resynth_lag(now)
            mark = (self.received_samples, self.report.units, self.report.audio_samples)
            if mark != self._stats_mark and self.reason in (None, "end") and not self.finished:
                self._stats_mark = mark
                out += self._send(self.stats(now))
        return out

    def shutdown(self, now: float) -> list[A.Action]:
        """The server drains: finish this session (units, audio, end), close 1001; a parked one ends now."""
        if self.parked is not None:
            return self._expire_park(E.SHUTTING_DOWN.value)
        return self._limit(E.SHUTTING_DOWN, "the server is shutting down", now)

    # ---------------------------------------------------------------------------------------------------------------
    # Start and subscribe

    def _on_start(self, msg: P.Start, now: float) -> list[A.Action]:
        plan = start_rules.check_start(self.cfg, self.server, msg)
        if isinstance(plan, start_rules.Refusal):
            return self._error(plan.code, plan.message)
        self.transmit = msg.transmit
        self.tx_done = msg.transmit is None  # with a transmitter, end waits for its END packet
        self.start, self.role, self.state = msg, "sender", State.OPENING
        self.resynth_options, self._open_deadline = plan.resynth, now + self.cfg.open_timeout_s
        self._pause(now)
        return [A.OpenSession(msg.sample_rate, plan.settings, plan.resynth)]

    def _on_subscribe(self, msg: P.Subscribe, now: float) -> list[A.Action]:
        resynth = start_rules.check_resynth(self.cfg, self.server, msg.resynth)
        if isinstance(resynth, start_rules.Refusal):
            return self._error(resynth.code, resynth.message)
        self.role, self.state = "listener", State.OPENING
        self.resynth_options, self._open_deadline = resynth, now + self.cfg.open_timeout_s
        self._pause(now)
        self.bitstream_listener = msg.format == "bitstream"
        return [A.Subscribe(msg.session, msg.token, resynth, bitstream=self.bitstream_listener)]

    def _ready(self, settings: dict, role: str, listen_token: str | None) -> P.Ready:
        return P.Ready(session=self.id, settings=settings, limits=self.cfg.limits(), models=self.server.models,
                       random_weights=self.server.random_weights, server=f"dpslm-stream {__version__}", role=role,
                       listen_token=listen_token, resume_token=self.resume_token,
                       resume_grace_s=self.cfg.resume_grace_s if self.resume_token else 0.0)  # fmt: skip

    # ---------------------------------------------------------------------------------------------------------------
    # Audio in, units out

    def _has_room(self, n: int) -> bool:
        assert self.start is not None and self.info is not None
        sr = self.start.sample_rate
        buffered = limits.buffered_samples(self.info, self.progress, self.queued_samples, sr)
        return limits.buffer_has_room(self.cfg, buffered, self.queued_samples, n, sr)

    def _accept(self, samples: np.ndarray, arrived: float) -> list[A.Action]:
        assert self.start is not None
        sr = self.start.sample_rate
        self.received_samples += len(samples)
        self.queued_samples += len(samples)
        self.report.clock.add(self.received_samples / sr, arrived)
        if self.metrics is not None:
            self.metrics.audio_seconds_total.inc(len(samples) / sr)
        return [A.FeedAudio(samples)]

    def _retry_held(self, now: float) -> list[A.Action]:
        if self._held is None or self.state != State.STREAMING or not self._has_room(len(self._held[0])):
            return []
        samples, arrived = self._held
        self._held = None
        self._resume(now)
        return self._accept(samples, arrived)

    def _buffer_full(self, now: float) -> list[A.Action]:
        self._held = None
        self._resume(now)
        return self._limit(E.BUFFER_FULL, f"more than {self.cfg.max_buffer_s:g} s of audio queued and the server could "
                                          f"not take more for {self.cfg.stall_timeout_s:g} s; send at most real time, "
                                          "or wait for units before sending more", now)  # fmt: skip

    def _on_unit(self, ev: UnitEvent, now: float) -> list[A.Action]:
        msg = self.report.unit(ev, now, self.id)
        text = P.to_json(msg)
        if self.replay is not None:
            self.replay.unit(msg.seq, text, len(text.encode("utf-8")))
        out = self._send_bytes(text, logged=self.replay is not None)
        if self.finished:  # dropped (client_too_slow): its backends are released
            return out
        if self.transmit is not None and not self.tx_done:
            durations = (int(ev.duration),) if self.transmit["durations"] else None
            transmit = A.Transmit((int(ev.unit),), durations, now)
            if self.tx_header is None:  # the transmitter is still opening: it gets them in order once it is open
                self.tx_waiting.append(transmit)
            else:
                out.append(transmit)
        return [*out, A.Relay(msg), *self._resynthesize(int(ev.unit), float(ev.end_s))]

    def _resynthesize(self, unit: int, end_s: float) -> list[A.Action]:
        if self.resynth is None or self.resynth_end is not None or self._resynth_cut is not None:
            return []
        self._resynth_from = end_s if self._resynth_from is None else self._resynth_from
        if limits.exact_resynth_exceeded(self.cfg, self.resynth_options, self._resynth_from, end_s):
            return self._cut_exact_resynth()
        return [A.PushUnits((unit,), (end_s,))]

    def _cut_exact_resynth(self) -> list[A.Action]:
        """The exact-resynthesis rule: unbounded context keeps the whole stream in every pass, so it ends after
        max_exact_resynth_s of input; the audio of the units pushed so far still comes, the units go on."""
        limit = self.cfg.max_exact_resynth_s
        self._resynth_cut = (f"unbounded context (left_context or vocoder_left_context null) is limited to {limit:g} s "
                             "of input on this server (serve --max-exact-resynth); give a number for longer streams")  # fmt: skip
        return [A.EndResynth(), *self._error(E.RESYNTH_LIMIT, f"resynthesis ended: {self._resynth_cut}; the audio of "
                                                              "the units before it follows; units are unaffected")]  # fmt: skip
