"""The session core (server/session.py) without a socket, a thread or a clock: every limit is one rule with its own
test here, fed events with explicit times; plus the resynthesis options value, the config's validation and the
Origin rule."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput
from dpslm_stream.server import actions as A
from dpslm_stream.server.backends import EncoderSessionInfo, Progress
from dpslm_stream.server.config import ServerConfig
from dpslm_stream.server.session import ServerInfo, Session, State
from dpslm_stream.stream.events import EndEvent, UnitEvent
from dpslm_stream.stream.resynth_events import ResynthEndEvent
from dpslm_stream.stream.resynth_options import ResynthOptionError, ResynthOptions

ROOT = Path(__file__).resolve().parent.parent
E = P.ErrorCode
SR = 16000
SERVER = ServerInfo("tiny", True, ((500, 4500), (100, 600)), (500, 4500), True)
CACHED = EncoderSessionInfo(500, 4500, "cached", 125, 10, 5, 1500)
FULL = EncoderSessionInfo(500, 4500, "full", 125, 10, 5, None)


def session(**config) -> Session:
    """A session at time 0 (stats only where a test asks for them; resume, with its acks, only where a test asks for
    it: tests/test_resume_core.py)."""
    return Session("s1", ServerConfig(**{"stats_interval_s": 1000.0, "resume_grace_s": 0, **config}), SERVER, now=0.0)


def sent(actions) -> list:
    """The messages of the Send actions (text parsed; binary frames as bytes)."""
    return [P.parse_server_message(a.data) if isinstance(a.data, str) else a.data for a in actions
            if isinstance(a, A.Send)]  # fmt: skip


def errors(actions) -> list[P.Error]:
    return [m for m in sent(actions) if isinstance(m, P.Error)]


def codes(actions) -> list[str]:
    return [e.code for e in errors(actions)]


def kinds(actions) -> list[type]:
    return [type(a) for a in actions]


def start(s: Session, now: float = 0.0, info: EncoderSessionInfo = CACHED, rstream=None, **fields) -> list:
    """start, then the backends open at ``now``; returns the actions of opened (ready)."""
    out = s.receive_text(json.dumps({"type": "start", "sample_rate": SR, **fields}), now)
    assert kinds(out) == [A.OpenSession], sent(out)
    return s.opened(info, rstream, now)


def pcm(seconds: float) -> bytes:
    return P.encode_audio(np.zeros(int(seconds * SR), np.float32), "pcm16")


def unit(seq: int, end_frame: int) -> UnitEvent:
    return UnitEvent(seq=seq, unit=seq % 7, start_frame=end_frame - 5, end_frame=end_frame, start_s=(end_frame - 5) / 50,
                     end_s=end_frame / 50, commit_audio_s=end_frame / 50)  # fmt: skip


def end_event(frames: int, units: int = 1) -> EndEvent:
    return EndEvent(units=units, seconds=frames / 50, frames=frames, bitrate=0.0)


class FakeStream:
    """A ResynthStream as the core sees it."""

    def __init__(self, lag_s: float = 0.0):
        self.lag_s = lag_s

    def settings(self) -> dict:
        return dataclasses.asdict(ResynthOptions())

    def push_units(self, units, end_s=None) -> None: ...

    def end(self) -> None: ...


# --- time rules ----------------------------------------------------------------------------------------------------


def test_start_deadline_closes_a_connection_that_keeps_sending_but_never_starts():
    s = session(start_timeout_s=1.0, idle_timeout_s=30.0)
    for t in (0.3, 0.6, 0.9):  # something every 0.3 s: never idle
        assert codes(s.receive_text('{"type":"end"}', t)) == [E.NOT_STARTED.value]
        assert s.tick(t) == []
    assert s.next_deadline() == pytest.approx(1.0)
    out = s.tick(1.0)
    assert codes(out) == [E.START_TIMEOUT.value] and errors(out)[0].fatal
    assert out[-1] == A.Close(P.CLOSE_POLICY, E.START_TIMEOUT.value) and s.state == State.CLOSED
    assert s.receive_text('{"type":"end"}', 1.1) == []  # closed: nothing more


def test_start_deadline_excludes_the_time_the_backends_take_to_open():
    s = session(start_timeout_s=1.0)
    s.receive_text(json.dumps({"type": "start", "sample_rate": SR}), 0.5)
    assert not s.reading and s.tick(3.0) == []  # opening: the client is not being read
    out = s.open_failed(E.BAD_SETTINGS, "refused", 5.0)  # the models took 4.5 s to load, then refused
    assert codes(out) == [E.BAD_SETTINGS.value] and s.state == State.CONNECTED and s.reading
    assert s.next_deadline() == pytest.approx(5.5)  # 1 s of the client's own time, 4.5 s excluded
    assert s.tick(5.4) == [] and codes(s.tick(5.5)) == [E.START_TIMEOUT.value]


def test_idle_counts_only_time_the_client_could_send():
    s = session(idle_timeout_s=10.0, stall_timeout_s=60.0, max_buffer_s=1.0)
    s.receive_text(json.dumps({"type": "start", "sample_rate": SR}), 0.0)
    ready = s.opened(CACHED, None, 25.0)  # a 25 s model load is not the client's silence
    assert isinstance(sent(ready)[0], P.Ready) and s.tick(30.0) == []
    assert kinds(s.receive_binary(pcm(1.0), 31.0)) == [A.FeedAudio]
    assert s.receive_binary(pcm(0.5), 32.0) == [] and not s.reading  # buffer full: the frame is held
    assert s.tick(41.0) == []  # 9 s waiting for room: not idle either
    out = s.consumed(0, 50.0)  # room again after 18 s
    assert kinds(out) == [A.FeedAudio] and s.reading
    assert s.tick(59.9) == []
    out = s.tick(60.0)  # 10 s after reading resumed
    assert codes(out) == [E.IDLE_TIMEOUT.value] and A.RequestEnd() in out


def test_session_time_limit_ends_with_the_units_so_far():
    s = session(max_session_s=5.0)
    start(s, 0.0)
    s.receive_binary(pcm(0.5), 1.0)
    s.encoder_events([unit(0, 10)], Progress(), 2.0)
    out = s.tick(5.0)
    assert codes(out) == [E.SESSION_TIME_LIMIT.value] and A.RequestEnd() in out and s.state == State.ENDING
    out = s.encoder_events([end_event(25)], Progress(finished=True), 5.5)
    end = sent(out)[-1]
    assert isinstance(end, P.EndMessage) and end.reason == E.SESSION_TIME_LIMIT.value and end.units == 1
    assert out[-1] == A.Close(P.CLOSE_POLICY, E.SESSION_TIME_LIMIT.value)


def test_stall_gives_buffer_full_and_zero_stall_refuses_at_once():
    s = session(max_buffer_s=1.0, stall_timeout_s=2.0, idle_timeout_s=100.0)
    start(s)
    s.receive_binary(pcm(1.0), 0.1)
    assert s.receive_binary(pcm(0.5), 1.0) == []
    assert s.next_deadline() == pytest.approx(3.0) and s.tick(2.9) == []
    out = s.tick(3.0)
    assert codes(out) == [E.BUFFER_FULL.value] and A.RequestEnd() in out and s.reading
    s = session(max_buffer_s=1.0, stall_timeout_s=0.0)
    start(s)
    s.receive_binary(pcm(1.0), 0.1)
    assert codes(s.receive_binary(pcm(0.5), 0.2)) == [E.BUFFER_FULL.value]


# --- size rules ----------------------------------------------------------------------------------------------------


def test_buffer_seconds_rule():
    s = session(max_buffer_s=1.0)
    start(s)
    assert kinds(s.receive_binary(pcm(0.5), 0.1)) == [A.FeedAudio]
    assert kinds(s.receive_binary(pcm(0.5), 0.2)) == [A.FeedAudio]
    assert s.receive_binary(pcm(0.1), 0.3) == [] and not s.reading
    assert s.consumed(SR - 1000, 0.4) == [] and not s.reading  # not enough room yet
    assert kinds(s.consumed(SR // 2, 0.5)) == [A.FeedAudio] and s.reading
    assert s.received_samples == int(1.1 * SR)


def test_buffer_bytes_rule():
    s = session(max_buffer_s=100.0, max_buffer_bytes=4 * SR, max_message_bytes=SR)
    start(s)
    assert kinds(s.receive_binary(pcm(0.5), 0.1)) == [A.FeedAudio]
    assert kinds(s.receive_binary(pcm(0.5), 0.2)) == [A.FeedAudio]  # 16000 float32 samples = 64000 bytes
    assert s.receive_binary(pcm(0.01), 0.3) == [] and not s.reading


def test_an_empty_buffer_takes_any_frame_within_the_message_size():
    s = session(max_buffer_s=0.1)
    start(s)
    assert kinds(s.receive_binary(pcm(0.5), 0.1)) == [A.FeedAudio]


def test_hops_waiting_inside_the_encoder_count_as_buffered():
    """A tiny hop makes the encoder take audio faster than it encodes it: what waits inside it beyond its window's
    own delay is buffered audio too, so back-pressure still holds."""
    s = session(max_buffer_s=1.0)
    start(s)
    s.receive_binary(pcm(0.5), 0.1)
    s.consumed(0, 0.2)  # the encoder took everything...
    s.encoder_events([], Progress(processed_samples=3 * SR, encoded_seconds=0.5), 0.3)  # ...but encoded 0.5 s of 3
    assert s.receive_binary(pcm(0.1), 0.4) == [] and not s.reading
    assert kinds(s.encoder_events([], Progress(processed_samples=3 * SR, encoded_seconds=2.9), 0.5)) == [A.FeedAudio]


def test_outgoing_bytes_rule_drops_a_client_that_does_not_read():
    s = session(max_outgoing_bytes=3000)
    ready = start(s)
    s.sent(sum(a.nbytes for a in ready if isinstance(a, A.Send)))  # the ready message was written
    s.receive_binary(pcm(0.5), 0.1)
    out = []
    for i in range(40):  # ~140 bytes per unit, none written
        out += s.encoder_events([unit(i, 5 * (i + 1))], Progress(), 0.2)
        if s.state == State.CLOSED:
            break
    assert out[-1] == A.Abort(P.CLOSE_POLICY, "client_too_slow: messages not read") and A.CancelSlot() in out
    assert s.encoder_events([unit(40, 205)], Progress(), 0.3) == []  # dropped: nothing more
    assert 2000 < sum(a.nbytes for a in out if isinstance(a, A.Send)) <= 3000 and s.outcome == E.CLIENT_TOO_SLOW.value
    s = session(max_outgoing_bytes=3000)  # the same, read as it comes: never dropped
    s.sent(sum(a.nbytes for a in start(s) if isinstance(a, A.Send)))
    for i in range(50):
        out = s.encoder_events([unit(i, 5 * (i + 1))], Progress(), 0.2)
        s.sent(sum(a.nbytes for a in out if isinstance(a, A.Send)))
    assert s.state == State.STREAMING


def test_message_size_rules():
    s = session(max_message_bytes=1000, max_text_bytes=200)
    start(s)
    assert codes(s.receive_binary(b"\0" * 1002, 0.1)) == [E.MESSAGE_TOO_LARGE.value]
    assert codes(s.receive_text(json.dumps({"type": "end", "pad": "x" * 300}), 0.2)) == [E.MESSAGE_TOO_LARGE.value]
    assert s.state == State.STREAMING and s.received_samples == 0


@pytest.mark.parametrize("options, field", [({"left": 501}, "left"), ({"hop": 4}, "hop"), ({"hop": 101}, "hop"),
                                            ({"lookahead": 101}, "lookahead"), ({"max_lag": 3001}, "max_lag"),
                                            ({"max_lag": 0}, "max_lag")])  # fmt: skip
def test_window_sizes_and_max_lag_are_capped(options, field):
    s = session()
    out = s.receive_text(json.dumps({"type": "start", "sample_rate": SR, "options": options}), 0.0)
    assert codes(out) == [E.BAD_SETTINGS.value] and f"options.{field}" in errors(out)[0].message
    assert s.state == State.CONNECTED
    fine = {"left": 500, "hop": 5, "lookahead": 100, "max_lag": 3000}[field]
    assert kinds(s.receive_text(json.dumps({"type": "start", "sample_rate": SR, "options": {field: fine}}), 0.1)) == \
        [A.OpenSession]  # fmt: skip


def test_caps_follow_the_config():
    s = session(max_left=50)
    out = s.receive_text(json.dumps({"type": "start", "sample_rate": SR}), 0.0)  # the preset's left (125) > 50
    assert codes(out) == [E.BAD_SETTINGS.value] and "--max-left" in errors(out)[0].message


@pytest.mark.parametrize("rate", [8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000])
def test_every_common_sample_rate_passes_the_resampler_rule(rate):
    assert kinds(session().receive_text(json.dumps({"type": "start", "sample_rate": rate}), 0.0)) == [A.OpenSession]


def test_a_sample_rate_whose_resampler_is_too_costly_is_refused():
    from dpslm_stream.audio import StreamingResampler, resampler_kernel_size

    for rate in (8000, 11025, 44100, 16001):  # the size the rule checks is the kernel the resampler builds
        expected = 0 if rate == 16000 else StreamingResampler(rate)._kernel.numel()
        assert resampler_kernel_size(rate) == expected
    assert resampler_kernel_size(47999) > 700_000_000
    s = session()
    out = s.receive_text(json.dumps({"type": "start", "sample_rate": 47999}), 0.0)
    assert codes(out) == [E.BAD_SAMPLE_RATE.value] and "--max-resampler-taps" in errors(out)[0].message
    assert A.OpenSession not in kinds(out) and s.state == State.CONNECTED  # nothing built; the client may start again
    assert kinds(s.receive_text(json.dumps({"type": "start", "sample_rate": 48000}), 0.1)) == [A.OpenSession]
    s = session(max_resampler_taps=50_000)  # the bound follows the config: 44.1 kHz (76k taps) refused
    assert codes(s.receive_text(json.dumps({"type": "start", "sample_rate": 44100}), 0.0)) == [E.BAD_SAMPLE_RATE.value]


def test_full_mode_audio_is_capped():
    s = session(max_full_s=1.0)
    start(s, info=FULL, options={"mode": "full"})
    assert kinds(s.receive_binary(pcm(0.6), 0.1)) == [A.FeedAudio]
    assert kinds(s.receive_binary(pcm(0.4), 0.2)) == [A.FeedAudio]
    out = s.receive_binary(pcm(0.1), 0.3)
    assert codes(out) == [E.SESSION_TIME_LIMIT.value] and "full" in errors(out)[0].message and A.RequestEnd() in out


# --- hostile input: coded errors, never an exception ------------------------------------------------------------------


@pytest.mark.parametrize("text, code", [
    ("[" * 100_000, E.MESSAGE_TOO_LARGE),
    ("[" * 1000 + "]" * 1000, E.BAD_JSON),
    ('{"type": "start", "sample_rate": 16000, "options": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {}}}}}}}}}', E.BAD_JSON),
    ('{"type": "start", "sample_rate": 16000, "preset": "\\ud800"}', E.BAD_MESSAGE),
    ('{"type": "subscribe", "session": "x", "token": "\\udfff"}', E.BAD_MESSAGE),
    ('{"\\ud800": 1}', E.BAD_MESSAGE),
])  # fmt: skip
def test_hostile_text_gets_a_coded_error(text, code):
    s = session()
    assert codes(s.receive_text(text, 0.0)) == [code.value] and s.state == State.CONNECTED


def test_float32_samples_outside_the_range_are_clipped_and_non_finite_refused():
    s = session()
    start(s, format="float32")
    out = s.receive_binary(np.array([0.5, 3e38, -7.0, -1.0], "<f4").tobytes(), 0.1)
    assert kinds(out) == [A.FeedAudio] and out[0].samples.tolist() == [0.5, 1.0, -1.0, -1.0]
    assert codes(s.receive_binary(np.array([0.0, np.inf], "<f4").tobytes(), 0.2)) == [E.NON_FINITE.value]


def test_a_failure_ends_with_internal_error_and_an_end_carrying_the_units():
    s = session()
    start(s)
    s.receive_binary(pcm(0.5), 0.1)
    s.encoder_events([unit(0, 5), unit(1, 12)], Progress(), 0.2)
    out = s.failed(RuntimeError("boom"), 0.3)
    msgs = sent(out)
    assert [m.code for m in msgs if isinstance(m, P.Error)] == [E.INTERNAL_ERROR.value] and msgs[0].fatal
    assert isinstance(msgs[-1], P.EndMessage) and msgs[-1].reason == E.INTERNAL_ERROR.value and msgs[-1].units == 2
    assert A.CancelSlot() in out and A.ListenersDone(gone=True) in out and out[-1] == A.Close(P.CLOSE_INTERNAL, "internal_error")
    assert s.failed(RuntimeError("again"), 0.4) == []  # once


def test_resynth_behind_stops_the_audio_and_the_units_go_on():
    s = session(max_resynth_lag_s=5.0, stats_interval_s=1.0)  # the lag is checked with the stats
    stream = FakeStream(lag_s=1.0)
    start(s, rstream=stream, resynth={})
    s.receive_binary(pcm(0.5), 0.1)
    assert A.PushUnits((0,), (0.1,)) in s.encoder_events([unit(0, 5)], Progress(), 0.2)
    assert codes(s.tick(1.0)) == []
    stream.lag_s = 6.0
    out = s.tick(2.0)
    assert A.CloseResynth() in out and codes(out) == [E.RESYNTH_BEHIND.value] and not errors(out)[0].fatal
    assert A.PushUnits((1,), (0.2,)) not in s.encoder_events([unit(1, 10)], Progress(), 2.1)  # units only now
    s.receive_text('{"type":"end"}', 2.2)
    end = sent(s.encoder_events([end_event(10, 2)], Progress(finished=True), 2.3))[-1]
    assert end.reason == "end" and end.units == 2 and "behind" in end.resynth["error"]


class RecordingStream(FakeStream):
    """A FakeStream that records the units pushed and whether it was ended."""

    def __init__(self):
        super().__init__()
        self.ended = False

    def end(self) -> None:
        self.ended = True


def test_exact_resynthesis_is_ended_after_max_exact_resynth_s_and_the_units_go_on():
    s = session(max_exact_resynth_s=2.0)
    start(s, rstream=FakeStream(), resynth={"left_context": None, "holdback": None})
    s.receive_binary(pcm(0.5), 0.1)
    first = s.encoder_events([unit(0, 10), unit(1, 60), unit(2, 110)], Progress(), 0.2)  # ends 0.2 s, 1.2 s, 2.2 s
    assert [a for a in first if isinstance(a, A.PushUnits)] == [A.PushUnits((0,), (0.2,)), A.PushUnits((1,), (1.2,)),
                                                                A.PushUnits((2,), (2.2,))] and codes(first) == []  # fmt: skip
    out = s.encoder_events([unit(3, 111)], Progress(), 0.3)  # 2.22 s: more than 2 s after the first unit's end
    assert A.EndResynth() in out and not any(isinstance(a, (A.PushUnits, A.CloseResynth)) for a in out)
    assert codes(out) == [E.RESYNTH_LIMIT.value] and not errors(out)[0].fatal and "--max-exact-resynth" in errors(out)[0].message
    assert [m.unit for m in sent(out) if isinstance(m, P.Unit)] == [3]  # the unit itself goes on
    out = s.encoder_events([unit(4, 120)], Progress(), 0.4)
    assert [m.unit for m in sent(out) if isinstance(m, P.Unit)] == [4] and kinds(out) == [A.Send, A.Relay]
    s.receive_text('{"type":"end"}', 0.5)
    out = s.encoder_events([end_event(120, 5)], Progress(finished=True), 0.6)
    assert A.EndResynth() not in out and not any(isinstance(m, P.EndMessage) for m in sent(out))  # its audio first
    rend = ResynthEndEvent(units=3, codec_frames=90, audio_seconds=2.2, chunks=3, passes=1, first_audio_latency_s=0.1,
                           latency_mean_s=0.1, latency_max_s=0.2, real_time_factor=0.5)  # fmt: skip
    end = sent(s.resynth_events([rend], None, 0.7))[-1]
    assert end.reason == "end" and end.units == 5 and "--max-exact-resynth" in end.resynth["error"]
    # Bounded context (the default options) is not limited by this rule.
    s = session(max_exact_resynth_s=2.0)
    start(s, rstream=FakeStream(), resynth={})
    out = s.encoder_events([unit(0, 10), unit(1, 500)], Progress(), 0.2)
    assert A.PushUnits((1,), (10.0,)) in out and codes(out) == []


def test_exact_resynthesis_is_refused_at_start_when_disabled():
    s = session(max_exact_resynth_s=0.0)
    for given in ({"left_context": None}, {"vocoder_left_context": None}):
        out = s.receive_text(json.dumps({"type": "start", "sample_rate": SR, "resynth": given}), 0.0)
        assert codes(out) == [E.UNSUPPORTED_OPTION.value] and not errors(out)[0].fatal and s.state == State.CONNECTED
        out = s.receive_text(json.dumps({"type": "subscribe", "session": "abc", "token": "t", "resynth": given}), 0.1)
        assert codes(out) == [E.UNSUPPORTED_OPTION.value] and s.state == State.CONNECTED
    assert kinds(s.receive_text(json.dumps({"type": "start", "sample_rate": SR, "resynth": {"left_context": 8}}),
                                0.2)) == [A.OpenSession]  # fmt: skip


def test_open_deadline_ends_a_session_whose_backends_never_open():
    s = session(open_timeout_s=5.0, start_timeout_s=1.0, idle_timeout_s=2.0)
    out = s.receive_text(json.dumps({"type": "start", "sample_rate": SR, "resynth": {}}), 0.5)
    assert kinds(out) == [A.OpenSession] and not s.reading
    assert s.next_deadline() == pytest.approx(5.5) and s.tick(5.4) == []  # neither start nor idle deadline meanwhile
    out = s.tick(5.5)
    msgs = sent(out)
    assert codes(out) == [E.INTERNAL_ERROR.value] and msgs[0].fatal and "--open-timeout" in msgs[0].message
    assert isinstance(msgs[-1], P.EndMessage) and msgs[-1].reason == E.INTERNAL_ERROR.value and msgs[-1].units == 0
    assert out[-1] == A.Close(P.CLOSE_INTERNAL, "internal_error") and s.finished and s.next_deadline() == math.inf
    assert s.opened(CACHED, FakeStream(), 60.0) == [A.CancelSlot(), A.CloseResynth()]  # released when they come
    s = session(open_timeout_s=5.0)  # a listener's open too
    s.receive_text(json.dumps({"type": "subscribe", "session": "abc", "token": "t", "resynth": {}}), 0.0)
    out = s.tick(5.0)
    assert codes(out) == [E.INTERNAL_ERROR.value] and isinstance(sent(out)[-1], P.EndMessage)
    assert s.subscribed("abc", 500, 4500, FakeStream(), 9.0) == [A.Unsubscribe(), A.CloseResynth()]
    s = session(open_timeout_s=5.0)  # an open in time is not affected
    start(s, now=4.9)
    assert s.tick(5.0) == [] and s.state == State.STREAMING


def test_connection_lost_releases_every_backend_at_once():
    s = session()
    start(s, rstream=FakeStream(), resynth={})
    out = s.connection_lost(0.5)
    assert {type(a) for a in out} == {A.CancelSlot, A.ListenersDone, A.CloseResynth} and A.ListenersDone(gone=True) in out
    assert s.state == State.GONE and not s.reading and s.outcome == "disconnected"
    s = session()  # lost while the backends open: they are released when they come
    s.receive_text(json.dumps({"type": "start", "sample_rate": SR}), 0.0)
    s.connection_lost(0.1)
    assert s.opened(CACHED, FakeStream(), 0.2) == [A.CancelSlot(), A.CloseResynth()]


def test_a_listener_under_its_senders_disconnect_and_its_own_leaving():
    s = session()
    out = s.receive_text(json.dumps({"type": "subscribe", "session": "abc", "token": "t"}), 0.0)
    assert kinds(out) == [A.Subscribe] and out[0].resynth == ResynthOptions()
    ready = sent(s.subscribed("abc", 500, 4500, FakeStream(), 0.1))[0]
    assert ready.role == "listener" and ready.settings["resynth"] == dataclasses.asdict(ResynthOptions())
    msg = P.Unit(seq=3, unit=1, start_frame=0, end_frame=5, start_s=0.0, end_s=0.1, commit_audio_s=0.2, lag_s=0.1)
    out = s.relay_unit(msg, 0.2)
    assert sent(out) == [msg] and A.PushUnits((1,), (0.1,)) in out
    assert codes(s.receive_binary(pcm(0.1), 0.3)) == [E.NOT_A_SENDER.value]
    out = s.sender_done(True, 0.4)  # the sender vanished
    assert codes(out) == [E.SENDER_GONE.value] and A.EndResynth() in out and s.state == State.ENDING
    out = s.resynth_events([_resynth_end()], None, 0.5)
    end = sent(out)[-1]
    assert end.reason == E.SENDER_GONE.value and end.units == 1 and out[-1].code == P.CLOSE_GOING_AWAY
    s = session()  # a listener that leaves
    s.receive_text(json.dumps({"type": "subscribe", "session": "abc", "token": "t", "resynth": None}), 0.0)
    s.subscribed("abc", 500, 4500, None, 0.1)
    out = s.receive_text('{"type":"end"}', 0.2)
    assert out[0] == A.Unsubscribe() and sent(out)[-1].reason == "end"


def _resynth_end():
    from dpslm_stream.stream.resynth_events import ResynthEndEvent

    return ResynthEndEvent(units=1, codec_frames=8, audio_seconds=0.2, chunks=1, passes=1, first_audio_latency_s=0.1,
                           latency_mean_s=0.1, latency_max_s=0.1, real_time_factor=0.5, error=None)  # fmt: skip


def test_subscribe_refusals_are_fatal_and_resynthesis_refusals_are_not():
    s = session()
    s.receive_text(json.dumps({"type": "subscribe", "session": "abc", "token": "t"}), 0.0)
    out = s.subscribe_failed(E.UNKNOWN_SESSION, "no such session", 0.1)
    assert codes(out) == [E.UNKNOWN_SESSION.value] and out[-1] == A.Close(P.CLOSE_POLICY, E.UNKNOWN_SESSION.value)
    s = session()
    s.receive_text(json.dumps({"type": "subscribe", "session": "abc", "token": "t"}), 0.0)
    out = s.subscribe_failed(E.BAD_SETTINGS, "resynthesis: no", 0.1)
    assert codes(out) == [E.BAD_SETTINGS.value] and s.state == State.CONNECTED and s.reading


def test_shutdown_finishes_a_session_and_closes_one_before_ready():
    s = session()
    start(s)
    out = s.shutdown(1.0)
    assert codes(out) == [E.SHUTTING_DOWN.value] and A.RequestEnd() in out
    s = session()
    out = s.shutdown(1.0)
    assert out[-1] == A.Close(P.CLOSE_GOING_AWAY, E.SHUTTING_DOWN.value)


def test_ready_reports_limits_and_resolved_settings():
    s = session()
    ready = sent(start(s, options={"hop": 20}))[0]
    assert ready.settings["hop"] == 10  # what the encoder reported (CACHED), not what was asked
    assert ready.limits == ServerConfig(resume_grace_s=0).limits() and ready.listen_token


# --- resynthesis options -----------------------------------------------------------------------------------------------


def test_resynth_options_defaults_equal_the_workers():
    from dpslm_stream.stream.resynth_worker import ResynthWorker

    params = inspect.signature(ResynthWorker.open_session).parameters
    for f in dataclasses.fields(ResynthOptions):
        assert params[f.name].default == f.default, f.name


@pytest.mark.parametrize("given, field", [({"holdback": -1}, "holdback"), ({"top_p": 2.0}, "top_p"),
                                          ({"temperature": float("nan")}, "temperature"), ({"seed": 2**70}, "seed"),
                                          ({"holdback": 40}, "holdback"), ({"trigger_units": 0}, "trigger_units"),
                                          ({"greedy": 1}, "greedy"), ({"nope": 1}, "nope")])  # fmt: skip
def test_bad_resynth_options_name_their_field(given, field):
    with pytest.raises(ResynthOptionError) as info:
        ResynthOptions.from_json(given)
    assert info.value.field == field and field in str(info.value)
    s = session()
    out = s.receive_text(json.dumps({"type": "start", "sample_rate": SR, "resynth": given}), 0.0)
    assert codes(out) and errors(out)[0].code in (E.BAD_SETTINGS.value, E.BAD_MESSAGE.value)
    assert field in errors(out)[0].message


def test_protocol_docs_list_exactly_the_resynth_options():
    doc = (ROOT / "docs" / "protocol.md").read_text()
    table = doc.split("`resynth` options")[1].split("\n\n")[1]
    documented = re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", table, re.M)
    names = {n for row in documented for n in row if n}
    assert names == {f.name for f in dataclasses.fields(ResynthOptions)}
    assert set(P.RESYNTH_OPTIONS) == names


def test_resynth_settings_report_every_option():
    from dpslm_stream.hub import ModelSet
    from dpslm_stream.stream.resynth_worker import ResynthWorker

    opts = ResynthOptions(holdback=2, seed=5, greedy=False, trigger_s=0.5)
    settings = ResynthWorker(ModelSet("tiny")).open_session(500, 4500, **opts.kwargs()).settings()
    assert {k: settings[k] for k in opts.kwargs()} == opts.kwargs()


# --- config and Origin -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, flag", [("min_hop", 0, "--min-hop"), ("max_outgoing_bytes", 0, "--max-outgoing-bytes"),
                                                ("start_timeout_s", 0.0, "--start-timeout"), ("max_left", -1, "--max-left"),
                                                ("stall_timeout_s", -1.0, "--stall-timeout"), ("max_hop", 2, "--min-hop"),
                                                ("max_message_bytes", 10 << 20, "--max-message-bytes"),
                                                ("open_timeout_s", 0.0, "--open-timeout"),
                                                ("max_exact_resynth_s", -1.0, "--max-exact-resynth"),
                                                ("max_exact_resynth_s", float("inf"), "--max-exact-resynth")])  # fmt: skip
def test_config_is_validated_naming_the_flag(field, value, flag):
    with pytest.raises(InvalidInput) as info:
        ServerConfig(**{field: value})
    assert flag in str(info.value)


def test_every_limit_has_a_serve_flag_and_is_documented():
    from dpslm_stream.server.cli import add_parser, config_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--max-left", "60", "--min-hop", "3", "--max-outgoing-bytes", "5000",
                              "--start-timeout", "2", "--max-text-bytes", "999", "--max-lag", "10",
                              "--open-timeout", "7", "--max-exact-resynth", "0",
                              "--max-resampler-taps", "1000"])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.max_left, cfg.min_hop, cfg.max_outgoing_bytes, cfg.start_timeout_s, cfg.max_text_bytes, cfg.max_lag) == \
        (60, 3, 5000, 2.0, 999, 10)  # fmt: skip
    assert (cfg.open_timeout_s, cfg.max_exact_resynth_s, cfg.max_resampler_taps) == (7.0, 0.0, 1000)
    readme = (ROOT / "README.md").read_text()
    for flag in ("--max-left", "--min-hop", "--max-hop", "--max-lookahead", "--max-lag", "--max-full-audio",
                 "--max-message-bytes", "--max-text-bytes", "--max-outgoing-bytes", "--max-buffer-bytes",
                 "--start-timeout", "--allow-origin", "--open-timeout", "--max-exact-resynth",
                 "--max-resampler-taps"):  # fmt: skip
        assert flag in readme, flag


def _serve_parser():
    import argparse

    from dpslm_stream.server.cli import add_parser

    parser = argparse.ArgumentParser()
    return parser, add_parser(parser.add_subparsers(dest="command"))


def _serve_args(*argv: str):
    return _serve_parser()[0].parse_args(["serve", *argv])


def test_every_config_field_has_a_serve_flag_named_after_it_and_the_old_flags_still_parse():
    from dpslm_stream.server.cli import ALIASES, config_from_args
    from dpslm_stream.server.config import CONFIG_FIELDS

    parser_flags = {option: action.dest for action in _serve_parser()[1]._actions for option in action.option_strings}
    for name in CONFIG_FIELDS:
        assert parser_flags.get("--" + name.replace("_", "-")) == name, name
        for alias in ALIASES.get(name, ()):
            assert parser_flags[alias] == name, alias
    assert config_from_args(_serve_args()) == ServerConfig()  # the flags' defaults are the config's
    old = config_from_args(_serve_args("--max-buffer", "2", "--start-timeout", "3", "--idle-timeout", "4",
                                       "--max-session-time", "5", "--max-full-audio", "6", "--stall-timeout", "7",
                                       "--drain-timeout", "8", "--max-resynth-lag", "9", "--open-timeout", "10",
                                       "--max-exact-resynth", "11", "--allow-origin", "https://a.example",
                                       "--no-warmup", "--no-resynth", "--allow-tf32"))  # fmt: skip
    new = config_from_args(_serve_args("--max-buffer-s", "2", "--start-timeout-s", "3", "--idle-timeout-s", "4",
                                       "--max-session-s", "5", "--max-full-s", "6", "--stall-timeout-s", "7",
                                       "--drain-timeout-s", "8", "--max-resynth-lag-s", "9", "--open-timeout-s", "10",
                                       "--max-exact-resynth-s", "11", "--allowed-origins", "https://a.example",
                                       "--no-warmup", "--no-resynth", "--allow-tf32"))  # fmt: skip
    assert old == new == ServerConfig(max_buffer_s=2, start_timeout_s=3, idle_timeout_s=4, max_session_s=5,
                                      max_full_s=6, stall_timeout_s=7, drain_timeout_s=8, max_resynth_lag_s=9,
                                      open_timeout_s=10, max_exact_resynth_s=11, allowed_origins=("https://a.example",),
                                      warmup=False, resynth=False, allow_tf32=True)  # fmt: skip
    assert config_from_args(_serve_args("--quantum-s", "0.25", "--stats-interval-s", "2")).quantum_s == 0.25


@pytest.mark.parametrize("field, value", [("presets", ("nope",)), ("dtype", "float64"), ("resynth_dtype", "int8"),
                                          ("precision", "turbo"), ("port", 70000), ("port", -1), ("warmup", 1),
                                          ("max_sessions", True), ("quantum_s", True), ("idle_timeout_s", float("nan")),
                                          ("pairs", ((500, "4500"),)), ("max_left", 1.5)])  # fmt: skip
def test_config_is_validated_where_it_is_defined(field, value):
    """What the CLI's parser used to check alone (choices, presets) is checked by ServerConfig itself, so ServerThread
    and the Ray gateway and replicas, which are given a ServerConfig, refuse the same values."""
    with pytest.raises(InvalidInput):
        ServerConfig(**{field: value})


def _origin_ok(origin: str | None, host: str, token: str | None = None, allowed: tuple = ()) -> bool:
    from dpslm_stream.server.app import Server

    headers = {"Host": host} | ({"Origin": origin} if origin else {})
    fake = SimpleNamespace(config=ServerConfig(token=token, allowed_origins=allowed))
    return Server._origin_ok(fake, SimpleNamespace(headers=headers))  # type: ignore[arg-type]


def test_origin_rule_closes_dns_rebinding():
    assert _origin_ok(None, "evil.example:8765")  # not a browser
    assert _origin_ok("http://127.0.0.1:8765", "127.0.0.1:8765") and _origin_ok("http://localhost:80", "localhost:80")
    assert _origin_ok("http://[::1]:8765", "[::1]:8765")
    assert not _origin_ok("http://evil.example:8765", "evil.example:8765")  # a rebinding page: its own name as Host
    assert not _origin_ok("http://10.0.0.5:8765", "10.0.0.5:8765")  # a public name needs the allowlist or a token
    assert _origin_ok("http://10.0.0.5:8765", "10.0.0.5:8765", allowed=("http://10.0.0.5:8765",))
    assert _origin_ok("https://app.example", "app.example", token="t")  # with a token the page's origin is fine
    assert not _origin_ok("http://evil.example", "127.0.0.1:8765")
    assert _origin_ok("http://anything", "x", allowed=("*",))


# --- a protocol fuzzer: random event sequences, checked invariants --------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_resynth_fuzz = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "holdback": st.one_of(st.none(), st.integers(-3, 50)), "top_p": st.floats(-1, 2), "seed": st.integers(-1, 2**64),
    "temperature": st.one_of(st.floats(allow_nan=True), st.text(max_size=3)), "bogus": st.integers()}))  # fmt: skip
_texts = st.one_of(
    st.just('{"type":"end"}'),
    st.builds(lambda sr, fmt, opts, r: json.dumps({"type": "start", "sample_rate": sr, "format": fmt, "options": opts,
                                                    "resynth": r}),
              st.sampled_from([16000, 8000, 44100, 7999, "16000"]), st.sampled_from(["pcm16", "float32", "mp3"]),
              st.fixed_dictionaries({}, optional={"hop": st.integers(-5, 300), "left": st.integers(-5, 1000),
                                                  "mode": st.sampled_from(["full", "cached", "sliding", "x"]),
                                                  "max_lag": st.integers(-1, 5000)}), _resynth_fuzz),  # fmt: skip
    st.builds(lambda sess, tok, r: json.dumps({"type": "subscribe", "session": sess, "token": tok, "resynth": r}),
              st.text(max_size=4), st.text(max_size=4), _resynth_fuzz),  # fmt: skip
    st.text(max_size=40),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(0, 40)),
)
_events = st.lists(st.one_of(
    st.tuples(st.just("text"), _texts), st.tuples(st.just("binary"), st.binary(max_size=64)),
    st.tuples(st.just("tick"), st.floats(0, 40)), st.tuples(st.just("opened"), st.booleans()),
    st.tuples(st.just("open_failed"), st.none()), st.tuples(st.just("subscribed"), st.booleans()),
    st.tuples(st.just("subscribe_failed"), st.sampled_from([E.UNKNOWN_SESSION, E.BAD_SETTINGS])),
    st.tuples(st.just("units"), st.integers(1, 3)), st.tuples(st.just("end_event"), st.none()),
    st.tuples(st.just("consumed"), st.integers(0, 4000)), st.tuples(st.just("failed"), st.none()),
    st.tuples(st.just("resynth_end"), st.none()), st.tuples(st.just("relay"), st.none()),
    st.tuples(st.just("sender_done"), st.booleans()), st.tuples(st.just("lost"), st.none()),
    st.tuples(st.just("sent"), st.integers(0, 5000)), st.tuples(st.just("shutdown"), st.none()),
), max_size=40)  # fmt: skip
# Most cases start with a valid session, so the random events reach streaming, ending and listening states.
_START = json.dumps({"type": "start", "sample_rate": SR})
_prefixes = st.sampled_from([
    [], [("text", _START), ("opened", False)], [("text", json.dumps({"type": "start", "sample_rate": SR, "resynth": {}})),
    ("opened", False)], [("text", json.dumps({"type": "start", "sample_rate": SR, "format": "float32", "options":
    {"mode": "full"}})), ("opened", True)], [("text", '{"type":"subscribe","session":"a","token":"b"}'), ("subscribed", True)],
])  # fmt: skip
_cases = st.builds(lambda prefix, rest: prefix + rest, _prefixes, _events)


def run_fuzz_case(events: list, config: dict) -> None:
    s = session(**config)
    now, closed, ends, next_seq, encoder_done, frames = 0.0, False, 0, 0, False, 0
    for kind, arg in events:
        now += 0.01
        if kind == "text":
            out = s.receive_text(arg, now)
        elif kind == "binary":
            out = s.receive_binary(arg, now)
        elif kind == "tick":
            now += arg
            out = s.tick(now)
        elif kind == "opened" and s.state == State.OPENING and s.role == "sender":
            out = s.opened(FULL if (s.start and s.start.options.get("mode") == "full") else CACHED,
                           FakeStream(lag_s=100.0 if arg else 0.0) if s.start and s.start.resynth is not None else None, now)  # fmt: skip
        elif kind == "open_failed" and s.state == State.OPENING and s.role == "sender":
            out = s.open_failed(E.BAD_SETTINGS, "no", now)
        elif kind == "subscribed" and s.state == State.OPENING and s.role == "listener":
            out = s.subscribed("x", 500, 4500, FakeStream() if arg else None, now)
        elif kind == "subscribe_failed" and s.state == State.OPENING and s.role == "listener":
            out = s.subscribe_failed(arg, "no", now)
        elif kind == "units" and s.info is not None and not encoder_done:
            evs = []
            for _ in range(arg):
                frames += 3
                evs.append(unit(next_seq, frames))
                next_seq += 1
            out = s.encoder_events(evs, Progress(processed_samples=SR * frames // 50), now)
        elif kind == "end_event" and s.info is not None and not encoder_done and s.reason is not None:
            encoder_done = True
            out = s.encoder_events([end_event(frames, next_seq)], Progress(finished=True), now)
        elif kind == "consumed":
            out = s.consumed(arg, now)
        elif kind == "failed":
            out = s.failed(RuntimeError("fuzz"), now)
        elif kind == "resynth_end" and s.resynth is not None:
            out = s.resynth_events([_resynth_end()], None, now)
        elif kind == "relay":
            out = s.relay_unit(P.Unit(seq=0, unit=1, start_frame=0, end_frame=2, start_s=0.0, end_s=0.04,
                                      commit_audio_s=0.04, lag_s=0.0), now)  # fmt: skip
        elif kind == "sender_done":
            out = s.sender_done(arg, now)
        elif kind == "lost":
            out = s.connection_lost(now)
        elif kind == "sent":
            s.sent(arg)
            out = []
        elif kind == "shutdown":
            out = s.shutdown(now)
        else:
            continue
        for a in out:
            assert not (closed and isinstance(a, A.Send)), f"a frame after the close: {a}"
            if isinstance(a, (A.Close, A.Abort)):
                assert not closed, "closed twice"
                closed = True
            if isinstance(a, A.Send) and isinstance(a.data, str):
                msg = P.parse_server_message(a.data)  # every frame is a valid server message
                ends += isinstance(msg, P.EndMessage)
                if isinstance(msg, P.EndMessage):
                    assert msg.units == s.report.units
        assert ends <= 1
        assert s.reading or s.state in (State.OPENING, State.GONE) or s._held is not None
        assert s.outgoing_bytes >= 0 and s.next_deadline() > -1


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(events=_cases, small=st.booleans())
def test_fuzzed_event_sequences_keep_the_invariants(events, small):
    """No event sequence raises; nothing is sent after the close; at most one end, carrying every unit sent; the
    core reads whenever it is not opening, holding a frame, or gone."""
    config = {"max_outgoing_bytes": 1500, "max_buffer_s": 0.05, "stall_timeout_s": 0.5} if small else {}
    run_fuzz_case(events, config)
