"""The session core's rules through real sockets (tiny set, loopback): hostile frames beside a canary session that
must get exactly the offline units, a pre-start deadline, idle time that excludes the server's own waits, a client
that does not read, listeners that drop, and a dropped connection's slot released at once."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import pytest
import websockets

from dpslm_stream import protocol as P
from dpslm_stream.client import ListenerClient, UnitsClient, chunked
from dpslm_stream.client.stream import stream_audio
from dpslm_stream.server.app import ServerConfig, ServerThread, build_encoder
from dpslm_stream.tiny import speech_like
from server_oracle import offline_units, pcm16

E = P.ErrorCode
SR = 16000




async def messages(ws, timeout: float = 60.0) -> list:
    """Every message until the server closes."""
    out = []
    try:
        while True:
            out.append(P.parse_server_message(await asyncio.wait_for(ws.recv(), timeout)))
    except websockets.ConnectionClosed:
        pass
    return out


async def first_error(ws) -> P.Error:
    for _ in range(100):
        msg = P.parse_server_message(await asyncio.wait_for(ws.recv(), 30))
        if isinstance(msg, P.Error):
            return msg
    raise AssertionError("no error message")


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False, start_timeout_s=1.0, max_text_bytes=4096)) as srv:
        yield srv


def test_hostile_frames_get_coded_errors_and_the_canary_is_exact(server):
    wav = speech_like(3.0, SR, seed=31)

    async def canary():
        return await stream_audio(server.url, wav, SR, options={"mode": "full"}, chunk_ms=100, realtime=True)

    async def refused_text(text: str, code: E, started: bool = False):
        async with websockets.connect(server.url, compression=None) as ws:
            if started:
                await ws.send(json.dumps({"type": "start", "sample_rate": SR}))
                assert isinstance(P.parse_server_message(await ws.recv()), P.Ready)
            await ws.send(text)
            err = await first_error(ws)
            assert err.code == code.value and not err.fatal, (text[:80], err)
            await ws.send(json.dumps({"type": "start", "sample_rate": SR}) if not started else '{"type":"end"}')
            msgs = await messages(ws)
            assert any(isinstance(m, (P.Ready, P.EndMessage)) for m in msgs)  # the connection still works

    async def loud_float32():  # finite samples far outside [-1, 1]: clipped, the session completes
        async with websockets.connect(server.url, compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": SR, "format": "float32"}))
            await ws.recv()
            loud = (speech_like(1.0, SR, seed=2) * 1e30).astype("<f4")
            await ws.send(loud.tobytes())
            await ws.send('{"type":"end"}')
            msgs = await messages(ws)
            assert not [m for m in msgs if isinstance(m, P.Error)] and msgs[-1].reason == "end"
            return ws.close_code

    async def never_starts():  # keeps sending, never starts: closed at the start deadline
        async with websockets.connect(server.url, compression=None) as ws:
            reader = asyncio.create_task(messages(ws, timeout=10))
            try:
                for _ in range(100):  # 10 s at most
                    await ws.send('{"type":"end"}')
                    await asyncio.sleep(0.1)
            except websockets.ConnectionClosed:
                pass
            return await reader, ws.close_code

    async def main():
        c = asyncio.create_task(canary())
        results = await asyncio.gather(
            refused_text("[" * 5000, E.MESSAGE_TOO_LARGE),
            refused_text("[" * 100 + "]" * 100, E.BAD_JSON),
            refused_text('{"type": "start", "sample_rate": 16000, "preset": "\\ud800"}', E.BAD_MESSAGE),
            refused_text('{"type": "subscribe", "session": "x", "token": "\\udc00"}', E.BAD_MESSAGE),
            refused_text(json.dumps({"type": "start", "sample_rate": SR, "options": {"left": 10**6}}), E.BAD_SETTINGS),
            refused_text(json.dumps({"type": "start", "sample_rate": SR, "options": {"hop": 1}}), E.BAD_SETTINGS),
            refused_text(json.dumps({"type": "start", "sample_rate": SR, "options": {"max_lag": 10**9}}), E.BAD_SETTINGS),
            refused_text(json.dumps({"type": "start", "sample_rate": SR, "resynth": {"top_p": 9.0}}), E.BAD_SETTINGS),
            refused_text('{"type": "end", "x": "\\ud800"}', E.BAD_MESSAGE, started=True),
            loud_float32(),
            never_starts(),
        )
        return await c, results

    res, results = asyncio.run(main())
    assert results[-2] == P.CLOSE_NORMAL
    got, close_code = results[-1]
    assert close_code == P.CLOSE_POLICY and got[-1].code == E.START_TIMEOUT.value and got[-1].fatal
    assert [u.unit for u in res.units] == offline_units(pcm16(wav)) and not res.errors


class SlowOpenEncoder:
    """The real EncoderWorker, except that opening a session takes 1.5 s (a model load during another's flush)."""

    def __init__(self, real):
        self.real, self.models, self.available_pairs, self.runner = real, real.models, real.available_pairs, real.runner
        self.load_pair, self.unload_pair, self.loaded_pairs = real.load_pair, real.unload_pair, real.loaded_pairs

    def open_session(self, *args, **kwargs):
        time.sleep(1.5)
        return self.real.open_session(*args, **kwargs)

    def step(self, sessions, **kwargs):
        return self.real.step(sessions, **kwargs)


def test_idle_excludes_the_time_the_server_takes_to_open_the_session():
    cfg = ServerConfig(port=0, models="tiny", warmup=False, idle_timeout_s=1.0)
    wav = speech_like(1.5, SR, seed=32)
    with ServerThread(cfg, encoder=SlowOpenEncoder(build_encoder(cfg))) as srv:
        res = asyncio.run(stream_audio(srv.url, wav, SR, chunk_ms=100, realtime=True))
    assert res.end.reason == "end" and not res.errors and res.units


def test_a_client_that_does_not_read_is_dropped_and_others_go_on():
    cfg = ServerConfig(port=0, models="tiny", warmup=False, max_outgoing_bytes=32 << 10, max_buffer_s=30.0,
                       max_buffer_bytes=8 << 20)  # fmt: skip
    wav = speech_like(20.0, SR, seed=33)
    with ServerThread(cfg) as srv:

        async def deaf():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # a reader that takes (almost) nothing
            sock.connect(("127.0.0.1", srv.port))
            ws = await websockets.connect(srv.url, sock=sock, compression=None, max_queue=1)
            await ws.send(json.dumps({"type": "start", "sample_rate": SR, "resynth": {}, "options": {"mode": "cached"}}))
            try:
                for chunk in chunked(wav, SR, 500):
                    await ws.send(P.encode_audio(chunk, "pcm16"))
                await ws.send('{"type":"end"}')
                await asyncio.wait_for(ws.wait_closed(), 120)
            except websockets.ConnectionClosed:
                pass
            return ws.close_code, ws.close_reason

        async def main():
            other = asyncio.create_task(stream_audio(srv.url, wav[: 2 * SR], SR, chunk_ms=100, realtime=True))
            return await deaf(), await other

        (code, reason), other = asyncio.run(main())
        # The close frame waits behind what the client never read: it sees the TCP connection go (1006), or 1008.
        assert code in (P.CLOSE_POLICY, 1006)
        metrics = urllib.request.urlopen(srv.http_url + P.METRICS_PATH).read().decode()
        assert f'dpslm_sessions_total{{reason="{E.CLIENT_TOO_SLOW.value}"}} 1.0' in metrics, metrics
        assert other.end.reason == "end" and other.units


def test_a_listener_that_drops_leaves_the_sender_exact():
    wav = speech_like(3.0, SR, seed=34)
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False)) as srv:

        async def main():
            async with UnitsClient(srv.url, sample_rate=SR, options={"mode": "full"}) as sender:
                listener = ListenerClient(srv.url, session=sender.ready.session, listen_token=sender.ready.listen_token,
                                          resynth=None)  # fmt: skip
                await listener.connect()
                msgs = []
                async for m in sender.stream(chunked(wav, SR, 100), realtime=True):
                    msgs.append(m)
                    if isinstance(m, P.Stats) and not listener._ws.transport.is_closing():
                        listener._ws.transport.abort()  # the listener vanishes without a close handshake
                return msgs

        msgs = asyncio.run(main())
    units = [m for m in msgs if isinstance(m, P.Unit)]
    end = msgs[-1]
    assert end.reason == "end" and not [m for m in msgs if isinstance(m, P.Error)]
    assert [u.unit for u in units] == offline_units(pcm16(wav)) and end.stats["listeners"] == 0


def test_a_dropped_connection_frees_its_slot_at_once():
    # Without resume (--resume-grace 0); with it, the slot is held while parked (tests/test_resume_server.py).
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False, max_sessions=1, resume_grace_s=0)) as srv:

        async def main():
            ws = await websockets.connect(srv.url, compression=None)
            await ws.send(json.dumps({"type": "start", "sample_rate": SR}))
            await ws.recv()
            await ws.send(P.encode_audio(speech_like(0.5, SR), "pcm16"))
            ws.transport.abort()
            for attempt in range(30):  # at most 1.5 s; a connection used to hold its slot 2 s after a drop
                await asyncio.sleep(0.05)
                try:
                    async with UnitsClient(srv.url, sample_rate=SR) as c:
                        return attempt, c.ready.session
                except Exception:  # noqa: BLE001 - busy until the server has seen the drop
                    continue
            raise AssertionError("the slot was not released")

        attempt, session = asyncio.run(main())
        assert session and attempt < 30


def test_a_bug_while_opening_ends_that_session_with_internal_error(monkeypatch):
    """Any exception in one session's handling, even in the task that opens its backends, ends that session with a
    coded error and a close (never a hang in the opening state); the server goes on."""
    from dpslm_stream.server import connection

    real_open = connection.Connection._open

    async def broken_open(self, action):
        if action.sample_rate == 12000:
            raise RuntimeError("injected bug")
        return await real_open(self, action)

    monkeypatch.setattr(connection.Connection, "_open", broken_open)
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False)) as srv:

        async def main():
            async with websockets.connect(srv.url, compression=None) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": 12000}))
                msgs = await messages(ws, timeout=30)
                code = ws.close_code
            ok = await stream_audio(srv.url, speech_like(0.5, SR, seed=3), SR, chunk_ms=100)
            return msgs, code, ok

        msgs, code, ok = asyncio.run(main())
    assert [m.code for m in msgs] == [E.INTERNAL_ERROR.value] and msgs[0].fatal and "injected bug" in msgs[0].message
    assert code == P.CLOSE_INTERNAL and ok.end.reason == "end"


def test_a_disconnect_storm_leaves_the_canary_exact_and_frees_every_slot():
    wav = speech_like(3.0, SR, seed=35)
    # The dropped senders are parked for 0.5 s (resume on), then released.
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False, max_sessions=40, resume_grace_s=0.5)) as srv:

        async def vanish(i: int):
            ws = await websockets.connect(srv.url, compression=None)
            try:
                if i % 4 >= 1:
                    await ws.send(json.dumps({"type": "start", "sample_rate": SR, "resynth": {} if i % 2 else None}))
                if i % 4 >= 2:
                    await ws.recv()
                    for chunk in chunked(speech_like(0.6, SR, seed=i), SR, 100):
                        await ws.send(P.encode_audio(chunk, "pcm16"))
                if i % 4 == 3:
                    await ws.send('{"type":"end"}')
                await asyncio.sleep(0.01 * (i % 5))
            finally:
                ws.transport.abort()  # no close handshake

        async def main():
            canary = asyncio.create_task(stream_audio(srv.url, wav, SR, options={"mode": "full"}, chunk_ms=100,
                                                      realtime=True))  # fmt: skip
            for wave in range(3):
                await asyncio.gather(*(vanish(10 * wave + i) for i in range(10)))
            res = await canary
            for _ in range(100):  # every dropped connection is released (bounded: 5 s)
                health = json.loads(urllib.request.urlopen(srv.http_url + P.HEALTH_PATH).read())
                if health["sessions"] == 0:
                    break
                await asyncio.sleep(0.05)
            return res, health

        res, health = asyncio.run(main())
    assert [u.unit for u in res.units] == offline_units(pcm16(wav)) and not res.errors
    assert health["sessions"] == 0 and health["status"] == "ok"
