"""Live resynthesis through the real server on loopback (tiny set, RANDOM weights: the audio checks the plumbing):
audio chunks stream back and end before `end`; the unlimited-context stream equals offline greedy resynthesis; a
listener receives exactly the sender's units and, from those units alone, the same audio; disconnects on either side
end cleanly; bad options and a failing resynthesis stay within their own session."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import websockets

from dpslm_stream import protocol as P
from dpslm_stream.audio import load_audio
from dpslm_stream.client import ListenerClient, SessionError, UnitsClient, chunked
from dpslm_stream.hub import ModelSet
from dpslm_stream.pipeline import Pipeline
from dpslm_stream.server.app import ServerConfig, ServerThread
from dpslm_stream.stream.resynth_worker import ResynthWorker
from dpslm_stream.tiny import speech_like

E = P.ErrorCode
SR = 16000
WAV = speech_like(2.0, SR, seed=11)


class FailingResynthWorker(ResynthWorker):
    """Fails every step that includes a stream opened with seed 666 (a stand-in for a model error)."""

    def step(self, sessions, yield_to=None):
        sessions = list(sessions)
        if any(s.ellav.seed == 666 for s in sessions):
            raise RuntimeError("injected resynthesis failure")
        return super().step(sessions, yield_to)


@pytest.fixture(scope="module")
def server():
    cfg = ServerConfig(port=0, models="tiny", max_sessions=20, idle_timeout_s=20)
    # max_batch=1: one pass per decode step, so batch shapes never depend on timing and greedy decoding of the same
    # prompt is bitwise reproducible across sessions (the listener test compares audio exactly)
    with ServerThread(cfg, resynth=FailingResynthWorker(ModelSet("tiny"), max_batch=1)) as srv:
        yield srv


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def collect(client, wav=WAV, realtime=False):
    msgs = [m async for m in client.stream(chunked(wav, SR, 100), realtime=realtime)]
    units = [m for m in msgs if isinstance(m, P.Unit)]
    chunks = [m for m in msgs if isinstance(m, P.AudioChunk)]
    audio = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
    return msgs, units, chunks, audio


def test_audio_streams_back_and_ends_before_end(server):
    async def main():
        async with UnitsClient(server.url, sample_rate=SR, resynth={"seed": 3}) as c:
            assert c.ready.settings["resynth"]["holdback"] == 3 and c.ready.settings["resynth"]["seed"] == 3
            return c.ready, await collect(c)

    ready, (msgs, units, chunks, audio) = run(main())
    end = msgs[-1]
    assert isinstance(end, P.EndMessage) and end.reason == "end"
    assert chunks and all(isinstance(m, (P.Unit, P.AudioChunk, P.Stats)) for m in msgs[:-1])
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert end.resynth["units"] == len(units) == end.units and end.resynth["error"] is None
    assert end.resynth["chunks"] == len(chunks)
    assert len(audio) == round(end.resynth["audio_seconds"] * 24000) == end.resynth["codec_frames"] * 600
    assert end.stats["resynth_audio_s"] == pytest.approx(len(audio) / 24000, abs=1e-3)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def long_speech() -> np.ndarray:
    """The bundled speech sample played twice: 14.6 s, > 200 deduplicated units."""
    wav, sr = load_audio(Path(__file__).parents[1] / "dpslm_stream" / "data" / "sample.wav")
    assert sr == SR
    return np.concatenate([wav, wav])


@pytest.mark.parametrize("wav", [WAV, long_speech()], ids=["synthetic-2s", "speech-14.6s"])
def test_unlimited_context_equals_offline_greedy_resynthesis(server, wav):
    """Full-mode units (= offline units) with C = L = None and a vocoder window over the whole stream: the audio that
    streams back is offline `resynth --greedy` (ELLA-V greedy generate + whole-sequence vocode), to PCM16 rounding,
    at any length (the speech gives far more units than one pass's default max_pass_units)."""
    opts = {"left_context": None, "holdback": None, "vocoder_left_context": None, "vocoder_lookahead": 100000}

    async def main():
        async with UnitsClient(server.url, sample_rate=SR, format="float32", resynth=opts,
                               options={"mode": "full"}) as c:
            return await collect(c, wav)

    msgs, units, chunks, audio = run(main())
    pipe = Pipeline(ModelSet("tiny"), 500, 4500)
    offline_units = pipe.encode(wav, SR, score=False).units
    assert [u.unit for u in units] == offline_units
    (wav, codes, finished), = pipe.resynthesize(offline_units, greedy=True)
    assert msgs[-1].resynth["codec_frames"] == len(codes)
    expected = np.clip(wav.squeeze(0).numpy(), -1, 1)
    assert audio.shape == expected.shape
    assert np.abs(audio - expected).max() <= 1.5 / 32768  # PCM16 quantisation of the same samples


def test_listener_gets_the_senders_units_and_the_same_audio_from_units_alone(server):
    async def main():
        # The exact settings: each side resynthesizes all its units in one pass and one vocoder window at the end,
        # so the audio depends on the units alone (with finite context the pass and window boundaries, and so the
        # prompts and windows, depend on when units arrive)
        exact = {"left_context": None, "holdback": None, "vocoder_left_context": None, "vocoder_lookahead": 100000}
        async with UnitsClient(server.url, sample_rate=SR, resynth=exact) as sender:
            async with ListenerClient(server.url, session=sender.ready.session,
                                      listen_token=sender.ready.listen_token, resynth=exact) as listener:  # fmt: skip
                assert listener.ready.role == "listener" and listener.ready.settings["sender"] == sender.ready.session
                assert listener.ready.listen_token is None

                async def listen():
                    return [m async for m in listener]

                task = asyncio.create_task(listen())
                sent = await collect(sender)
                return sent, await task

    (msgs, units, _, audio), heard = run(main())
    heard_units = [m for m in heard if isinstance(m, P.Unit)]
    heard_audio = np.concatenate([m.samples for m in heard if isinstance(m, P.AudioChunk)])
    assert [(u.seq, u.unit, u.start_frame, u.end_frame) for u in heard_units] == \
        [(u.seq, u.unit, u.start_frame, u.end_frame) for u in units]  # fmt: skip
    assert heard[-1].reason == "end" and heard[-1].units == len(units)
    assert heard[-1].stats["bitrate"] == pytest.approx(msgs[-1].stats["bitrate"], rel=1e-3)
    np.testing.assert_array_equal(heard_audio, audio)  # greedy, exact settings: the same audio from the units alone


def test_sender_vanishing_ends_the_listener_cleanly(server):
    async def main():
        sender = UnitsClient(server.url, sample_rate=SR, resynth=None)
        await sender.connect()
        listener = ListenerClient(server.url, session=sender.ready.session, listen_token=sender.ready.listen_token)
        await listener.connect()
        await sender.send(WAV[:SR])
        got = []
        async for m in listener:  # wait for a first unit, then drop the sender without an end
            got.append(m)
            if isinstance(m, P.Unit):
                await sender._ws.close()
                break
        got += [m async for m in listener]
        return got

    got = run(main())
    errors = [m for m in got if isinstance(m, P.Error)]
    assert [e.code for e in errors] == [E.SENDER_GONE.value] and errors[0].fatal
    assert isinstance(got[-1], P.EndMessage) and got[-1].reason == E.SENDER_GONE.value


def test_listener_leaving_does_not_disturb_the_sender(server):
    async def main():
        async with UnitsClient(server.url, sample_rate=SR, resynth={}) as sender:
            listener = ListenerClient(server.url, session=sender.ready.session, listen_token=sender.ready.listen_token)
            await listener.connect()
            await listener.close()  # gone without a word
            return await collect(sender)

    msgs, units, chunks, audio = run(main())
    assert msgs[-1].reason == "end" and msgs[-1].resynth["error"] is None and len(units) == msgs[-1].units > 0
    assert len(audio) == msgs[-1].resynth["codec_frames"] * 600


def test_a_failing_resynthesis_leaves_its_units_and_other_sessions_intact(server):
    async def one(seed):
        async with UnitsClient(server.url, sample_rate=SR, resynth={"seed": seed, "greedy": False}) as c:
            return await collect(c)

    async def main():
        return await asyncio.gather(one(666), one(1))

    (bad_msgs, bad_units, _, _), (good_msgs, good_units, _, good_audio) = run(main())
    errors = [m for m in bad_msgs if isinstance(m, P.Error)]
    assert errors and errors[0].code == E.INTERNAL_ERROR.value and not errors[0].fatal
    assert bad_msgs[-1].reason == "end" and "injected" in bad_msgs[-1].resynth["error"]
    assert bad_msgs[-1].units == len(bad_units) > 0  # every unit still arrived
    assert good_msgs[-1].resynth["error"] is None and len(good_audio) > 0


async def refused(url, first: dict) -> P.Error:
    async with websockets.connect(url, compression=None) as ws:
        await ws.send(json.dumps(first))
        while True:
            msg = P.parse_server_message(await asyncio.wait_for(ws.recv(), 30))
            if isinstance(msg, P.Error):
                return msg


@pytest.mark.parametrize(
    "resynth, code",
    [
        ({"holdback": -1}, E.BAD_SETTINGS),
        ({"top_p": 2.0}, E.BAD_SETTINGS),
        ({"temperature": -1.0}, E.BAD_SETTINGS),
        ({"vocoder_lookahead": -3}, E.BAD_SETTINGS),
        ({"holdback": 40, "left_context": 8}, E.BAD_SETTINGS),  # the prompt cannot hold the hold-back
        ({"left_contxt": 3}, E.BAD_MESSAGE),
        ({"seed": "x"}, E.BAD_MESSAGE),
    ],
)
def test_bad_resynthesis_options_get_clear_errors(server, resynth, code):
    err = run(refused(server.url, {"type": "start", "sample_rate": SR, "resynth": resynth}))
    assert err.code == code.value and not err.fatal


def test_subscribe_refusals(server):
    async def main():
        async with UnitsClient(server.url, sample_rate=SR) as sender:
            wrong = await refused(server.url, {"type": "subscribe", "session": sender.ready.session, "token": "nope"})
            unknown = await refused(server.url, {"type": "subscribe", "session": "0" * 12, "token": "x"})
            listener = ListenerClient(server.url, session=sender.ready.session, listen_token=sender.ready.listen_token)
            await listener.connect()
            await listener._ws.send(P.encode_audio(np.zeros(160, np.float32), "pcm16"))
            await listener._ws.send(json.dumps({"type": "start", "sample_rate": SR}))
            errs = []
            async for m in listener:
                if isinstance(m, P.Error):
                    errs.append(m)
                    if len(errs) == 2:
                        await listener.end()
            await sender.end()
            return wrong, unknown, errs

    wrong, unknown, errs = run(main())
    assert wrong.code == unknown.code == E.UNKNOWN_SESSION.value and wrong.fatal
    assert [e.code for e in errs] == [E.NOT_A_SENDER.value] * 2 and not any(e.fatal for e in errs)


def test_resynthesis_can_be_switched_off():
    with ServerThread(ServerConfig(port=0, models="tiny", resynth=False, warmup=False)) as srv:
        err = run(refused(srv.url, {"type": "start", "sample_rate": SR, "resynth": {}}))
        assert err.code == E.UNSUPPORTED_OPTION.value

        async def units_only():
            async with UnitsClient(srv.url, sample_rate=SR) as c:
                return await collect(c, WAV[: SR // 2])

        msgs, units, chunks, _ = run(units_only())
        assert units and not chunks and msgs[-1].resynth is None


def test_stream_client_writes_the_resynthesized_audio(server, tmp_path):
    import soundfile as sf

    from dpslm_stream.cli import main

    src, out, doc = tmp_path / "in.wav", tmp_path / "out.wav", tmp_path / "units.json"
    sf.write(src, WAV, SR)
    assert main(["stream", str(src), "--url", server.url, "--audio-out", str(out), "--json", str(doc),
                 "--resynth-options", '{"holdback": 2, "seed": 5}', "--quiet"]) == 0  # fmt: skip
    audio, rate = sf.read(out, dtype="float32")
    units = json.loads(doc.read_text())["files"][str(src)]["units"]
    assert rate == 24000 and len(audio) > 0 and len(audio) % 600 == 0
    assert json.loads(doc.read_text())["stream"]["settings"]["resynth"]["holdback"] == 2 and units


class SlowResynthWorker(ResynthWorker):
    """A resynthesis worker far slower than real time (a stand-in for full-size ELLA-V on a small CPU)."""

    def step(self, sessions, yield_to=None):
        import time

        time.sleep(0.3)
        return super().step(sessions, yield_to)


def test_a_resynthesis_that_falls_behind_is_stopped_and_the_units_go_on():
    cfg = ServerConfig(port=0, models="tiny", warmup=False, max_resynth_lag_s=1.0, stats_interval_s=0.2)
    with ServerThread(cfg, resynth=SlowResynthWorker(ModelSet("tiny"), max_decode_steps=1)) as srv:

        async def main():
            async with UnitsClient(srv.url, sample_rate=SR, resynth={}) as c:
                return await collect(c, speech_like(4.0, SR, seed=4), realtime=True)

        msgs, units, chunks, _ = run(main())
    errors = [m for m in msgs if isinstance(m, P.Error)]
    assert [e.code for e in errors] == [E.RESYNTH_BEHIND.value] and not errors[0].fatal
    end = msgs[-1]
    assert end.reason == "end" and end.units == len(units) > 0  # every unit still arrived
    assert "behind" in end.resynth["error"] and end.resynth["chunks"] == len(chunks)


def test_exact_resynthesis_ends_after_max_exact_resynth_s_and_the_units_go_on():
    cfg = ServerConfig(port=0, models="tiny", warmup=False, max_exact_resynth_s=1.0)
    with ServerThread(cfg) as srv:

        async def main():
            async with UnitsClient(srv.url, sample_rate=SR, resynth={"left_context": None}) as c:
                return await collect(c, speech_like(3.0, SR, seed=5))

        msgs, units, chunks, _ = run(main())
    errors = [m for m in msgs if isinstance(m, P.Error)]
    assert [e.code for e in errors] == [E.RESYNTH_LIMIT.value] and not errors[0].fatal
    end = msgs[-1]
    assert end.reason == "end" and end.units == len(units)  # every unit still arrived
    resynthesized = [u for u in units if u.end_s - units[0].end_s <= 1.0]  # the rule counts from the first unit
    assert end.resynth["units"] == len(resynthesized) < len(units)  # the audio of those units came, whole
    assert "--max-exact-resynth" in end.resynth["error"] and end.resynth["chunks"] == len(chunks) > 0


def test_bench_server_with_resynthesis_reports_first_audio_and_finish(capsys):
    """`bench server --resynth` (tiny set): each client also gets audio; the row says when the first audio came, the
    unit-to-audio latency, the resynthesis compute and when the session finished."""
    from dpslm_stream.cli import main

    assert main(["bench", "server", "--models", "tiny", "--clients", "1", "--seconds", "2", "--resynth"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "resynthesis: first audio" in ln)
    first = float(line.split("first audio ")[1].split(" s")[0])
    assert 0 < first < 5 and "s of audio per input second" in line and "stopped early" not in line
    assert "largest N served in real time" in out
