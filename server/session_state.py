"""The session core's state, its output and its endings (server/session.py's ``Session`` adds the events).

``SessionState`` holds one connection's session: its lifecycle ``State``, counters, backends' handles and the resume
record (server/resume.py), and the transitions every event shares: sending within the outgoing rule (or into the
parked outbox), coded errors, the fatal limits and the orderly end (every unit and audio chunk, then ``end``, then
the close), the resynthesis limits, parking and resuming, stats. Like the events, it never touches a socket, a
thread or a clock.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from typing import Any

import numpy as np

from dpslm_stream import protocol as P
from dpslm_stream.opus import OpusUplinkDecoder
from dpslm_stream.stream.resynth_events import ResynthEndEvent
from dpslm_stream.stream.resynth_options import ResynthOptions

from . import actions as A
from . import limits, resume
from .backends import EncoderSessionInfo, Progress, ResynthStream
from .config import ServerConfig
from .report import Report
from .start import ServerInfo

log = logging.getLogger("dpslm_stream.server")
E = P.ErrorCode

class State(enum.Enum):
    CONNECTED = "connected"  # no session yet: start or subscribe expected
    OPENING = "opening"  # start/subscribe accepted, the backends open (frames are not read meanwhile)
    STREAMING = "streaming"  # sender: audio in, units out
    LISTENING = "listening"  # listener: the sender's units in, audio out
    ENDING = "ending"  # no more input: the remaining units and audio are finished, then end
    CLOSED = "closed"  # the last frame (end, or a fatal error) is queued and the close requested
    GONE = "gone"  # the transport is gone


class SessionState:
    """The state and shared transitions of one session (see the module docstring)."""

    def __init__(self, session_id: str, config: ServerConfig, server: ServerInfo, now: float, metrics: Any = None,
                 resume_only: bool = False):  # fmt: skip
        self.id = session_id
        self.resume_only = resume_only  # admitted beyond max_sessions for a parked session: start/subscribe are busy
        self.cfg = config
        self.server = server
        self.metrics = metrics
        self.state = State.CONNECTED
        self.role: str | None = None  # "sender" or "listener" once opening
        self.reason: str | None = None  # why the session ends: "end" or an ErrorCode value
        self.outcome: str | None = None  # how it ended (the sessions_total metric's label)
        self.connected_at = now
        self.started_at = now  # ready time
        self._client_clock_from = now  # the idle rule counts from here (last frame, or the end of a pause)
        self._paused_since: float | None = None  # frames are not read since then (opening, full buffer)
        self._paused_total = 0.0  # seconds not read before start (the start deadline excludes them)
        self._next_stats = math.inf
        self._stats_mark: tuple = ()
        # Sender.
        self.start: P.Start | None = None
        self.info: EncoderSessionInfo | None = None
        self.listen_token: str | None = None
        self.received_samples = 0
        self.queued_samples = 0  # fed, not yet taken by the encoder (an upper bound between reports)
        self.progress = Progress()
        self._held: tuple[np.ndarray, float] | None = None  # a frame waiting for buffer room, and when it arrived
        self.opus: OpusUplinkDecoder | None = None  # format opus: the stream's decoder (48 kHz out)
        self.units_done = False  # every unit of the stream has been sent
        self.forced_commits = 0
        self.listeners = 0
        # Listener.
        self.sender_id: str | None = None
        self.k_lmbda: tuple[int, int] | None = None
        # Output.
        self.outgoing_bytes = 0
        self.report = Report(metrics)
        # Resynthesis.
        self.resynth: ResynthStream | None = None
        self.resynth_settings: dict | None = None
        self.resynth_options: ResynthOptions | None = None
        self._resynth_from: float | None = None  # end_s of the first unit resynthesized (the exact-resynthesis rule)
        self._resynth_cut: str | None = None  # why the resynthesis was ended early (its pushed units still get audio)
        self._open_deadline = math.inf
        # Transmission (start.transmit / a bitstream listener); the transmitter itself runs on the codec thread.
        self.transmit: dict | None = None  # the sender's validated TransmitOptions (JSON form)
        self.bitstream_listener = False
        self.tx_deadline = math.inf  # when the open packet is due (reported by the transmitter)
        self.tx_done = True  # no transmitter, or its END packet is out
        self.tx_header: bytes | None = None  # the stream header (new bitstream listeners get it first)
        # Units committed while the transmitter opens (its ULM may be loading): handed to it once it is open, so the
        # bitstream carries every unit, however long the open takes.
        self.tx_waiting: list[A.Transmit] = []
        self.tx_stats: dict | None = None
        self.resynth_end: ResynthEndEvent | None = None
        # Resume (server/resume.py): a sender with a token keeps what it sent; parked while its transport is lost.
        self.resume_token: str | None = None
        self.replay: resume.ReplayLog | None = None
        self.parked: resume.Parked | None = None
        self.acked = 0  # input samples the client was told (ack / resumed)
        self._acked_at = -math.inf
        self._skip_samples = 0  # resent audio the server already has (resume.resend_from below resumed.samples)

    # ---------------------------------------------------------------------------------------------------------------
    # Queries

    @property
    def reading(self) -> bool:
        """Whether the I/O layer should read the client's next frame now."""
        return self.state not in (State.OPENING, State.GONE) and self._held is None

    @property
    def accepts_listeners(self) -> bool:
        return self.role == "sender" and self.state in (State.STREAMING, State.ENDING) and not self.units_done

    @property
    def finished(self) -> bool:
        return self.state in (State.CLOSED, State.GONE)

    def next_deadline(self) -> float:
        """The earliest time at which ``tick`` has something to do (inf: nothing until the next event)."""
        cfg = self.cfg
        if self.parked is not None:  # only the grace period and the session time run; no client, no stats
            running = self.state in (State.STREAMING, State.ENDING)
            return min(self.parked.deadline, self.started_at + cfg.max_session_s if running else math.inf)
        times = [self._next_stats]
        if self.replay is not None and self.received_samples > self.acked and not self.finished:
            times.append(self._acked_at + resume.ACK_INTERVAL_S)
        if self.state in (State.CONNECTED,):
            times.append(self.connected_at + self._paused_total + cfg.start_timeout_s)
            times.append(self._client_clock_from + cfg.idle_timeout_s)
        elif self.state == State.OPENING:
            times.append(self._open_deadline)
        elif self.state == State.STREAMING:
            if self._held is not None:
                times.append(self._held[1] + cfg.stall_timeout_s)
            else:
                times.append(self._client_clock_from + cfg.idle_timeout_s)
        if self.state in (State.STREAMING, State.LISTENING):
            times.append(self.started_at + cfg.max_session_s)
        if not self.tx_done and not self.finished:
            times.append(self.tx_deadline)
        return min(times)

    # ---------------------------------------------------------------------------------------------------------------
    # The transport

    def connection_lost(self, now: float) -> list[A.Action]:
        """The transport is gone (closed by either side, or dropped): release every backend at once."""
        if self.state == State.GONE:
            return []
        out: list[A.Action] = []
        if self.role == "sender" and self.info is not None and not self.progress.finished:
            out.append(A.CancelSlot())
        if self.role == "sender" and not self.units_done:
            out.append(A.ListenersDone(gone=True))
        if self.role == "listener":
            out.append(A.Unsubscribe())
        if self.resynth is not None and self.resynth_end is None:
            out.append(A.CloseResynth())
        if self.outcome is None:
            self.outcome = "disconnected" if self.role is not None else "no_session"
        self.state, self._held = State.GONE, None
        return out

    # ---------------------------------------------------------------------------------------------------------------
    # Resume (server/resume.py)

    def transport_lost(self, clean: bool, now: float) -> list[A.Action]:
        """The transport is gone; without a close handshake (``clean``) a resumable sender is parked for
        resume_grace_s (its backends go on, its output waits), otherwise ``connection_lost``."""
        parkable = self.role == "sender" and self.replay is not None and self.state != State.GONE
        if clean or not parkable or self.parked is not None or self.outcome == E.CLIENT_TOO_SLOW.value or (
                self.reason == E.SHUTTING_DOWN.value):
            return self.connection_lost(now) if self.parked is None else []
        assert self.replay is not None
        self._held, self._paused_since = None, None  # a frame held for buffer room was not accepted: it is resent
        self.parked = resume.Parked(now, now + self.cfg.resume_grace_s, self.cfg.resume_outbox_bytes)
        self.replay.holding = True
        return []

    def resume_refusal(self, msg: P.Resume) -> str | None:
        """Why this session cannot take ``msg`` (None: it can): not resumable, gone, or offsets it cannot replay."""
        if self.replay is None or self.state == State.GONE:
            return "the session is gone or cannot resume"
        if msg.resend_from is not None and msg.resend_from > self.received_samples:
            return (f"resend_from {msg.resend_from} is past the {self.received_samples} samples the server accepted: "
                    "the audio between would be lost")  # fmt: skip
        return self.replay.refusal(msg.next_seq, msg.audio_samples)

    def resume(self, msg: P.Resume, now: float) -> list[A.Action]:
        """A new connection took this session over (the I/O layer checked ``resume_refusal`` and dropped the old
        transport, if any): resumed, the replay from the client's offsets, what was produced while parked."""
        assert self.replay is not None
        outbox = list(self.parked.outbox) if self.parked is not None else []
        if self.state == State.CLOSED and not any(isinstance(a, A.Close) for a in outbox):
            outbox += self.replay.final  # it ended on the transport that broke: its end again
        self.parked, self.replay.holding = None, False
        self._held, self._paused_since = None, None  # a takeover: the old transport's held frame is resent
        self.outgoing_bytes = 0  # the old transport's queue is gone
        self._client_clock_from = max(self._client_clock_from, now)
        self._skip_samples = 0 if msg.resend_from is None else self.received_samples - msg.resend_from
        self.acked, self._acked_at = self.received_samples, now
        if self.metrics is not None:
            self.metrics.resumes_total.inc()
        resumed = P.to_json(P.Resumed(samples=self.received_samples, next_seq=msg.next_seq))
        # The replay (at most twice resume_outbox_bytes, its own bound) does not count against max_outgoing_bytes.
        frames = [resumed, *(data for data, _ in self.replay.replay(msg.next_seq, msg.audio_samples))]
        out: list[A.Action] = [A.Send(data, 0) for data in frames]
        out += [A.Send(a.data, 0) if isinstance(a, A.Send) else a for a in outbox]
        return out

    def resume_failed(self, message: str, now: float) -> list[A.Action]:
        """This connection's resume found no session to take over (or offsets it cannot replay): fatal."""
        self.role = None
        return self._limit(E.RESUME_FAILED, message, now)

    def handed_over(self, now: float) -> list[A.Action]:
        """This connection's transport now carries the session it resumed: this core is done, silently."""
        self.state, self.outcome = State.GONE, "handed_over"
        return []

    def _ack(self, now: float) -> list[A.Action]:
        if self.replay is None or self.received_samples <= self.acked:
            return []
        self.acked, self._acked_at = self.received_samples, now
        return self._send(P.Ack(samples=self.received_samples))

    def _expire_park(self, why: str) -> list[A.Action]:
        """The parked session ends (grace period over, outbox full, drain): its backends are released."""
        assert self.parked is not None
        now = self.parked.deadline
        self.parked = None
        if self.metrics is not None:
            self.metrics.parks_expired_total.labels(why).inc()
        self.outcome = why
        return self.connection_lost(now)

    # ---------------------------------------------------------------------------------------------------------------
    # Endings

    def _end(self, reason: str) -> list[A.Action]:
        """Sender: stop taking audio; the encoder finishes and its end event brings the end message. No deadline: a
        full-mode flush of a long stream legitimately takes a while; a drain has its own."""
        if self.finished:
            return []
        self.reason, self.state = reason, State.ENDING
        return [A.RequestEnd()]

    def _limit(self, code: P.ErrorCode, why: str, now: float) -> list[A.Action]:
        """End the session for a fatal reason: tell the client, finish the units of the audio already received (and
        their audio), send end, close with the code's close code. Before ready there is nothing to finish."""
        if self.finished or self.state == State.ENDING:
            return []
        if self.state == State.LISTENING:
            self.reason, self.state = code.value, State.ENDING
            out = self._error(code, f"{why}; the audio of the units received follows, then end", fatal=True)
            return out + [A.Unsubscribe()] + self._units_over(now)
        if self.state == State.STREAMING:
            if self._held is not None:
                self._held = None
                self._resume(now)
            end = self._end(code.value)
            return self._error(code, f"{why}; the units of the audio received so far follow, then end", fatal=True) + end
        self.outcome = code.value
        return self._error(code, f"{why}; closing", fatal=True) + self._close(P.close_code(code), code.value)

    def _open_expired(self, now: float) -> list[A.Action]:
        """The open deadline: backends that did not open within open_timeout_s (a stuck model load) end the session
        with internal_error and an end; what opens later is released (``opened`` / ``subscribed`` undo it)."""
        self._resume(now)
        self.reason, self.units_done = E.INTERNAL_ERROR.value, True
        out = self._error(E.INTERNAL_ERROR, f"the server could not open this session's models within "
                                            f"{self.cfg.open_timeout_s:g} s (serve --open-timeout); try again later",
                          fatal=True)  # fmt: skip
        return out + self._maybe_finish(now)

    def _leave(self, now: float) -> list[A.Action]:
        """Listener sent end: stop receiving units, finish the audio of those received, then end."""
        if self.state != State.LISTENING:
            return []
        self.reason, self.state = "end", State.ENDING
        return [A.Unsubscribe()] + self._units_over(now)

    def _units_over(self, now: float) -> list[A.Action]:
        """Every unit this connection will get has been sent: listeners are told, resynthesis finishes, then end."""
        if self.units_done:
            return []
        self.units_done = True
        if self.finished:  # dropped meanwhile: its backends are already released
            return []
        if self.state == State.STREAMING:
            self.state = State.ENDING
        out: list[A.Action] = []
        if not self.tx_done:  # listeners are told once the last packet is out (transmitted, done)
            if self.tx_header is not None:
                out.append(A.TransmitEnd(now))  # (else transmit_opened sends it: the transmitter is still opening)
        elif self.role == "sender":
            out.append(A.ListenersDone(gone=False))
        if self.resynth is not None and self.resynth_end is None and self._resynth_cut is None:
            out.append(A.EndResynth())
        return out + self._maybe_finish(now)

    def _maybe_finish(self, now: float) -> list[A.Action]:
        """Send the end message once every unit and every audio chunk of the session is out, then close."""
        if self.finished or not self.units_done or (self.resynth is not None and self.resynth_end is None) or (
                not self.tx_done):
            return []
        reason = self.reason or "end"
        self.outcome = reason
        end = self.report.end_message(reason, self.stats(now), self.forced_commits, self.resynth_end)
        code = P.CLOSE_NORMAL if reason == "end" else P.close_code(P.ErrorCode(reason))
        if self.replay is not None:  # a resume after the end was sent (and lost) gets it again
            self.replay.final = [A.Send(P.to_json(end), 0), A.Close(code, reason[:120])]
        return self._ack(now) + self._send(end) + self._close(code, reason)

    def _close(self, code: int, reason: str) -> list[A.Action]:
        if self.finished:  # already closed (e.g. dropped as client_too_slow while its last frame was queued)
            return []
        self.state = State.CLOSED
        close = A.Close(code, reason[:120])  # a close reason must fit in 123 bytes
        if self.parked is not None:
            self.parked.outbox.append(close)
            return []
        return [close]

    # ---------------------------------------------------------------------------------------------------------------
    # Resynthesis limits

    def _check_resynth_lag(self, now: float) -> list[A.Action]:
        """Stop a resynthesis that fell too far behind (e.g. full-size ELLA-V on a CPU): its backlog would only grow
        and hold the session's end back; the units go on, the client is told why the audio stopped."""
        if self.resynth is None or self.resynth_end is not None:
            return []
        lag = self.resynth.lag_s
        if lag <= self.cfg.max_resynth_lag_s:
            return []
        return [A.CloseResynth()] + self._stop_resynth(E.RESYNTH_BEHIND, f"it fell {lag:.1f} s behind (limit "
                                                       f"{self.cfg.max_resynth_lag_s:g} s): this server cannot "
                                                       "resynthesize in real time", now)  # fmt: skip

    def _stop_resynth(self, code: P.ErrorCode, why: str, now: float) -> list[A.Action]:
        """End this session's resynthesis early (the units go on): tell the client, finish if all else is done."""
        if self.resynth_end is not None or self.finished:
            return []
        self.resynth_end = self.report.resynth_end_event(why)
        return self._error(code, f"resynthesis stopped: {why}; units are unaffected") + self._maybe_finish(now)

    # ---------------------------------------------------------------------------------------------------------------
    # Output and clocks

    def _send(self, msg: Any) -> list[A.Action]:
        return self._send_bytes(P.to_json(msg))

    def _send_bytes(self, data: str | bytes, logged: bool = False) -> list[A.Action]:
        """The outgoing rule: a client that does not read is dropped once max_outgoing_bytes are queued for it (units
        are never dropped while the connection lives: the connection is). Parked, the frame waits for a resume (in
        the replay log when ``logged``, else in the parked outbox), within resume_outbox_bytes."""
        if self.finished:
            return []
        nbytes = len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))
        if self.parked is not None:
            if not logged:
                self.parked.outbox.append(A.Send(data, nbytes))
            return [] if self.parked.produced(nbytes) else self._expire_park("resume_outbox_full")
        self.outgoing_bytes += nbytes
        if not limits.outgoing_exceeded(self.cfg, self.outgoing_bytes):
            return [A.Send(data, nbytes)]
        self.outcome = E.CLIENT_TOO_SLOW.value
        self._count_error(E.CLIENT_TOO_SLOW)
        out: list[A.Action] = []
        if self.role == "sender" and self.info is not None and not self.progress.finished:
            out.append(A.CancelSlot())
        if self.resynth is not None and self.resynth_end is None:
            out.append(A.CloseResynth())
        self.state = State.CLOSED
        return out + [A.Abort(P.CLOSE_POLICY, "client_too_slow: messages not read")]

    def _error(self, code: P.ErrorCode, message: str, fatal: bool = False, **extra: Any) -> list[A.Action]:
        self._count_error(code)
        return self._send(P.Error(code=code.value, message=message, fatal=fatal, **extra))

    def _count_error(self, code: P.ErrorCode) -> None:
        if self.metrics is not None:
            self.metrics.errors_total.labels(code.value).inc()

    def _client_active(self, now: float) -> None:
        self._client_clock_from = max(self._client_clock_from, now)

    def _pause(self, now: float) -> None:
        if self._paused_since is None:
            self._paused_since = now

    def _resume(self, now: float) -> None:
        """Frames are read again: the time not read was not the client's (idle and start deadlines skip it)."""
        if self._paused_since is not None:
            if self.state in (State.CONNECTED, State.OPENING):
                self._paused_total += now - self._paused_since
            self._paused_since = None
        self._client_clock_from = max(self._client_clock_from, now)

    # ---------------------------------------------------------------------------------------------------------------
    # Stats

    def stats(self, now: float) -> P.Stats:
        lag = None if self.resynth is None else (0.0 if self.resynth_end else self.resynth.lag_s)
        sender = None
        if self.role == "sender" and self.start is not None:
            sender = {"sample_rate": self.start.sample_rate, "received": self.received_samples,
                      "queued": self.queued_samples, "progress": self.progress, "listeners": self.listeners}  # fmt: skip
        buffers = self.outgoing_bytes + (self.opus.state_nbytes if self.opus is not None else 0)  # + partial Opus pages
        stats = self.report.stats(now - self.started_at, sender, buffers, lag)
        precision = self.info.precision if sender is not None and self.info is not None else None
        resynth_precision = (self.resynth_settings or {}).get("precision")
        return dataclasses.replace(stats, transmit=self.tx_stats, precision=precision,
                                   resynth_precision=resynth_precision)  # fmt: skip
