"""Server limits with the tiny set on loopback: idle timeout, session time, back-pressure with a bounded buffer, the
buffer_full refusal, a failing session isolated from the others, SIGTERM drain, flat memory over a long session."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import websockets

from dpslm_stream import protocol as P
from dpslm_stream.client import SessionError, UnitsClient, chunked
from dpslm_stream.client.stream import stream_audio
from dpslm_stream.server.app import ServerConfig, ServerThread, build_encoder
from dpslm_stream.server.encoder_thread import InProcessEncoder, EncoderThread
from dpslm_stream.tiny import speech_like
from server_oracle import offline_units, pcm16

E = P.ErrorCode
SR = 16000




def check_complete(units: list[P.Unit], end: P.EndMessage) -> None:
    assert [u.seq for u in units] == list(range(len(units))) and end.units == len(units)
    assert units[0].start_frame == 0 and units[-1].end_frame == end.num_frames
    assert all(a.end_frame == b.start_frame for a, b in zip(units, units[1:]))


async def collect(ws) -> tuple[list, list[P.Unit], P.EndMessage | None]:
    """Every message until the server closes: (all messages, units, end message or None)."""
    msgs = []
    try:
        while True:
            msgs.append(P.parse_server_message(await asyncio.wait_for(ws.recv(), 60)))
    except websockets.ConnectionClosed:
        pass
    units = [m for m in msgs if isinstance(m, P.Unit)]
    ends = [m for m in msgs if isinstance(m, P.EndMessage)]
    return msgs, units, ends[0] if ends else None


def server(**overrides) -> ServerThread:
    return ServerThread(ServerConfig(port=0, models="tiny", warmup=False, **overrides))


def test_idle_timeout_finishes_the_audio_received():
    wav = speech_like(0.6, SR, seed=11)
    with server(idle_timeout_s=0.5) as srv:

        async def main():
            async with websockets.connect(srv.url, compression=None) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": SR, "options": {"mode": "full"}}))
                for chunk in chunked(wav, SR, 100):
                    await ws.send(P.encode_audio(chunk, "pcm16"))
                msgs, units, end = await collect(ws)  # then silence: the server times out
                return msgs, units, end, ws.close_code

        msgs, units, end, close_code = asyncio.run(main())
        err = next(m for m in msgs if isinstance(m, P.Error))
        assert err.code == E.IDLE_TIMEOUT.value and err.fatal
        assert end.reason == E.IDLE_TIMEOUT.value and close_code == P.CLOSE_POLICY
        check_complete(units, end)
        assert [u.unit for u in units] == offline_units(pcm16(wav))  # the received audio was finished exactly

        async def never_starts():  # a connection that never starts is closed too
            async with websockets.connect(srv.url) as ws:
                msgs, _, end = await collect(ws)
                return msgs, end, ws.close_code

        msgs, end, close_code = asyncio.run(never_starts())
        assert [m.code for m in msgs] == [E.IDLE_TIMEOUT.value] and end is None and close_code == P.CLOSE_POLICY


def test_max_session_time_ends_with_the_units_so_far():
    wav = speech_like(6.0, SR, seed=12)
    with server(max_session_s=1.0) as srv:

        async def main():
            units, errors, end = [], [], None
            async with UnitsClient(srv.url, sample_rate=SR, options={"mode": "full"}) as client:
                async for msg in client.stream(chunked(wav, SR, 100), realtime=True):
                    if isinstance(msg, P.Unit):
                        units.append(msg)
                    elif isinstance(msg, P.Error):
                        errors.append(msg)
                    elif isinstance(msg, P.EndMessage):
                        end = msg
            return units, errors, end

        units, errors, end = asyncio.run(main())
        assert [e.code for e in errors] == [E.SESSION_TIME_LIMIT.value] and errors[0].fatal
        assert end.reason == E.SESSION_TIME_LIMIT.value and 0.5 < end.audio_s < 6.0
        check_complete(units, end)
        received = pcm16(wav)[: round(end.audio_s * SR)]
        assert [u.unit for u in units] == offline_units(received)


def test_full_mode_audio_is_capped():
    """Mode full keeps the whole stream until its end, so its audio is capped (max_full_s), not its wall time."""
    wav = speech_like(3.0, SR, seed=17)
    with server(max_full_s=1.0) as srv:
        res = asyncio.run(stream_audio(srv.url, wav, SR, options={"mode": "full"}, chunk_ms=100))
        assert [e.code for e in res.errors] == [E.SESSION_TIME_LIMIT.value] and "full" in res.errors[0].message
        assert res.end.reason == E.SESSION_TIME_LIMIT.value and res.end.audio_s == pytest.approx(1.0)
        check_complete(res.units, res.end)
        assert [u.unit for u in res.units] == offline_units(pcm16(wav)[:SR])


def test_back_pressure_bounds_the_buffer_and_keeps_every_unit():
    """A client sending 30 s at once is slowed by TCP back-pressure; the server never queues more than its bound,
    and the units equal those of the encoder run directly on the whole signal (the server changes nothing)."""
    wav = speech_like(30.0, SR, seed=13)
    max_buffer_s = 0.5
    with server(max_buffer_s=max_buffer_s, quantum_s=0.2) as srv:
        peak = [0]
        stop = threading.Event()

        def watch():  # sample the server's queues from outside while the stream runs
            while not stop.is_set():
                for conn in list(srv.server.connections):
                    if conn.slot is not None:
                        peak[0] = max(peak[0], conn.slot.queued_samples)
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            res = asyncio.run(stream_audio(srv.url, wav, SR, chunk_ms=100, realtime=False))
        finally:
            stop.set()
            watcher.join()
        check_complete(res.units, res.end)
        assert res.end.reason == "end" and not res.errors
        assert 0 < peak[0] <= max_buffer_s * SR + 0.1 * SR  # the bound plus at most one frame
        assert [u.unit for u in res.units] == _direct_units(srv, pcm16(wav))


def _direct_units(srv: ServerThread, wav: np.ndarray) -> list[int]:
    """The same encoder (a fresh worker on the same models), no server: push everything, end, step to the end."""
    from dpslm_stream.stream.events import EndEvent, UnitEvent

    enc = build_encoder(srv.config)
    session = enc.open_session(SR, 500, 4500)
    session.push(wav.astype(np.float32))
    session.end()
    units = []
    for _ in range(10_000):
        enc.step([session])
        events = session.poll()
        units += [e.unit for e in events if isinstance(e, UnitEvent)]
        if any(isinstance(e, EndEvent) for e in events):
            return units
    raise AssertionError("the encoder did not finish")


def test_buffer_full_when_the_client_outruns_a_server_that_will_not_wait():
    wav = speech_like(60.0, SR, seed=14)
    with server(max_buffer_s=0.2, stall_timeout_s=0.0, quantum_s=0.1) as srv:

        async def main():
            async with websockets.connect(srv.url, compression=None) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": SR}))

                async def flood():
                    try:
                        for chunk in chunked(wav, SR, 200):
                            await ws.send(P.encode_audio(chunk, "pcm16"))
                    except websockets.ConnectionClosed:
                        pass

                sender = asyncio.create_task(flood())
                msgs, units, end = await collect(ws)
                await sender
                return msgs, units, end, ws.close_code

        msgs, units, end, close_code = asyncio.run(main())
        errors = [m for m in msgs if isinstance(m, P.Error)]
        assert [e.code for e in errors] == [E.BUFFER_FULL.value] and errors[0].fatal
        assert end.reason == E.BUFFER_FULL.value and close_code == P.CLOSE_POLICY and end.audio_s < 60.0
        check_complete(units, end)


class FaultyEncoder:
    """The real EncoderWorker, except that a session opened at POISON_RATE makes the batched step raise once it holds
    0.3 s of audio: a bug triggered by one stream's data. The server must fail that session alone."""

    POISON_RATE = 11000  # an odd rate with a cheap resampler (serve --max-resampler-taps)

    def __init__(self, real):
        self.real = real
        self.models = real.models
        self.runner = real.runner  # its forward counts feed the batch metric
        self.available_pairs = real.available_pairs
        self.load_pair, self.unload_pair, self.loaded_pairs = real.load_pair, real.unload_pair, real.loaded_pairs
        self.poisoned: set[int] = set()

    def open_session(self, sample_rate, *args, **kwargs):
        session = self.real.open_session(sample_rate, *args, **kwargs)
        if sample_rate == self.POISON_RATE:
            self.poisoned.add(id(session))
        return session

    def step(self, sessions, full_slice_s=None):
        if any(id(s) in self.poisoned and s.audio_seconds > 0.3 for s in sessions):
            raise RuntimeError("injected model failure")
        return self.real.step(sessions, full_slice_s)


def test_a_failing_session_does_not_stall_or_break_the_others():
    cfg = ServerConfig(port=0, models="tiny", warmup=False)
    wavs = [speech_like(2.0, SR, seed=20 + i) for i in range(2)]
    with ServerThread(cfg, encoder=FaultyEncoder(build_encoder(cfg))) as srv:

        async def healthy(wav):
            return await stream_audio(srv.url, wav, SR, options={"mode": "full"}, chunk_ms=100, realtime=True)

        async def poisoned():
            bad = speech_like(2.0, FaultyEncoder.POISON_RATE, seed=1)
            with pytest.raises(SessionError) as info:
                await stream_audio(srv.url, bad, FaultyEncoder.POISON_RATE, chunk_ms=100, realtime=True)
            return info.value

        async def main():
            return await asyncio.gather(healthy(wavs[0]), poisoned(), healthy(wavs[1]))

        a, err, b = asyncio.run(main())
        assert err.code == E.INTERNAL_ERROR.value and "injected model failure" in str(err)
        for res, wav in ((a, wavs[0]), (b, wavs[1])):
            check_complete(res.units, res.end)
            assert [u.unit for u in res.units] == offline_units(pcm16(wav))
        assert json.loads(_get(srv.http_url + P.HEALTH_PATH))["status"] == "ok"


class StuckOpenEncoder(InProcessEncoder):
    """The tiny encoder, except that opening a session at STUCK_RATE never returns (a model load that hangs) and one
    at LATE_RATE returns only LATE_S after it was asked for (after its connection gave up on it)."""

    STUCK_RATE, LATE_RATE, LATE_S = 9000, 10000, 2.0  # odd rates, whose resamplers are cheap

    def __init__(self, real):
        super().__init__(real)
        self.late_slots: list = []

    def make_backend(self, loop, metrics, quantum_s):
        outer = self

        class Worker(EncoderThread):
            never = asyncio.Event()  # held here, as a real stuck load is held by its thread

            async def open_slot(self, session_id, sample_rate, settings, sink):
                if sample_rate == outer.STUCK_RATE:
                    await self.never.wait()
                if sample_rate == outer.LATE_RATE:
                    await asyncio.sleep(outer.LATE_S)
                slot = await super().open_slot(session_id, sample_rate, settings, sink)
                if sample_rate == outer.LATE_RATE:
                    outer.late_slots.append(slot)
                return slot

        return Worker(self.worker, loop, metrics, quantum_s)


def test_an_open_that_never_returns_ends_its_session_and_frees_its_slot():
    cfg = ServerConfig(port=0, models="tiny", warmup=False, open_timeout_s=0.5, max_sessions=1)
    encoder = StuckOpenEncoder(build_encoder(cfg))
    wav = speech_like(1.0, SR, seed=3)
    with ServerThread(cfg, encoder=encoder) as srv:

        async def opening(rate):
            async with websockets.connect(srv.url) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": rate}))
                msgs, _, end = await collect(ws)
                return msgs, end, ws.close_code

        for rate in (StuckOpenEncoder.STUCK_RATE, StuckOpenEncoder.LATE_RATE):
            msgs, end, close_code = asyncio.run(opening(rate))
            assert [(m.code, m.fatal) for m in msgs if isinstance(m, P.Error)] == [(E.INTERNAL_ERROR.value, True)]
            assert "--open-timeout" in msgs[0].message and close_code == P.CLOSE_INTERNAL
            assert end is not None and end.reason == E.INTERNAL_ERROR.value and end.units == 0
            # Its session slot is free again (max_sessions=1): the next client is served, exactly.
            res = asyncio.run(stream_audio(srv.url, wav, SR, options={"mode": "full"}, chunk_ms=100))
            assert [u.unit for u in res.units] == offline_units(pcm16(wav))
        deadline = time.monotonic() + 10 * StuckOpenEncoder.LATE_S
        while not encoder.late_slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(encoder.late_slots) == 1 and encoder.late_slots[0].cancelled  # opened too late: released


def _get(url: str) -> str:
    import urllib.request

    return urllib.request.urlopen(url).read().decode()


def test_sigterm_drains_running_sessions():
    """A real `serve` process: SIGTERM finishes every running session's units, sends end, closes with 1001, and
    the process exits 0."""
    proc = subprocess.Popen([sys.executable, "-m", "dpslm_stream.server", "--models", "tiny", "--port", "0",
                             "--no-warmup", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"WebSocket\s+(ws://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, proc.stderr.read()
        wav = speech_like(8.0, SR, seed=15)

        async def streaming():
            async with websockets.connect(url, compression=None) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": SR, "options": {"mode": "full"}}))

                async def feed():
                    try:
                        for i, chunk in enumerate(chunked(wav, SR, 100)):
                            await ws.send(P.encode_audio(chunk, "pcm16"))
                            await asyncio.sleep(0.1)
                            if i == 10:
                                proc.send_signal(signal.SIGTERM)
                    except websockets.ConnectionClosed:
                        pass

                feeder = asyncio.create_task(feed())
                msgs, units, end = await collect(ws)
                feeder.cancel()
                return msgs, units, end, ws.close_code

        async def idle():  # started, no audio yet
            async with websockets.connect(url, compression=None) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": SR}))
                msgs, units, end = await collect(ws)
                return msgs, units, end, ws.close_code

        async def main():
            return await asyncio.gather(streaming(), idle())

        (msgs, units, end, code), (msgs2, units2, end2, code2) = asyncio.run(main())
        assert proc.wait(timeout=60) == 0
        for m, e, c in ((msgs, end, code), (msgs2, end2, code2)):
            assert any(isinstance(x, P.Error) and x.code == E.SHUTTING_DOWN.value and x.fatal for x in m)
            assert e.reason == E.SHUTTING_DOWN.value and c == P.CLOSE_GOING_AWAY
        assert units2 == [] and end2.units == 0
        check_complete(units, end)
        assert 0.5 < end.audio_s < 8.0
        assert [u.unit for u in units] == offline_units(pcm16(wav)[: round(end.audio_s * SR)])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read the resident set size")
def test_memory_stays_flat_over_a_long_session():
    """Three minutes of audio through one cached session: the session's state and the process's memory stop growing
    once the windows are full (cheap windows: flatness does not depend on their size)."""
    wav = speech_like(180.0, SR, seed=16)
    with server(max_buffer_s=2.0, stats_interval_s=0.2) as srv:
        samples = []  # (audio seconds processed, session state bytes, process RSS)

        def on_message(msg):
            if isinstance(msg, P.Stats):
                samples.append((msg.processed_s, msg.state_nbytes, _rss_bytes()))

        res = asyncio.run(stream_audio(srv.url, wav, SR, chunk_ms=200, on_message=on_message,
                                       options={"left": 50, "hop": 25, "lookahead": 5}))  # fmt: skip
        check_complete(res.units, res.end)
        early = [s for s in samples if 20 <= s[0] <= 60]
        late = [s for s in samples if s[0] >= 140]
        assert early and late, samples
        state_early = max(s[1] for s in early)
        assert max(s[1] for s in late) <= 1.25 * state_early + 65536
        assert min(s[2] for s in late) - max(s[2] for s in early) < 32 * 2**20  # RSS: no growth with length
