"""Hostile black-box tests of the live units server: the tiny set on loopback, driven only through its WebSocket.

Every test runs canary sessions beside the hostile traffic. A canary is a well-behaved client in full mode, paced in
real time, whose units must be EXACTLY the offline units of the same (PCM16-decoded) audio (`Pipeline.encode`).
Around it: tens of kinds of bad input, absurd options, slot squatting, a flood of bulk audio, a disconnect storm, a
SIGTERM drain of a real `serve` process, memory over 10 minutes of audio and a seeded protocol fuzzer.

The assertions are generic, true of any correct server: canaries exact; every error carries a code that
dpslm_stream.protocol defines; the server never closes with 1011 (internal error) without an `end` first; a
session that got `ready` and sent `end` gets `end` back (unless the connection itself broke the WebSocket rules);
the server accepts new sessions afterwards. No timing is asserted except generous bounds that only a hung or
locked-out server misses. Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest
import websockets

from dpslm_stream import protocol as P
from dpslm_stream.client import SessionError
from dpslm_stream.client.stream import stream_audio
from dpslm_stream.server.app import ServerConfig, ServerThread
from dpslm_stream.tiny import speech_like
from server_oracle import offline_units, pcm16

SR = 16000
CODES = {c.value for c in P.ErrorCode}
LIBRARY_CLOSES = {1002, 1007, 1009}  # protocol error, invalid UTF-8, frame too big: closed by websockets itself



# --- canaries ---------------------------------------------------------------------------------------------------------


async def canary(url: str, seed: int, seconds: float = 2.0, chunk_ms: float = 100.0):
    """A well-behaved real-time client in full mode; returns (audio it sent, StreamResult)."""
    wav = speech_like(seconds, SR, seed=seed)
    for attempt in range(60):  # `busy` is a fair answer while hostile connections hold the slots: retry, bounded
        try:
            res = await stream_audio(url, wav, SR, realtime=True, chunk_ms=chunk_ms, options={"mode": "full"},
                                     open_timeout=60)  # fmt: skip
            return wav, res
        except SessionError as e:
            if e.code != P.ErrorCode.BUSY.value or attempt == 59:
                raise
            await asyncio.sleep(0.5)


def check_canary(wav: np.ndarray, res) -> None:
    assert res.end is not None and res.end.reason == "end", res.end
    assert not res.errors, res.errors
    assert [u.seq for u in res.units] == list(range(len(res.units)))
    assert [u.unit for u in res.units] == offline_units(pcm16(wav)), "a canary's units differ from offline"


async def with_canaries(url: str, hostile, seeds=(101, 102), seconds: float = 2.0):
    """Run the coroutine `hostile` beside canaries (started first, so they overlap it); check them; return its
    result."""
    tasks = [asyncio.create_task(canary(url, s, seconds)) for s in seeds]
    await asyncio.sleep(0.2)
    out = await hostile
    for wav, res in await asyncio.gather(*tasks):
        check_canary(wav, res)
    return out


# --- a raw connection and the generic checks -----------------------------------------------------------------------


@dataclass
class Outcome:
    """Everything one raw connection saw."""

    sent: list = field(default_factory=list)
    texts: list[dict] = field(default_factory=list)  # every text message, parsed
    binary: int = 0
    close_code: int | None = None
    refused: str | None = None  # the handshake failed (HTTP status)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.texts if m.get("type") == kind]

    @property
    def ready(self) -> dict | None:
        r = self.of("ready")
        return r[0] if r else None

    @property
    def end(self) -> dict | None:
        e = self.of("end")
        return e[0] if e else None

    def codes(self) -> list[str]:
        return [m.get("code") for m in self.of("error")]


async def raw_session(url: str, frames, read_s: float = 8.0, gap_s: float = 0.0, quiet_s: float = 1.0) -> Outcome:
    """Connect, send `frames` (str: text frame, bytes: binary frame, float: a pause of that many seconds), then read
    until the server closes, or, once everything is sent, until `read_s` passes without a message (`quiet_s` when no
    session started and every text frame was answered: nothing more is due then). Until then a start may still be
    opening (a busy server opens sessions on its encoder thread, after the step it is running): its ready is waited
    for as long as any other message (waiting 1 s for it failed this file once, under a loaded CI run)."""
    out = Outcome()
    try:
        ws = await websockets.connect(url, compression=None, max_size=None, open_timeout=30, close_timeout=5)
    except websockets.InvalidStatus as e:
        out.refused = str(e.response.status_code)
        return out
    sent_all = asyncio.Event()
    async with ws:

        async def reader():
            while True:
                # Before a session starts, the server answers each text frame with one message (ready or an error).
                unanswered = sum(isinstance(f, str) for f in out.sent) > len(out.texts)
                timeout = read_s if not sent_all.is_set() or out.ready is not None or unanswered else quiet_s
                try:
                    msg = await asyncio.wait_for(ws.recv(), timeout)
                except asyncio.TimeoutError:
                    if sent_all.is_set():
                        return
                    continue
                except websockets.ConnectionClosed:
                    return
                if isinstance(msg, bytes):
                    out.binary += 1
                else:
                    parsed = json.loads(msg)  # the server only ever sends JSON objects
                    assert isinstance(parsed, dict) and "type" in parsed, msg[:200]
                    out.texts.append(parsed)

        task = asyncio.create_task(reader())
        for f in frames:
            if isinstance(f, float):
                await asyncio.sleep(f)
                continue
            try:
                await ws.send(f)
            except websockets.ConnectionClosed:
                break
            except AttributeError:
                # The client library's own race, not the server's: when the server closes while a large frame is
                # still being written, websockets aborts a transport asyncio already tore down (its loop is None).
                # The connection is closed either way; what the server answered is checked below.
                break
            out.sent.append(f if len(f) < 200 else f[:200])
            if gap_s:
                await asyncio.sleep(gap_s)
        sent_all.set()
        await task
        if ws.close_code is None:
            await ws.close()
        out.close_code = ws.close_code
    return out


def check_generic(out: Outcome, ended: bool = True) -> None:
    """What any connection may expect: defined error codes; no 1011 without an end; a started session that sent
    end gets end (unless the WebSocket library itself closed the connection for breaking its rules)."""
    for m in out.of("error"):
        assert m.get("code") in CODES, f"undefined error code {m!r}"
        assert isinstance(m.get("message"), str) and m["message"], m
    if out.close_code == P.CLOSE_INTERNAL:
        assert out.end is not None, f"closed with 1011 and no end; errors {out.codes()}"
    if ended and out.ready is not None and out.close_code not in LIBRARY_CLOSES:
        assert out.end is not None, f"started, sent end, got no end (close {out.close_code}, errors {out.codes()})"


def start(mode: str = "full", fmt: str = "pcm16", **extra) -> str:
    return json.dumps({"type": "start", "sample_rate": SR, "format": fmt, "options": {"mode": mode}, **extra})


END = '{"type": "end"}'


def audio_frames(wav: np.ndarray, fmt: str = "pcm16", chunk: int = 1600) -> list[bytes]:
    return [P.encode_audio(wav[i : i + chunk], fmt) for i in range(0, len(wav), chunk)]


def check_survives(out: Outcome, wav: np.ndarray, fmt: str = "pcm16") -> None:
    """The session got its error(s) for the bad message(s) and still encoded the good audio exactly."""
    check_generic(out)
    assert out.ready is not None, out.codes()
    assert out.end is not None and out.end["reason"] == "end", (out.end, out.codes())
    got = [m["unit"] for m in out.of("unit")]
    heard = pcm16(wav) if fmt == "pcm16" else wav.astype(np.float32)
    assert got == offline_units(heard)


@pytest.fixture(scope="module")
def srv():
    """One server with the default flags but a short resume grace (tiny set, loopback, an ephemeral port)."""
    # Senders that vanish are parked for resume (--resume-grace) 1 s here, not 30: their slots come back within a test.
    with ServerThread(ServerConfig(port=0, models="tiny", resume_grace_s=1.0)) as s:
        yield s


async def accepts_new_sessions(url: str, seed: int = 199) -> None:
    """The server still serves: a fresh canary, retried while it is busy (slots free up), within 60 s."""
    deadline = time.monotonic() + 60
    while True:
        try:
            wav, res = await canary(url, seed, seconds=1.0)
        except Exception as e:  # noqa: BLE001 - busy (slots still draining): retry
            assert time.monotonic() < deadline, f"no new session accepted within 60 s: {e!r}"
            await asyncio.sleep(0.5)
            continue
        check_canary(wav, res)
        return


# --- bad input beside canaries ---------------------------------------------------------------------------------------

GOOD = speech_like(0.6, SR, seed=7)
GOOD_PCM = audio_frames(GOOD)
GOOD_F32 = audio_frames(GOOD, "float32")

# Messages that are wrong in themselves: sent after a good start, each must be answered with a non-fatal coded
# error, and the session must go on to encode the good audio after it exactly.
BAD_MESSAGES: dict[str, list] = {
    "bad_json": ["{oops"],
    "json_array": ["[1, 2, 3]"],
    "json_string": ['"start"'],
    "json_null": ["null"],
    "json_number": ["12"],
    "empty_text": [""],
    "deep_nesting_list": ["[" * 100_000 + "]" * 100_000],
    "deep_nesting_object": ['{"a":' * 50_000 + "1" + "}" * 50_000],
    "huge_text": [json.dumps({"type": "pause", "pad": "x" * 900_000})],
    "text_over_text_limit": [json.dumps({"type": "end", "pad": "x" * 20_000})],
    "text_over_hard_cap": [json.dumps({"type": "end", "pad": "x" * (2 << 20)})],
    "unpaired_surrogate_type": ['{"type": "\\ud800"}'],
    "unpaired_surrogate_field": ['{"type": "start", "sample_rate": 16000, "preset": "\\udfff"}'],
    "nan_literal": ['{"type": "start", "sample_rate": NaN}'],
    "infinity_literal": ['{"type": "end", "x": Infinity}'],
    "huge_number": ['{"type": "start", "sample_rate": 1e400}'],
    "huge_int": ['{"type": "start", "sample_rate": ' + "9" * 5000 + "}"],
    "unknown_type": ['{"type": "pause"}'],
    "type_not_a_string": ['{"type": 5}'],
    "type_missing": ['{"sample_rate": 16000}'],
    "start_twice": [start()],
    "odd_pcm_length": [b"\x01\x02\x03"],
    "one_byte": [b"\x00"],
    "empty_binary": [b""],
    "binary_over_message_limit": [b"\x00" * ((1 << 20) + 2)],
    "binary_over_hard_cap": [b"\x00" * ((4 << 20) + 2)],
    "control_chars": ['{"type": "\\u0000\\u0001"}'],
}

BAD_FLOAT_FRAMES: dict[str, bytes] = {
    "nan": np.array([0.0, np.nan, 0.1], "<f4").tobytes(),
    "inf": np.array([np.inf, 0.0], "<f4").tobytes(),
    "minus_inf": np.array([-np.inf], "<f4").tobytes(),
    "out_of_range_finite": np.array([3e38, -1e30, 0.5], "<f4").tobytes(),
    "just_out_of_range": np.array([1.5, -1.0001], "<f4").tobytes(),
    "odd_float_length": b"\x00" * 5,
    "denormals": np.array([1e-45, -1e-40], "<f4").tobytes(),
}


def _run_bad_kinds(url: str, kinds: dict, fmt: str) -> dict[str, Outcome]:
    good = GOOD_PCM if fmt == "pcm16" else GOOD_F32

    async def one(bad):
        return await raw_session(url, [start(fmt=fmt), *([bad] if isinstance(bad, bytes) else bad), *good, END])

    async def main():
        out = {}
        names = list(kinds)
        for i in range(0, len(names), 6):  # six at a time beside the canaries (the server has 16 slots)
            batch = names[i : i + 6]
            res = await with_canaries(url, asyncio.gather(*(one(kinds[n]) for n in batch)), seeds=(100 + i,))
            out.update(zip(batch, res))
        return out

    return asyncio.run(main())


def test_the_raw_client_waits_for_a_session_that_opens_slowly():
    """The harness itself: a start that takes longer to open than `quiet_s` (a busy server) is still waited for, with
    the errors of the frames sent behind it. It once gave up after 1 s and read a loaded server's slow open as a
    missing error (test_bad_messages_are_answered_and_the_session_goes_on, kind unpaired_surrogate_field)."""
    from dpslm_stream.server.app import build_encoder
    from dpslm_stream.server.encoder_thread import EncoderThread, InProcessEncoder

    class SlowOpen(InProcessEncoder):
        def make_backend(self, loop, metrics, quantum_s):
            class Worker(EncoderThread):
                async def open_slot(self, *args, **kwargs):
                    await asyncio.sleep(1.5)  # longer than raw_session's quiet_s
                    return await super().open_slot(*args, **kwargs)

            return Worker(self.worker, loop, metrics, quantum_s)

    cfg = ServerConfig(port=0, models="tiny", warmup=False)
    with ServerThread(cfg, encoder=SlowOpen(build_encoder(cfg))) as slow:
        out = asyncio.run(raw_session(slow.url, [start(), *BAD_MESSAGES["unpaired_surrogate_field"], *GOOD_PCM, END]))
    check_survives(out, GOOD)
    assert out.codes() == [P.ErrorCode.BAD_MESSAGE.value]


def test_bad_messages_are_answered_and_the_session_goes_on(srv):
    results = _run_bad_kinds(srv.url, BAD_MESSAGES, "pcm16")
    failures = {}
    for name, out in results.items():
        try:
            if name.endswith("hard_cap") and out.close_code == P.CLOSE_TOO_BIG:
                continue  # a frame past the WebSocket library's own cap: it closes with 1009 (documented)
            check_survives(out, GOOD)
            assert out.of("error") and all(not e["fatal"] for e in out.of("error")), out.of("error")
        except AssertionError as e:
            failures[name] = ascii(str(e).splitlines()[0][:300])
    if failures:  # pytrace=False: no source parsing after the server thread hit a RecursionError (CPython 3.11)
        pytest.fail(f"{len(failures)} of {len(results)} kinds: {failures}", pytrace=False)
    asyncio.run(accepts_new_sessions(srv.url))


def test_bad_float32_frames_never_kill_the_session(srv):
    results = _run_bad_kinds(srv.url, BAD_FLOAT_FRAMES, "float32")
    failures = {}
    for name, out in results.items():
        try:
            check_generic(out)
            assert out.end is not None and out.end["reason"] == "end", (out.end, out.codes())
            if name != "denormals":
                # the frame was refused (a coded error) or clipped; either way the good audio after it is encoded
                assert out.of("error") or out.end["audio_s"] > len(GOOD) / SR
        except AssertionError as e:
            failures[name] = ascii(str(e).splitlines()[0][:300])
    if failures:  # pytrace=False: no source parsing after the server thread hit a RecursionError (CPython 3.11)
        pytest.fail(f"{len(failures)} of {len(results)} kinds: {failures}", pytrace=False)


# Starts that must be refused (non-fatal, coded), after which a good start on the same connection works exactly.
BAD_STARTS: dict[str, dict] = {
    "sample_rate_string": {"sample_rate": "16000"},
    "sample_rate_float": {"sample_rate": 16000.5},
    "sample_rate_bool": {"sample_rate": True},
    "sample_rate_zero": {"sample_rate": 0},
    "sample_rate_negative": {"sample_rate": -16000},
    "sample_rate_huge": {"sample_rate": 10**30},
    "sample_rate_costly_resampler": {"sample_rate": 47999},  # 769M-tap kernel: refused before anything is built
    "sample_rate_missing": {},
    "format_unknown": {"sample_rate": SR, "format": "mp3"},
    "format_number": {"sample_rate": SR, "format": 16},
    "options_list": {"sample_rate": SR, "options": [1, 2]},
    "options_string": {"sample_rate": SR, "options": "full"},
    "mode_unknown": {"sample_rate": SR, "options": {"mode": "turbo"}},
    "preset_number": {"sample_rate": SR, "preset": 5},
    "score_string": {"sample_rate": SR, "score": "yes"},
    "k_string": {"sample_rate": SR, "k": "500", "lmbda": 4500},
    "k_float": {"sample_rate": SR, "k": 500.5, "lmbda": 4500},
    "version_string": {"sample_rate": SR, "version": "2"},
    "version_huge": {"sample_rate": SR, "version": 10**100},
    "hop_zero": {"sample_rate": SR, "options": {"mode": "cached", "hop": 0}},
    "hop_negative": {"sample_rate": SR, "options": {"mode": "cached", "hop": -1}},
    "left_float": {"sample_rate": SR, "options": {"mode": "cached", "left": 1.5}},
    "left_string": {"sample_rate": SR, "options": {"mode": "cached", "left": "10"}},
    "left_huge_int": {"sample_rate": SR, "options": {"mode": "cached", "left": 10**40}},
    "max_lag_zero": {"sample_rate": SR, "options": {"mode": "cached", "max_lag": 0}},
    "max_lag_negative": {"sample_rate": SR, "options": {"mode": "cached", "max_lag": -5}},
    "resynth_list": {"sample_rate": SR, "resynth": [1]},
}


def test_bad_starts_are_refused_and_a_good_start_still_works(srv):
    async def one(fields):
        bad = json.dumps({"type": "start", **fields})
        return await raw_session(srv.url, [bad, start(), *GOOD_PCM, END])

    async def main():
        names, out = list(BAD_STARTS), {}
        for i in range(0, len(names), 8):
            batch = names[i : i + 8]
            res = await with_canaries(srv.url, asyncio.gather(*(one(BAD_STARTS[n]) for n in batch)), seeds=(300 + i,))
            out.update(zip(batch, res))
        return out

    failures = {}
    for name, out in asyncio.run(main()).items():
        try:
            check_survives(out, GOOD)
            first = out.of("error")[0] if out.of("error") else None
            assert first is not None and not first["fatal"], out.texts[:2]
        except AssertionError as e:
            failures[name] = ascii(str(e).splitlines()[0][:300])
    if failures:  # pytrace=False: no source parsing after the server thread hit a RecursionError (CPython 3.11)
        pytest.fail(f"{len(failures)} of {len(BAD_STARTS)} kinds: {failures}", pytrace=False)


# Absurd but well-typed window options: refused with a coded error, or accepted with every resolved size capped
# (a public server's windows are bounded: here, at most 3000 frames = 60 s, and max_lag at most 30 000 frames).
ABSURD_OPTIONS: dict[str, dict] = {
    "left_1e6": {"mode": "cached", "left": 1_000_000},
    "lookahead_1e6": {"mode": "cached", "lookahead": 1_000_000},
    "sliding_left_1e6": {"mode": "sliding", "left": 1_000_000},
    "hop_1_cached": {"mode": "cached", "hop": 1},
    "hop_1e6": {"mode": "cached", "hop": 1_000_000},
    "max_lag_1e12": {"mode": "cached", "max_lag": 10**12},
    "everything_huge": {"mode": "sliding", "left": 999_999, "hop": 999_999, "lookahead": 999_999},
    "unknown_option": {"mode": "cached", "turbo": True},
}
CAPS = {"left": 3000, "hop": 3000, "lookahead": 3000, "max_lag": 30000}


def test_absurd_options_are_refused_or_capped(srv):
    async def one(options):
        bad = json.dumps({"type": "start", "sample_rate": SR, "options": options})
        return await raw_session(srv.url, [bad, *GOOD_PCM, END], read_s=15)

    async def main():
        names = list(ABSURD_OPTIONS)
        res = await with_canaries(srv.url, asyncio.gather(*(one(ABSURD_OPTIONS[n]) for n in names)))
        return dict(zip(names, res))

    failures = {}
    for name, out in asyncio.run(main()).items():
        try:
            check_generic(out)
            if out.ready is None:  # refused
                assert out.codes() and out.codes()[0] in CODES
            else:
                settings = out.ready["settings"]
                over = {k: settings.get(k) for k, cap in CAPS.items() if (settings.get(k) or 0) > cap}
                assert not over, f"accepted uncapped: {over}"
                assert out.end is not None and out.end["reason"] == "end"
        except AssertionError as e:
            failures[name] = ascii(str(e).splitlines()[0][:300])
    if failures:  # pytrace=False: no source parsing after the server thread hit a RecursionError (CPython 3.11)
        pytest.fail(f"{len(failures)} of {len(ABSURD_OPTIONS)} kinds: {failures}", pytrace=False)


def test_binary_before_start_end_before_start_and_after_end(srv):
    async def main():
        outs = await with_canaries(srv.url, asyncio.gather(
            raw_session(srv.url, [GOOD_PCM[0], END, start(), *GOOD_PCM, END]),
            raw_session(srv.url, [start(), *GOOD_PCM, END, GOOD_PCM[0], END, start()]),
        ))  # fmt: skip
        return outs

    before, after = asyncio.run(main())
    check_survives(before, GOOD)
    assert before.codes()[:2] == [P.ErrorCode.NOT_STARTED.value] * 2
    check_survives(after, GOOD)
    assert before.end["audio_s"] == after.end["audio_s"] == pytest.approx(len(GOOD) / SR)


# --- slot squatting, disconnect storm, flood -------------------------------------------------------------------------


@pytest.mark.slow
def test_slot_squatters_that_never_start_do_not_lock_others_out():
    """max_sessions connections that never send start but keep sending junk often enough never to be idle: a new
    client must still get a session (the squatters are ended by a pre-start rule) within 40 s."""
    with ServerThread(ServerConfig(port=0, models="tiny", max_sessions=3, warmup=False)) as srv:

        async def squat(i):
            return await raw_session(srv.url, ['{"type": "ping"}', 1.0] * 60, read_s=2)

        async def main():
            squatters = [asyncio.create_task(squat(i)) for i in range(3)]
            await asyncio.sleep(1.0)
            await accepts_new_sessions_within(srv.url, 40)
            for t in squatters:
                t.cancel()
            await asyncio.gather(*squatters, return_exceptions=True)

        asyncio.run(main())


async def accepts_new_sessions_within(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            wav, res = await canary(url, 198, seconds=0.5)
            check_canary(wav, res)
            return
        except Exception as e:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise AssertionError(f"locked out for {seconds} s: {e!r}") from None
            await asyncio.sleep(1.0)


def test_disconnect_storm_beside_canaries(srv):
    """40 clients that start (or not), send some audio and vanish at seeded random points (abort without a close
    handshake, close mid-audio, close right after start): the canaries are exact, every slot comes back."""
    rng = random.Random(14)

    async def vanish(i):
        try:
            ws = await websockets.connect(srv.url, compression=None, open_timeout=30)
        except websockets.InvalidStatus:
            return  # busy: also fine
        how = rng.choice(["abort", "close", "abort_before_start", "abort_after_end"])
        try:
            if how != "abort_before_start":
                await ws.send(start(rng.choice(["full", "cached", "sliding"])))
            for frame in GOOD_PCM[: rng.randint(0, len(GOOD_PCM))]:
                await ws.send(frame)
                if rng.random() < 0.3:
                    await asyncio.sleep(0.02)
            if how == "abort_after_end":
                await ws.send(END)
        except websockets.ConnectionClosed:
            pass
        if how == "close":
            await ws.close()
        else:
            ws.transport.abort()

    async def storm():
        for wave in range(4):
            await asyncio.gather(*(vanish(10 * wave + j) for j in range(10)))

    asyncio.run(with_canaries(srv.url, storm(), seeds=(401, 402, 403), seconds=3.0))
    # every slot frees up (the vanished senders' parks end after 1 s): as many concurrent sessions as it has slots
    async def all_slots():
        for _ in range(100):  # bounded: 10 s
            if json.loads(urllib.request.urlopen(srv.http_url + P.HEALTH_PATH).read())["sessions"] == 0:
                break
            await asyncio.sleep(0.1)
        n = srv.config.max_sessions - 1
        res = await asyncio.gather(*(accepts_new_sessions(srv.url, 500 + i) for i in range(n)))
        return res

    asyncio.run(all_slots())


@pytest.mark.slow
def test_full_mode_flood_beside_a_real_time_canary(srv):
    """A client sends 120 s at once in full mode; a real-time canary beside it still gets exactly the offline units
    (its lag is measured by `dpslm-stream bench flood`, not asserted here) and the flood ends with all its units."""
    bulk = speech_like(120.0, SR, seed=21)

    async def flood():
        return await stream_audio(srv.url, bulk, SR, realtime=False, chunk_ms=5000, format="float32",
                                  options={"mode": "full"}, open_timeout=60)  # fmt: skip

    res = asyncio.run(with_canaries(srv.url, flood(), seeds=(601,), seconds=6.0))
    assert res.end is not None and res.end.reason == "end", (res.end, res.errors)
    assert res.end.audio_s == pytest.approx(120.0) and res.units and res.units[-1].end_frame == res.end.num_frames
    asyncio.run(accepts_new_sessions(srv.url))


# --- memory over 10 minutes of audio ---------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


@pytest.mark.slow
def test_memory_stays_bounded_over_ten_minutes_of_audio(srv):
    """600 s of audio in cached mode as fast as the server takes it (back-pressure): the session's state stays flat
    and this process's RSS (server and client share it) grows by less than 150 MB."""
    wav = speech_like(30.0, SR, seed=31)
    frames = audio_frames(wav, chunk=16000)  # 1 s frames; 20 passes over 30 s

    async def main():
        async with websockets.connect(srv.url, compression=None, max_size=None, open_timeout=30) as ws:
            await ws.send(start("cached"))
            ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert ready["type"] == "ready", ready
            states, rss = [], []

            async def read():
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    if msg["type"] == "stats":
                        states.append(msg["state_nbytes"])
                        rss.append(_rss_bytes())
                    elif msg["type"] == "error":
                        assert msg["code"] in CODES and not msg["fatal"], msg
                    elif msg["type"] == "end":
                        return msg

            reader = asyncio.create_task(read())
            for i in range(20):
                for f in frames:
                    await ws.send(f)
            await ws.send(END)
            end = await asyncio.wait_for(reader, 300)
            return end, states, rss

    rss0 = _rss_bytes()
    end, states, rss = asyncio.run(main())
    assert end["reason"] == "end" and end["audio_s"] == pytest.approx(600.0)
    assert len(states) >= 4
    late = states[len(states) // 4 :]
    assert max(late) <= 1.5 * max(states[: len(states) // 4]) + 65536, states
    assert max(rss) - rss0 < 150 * 2**20, (rss0, max(rss))


# --- a seeded protocol fuzzer ----------------------------------------------------------------------------------------

FUZZ_CASES = 96
FUZZ_SEED = 20261206


def _mutate_json(rng: random.Random, msg: dict) -> str:
    """One random mutation of a valid message, as text."""
    msg = json.loads(json.dumps(msg))
    keys = list(msg)
    junk = [None, True, -1, 0, 2**63, 1e308, -1e-308, "", "x" * rng.randint(1, 5000), "\ud800", [], {}, [[[]]],
            {"mode": "full"}, "full", "pcm16", 16000, float("nan"), float("inf")]  # fmt: skip
    op = rng.randrange(9)
    if op == 0 and keys:
        del msg[rng.choice(keys)]
    elif op == 1 and keys:
        msg[rng.choice(keys)] = rng.choice(junk)
    elif op == 2:
        msg["".join(rng.choice("abcxyz_\u00e9\ud801") for _ in range(rng.randint(1, 8)))] = rng.choice(junk)
    elif op == 3:
        msg.setdefault("options", {})
        if isinstance(msg["options"], dict):
            msg["options"][rng.choice(["left", "hop", "lookahead", "max_lag", "mode", "zzz"])] = rng.choice(junk)
    elif op == 4:
        depth = rng.choice([10, 1000, 30000])
        return "[" * depth + json.dumps(msg) + "]" * depth
    elif op == 5:
        text = json.dumps(msg)
        cut = rng.randrange(len(text) + 1)
        return text[:cut]
    elif op == 6:
        text = json.dumps(msg)
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(["\\ud800", "\x00", "}", "{", '"', "\\", "\u2028", "NaN"]) + text[i:]
    elif op == 7:
        msg["type"] = rng.choice(["start", "end", "subscribe", "ready", "unit", "error", "", "START", 1, None])
    else:
        msg["sample_rate"] = rng.choice([8000, 48000, 7999, 48001, 44100, 22050.0, "16000", None, 10**20])
    return json.dumps(msg)  # may carry NaN / Infinity literals (Python's json writes them) and lone surrogates


def _random_binary(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 3, 5, 7])))
    if kind == 1:
        return rng.randbytes(rng.choice([64, 320, 3200, 6400]))  # random bits: NaN, Inf and huge floats likely
    if kind == 2:
        return np.array([rng.choice([np.nan, np.inf, -np.inf, 1e30, -3.0, 0.5])] * 160, "<f4").tobytes()
    if kind == 3:
        return P.encode_audio(GOOD[: rng.randrange(1, 3200)], rng.choice(["pcm16", "float32"]))
    return b""


def _fuzz_case(rng: random.Random) -> list:
    """A message sequence: a valid session (start, audio, end) with random mutations, insertions and reorderings."""
    fmt = rng.choice(["pcm16", "float32"])
    good_start = {"type": "start", "sample_rate": SR, "format": fmt,
                  "options": {"mode": rng.choice(["full", "cached", "sliding"])}}  # fmt: skip
    seq: list = [json.dumps(good_start), *audio_frames(GOOD[: rng.randrange(320, len(GOOD))], fmt, 800), END]
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(seq) + 1)
        if op == 0:
            seq.insert(i, _mutate_json(rng, good_start))
        elif op == 1:
            seq.insert(i, _mutate_json(rng, {"type": "end"}))
        elif op == 2:
            seq.insert(i, _random_binary(rng))
        elif op == 3 and len(seq) > 1:
            j = rng.randrange(len(seq))
            seq[i % len(seq)], seq[j] = seq[j], seq[i % len(seq)]
        else:
            seq[0] = _mutate_json(rng, good_start)
    if seq[-1] != END:
        seq.append(END)  # always end, so that a started session must answer with end
    return seq


def test_protocol_fuzzer_96_seeded_cases(srv):
    """96 random mutations of valid sessions (seed FUZZ_SEED), 10 at a time beside a canary each round."""
    rng = random.Random(FUZZ_SEED)
    cases = [_fuzz_case(rng) for _ in range(FUZZ_CASES)]

    async def main():
        outs = []
        for i in range(0, FUZZ_CASES, 10):
            batch = cases[i : i + 10]
            outs += await with_canaries(srv.url, asyncio.gather(*(raw_session(srv.url, c, read_s=8) for c in batch)),
                                        seeds=(700 + i,), seconds=1.0)  # fmt: skip
        return outs

    failures = []
    for n, out in enumerate(asyncio.run(main())):
        try:
            check_generic(out)
        except AssertionError as e:
            failures.append((n, str(e).splitlines()[0][:200], [ascii(s[:80]) for s in out.sent[:4]]))
    if failures:
        pytest.fail(ascii(f"{len(failures)} of {FUZZ_CASES} cases: {failures[:6]}"), pytrace=False)
    asyncio.run(accepts_new_sessions(srv.url))


# --- SIGTERM drain of a real server process --------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_drains_canaries_beside_hostile_clients():
    """A `serve` process gets SIGTERM while two canaries stream, a squatter idles before start and a client floods:
    each canary gets end with exactly the offline units of the audio the server took; the process exits 0."""
    proc = subprocess.Popen([sys.executable, "-m", "dpslm_stream.server", "--models", "tiny", "--port", "0",
                             "--no-warmup", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            m = re.search(r"WebSocket\s+(ws://\S+)", line)
            if m:
                url = m.group(1)
                break
            assert time.monotonic() < deadline
        assert url, proc.stderr.read()
        wavs = [speech_like(6.0, SR, seed=s) for s in (801, 802)]

        async def paced(wav):
            async with websockets.connect(url, compression=None, open_timeout=30) as ws:
                await ws.send(start())
                msgs = []

                async def read():
                    try:
                        while True:
                            msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
                    except websockets.ConnectionClosed:
                        pass

                reader = asyncio.create_task(read())
                try:
                    for f in audio_frames(wav):
                        await ws.send(f)
                        await asyncio.sleep(0.1)
                    await ws.send(END)
                except websockets.ConnectionClosed:
                    pass
                await asyncio.wait_for(reader, 90)
                return msgs, ws.close_code

        async def main():
            squat = asyncio.create_task(raw_session(url, ['{"type": "ping"}', 1.0] * 20, read_s=3))
            bulk = asyncio.create_task(raw_session(url, [start(), *audio_frames(speech_like(30.0, SR, seed=9)), END],
                                                   read_s=30))  # fmt: skip
            canaries = [asyncio.create_task(paced(w)) for w in wavs]
            await asyncio.sleep(2.0)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*canaries), await squat, await bulk

        results, squat, bulk = asyncio.run(main())
        for (msgs, close_code), wav in zip(results, wavs):
            ends = [m for m in msgs if m["type"] == "end"]
            assert ends, (close_code, [m for m in msgs if m["type"] == "error"])
            assert all(m["code"] in CODES for m in msgs if m["type"] == "error")
            heard = pcm16(wav)[: round(ends[0]["audio_s"] * SR)]
            assert [m["unit"] for m in msgs if m["type"] == "unit"] == offline_units(heard)
            assert close_code in (P.CLOSE_NORMAL, P.CLOSE_GOING_AWAY)
        for out in (squat, bulk):
            check_generic(out)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
