"""UnitsClient: the embeddable async client of the live units server (one session per instance).

    async with UnitsClient("ws://127.0.0.1:8765/v1/stream", sample_rate=16000) as client:
        print(client.ready.session, client.ready.settings)
        async for msg in client.stream(chunks, realtime=True):   # chunks: float32 numpy arrays
            if isinstance(msg, protocol.Unit):
                print(msg.seq, msg.unit, msg.end_s, msg.lag_s)

``stream`` sends the chunks (paced in real time, or as fast as the server takes them), then ``end``, while it yields
every server message: Unit, Stats, Error, AudioChunk (with ``resynth=``: 24 kHz audio made from the units) and
finally the EndMessage. After a fatal Error the server still sends the
units of the audio it received and an EndMessage whose reason is the error code; when it cannot (internal_error), the
iterator raises SessionError. Lower level: ``send(samples)``, ``end()`` and ``async for msg in client``.
The client checks the protocol's promise that units arrive as seq 0, 1, 2, ... and audio chunks contiguously, and
raises if one is missing.

Reconnect (``reconnect=True``, the default): when the connection drops without a close handshake and the server gave
a ``resume_token``, the client reconnects (at most ``max_reconnects`` attempts, exponential backoff with jitter),
sends ``resume`` with the first unit seq and the audio sample it lacks, and resends its input audio from the
server's offset (it keeps what the server has not acknowledged, at most ``max_retained_s``). The iterator goes on
as if nothing happened: units stay contiguous, none repeated. ``reconnects`` counts the resumes.

``ListenerClient(url, session=ready.session, listen_token=ready.listen_token)`` is the receiving side of a
low-bitrate link: it yields the sender's units and audio resynthesized from those units alone.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import AsyncIterable, AsyncIterator, Iterable

import numpy as np
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from dpslm_stream import protocol as P
from dpslm_stream.errors import DPSLMError, InvalidInput

from .reconnect import RetainedAudio, backoff_delays


class SessionError(DPSLMError):
    """The server refused or ended the session with an error; ``code`` is the protocol ErrorCode value (or
    "http_<status>" for a refused handshake, "connection_lost" when the connection dropped without an end)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retry_after_s = retry_after_s


class DroppedConnection(SessionError):
    """The connection closed before the session's end (``abrupt``: without a close frame, so it may resume)."""

    def __init__(self, code: str, message: str, abrupt: bool):
        super().__init__(code, message)
        self.abrupt = abrupt


class UnitsClient:
    """One live session: connect, start, send audio, receive units (see the module docstring)."""

    def __init__(self, url: str, *, sample_rate: int, format: str = "pcm16", k: int | None = None,
                 lmbda: int | None = None, preset: str = "low-latency", score: bool = False,
                 options: dict | None = None, token: str | None = None, origin: str | None = None,
                 open_timeout: float = 60.0, frame_ms: float = 100.0, resynth: dict | None = None,
                 transmit: dict | None = None, reconnect: bool = True, max_reconnects: int = 8,
                 max_retained_s: float = 60.0, seed: int | None = None):  # fmt: skip
        if format not in P.SAMPLE_FORMATS:
            raise InvalidInput(f"format must be one of {P.SAMPLE_FORMATS}, got {format!r}")
        self.url = url
        self.start_msg = {"type": "start", "version": P.PROTOCOL_VERSION, "sample_rate": sample_rate,
                          "format": format, "preset": preset, "score": score, "options": dict(options or {})}  # fmt: skip
        if k is not None or lmbda is not None:
            self.start_msg.update(k=k, lmbda=lmbda)
        if resynth is not None:
            self.start_msg["resynth"] = dict(resynth)
        if transmit is not None:  # the session's unit bitstream comes back as BitstreamFrame messages
            self.start_msg["transmit"] = dict(transmit)
        self.sample_rate = sample_rate
        self.format = format
        self.token = token
        self.origin = origin
        self.open_timeout = open_timeout
        self.frame_samples = max(1, int(sample_rate * frame_ms / 1000))
        self.ready: P.Ready | None = None
        self.end_message: P.EndMessage | None = None
        self.sent_samples = 0
        self._ws = None
        self._next_seq = 0
        self._next_audio_seq = 0
        self.audio_samples = 0  # resynthesized 24 kHz samples received
        # Reconnect (the module docstring).
        self.reconnect = reconnect
        self.max_reconnects = max_reconnects
        self.reconnects = 0
        self._retained = RetainedAudio(max(1, int(max_retained_s * sample_rate)))
        self._rng = random.Random(seed)
        self._ended = False  # end was sent (it is sent again after a resume)
        self._send_lock = asyncio.Lock()  # a resend after a resume and the sender's frames never interleave
        self._new_transport = asyncio.Event()  # set (and replaced) when a reconnection succeeds or is given up

    async def __aenter__(self) -> "UnitsClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _dial(self):
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            return await websockets.connect(self.url, additional_headers=headers, origin=self.origin,
                                            open_timeout=self.open_timeout, compression=None,
                                            max_size=2**22)  # fmt: skip
        except InvalidStatus as e:
            status = e.response.status_code
            body = e.response.body.decode(errors="replace").strip()
            raise SessionError(f"http_{status}", body or f"the server refused the connection (HTTP {status})") from None
        except (OSError, asyncio.TimeoutError) as e:
            raise SessionError("connection_failed", f"cannot connect to {self.url}: {e}") from None

    async def connect(self) -> P.Ready:
        """Open the WebSocket, send start, wait for ready; SessionError on refusal (busy, bad settings, HTTP 401...)."""
        self._ws = await self._dial()
        try:
            await self._ws.send(json.dumps(self.start_msg))
        except ConnectionClosed:
            pass  # refused at once (busy): the reason is already queued for _recv
        while self.ready is None:
            msg = await self._recv()
            if isinstance(msg, P.Error):
                await self.close()
                raise SessionError(msg.code, msg.message, msg.retry_after_s)
            if isinstance(msg, P.Ready):
                self.ready = msg
        return self.ready

    async def _recv(self) -> P.ServerMessage:
        try:
            text = await self._ws.recv()
        except ConnectionClosed as e:
            reason = e.rcvd.reason if e.rcvd else "no close frame"
            code = e.rcvd.code if e.rcvd else 1006
            raise DroppedConnection("connection_lost", f"the connection closed ({code} {reason}) before the session "
                                                       "ended", abrupt=e.rcvd is None) from None  # fmt: skip
        if isinstance(text, bytes):  # resynthesized audio, or the unit bitstream (start.transmit)
            return P.decode_server_binary(text)
        return P.parse_server_message(text)

    async def send(self, samples: np.ndarray) -> None:
        """Send float samples (mono, at the start's sample rate), split into frames of ``frame_ms``. With reconnect,
        they are kept until the server acknowledges them; a send into a dropped connection waits for the resume
        (which resends them)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        waiting = self._new_transport
        async with self._send_lock:
            self.sent_samples += len(samples)
            if self._resumable:
                self._retained.add(samples)
            try:
                await self._send_frames(self._ws, samples)
                return
            except ConnectionClosed:
                if not self._resumable:
                    raise
        await waiting.wait()  # the resume resent them (or was given up: the receiving side raises)

    async def _send_frames(self, ws, samples: np.ndarray) -> None:
        for i in range(0, len(samples), self.frame_samples):
            await ws.send(P.encode_audio(samples[i : i + self.frame_samples], self.format))

    async def end(self) -> None:
        """End of audio: the server sends the remaining units, then the end message."""
        waiting = self._new_transport
        async with self._send_lock:
            self._ended = True
            try:
                await self._ws.send('{"type":"end"}')
                return
            except ConnectionClosed:
                if not self._resumable:
                    raise
        await waiting.wait()

    @property
    def _resumable(self) -> bool:
        return self.reconnect and self.ready is not None and self.ready.resume_token is not None

    async def _resume(self, lost: SessionError) -> None:
        """Reconnect and resume after a drop (backoff with jitter, bounded attempts), then resend the audio from the
        server's offset and end if it was sent; SessionError when the session cannot be resumed."""
        assert self.ready is not None and self.ready.resume_token is not None
        try:
            ws, resumed = None, None
            for delay in backoff_delays(self.max_reconnects, rng=self._rng):
                await asyncio.sleep(delay)
                if ws is not None:  # the previous attempt's connection
                    ws.transport.abort()
                    ws = None
                try:
                    ws = await self._dial()
                    await ws.send(json.dumps({"type": "resume", "version": P.PROTOCOL_VERSION,
                                              "token": self.ready.resume_token, "next_seq": self._next_seq,
                                              "audio_samples": self.audio_samples}))  # fmt: skip
                    reply = P.parse_server_message(await asyncio.wait_for(ws.recv(), self.open_timeout))
                except (SessionError, ConnectionClosed, asyncio.TimeoutError):
                    continue  # the server is unreachable or busy for now: try again
                if isinstance(reply, P.Resumed):
                    resumed = reply
                    break
                if isinstance(reply, P.Error) and reply.code != P.ErrorCode.BUSY.value:
                    raise SessionError(reply.code, f"the connection dropped and could not be resumed: {reply.message}")
            if resumed is None or ws is None:
                raise SessionError(lost.code, f"{lost}; {self.max_reconnects} reconnection attempts failed")
            resend = self._retained.since(resumed.samples)
            if resend is None:
                await ws.close()
                raise SessionError(P.ErrorCode.RESUME_FAILED.value, f"the server has {resumed.samples} samples; this "
                                   f"client no longer keeps the audio from there (max_retained_s)")  # fmt: skip
            async with self._send_lock:
                self._ws = ws
                self._retained.ack(resumed.samples)
                try:
                    await self._send_frames(ws, resend)
                    if self._ended:
                        await ws.send('{"type":"end"}')
                except ConnectionClosed:
                    pass  # dropped again: the next _recv sees it
            self.reconnects += 1
        finally:
            waiting, self._new_transport = self._new_transport, asyncio.Event()
            waiting.set()

    def __aiter__(self) -> AsyncIterator[P.ServerMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[P.ServerMessage]:
        """Server messages up to and including the end message; SessionError if the connection ends without one, or
        after the end message of a session that failed (internal_error: its units so far were yielded first)."""
        fatal: P.Error | None = None
        while self.end_message is None:
            try:
                msg = await self._recv()
            except DroppedConnection as e:
                if e.abrupt and self._resumable:
                    await self._resume(e)
                    continue
                if fatal is not None:  # e.g. internal_error: the server closes without an end message
                    raise SessionError(fatal.code, fatal.message) from None
                raise
            if isinstance(msg, (P.Ack, P.Resumed)):  # the transport's bookkeeping, not the session's
                if isinstance(msg, P.Ack):
                    self._retained.ack(msg.samples)
                continue
            if isinstance(msg, P.Unit):
                if self._next_seq == 0 and msg.seq > 0 and isinstance(self, ListenerClient):
                    self._next_seq = msg.seq  # a listener joins a running stream at its next unit
                if msg.seq != self._next_seq:
                    raise SessionError("protocol", f"unit seq {msg.seq} arrived, expected {self._next_seq}")
                self._next_seq += 1
            elif isinstance(msg, P.AudioChunk):
                if msg.seq != self._next_audio_seq or msg.start_sample != self.audio_samples:
                    raise SessionError("protocol", f"audio chunk {msg.seq} at sample {msg.start_sample} arrived, "
                                                   f"expected {self._next_audio_seq} at {self.audio_samples}")  # fmt: skip
                self._next_audio_seq += 1
                self.audio_samples += len(msg.samples)
            elif isinstance(msg, P.Error) and msg.fatal:
                fatal = msg
            elif isinstance(msg, P.EndMessage):
                self.end_message = msg
            yield msg
        if fatal is not None and fatal.code == P.ErrorCode.INTERNAL_ERROR.value:
            raise SessionError(fatal.code, fatal.message)

    async def stream(self, chunks: Iterable[np.ndarray] | AsyncIterable[np.ndarray],
                     realtime: bool = False) -> AsyncIterator[P.ServerMessage]:  # fmt: skip
        """Send ``chunks`` (then end) while yielding the server's messages until its end message.

        ``realtime``: pace the chunks at the audio's own rate, as a microphone would; otherwise send as fast as the
        server takes them (it applies back-pressure when its bounded buffer is full)."""

        async def feed() -> None:
            t0 = time.monotonic()
            sent = 0
            try:
                if hasattr(chunks, "__aiter__"):
                    async for chunk in chunks:
                        await self.send(chunk)
                else:
                    for chunk in chunks:
                        if realtime:
                            await asyncio.sleep(max(0.0, t0 + sent / self.sample_rate - time.monotonic()))
                        await self.send(chunk)
                        sent += len(chunk)
                await self.end()
            except ConnectionClosed:
                pass  # the receiving side reports why

        feeder = asyncio.create_task(feed())
        try:
            async for msg in self:
                yield msg
        finally:
            if not feeder.done():
                feeder.cancel()
            try:
                await feeder
            except asyncio.CancelledError:
                pass

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()


class ListenerClient(UnitsClient):
    """The receiving side of a link: subscribe to a running session (its ready.session and ready.listen_token) and
    iterate its units and the audio resynthesized from them with ``resynth`` options (``audio=False``: units only).
    ``end()`` leaves: the audio of the units received so far still comes, then the end message."""

    def __init__(self, url: str, *, session: str, listen_token: str, audio: bool = True, resynth: dict | None = None,
                 token: str | None = None, origin: str | None = None, open_timeout: float = 60.0,
                 format: str = "units"):  # fmt: skip
        super().__init__(url, sample_rate=16000, token=token, origin=origin, open_timeout=open_timeout,
                         reconnect=False)  # fmt: skip
        bits = format == "bitstream"  # the sender's BitstreamFrames instead of units; the receiver resynthesizes
        self.start_msg = {"type": "subscribe", "version": P.PROTOCOL_VERSION, "session": session, "format": format,
                          "token": listen_token, "resynth": dict(resynth or {}) if audio and not bits else None}  # fmt: skip

    async def send(self, samples: np.ndarray) -> None:
        raise InvalidInput("a listener sends no audio")


def chunked(samples: np.ndarray, sample_rate: int, chunk_ms: float = 100.0) -> list[np.ndarray]:
    """Split a signal into chunks of ``chunk_ms`` (what a capture device delivers)."""
    n = max(1, int(sample_rate * chunk_ms / 1000))
    return [samples[i : i + n] for i in range(0, len(samples), n)]
