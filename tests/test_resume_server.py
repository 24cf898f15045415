"""Reconnect and resume through a real server (tiny set, random weights: plumbing) on 127.0.0.1.

The acceptance test: a session whose TCP connection is cut 5 times at random (seeded) points, by a proxy between
the client and the server that drops both sides without a close handshake (mid-frame, in either direction), yields
exactly the units of an uncut session, and exactly its resynthesized audio (the exact resynthesis setting: its audio
does not depend on timing). Plus the handover of a parked session's slot to a resume-only connection.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request

import numpy as np
import pytest
import websockets

from dpslm_stream import protocol as P
from dpslm_stream.client import UnitsClient, chunked
from dpslm_stream.server.app import ServerConfig, ServerThread
from dpslm_stream.tiny import speech_like

E = P.ErrorCode
SR = 16000
EXACT = {"left_context": None, "holdback": None, "vocoder_left_context": None, "vocoder_lookahead": 100000}


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that cuts the connection it carries (aborts both sides: no close frame, no FIN
    handshake) when the bytes it forwarded in one direction, counted over all its connections, reach the next cut
    point of that direction; the bytes up to the point are forwarded, so a cut can fall inside a frame."""

    def __init__(self, target_port: int, cuts: list[tuple[str, int]] = ()):
        self.target_port = target_port
        self.points = {d: sorted(n for dd, n in cuts if dd == d) for d in ("up", "down")}
        self.count = {"up": 0, "down": 0}
        self.cuts = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pair = (writer, up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, "up", pair), self._pipe(up_reader, writer, "down", pair))
        except asyncio.CancelledError:  # the test's loop ends
            pass

    async def _pipe(self, src, dst, direction: str, pair) -> None:
        try:
            while True:
                data = await src.read(4096)
                if not data:
                    dst.close()
                    return
                points = self.points[direction]
                if points and self.count[direction] + len(data) >= points[0]:
                    keep = points.pop(0) - self.count[direction]
                    dst.write(data[:keep])
                    self.count[direction] += keep
                    self.cuts += 1
                    for w in pair:
                        w.transport.abort()
                    return
                dst.write(data)
                self.count[direction] += len(data)
                await dst.drain()
        except (ConnectionError, OSError):
            for w in pair:
                w.transport.abort()


async def session(url: str, wav: np.ndarray, **kwargs) -> tuple[list[P.Unit], np.ndarray, P.EndMessage, UnitsClient]:
    units, audio = [], []
    async with UnitsClient(url, sample_rate=SR, options={"mode": "cached"}, resynth=EXACT, seed=7, **kwargs) as c:
        async for msg in c.stream(chunked(wav, SR, 100)):
            if isinstance(msg, P.Unit):
                units.append(msg)
            elif isinstance(msg, P.AudioChunk):
                audio.append(msg.samples)
            elif isinstance(msg, P.EndMessage):
                end = msg
    return units, np.concatenate(audio) if audio else np.zeros(0, np.float32), end, c


def test_five_cuts_at_random_points_yield_exactly_the_uncut_units_and_audio():
    wav = speech_like(3.0, SR, seed=41)
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False)) as srv:

        async def main():
            ref_units, ref_audio, ref_end, _ = await session(srv.url, wav)
            measure = CuttingProxy(srv.port)  # no cuts: how many bytes flow each way
            port = await measure.start()
            url = f"ws://127.0.0.1:{port}{P.WS_PATH}"
            units, audio, _, _ = await session(url, wav)
            assert [u.unit for u in units] == [u.unit for u in ref_units]
            rng = random.Random(20)  # seeded cut points past the handshake and ready, within the uncut totals
            up, down = measure.count["up"], measure.count["down"]
            cuts = [("up", rng.randrange(4000, int(0.9 * up))) for _ in range(3)]
            cuts += [("down", rng.randrange(3000, int(0.9 * down))) for _ in range(2)]
            proxy = CuttingProxy(srv.port, cuts)
            port = await proxy.start()
            units, audio, end, client = await session(f"ws://127.0.0.1:{port}{P.WS_PATH}", wav)
            metrics = urllib.request.urlopen(srv.http_url + P.METRICS_PATH).read().decode()
            return ref_units, ref_audio, ref_end, units, audio, end, client, proxy, cuts, metrics

        ref_units, ref_audio, ref_end, units, audio, end, client, proxy, cuts, metrics = asyncio.run(main())
    assert proxy.cuts == 5, (proxy.cuts, cuts, proxy.count)
    assert client.reconnects >= 3  # a cut during a reconnection attempt is retried within the same reconnect
    assert [(u.seq, u.unit, u.start_frame, u.end_frame) for u in units] == \
        [(u.seq, u.unit, u.start_frame, u.end_frame) for u in ref_units]  # fmt: skip
    assert len(ref_units) > 20 and end.reason == "end" and end.units == ref_end.units
    assert len(ref_audio) > 0
    np.testing.assert_array_equal(audio, ref_audio)
    assert f"dpslm_resumes_total {float(client.reconnects)}" in metrics


def test_a_parked_session_keeps_its_slot_and_a_resume_only_connection_takes_it_over():
    wav = speech_like(1.0, SR, seed=42)
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False, max_sessions=1)) as srv:

        async def main():
            ws = await websockets.connect(srv.url, compression=None)
            await ws.send(json.dumps({"type": "start", "sample_rate": SR, "options": {"mode": "full"}}))
            ready = P.parse_server_message(await ws.recv())
            await ws.send(P.encode_audio(wav[: SR // 2], "pcm16"))
            acked = 0
            while acked < SR // 2:  # wait until the server acknowledged the first half
                msg = P.parse_server_message(await asyncio.wait_for(ws.recv(), 30))
                acked = msg.samples if isinstance(msg, P.Ack) else acked
            ws.transport.abort()  # dropped without a close handshake: parked
            await asyncio.sleep(0.3)
            async with websockets.connect(srv.url, compression=None) as other:  # the slot is still taken
                await other.send(json.dumps({"type": "start", "sample_rate": SR}))
                busy = P.parse_server_message(await asyncio.wait_for(other.recv(), 30))
            async with websockets.connect(srv.url, compression=None) as bad:
                await bad.send(json.dumps({"type": "resume", "token": "not-a-token", "next_seq": 0}))
                failed = P.parse_server_message(await asyncio.wait_for(bad.recv(), 30))
            async with websockets.connect(srv.url, compression=None) as ws2:
                await ws2.send(json.dumps({"type": "resume", "token": ready.resume_token, "next_seq": 0}))
                resumed = P.parse_server_message(await asyncio.wait_for(ws2.recv(), 30))
                await ws2.send(P.encode_audio(wav[resumed.samples :], "pcm16"))
                await ws2.send('{"type":"end"}')
                rest = []
                try:
                    while True:
                        rest.append(P.parse_server_message(await asyncio.wait_for(ws2.recv(), 60)))
                except websockets.ConnectionClosed:
                    pass
            health = json.loads(urllib.request.urlopen(srv.http_url + P.HEALTH_PATH).read())
            return ready, busy, failed, resumed, rest, health

        ready, busy, failed, resumed, rest, health = asyncio.run(main())
        async def reference():
            async with UnitsClient(srv.url, sample_rate=SR, options={"mode": "full"}) as c:
                return [m.unit async for m in c.stream(chunked(wav, SR, 100)) if isinstance(m, P.Unit)]

        ref = asyncio.run(reference())
    assert isinstance(busy, P.Error) and busy.code == E.BUSY.value
    assert isinstance(failed, P.Error) and failed.code == E.RESUME_FAILED.value and failed.fatal
    assert resumed == P.Resumed(samples=SR // 2, next_seq=0)
    assert [m.unit for m in rest if isinstance(m, P.Unit)] == ref and isinstance(rest[-1], P.EndMessage)
    assert health["sessions"] == 0


def test_without_reconnect_a_cut_is_a_session_error_and_the_session_is_parked_then_released():
    from dpslm_stream.client import SessionError

    wav = speech_like(2.0, SR, seed=43)
    with ServerThread(ServerConfig(port=0, models="tiny", warmup=False, resume_grace_s=0.5)) as srv:

        async def main():
            proxy = CuttingProxy(srv.port, [("up", 20000)])
            port = await proxy.start()
            with pytest.raises(SessionError) as info:
                await session(f"ws://127.0.0.1:{port}{P.WS_PATH}", wav, reconnect=False)
            for _ in range(100):  # the parked session is released after its 0.5 s grace (bounded: 10 s)
                health = json.loads(urllib.request.urlopen(srv.http_url + P.HEALTH_PATH).read())
                if health["sessions"] == 0:
                    break
                await asyncio.sleep(0.1)
            metrics = urllib.request.urlopen(srv.http_url + P.METRICS_PATH).read().decode()
            return info.value, proxy, health, metrics

        error, proxy, health, metrics = asyncio.run(main())
    assert error.code == "connection_lost" and proxy.cuts == 1 and health["sessions"] == 0
    assert 'dpslm_parks_expired_total{reason="resume_expired"} 1.0' in metrics
