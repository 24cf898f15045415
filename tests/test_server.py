"""The live units server end to end on loopback with the tiny model set: offline parity through the real server and
the `stream` client, 16 concurrent sessions, every malformed input isolated to its own session, busy, token and
origin refusal, health, metrics and the page. Limits, drain and long sessions are in test_server_limits.py."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from argparse import Namespace

import numpy as np
import pytest
import websockets

from dpslm_stream import protocol as P
from dpslm_stream.client import SessionError, UnitsClient, chunked
from dpslm_stream.client.stream import run as stream_run
from dpslm_stream.client.stream import stream_audio
from dpslm_stream.hub import ModelSet
from dpslm_stream.pipeline import Pipeline
from dpslm_stream.server.app import ServerConfig, ServerThread
from dpslm_stream.tiny import speech_like

E = P.ErrorCode
MODELS = ModelSet("tiny")


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerConfig(port=0, models="tiny", max_sessions=40, idle_timeout_s=20)) as srv:
        yield srv


_pipelines: dict = {}


def offline(wav: np.ndarray, sr: int, k: int = 500, lmbda: int = 4500, score: bool = False):
    """The offline reference: Pipeline.encode on the whole signal."""
    if (k, lmbda) not in _pipelines:
        _pipelines[(k, lmbda)] = Pipeline(MODELS, k, lmbda)
    return _pipelines[(k, lmbda)].encode(wav, sr, score=score)


def check_complete(units: list[P.Unit], end: P.EndMessage) -> None:
    """Units arrive as seq 0..n-1 and tile the stream's frames [0, num_frames) without gaps or overlaps."""
    assert [u.seq for u in units] == list(range(len(units)))
    assert end.units == len(units)
    assert units[0].start_frame == 0 and units[-1].end_frame == end.num_frames
    assert all(a.end_frame == b.start_frame for a, b in zip(units, units[1:]))
    assert all(u.end_frame > u.start_frame for u in units)


class Raw:
    """A bare WebSocket session for sending exactly what a test wants (including garbage)."""

    def __init__(self, ws):
        self.ws = ws

    @classmethod
    async def open(cls, url: str, **kw) -> "Raw":
        return cls(await websockets.connect(url, compression=None, max_size=2**22, **kw))

    async def start(self, **fields) -> P.ServerMessage:
        await self.ws.send(json.dumps({"type": "start", "sample_rate": 16000, **fields}))
        return await self.recv()

    async def recv(self, timeout: float = 30) -> P.ServerMessage:
        return P.parse_server_message(await asyncio.wait_for(self.ws.recv(), timeout))

    async def error(self) -> P.Error:
        """The next error message (skipping stats)."""
        while True:
            msg = await self.recv()
            if not isinstance(msg, P.Stats):
                assert isinstance(msg, P.Error), msg
                return msg

    async def finish(self) -> tuple[list[P.Unit], P.EndMessage]:
        """Send end; collect the units up to the end message; the server then closes normally."""
        await self.ws.send('{"type":"end"}')
        units = []
        while True:
            msg = await self.recv()
            if isinstance(msg, P.Unit):
                units.append(msg)
            elif isinstance(msg, P.EndMessage):
                await self.ws.wait_closed()
                return units, msg


# --- parity with offline encode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sr", [16000, 44100])
def test_full_mode_stream_client_equals_offline_encode(server, tmp_path, sr):
    """The `stream` CLI through the real server, mode full, writes what `encode --json` writes."""
    import soundfile as sf

    from dpslm_stream.cli import main as cli_main

    wav = speech_like(3.0, sr, seed=sr)
    path = tmp_path / f"speech_{sr}.wav"
    sf.write(path, wav, sr, subtype="FLOAT")
    args = Namespace(files=[path], url=server.url, token=None, k=500, lmbda=4500, preset="low-latency", mode="full",
                     score=True, format="pcm16" if sr == 16000 else "float32", pace="fast", chunk_ms=100.0,
                     json=tmp_path / "stream.json", quiet=True, reconnect=True)  # fmt: skip
    assert stream_run(args) == 0
    assert cli_main(["encode", str(path), "--models", "tiny", "--k", "500", "--lmbda", "4500", "--quiet",
                     "--json", str(tmp_path / "encode.json")]) == 0  # fmt: skip
    streamed = json.loads((tmp_path / "stream.json").read_text())
    encoded = json.loads((tmp_path / "encode.json").read_text())
    assert set(encoded) <= set(streamed)  # same document (the stream adds its settings)
    for key in ("k", "lmbda", "num_neighbors", "models", "random_weights", "frame_rate"):
        assert streamed[key] == encoded[key]
    s, e = streamed["files"][str(path)], encoded["files"][str(path)]
    assert set(e) <= set(s)
    if sr == 16000:  # PCM16 on the wire: the reference sees the same quantised samples (the file is float)
        ref = offline(np.frombuffer(P.encode_audio(wav, "pcm16"), "<i2") / np.float32(32768), sr, score=True)
        assert s["units"] == ref.units and s["durations"] == ref.durations
        np.testing.assert_allclose(s["unit_logprobs"], ref.unit_logprobs, rtol=1e-4, atol=1e-4)
    else:  # float32 on the wire: bit-identical input, so the whole document matches encode --json
        for key in ("units", "durations", "starts", "start_seconds", "num_frames", "seconds", "units_per_second",
                    "bitrate"):  # fmt: skip
            assert s[key] == e[key], key
        np.testing.assert_allclose(s["unit_logprobs"], e["unit_logprobs"], rtol=1e-4, atol=1e-4)
        assert streamed["bitrate"] == pytest.approx(encoded["bitrate"])


def test_cached_mode_commits_units_while_audio_flows(server):
    wav = speech_like(4.0, 16000, seed=7)
    sent_before_end = []

    async def main():
        async with UnitsClient(server.url, sample_rate=16000, preset="low-latency", score=True) as client:
            assert client.ready.settings["mode"] == "cached"
            got = []
            async for msg in client.stream(chunked(wav, 16000, 100), realtime=True):
                if isinstance(msg, P.Unit):
                    got.append(msg)
                    sent_before_end.append(client.sent_samples < len(wav))
            return got, client.end_message

    units, end = asyncio.run(main())
    check_complete(units, end)
    assert end.reason == "end" and end.audio_s == pytest.approx(4.0)
    assert any(sent_before_end), "cached mode must commit units before the stream ends"
    assert all(u.logprob is not None and u.logprob < 0 for u in units)
    assert end.stats["loglikelihood"] == pytest.approx(sum(u.logprob for u in units), rel=1e-6)
    assert end.stats["bitrate"] > 0 and end.stats["units"] == len(units)


def test_16_concurrent_clients_complete_and_ordered(server):
    """16 sessions at once, mixed rates, pairs and formats: each equals its own offline encode."""
    jobs = [(16000 if i % 3 else 44100, (500, 4500) if i % 2 else (100, 600), "pcm16" if i % 4 else "float32", i)
            for i in range(16)]  # fmt: skip
    signals = [speech_like(1.5 + 0.1 * (i % 5), sr, seed=100 + i) for sr, _, _, i in jobs]

    async def one(job, wav):
        sr, (k, lmbda), fmt, _ = job
        return await stream_audio(server.url, wav, sr, k=k, lmbda=lmbda, format=fmt, options={"mode": "full"},
                                  chunk_ms=50, realtime=True)  # fmt: skip

    async def main():
        return await asyncio.gather(*(one(j, w) for j, w in zip(jobs, signals)))

    results = asyncio.run(main())
    assert len({r.ready.session for r in results}) == 16
    for (sr, (k, lmbda), fmt, _), wav, res in zip(jobs, signals, results):
        check_complete(res.units, res.end)
        sent = wav if fmt == "float32" else np.frombuffer(P.encode_audio(wav, "pcm16"), "<i2") / np.float32(32768)
        ref = offline(sent, sr, k, lmbda)
        assert [u.unit for u in res.units] == ref.units
        assert [u.end_frame - u.start_frame for u in res.units] == ref.durations


# --- malformed input: an error for that session only ---------------------------------------------------------------


def test_bad_inputs_each_get_an_error_and_leave_other_sessions_unaffected(server):
    wav = speech_like(3.0, 16000, seed=3)
    pcm = P.encode_audio(wav[:1600], "pcm16")

    async def victim():  # a healthy session streaming throughout
        return await stream_audio(server.url, wav, 16000, options={"mode": "full"}, chunk_ms=100, realtime=True)

    async def expect_then_continue(setup, code):
        """Run `setup` (which provokes one error), check the code, then show the session still works."""
        raw = await Raw.open(server.url)
        ready = await raw.start(options={"mode": "full"})
        assert isinstance(ready, P.Ready)
        await setup(raw)
        err = await raw.error()
        assert err.code == code.value and not err.fatal and err.message
        await raw.ws.send(pcm)  # the session is still usable
        units, end = await raw.finish()
        assert end.reason == "end" and end.audio_s == pytest.approx(0.1)
        check_complete(units, end)

    async def before_start(send, code):
        raw = await Raw.open(server.url)
        await send(raw.ws)
        err = await raw.error()
        assert err.code == code.value and not err.fatal
        assert isinstance(await raw.start(), P.Ready)  # a correct start is still accepted
        await raw.ws.close()

    async def refused_start(fields, code):
        raw = await Raw.open(server.url)
        await raw.ws.send(json.dumps({"type": "start", **fields}))
        err = await raw.error()
        assert err.code == code.value and not err.fatal, err
        await raw.ws.close()

    async def vanish():  # a client that disappears mid-stream, without a close handshake
        raw = await Raw.open(server.url)
        await raw.start(options={"mode": "cached"})
        for _ in range(5):
            await raw.ws.send(pcm)
        raw.ws.transport.abort()

    async def too_big_for_the_library():
        raw = await Raw.open(server.url)
        await raw.start()
        await raw.ws.send(b"\x00" * (2 * server.config.max_message_bytes + 2))
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await raw.recv()
        assert info.value.rcvd.code == P.CLOSE_TOO_BIG

    async def main():
        v = asyncio.create_task(victim())
        big = server.config.max_message_bytes + 2
        await asyncio.gather(
            expect_then_continue(lambda r: r.ws.send("{oops"), E.BAD_JSON),
            expect_then_continue(lambda r: r.ws.send('{"type": "pause"}'), E.UNKNOWN_TYPE),
            expect_then_continue(lambda r: r.ws.send(b"\x01\x02\x03"), E.BAD_AUDIO),
            expect_then_continue(lambda r: r.ws.send(b""), E.BAD_AUDIO),
            expect_then_continue(lambda r: r.ws.send(b"\x00" * big), E.MESSAGE_TOO_LARGE),
            expect_then_continue(lambda r: r.ws.send(json.dumps({"type": "start", "sample_rate": 16000})),
                                 E.ALREADY_STARTED),  # fmt: skip
            before_start(lambda ws: ws.send(pcm), E.NOT_STARTED),
            before_start(lambda ws: ws.send('{"type":"end"}'), E.NOT_STARTED),
            refused_start({"sample_rate": 10**9}, E.BAD_SAMPLE_RATE),
            refused_start({"sample_rate": 16000, "k": 500, "lmbda": 1234}, E.UNKNOWN_MODEL),
            refused_start({"sample_rate": 16000, "k": 200, "lmbda": 700}, E.UNKNOWN_MODEL),  # released, not served
            refused_start({"sample_rate": 16000, "preset": "ultra"}, E.BAD_SETTINGS),
            refused_start({"sample_rate": 16000, "resynth": {}, "version": 1}, E.UNSUPPORTED_OPTION),
            refused_start({"sample_rate": 16000, "version": 9}, E.UNSUPPORTED_VERSION),
            vanish(),
            too_big_for_the_library(),
        )
        return await v

    res = asyncio.run(main())
    check_complete(res.units, res.end)
    ref = offline(np.frombuffer(P.encode_audio(wav, "pcm16"), "<i2") / np.float32(32768), 16000)
    assert [u.unit for u in res.units] == ref.units and not res.errors


def test_non_finite_float_frames_and_audio_after_end(server):
    async def main():
        raw = await Raw.open(server.url)
        await raw.start(format="float32", options={"mode": "full"})
        await raw.ws.send(np.array([0.0, np.nan, 0.1], dtype="<f4").tobytes())
        err = await raw.error()
        assert err.code == E.NON_FINITE.value and "NaN" in err.message
        await raw.ws.send(P.encode_audio(speech_like(0.5, 16000), "float32"))
        await raw.ws.send('{"type":"end"}')
        await raw.ws.send(P.encode_audio(np.zeros(160), "float32"))
        msgs = []
        while not isinstance(msgs[-1:] and msgs[-1], P.EndMessage):
            msgs.append(await raw.recv())
        assert any(isinstance(m, P.Error) and m.code == E.AFTER_END.value for m in msgs)
        assert msgs[-1].audio_s == pytest.approx(0.5)  # neither the NaN frame nor the late one counted

    asyncio.run(main())


# --- admission, auth, HTTP endpoints -------------------------------------------------------------------------------


def test_busy_reply_is_immediate_and_slots_free_up():
    with ServerThread(ServerConfig(port=0, models="tiny", max_sessions=2, warmup=False)) as srv:

        async def main():
            a = await Raw.open(srv.url)
            b = await Raw.open(srv.url)
            assert isinstance(await a.start(), P.Ready) and isinstance(await b.start(), P.Ready)
            c = await Raw.open(srv.url)
            err = await c.recv(timeout=5)  # at once, without sending anything
            assert err.code == E.BUSY.value and err.fatal and err.retry_after_s > 0
            await c.ws.wait_closed()
            assert c.ws.close_code == P.CLOSE_TRY_AGAIN
            with pytest.raises(SessionError) as info:
                await UnitsClient(srv.url, sample_rate=16000).connect()
            assert info.value.code == "busy"
            await a.finish()  # a slot frees up once the server has seen the connection close
            for _ in range(100):
                if json.loads(urllib.request.urlopen(srv.http_url + P.HEALTH_PATH).read())["sessions"] < 2:
                    break
                await asyncio.sleep(0.05)
            async with UnitsClient(srv.url, sample_rate=16000) as d:
                assert d.ready.session
            await b.ws.close()

        asyncio.run(main())
        metrics = urllib.request.urlopen(srv.http_url + P.METRICS_PATH).read().decode()
        assert 'dpslm_rejected_total{reason="busy"} 2.0' in metrics


def test_token_origin_and_offered_modes_are_enforced():
    cfg = ServerConfig(port=0, models="tiny", token="s3cret-token", allowed_origins=("https://app.example",),
                       modes=("cached", "full"), warmup=False)  # fmt: skip
    with ServerThread(cfg) as srv:
        host = f"127.0.0.1:{srv.port}"

        async def status_of(url, **kw):
            try:
                ws = await websockets.connect(url, **kw)
            except websockets.InvalidStatus as e:
                return e.response.status_code
            await ws.close()
            return 101

        async def main():
            assert await status_of(srv.url) == 401
            assert await status_of(srv.url + "?token=wrong") == 401
            assert await status_of(srv.url + "?token=s3cret-token") == 101
            assert await status_of(srv.url, additional_headers={"Authorization": "Bearer s3cret-token"}) == 101
            assert await status_of(srv.url, additional_headers={"Authorization": "Bearer s3cret-tokem"}) == 401
            ok = srv.url + "?token=s3cret-token"
            assert await status_of(ok, origin="https://evil.example") == 403
            assert await status_of(ok, origin="https://app.example") == 101
            assert await status_of(ok, origin=f"http://{host}") == 101  # the server's own page
            with pytest.raises(SessionError) as info:
                await UnitsClient(srv.url, sample_rate=16000, token="nope").connect()
            assert info.value.code == "http_401"
            async with UnitsClient(srv.url, sample_rate=16000, token="s3cret-token") as c:
                assert c.ready.session
            with pytest.raises(SessionError) as info:  # the operator did not offer sliding windows
                await UnitsClient(srv.url, sample_rate=16000, token="s3cret-token", options={"mode": "sliding"}).connect()
            assert info.value.code == E.BAD_SETTINGS.value and "not offered" in str(info.value)

        asyncio.run(main())
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(srv.http_url + P.METRICS_PATH)
        assert info.value.code == 401
        req = urllib.request.Request(srv.http_url + P.METRICS_PATH, headers={"Authorization": "Bearer s3cret-token"})
        metrics = urllib.request.urlopen(req).read().decode()
        assert 'dpslm_rejected_total{reason="unauthorized"} 4.0' in metrics
        assert 'dpslm_rejected_total{reason="forbidden_origin"} 1.0' in metrics
        assert json.loads(urllib.request.urlopen(srv.http_url + P.HEALTH_PATH).read())["status"] == "ok"


class _NoSink:
    def on_events(self, events, progress):
        pass

    def on_consumed(self):
        pass

    def on_failure(self, error):
        raise AssertionError(error)


def test_batch_metric_counts_sessions_per_forward_not_rounds(tiny_models):
    """dpslm_batch_sessions is the number of sessions in an encoder forward, and dpslm_step_seconds times only steps
    that ran one: most rounds of a live server only take 20 ms of audio in while no hop is ready, and counting them
    made a server whose every forward held all 8 sessions report batches of 2."""
    from dpslm_stream.server.encoder_thread import EncoderThread, Slot
    from dpslm_stream.server.metrics import Metrics
    from dpslm_stream.stream.worker import EncoderWorker

    worker = EncoderWorker(tiny_models, "cpu", pairs=[(500, 4500)])
    metrics, loop = Metrics(), asyncio.new_event_loop()
    try:
        thread = EncoderThread(worker, loop, metrics)
        slots = [Slot(f"s{i}", worker.open_session(16000, 500, 4500), 16000, _NoSink()) for i in range(3)]
        thread._slots = list(slots)
        value = metrics.registry.get_sample_value
        wav = speech_like(2.0, 16000, seed=4)
        for slot in slots:  # one 20 ms frame each: audio taken in, no hop ready, no forward
            slot.add_audio(wav[:320])
        thread._round()
        assert value("dpslm_worker_busy_seconds_total") > 0
        assert value("dpslm_batch_sessions_count") == value("dpslm_step_seconds_count") == 0
        for slot in slots:  # the rest: several hops each, run one hop of every session per forward
            slot.add_audio(wav[320:])
        thread._round()
        assert value("dpslm_batch_sessions_count") == value("dpslm_step_seconds_count") == 1
        assert value("dpslm_batch_sessions_sum") == 3.0
        assert worker.runner.forwards > 1 and worker.runner.forward_streams == 3 * worker.runner.forwards
    finally:
        loop.close()


def test_health_metrics_and_page(server):
    health = json.loads(urllib.request.urlopen(server.http_url + P.HEALTH_PATH).read())
    assert health["status"] == "ok" and health["random_weights"] and health["protocol"] == P.PROTOCOL_VERSION
    assert [500, 4500] in health["pairs"] and health["default_pair"] == [500, 4500]
    res = asyncio.run(stream_audio(server.url, speech_like(1.0, 16000, seed=9), 16000))
    metrics = urllib.request.urlopen(server.http_url + P.METRICS_PATH).read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line[:1] != "#"}
    assert values["dpslm_units_total"] >= len(res.units) > 0
    assert values["dpslm_audio_seconds_total"] >= 1.0 - 1e-9  # a sum of chunk durations (alone: 0.9999999999999999)
    assert values['dpslm_sessions_total{reason="end"}'] >= 1
    assert values["dpslm_batch_sessions_count"] > 0 and values["dpslm_step_seconds_count"] > 0
    assert values["dpslm_commit_lag_seconds_count"] >= len(res.units)
    for name, ctype, needle in [("/", "text/html", 'src="app.js"'), ("/app.js", "javascript", "WS_PATH"),
                                ("/worklet.js", "javascript", "registerProcessor")]:  # fmt: skip
        with urllib.request.urlopen(server.http_url + name) as r:
            assert ctype in r.headers["Content-Type"]
            assert needle in r.read().decode()
    for bad in ("/nope.js", "/../server/app.py", "/%2e%2e/server/app.py", "/.hidden"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.http_url + bad)
        assert info.value.code == 404
