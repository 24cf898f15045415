"""The session core (server/session.py, session_state.py, start.py, resume.py) pinned where a client would notice:
the exact coded error and message of every refusal, each rule at its exact edge, the fields of ready, stats and end,
the state after each event, and the bitstream path (start.transmit) without a socket.

Written from the mutants `make mutants MODULES=session` left alive (docs/mutation.md). No model runs here: the
encoder and resynthesis are faked by the events the core is fed.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from dpslm_stream import __version__
from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput
from dpslm_stream.opus import INSTALL_HINT as OPUS_INSTALL_HINT
from dpslm_stream.server import actions as A
from dpslm_stream.server.backends import EncoderSessionInfo, Progress
from dpslm_stream.server.config import ServerConfig
from dpslm_stream.server.metrics import Metrics
from dpslm_stream.server.resume import Parked, ReplayLog
from dpslm_stream.server.session import ServerInfo, Session, State
from dpslm_stream.server.start import Refusal, StartPlan, check_resynth, check_start, sender_settings
from dpslm_stream.stream.resynth_events import ResynthEndEvent
from dpslm_stream.stream.resynth_options import ResynthOptions

from test_resume_core import audio, resumable, resume_msg
from test_session_core import CACHED, FULL, SERVER, SR, FakeStream, codes, end_event, kinds, pcm, sent, session, start, unit

E = P.ErrorCode
NO_OPUS = dataclasses.replace(SERVER, opus=False)


def one_error(actions) -> P.Error:
    """The one error message among ``actions``."""
    found = [m for m in sent(actions) if isinstance(m, P.Error)]
    assert len(found) == 1, found
    return found[0]


def refused(actions, code: E, message: str, fatal: bool = False) -> None:
    err = one_error(actions)
    assert (err.code, err.message, err.fatal) == (code.value, message, fatal)


def text(s: Session, obj: dict | str, now: float = 0.0) -> list:
    return s.receive_text(obj if isinstance(obj, str) else json.dumps(obj), now)


def start_msg(**fields) -> P.Start:
    msg = P.parse_client_message(json.dumps({"type": "start", "sample_rate": SR, **fields}))
    assert isinstance(msg, P.Start)
    return msg


def listener(s: Session, rstream=None, now: float = 0.0, **fields) -> list:
    out = text(s, {"type": "subscribe", "session": "abc", "token": "t", "resynth": {} if rstream else None, **fields},
               now)  # fmt: skip
    assert kinds(out) == [A.Subscribe]
    return s.subscribed("abc", 500, 4500, rstream, now)


def resynth_end(error: str | None = None) -> ResynthEndEvent:
    return ResynthEndEvent(units=1, codec_frames=8, audio_seconds=0.2, chunks=1, passes=1, first_audio_latency_s=0.1,
                           latency_mean_s=0.1, latency_max_s=0.1, real_time_factor=0.5, error=error)  # fmt: skip


# --- start.py: the start and subscribe checks, message by message ----------------------------------------------------


def test_check_start_refusals_name_what_is_served():
    cfg = ServerConfig()
    assert check_start(cfg, SERVER, start_msg(k=500)) == Refusal(
        E.BAD_MESSAGE, "give both k and lmbda, or neither (the server's default pair)")
    assert check_start(cfg, SERVER, start_msg(lmbda=4500)).code == E.BAD_MESSAGE
    assert check_start(cfg, SERVER, start_msg(k=500, lmbda=600)) == Refusal(
        E.UNKNOWN_MODEL, "(k=500, lmbda=600) is not served here; served: (k=500, lmbda=4500), (k=100, lmbda=600)")
    assert check_start(ServerConfig(modes=("cached", "full")), SERVER, start_msg(options={"mode": "sliding"})) == \
        Refusal(E.BAD_SETTINGS, "mode 'sliding' / preset 'low-latency' is not offered here; modes: cached, full; "
                                "presets: any")  # fmt: skip
    presets = ServerConfig(presets=("low-latency",))
    assert check_start(presets, SERVER, start_msg(preset="balanced")) == Refusal(
        E.BAD_SETTINGS, "mode 'cached' / preset 'balanced' is not offered here; modes: full, sliding, cached; "
                        "presets: low-latency")  # fmt: skip
    assert isinstance(check_start(presets, SERVER, start_msg(preset="low-latency")), StartPlan)
    assert check_start(cfg, NO_OPUS, start_msg(format="opus")) == Refusal(
        E.UNSUPPORTED_OPTION, f"this server cannot decode Opus ({OPUS_INSTALL_HINT} on the server); send pcm16 or float32")
    assert check_start(cfg, SERVER, start_msg(sample_rate=47999)).code == E.BAD_SAMPLE_RATE


def test_check_start_with_the_default_pair_or_a_given_one_builds_the_encoder_settings():
    cfg = ServerConfig()
    plan = check_start(cfg, SERVER, start_msg(options={"mode": "sliding", "hop": 20}, score=True))
    assert plan == StartPlan({"k": 500, "lmbda": 4500, "mode": "sliding", "preset": "low-latency", "score": True,
                              "hop": 20}, None)  # fmt: skip
    plan = check_start(cfg, SERVER, start_msg(k=100, lmbda=600, resynth={"seed": 3}))
    assert isinstance(plan, StartPlan) and plan.settings == {"k": 100, "lmbda": 600, "mode": "cached",
                                                             "preset": "low-latency", "score": False}  # fmt: skip
    assert plan.resynth == ResynthOptions(seed=3)


def test_check_start_transmit_table_needs_a_table_for_the_sessions_k():
    cfg = ServerConfig()
    table = {"coder": "table"}
    assert check_start(cfg, SERVER, start_msg(transmit=table)) == Refusal(
        E.UNSUPPORTED_OPTION, "this server has no unit table (serve --transmit-table FILE), none for k=500; transmit "
                              "with coder 'uniform' or 'ulm'")  # fmt: skip
    two = dataclasses.replace(SERVER, transmit_table_ks=(100, 200))
    assert check_start(cfg, two, start_msg(transmit=table)) == Refusal(
        E.UNSUPPORTED_OPTION, "this server has tables for k=100, 200, none for k=500; transmit with coder 'uniform' "
                              "or 'ulm'")  # fmt: skip
    assert isinstance(check_start(cfg, two, start_msg(k=100, lmbda=600, transmit=table)), StartPlan)
    assert isinstance(check_start(cfg, SERVER, start_msg(transmit={"coder": "uniform"})), StartPlan)


def test_check_resynth_refusals():
    cfg = ServerConfig()
    assert check_resynth(cfg, SERVER, None) is None
    assert check_resynth(cfg, dataclasses.replace(SERVER, resynth=False), {}) == Refusal(
        E.UNSUPPORTED_OPTION, "this server runs without resynthesis (started with --no-resynth); ask for units only")
    assert check_resynth(cfg, SERVER, {}) == ResynthOptions()
    bad = check_resynth(cfg, SERVER, {"holdback": -1})
    assert isinstance(bad, Refusal) and bad.code == E.BAD_SETTINGS and "holdback" in bad.message
    off = check_resynth(ServerConfig(max_exact_resynth_s=0.0), SERVER, {"left_context": None})
    assert isinstance(off, Refusal) and off.code == E.UNSUPPORTED_OPTION


def test_sender_settings_report_the_resolved_windows():
    info = EncoderSessionInfo(100, 600, "sliding", 60, 8, 4, 700, "fast")
    got = sender_settings(start_msg(format="float32", preset="balanced", score=True), info, {"seed": 1})
    assert got == {"sample_rate": SR, "format": "float32", "k": 100, "lmbda": 600, "preset": "balanced",
                   "score": True, "frame_rate": P.FRAME_RATE, "mode": "sliding", "left": 60, "hop": 8,
                   "lookahead": 4, "max_lag": 700, "precision": "fast", "num_neighbors": got["num_neighbors"],
                   "resynth": {"seed": 1}}  # fmt: skip
    from dpslm_stream.pipeline import default_num_neighbors

    assert got["num_neighbors"] == default_num_neighbors(100) and "container" not in got
    full = sender_settings(start_msg(), FULL, None)
    assert (full["left"], full["hop"], full["lookahead"], full["max_lag"], full["mode"]) == (None, None, None, None,
                                                                                             "full")  # fmt: skip
    opus = sender_settings(start_msg(format="opus", container="ogg"), CACHED, None)
    assert opus["container"] == "ogg" and opus["format"] == "opus"


# --- receive_text: every refusal, exactly ----------------------------------------------------------------------------


def test_text_refusals_by_state_and_role():
    s = session()
    refused(text(s, '{"type":"end"}'), E.NOT_STARTED, "end before start: send a start message first")
    start(s)
    refused(text(s, {"type": "start", "sample_rate": SR}), E.ALREADY_STARTED,
            "this connection already has a session; one start per connection (open a new connection for a new stream)")
    refused(text(s, {"type": "subscribe", "session": "a", "token": "b"}), E.ALREADY_STARTED,
            "this connection is a sender; subscribe on a new connection")
    refused(text(s, {"type": "resume", "token": "x", "next_seq": 0}), E.ALREADY_STARTED,
            "resume is the first message of a new connection")
    assert s.state == State.STREAMING and s.role == "sender"
    s = session()
    listener(s)
    for msg in ({"type": "start", "sample_rate": SR}, {"type": "subscribe", "session": "a", "token": "b"}):
        refused(text(s, msg), E.NOT_A_SENDER, f"a listener connection takes no {msg['type']}; send end to leave")
    assert s.state == State.LISTENING


def test_end_while_opening_or_ending_does_nothing_and_end_while_streaming_ends():
    s = session()
    text(s, {"type": "start", "sample_rate": SR})
    assert text(s, '{"type":"end"}', 0.1) == [] and s.state == State.OPENING and s.reason is None
    s.opened(CACHED, None, 0.2)
    assert text(s, '{"type":"end"}', 0.3) == [A.RequestEnd()] and (s.state, s.reason) == (State.ENDING, "end")
    assert text(s, '{"type":"end"}', 0.4) == []


def test_a_resume_only_connection_is_busy_for_subscribe_too():
    s = Session("s2", ServerConfig(), SERVER, now=0.0, resume_only=True)
    out = text(s, {"type": "subscribe", "session": "a", "token": "b"}, 0.1)
    refused(out, E.BUSY, "all session slots are in use (this connection may only resume); closing", fatal=True)
    assert out[-1] == A.Close(P.CLOSE_TRY_AGAIN, E.BUSY.value) and s.outcome == E.BUSY.value
    s = Session("s3", ServerConfig(), SERVER, now=0.0, resume_only=True)
    out = text(s, {"type": "resume", "token": "x", "next_seq": 0}, 0.1)
    assert kinds(out) == [A.Resume] and s.role == "resuming"


def test_subscribe_asks_for_the_sender_with_its_options():
    s = session(open_timeout_s=7.0)
    out = text(s, {"type": "subscribe", "session": "abc", "token": "t", "resynth": {"seed": 4}}, 1.0)
    assert out == [A.Subscribe("abc", "t", ResynthOptions(seed=4), bitstream=False)]
    assert (s.role, s.state, s.reading, s.next_deadline()) == ("listener", State.OPENING, False, 8.0)
    assert s.resynth_options == ResynthOptions(seed=4)
    s = session()
    out = text(s, {"type": "subscribe", "session": "abc", "token": "t", "format": "bitstream"}, 0.0)
    assert out == [A.Subscribe("abc", "t", None, bitstream=True)] and s.bitstream_listener  # bits: no audio
    s = session()
    out = text(s, {"type": "subscribe", "session": "abc", "token": "t", "resynth": {"holdback": -1}}, 0.0)
    assert one_error(out).code == E.BAD_SETTINGS.value and s.state == State.CONNECTED and s.role is None


def test_start_opens_with_the_plan_and_pauses_reading():
    s = session(open_timeout_s=3.0)
    out = text(s, {"type": "start", "sample_rate": 8000, "options": {"hop": 20}, "resynth": {"seed": 2}}, 2.0)
    assert out == [A.OpenSession(8000, {"k": 500, "lmbda": 4500, "mode": "cached", "preset": "low-latency",
                                        "score": False, "hop": 20}, ResynthOptions(seed=2))]  # fmt: skip
    assert (s.role, s.state, s.reading, s.next_deadline(), s.tx_done) == ("sender", State.OPENING, False, 5.0, True)
    assert s.resynth_options == ResynthOptions(seed=2)


# --- receive_binary ---------------------------------------------------------------------------------------------------


def test_binary_refusals_by_state_and_role():
    s = session()
    refused(s.receive_binary(pcm(0.1), 0.0), E.NOT_STARTED,
            "audio before start: send a start message (JSON) first; the frame was dropped")
    text(s, {"type": "start", "sample_rate": SR})
    assert s.receive_binary(pcm(0.1), 0.1) == []  # opening: not read (a frame that slips through is ignored)
    s.opened(CACHED, None, 0.2)
    text(s, '{"type":"end"}', 0.3)
    refused(s.receive_binary(pcm(0.1), 0.4), E.AFTER_END, "audio after end was dropped")
    s = session(max_session_s=1.0)
    start(s)
    s.tick(1.0)  # ended by a limit: the audio still in flight is dropped silently
    assert s.reason == E.SESSION_TIME_LIMIT.value and s.receive_binary(pcm(0.1), 1.1) == []
    s = session()
    listener(s)
    refused(s.receive_binary(pcm(0.1), 0.1), E.NOT_A_SENDER, "a listener connection takes no audio; the frame was "
                                                            "dropped")  # fmt: skip


def test_message_size_edge_and_message():
    s = session(max_message_bytes=1000)
    start(s)
    assert kinds(s.receive_binary(b"\0" * 1000, 0.1)) == [A.FeedAudio]  # exactly the limit: taken
    refused(s.receive_binary(b"\0" * 1002, 0.2), E.MESSAGE_TOO_LARGE,
            "audio frame of 1002 bytes exceeds the limit of 1000; split it (e.g. 20-100 ms per frame); the frame was "
            "dropped")  # fmt: skip
    assert s.received_samples == 500


def test_an_undecodable_frame_is_refused_and_the_stream_goes_on():
    s = session()
    start(s)
    out = s.receive_binary(b"\0" * 3, 0.1)  # an odd number of bytes is no pcm16
    assert one_error(out).code == E.BAD_AUDIO.value and s.state == State.STREAMING
    refused(s.receive_binary(b"", 0.2), E.BAD_AUDIO, "empty audio frame; send at least one sample per binary frame")
    assert kinds(s.receive_binary(pcm(0.1), 0.3)) == [A.FeedAudio]


def test_full_mode_cap_edge_and_message():
    s = session(max_full_s=1.0)
    start(s, info=FULL, options={"mode": "full"})
    assert kinds(s.receive_binary(pcm(1.0), 0.1)) == [A.FeedAudio]  # exactly max_full_s: taken
    out = s.receive_binary(pcm(1 / SR), 0.2)
    refused(out, E.SESSION_TIME_LIMIT, "mode full keeps the whole stream until the end: at most 1 s of audio (use "
                                       "cached or sliding for longer streams); the units of the audio received so far "
                                       "follow, then end", fatal=True)  # fmt: skip
    assert out[-1] == A.RequestEnd() and s.received_samples == SR
    s = session(max_full_s=1.0)  # cached mode is not capped by this rule
    start(s)
    assert kinds(s.receive_binary(pcm(1.0), 0.1)) == [A.FeedAudio]
    s.consumed(0, 0.15)
    assert kinds(s.receive_binary(pcm(0.5), 0.2)) == [A.FeedAudio]


def test_zero_stall_refuses_with_the_buffer_full_message():
    s = session(max_buffer_s=1.0, stall_timeout_s=0.0)
    start(s)
    s.receive_binary(pcm(1.0), 0.1)
    out = s.receive_binary(pcm(0.5), 0.2)
    refused(out, E.BUFFER_FULL, "more than 1 s of audio queued and the server could not take more for 0 s; send at "
                                "most real time, or wait for units before sending more; the units of the audio "
                                "received so far follow, then end", fatal=True)  # fmt: skip
    assert out[-1] == A.RequestEnd() and s.reading and s._held is None and s.received_samples == SR


def test_accepted_audio_is_counted_and_timed():
    metrics = Metrics()
    s = Session("s1", ServerConfig(stats_interval_s=1000.0, resume_grace_s=0), SERVER, now=0.0, metrics=metrics)
    start(s)
    out = s.receive_binary(pcm(0.25), 0.5)
    assert kinds(out) == [A.FeedAudio] and len(out[0].samples) == SR // 4
    assert (s.received_samples, s.queued_samples) == (SR // 4, SR // 4)
    assert metrics.audio_seconds_total._value.get() == pytest.approx(0.25)
    assert s.report.clock.arrival_of(0.25) == pytest.approx(0.5)  # the commit lag of a unit ending at 0.25 s
    s.consumed(1000, 0.6)
    assert s.queued_samples == 1000
    s.consumed(3000, 0.7)  # a later report can only lower what is queued
    assert s.queued_samples == 1000


def test_a_held_frame_is_taken_when_room_comes_with_the_time_it_arrived():
    s = session(max_buffer_s=1.0, idle_timeout_s=5.0)
    start(s)
    s.receive_binary(pcm(1.0), 0.0)
    assert s.receive_binary(pcm(0.5), 1.0) == [] and s._held is not None
    assert s.encoder_events([], Progress(), 2.0) == []  # still no room
    out = s.consumed(0, 3.0)
    assert kinds(out) == [A.FeedAudio] and s.received_samples == SR * 3 // 2
    assert s.report.clock.arrival_of(1.5) == pytest.approx(1.0)  # arrived at 1.0, not when taken
    assert s.next_deadline() == pytest.approx(8.0)  # idle counts from when reading resumed


# --- opened, subscribed, their failures -----------------------------------------------------------------------------


def test_ready_of_a_sender_carries_every_field():
    s = Session("sid", ServerConfig(stats_interval_s=2.0, resume_grace_s=12.0), SERVER, now=0.0, metrics=None)
    text(s, {"type": "start", "sample_rate": SR})
    out = s.opened(CACHED, None, 1.5)
    ready = sent(out)[0]
    assert out[0] == A.Register(ready.listen_token, ready.resume_token) and len(out) == 2
    assert ready.session == "sid" and ready.role == "sender" and ready.models == "tiny" and ready.random_weights
    assert ready.server == f"dpslm-stream {__version__}" and ready.resume_grace_s == 12.0
    assert len(ready.listen_token) >= 16 and len(ready.resume_token) >= 16 and ready.listen_token != ready.resume_token
    assert ready.limits == ServerConfig(stats_interval_s=2.0, resume_grace_s=12.0).limits()
    assert ready.settings == sender_settings(s.start, CACHED, None)
    assert (s.state, s.started_at, s.next_deadline()) == (State.STREAMING, 1.5, 3.5)  # the first stats
    assert s.replay is not None and s.replay.max_bytes == ServerConfig().resume_outbox_bytes
    ready2 = sent(start(session(), rstream=FakeStream(), resynth={}))[0]
    assert ready2.settings["resynth"] == dataclasses.asdict(ResynthOptions()) and ready2.resume_token is None
    assert ready2.resume_grace_s == 0.0


def test_opened_after_a_close_releases_what_opened():
    s = session()
    text(s, {"type": "start", "sample_rate": SR})
    s.shutdown(0.1)
    assert s.opened(CACHED, None, 0.2) == [A.CancelSlot()]


def test_open_failed_lets_the_client_start_again():
    s = session()
    assert s.open_failed(E.BAD_SETTINGS, "no", 0.0) == []  # nothing opening
    text(s, {"type": "start", "sample_rate": SR})
    out = s.open_failed(E.BAD_SETTINGS, "the encoder refused", 0.5)
    refused(out, E.BAD_SETTINGS, "the encoder refused")
    assert (s.state, s.role, s.start, s.reading) == (State.CONNECTED, None, None, True)
    assert kinds(text(s, {"type": "start", "sample_rate": SR}, 0.6)) == [A.OpenSession]


def test_ready_of_a_listener():
    s = Session("lid", ServerConfig(stats_interval_s=3.0), SERVER, now=0.0)
    text(s, {"type": "subscribe", "session": "abc", "token": "t", "resynth": None})
    out = s.subscribed("abc", 100, 600, None, 2.0)
    assert len(out) == 1
    ready = sent(out)[0]
    assert ready.settings == {"sender": "abc", "k": 100, "lmbda": 600, "frame_rate": P.FRAME_RATE, "resynth": None}
    assert (ready.role, ready.listen_token, ready.resume_token, ready.resume_grace_s) == ("listener", None, None, 0.0)
    assert ready.session == "lid" and s.k_lmbda == (100, 600) and s.sender_id == "abc"
    assert (s.state, s.started_at, s.next_deadline()) == (State.LISTENING, 2.0, 5.0)
    s = session()
    assert s.subscribed("abc", 500, 4500, None, 0.0) == [A.Unsubscribe()]  # not opening: undone


def test_subscribe_failed_only_while_opening_and_fatal_by_code():
    s = session()
    assert s.subscribe_failed(E.UNKNOWN_SESSION, "no", 0.0) == []
    text(s, {"type": "subscribe", "session": "abc", "token": "t"})
    out = s.subscribe_failed(E.SENDER_GONE, "it left", 0.5)
    refused(out, E.SENDER_GONE, "it left; closing", fatal=True)
    assert out[-1] == A.Close(P.CLOSE_GOING_AWAY, E.SENDER_GONE.value) and s.finished


# --- encoder events ---------------------------------------------------------------------------------------------------


def test_encoder_events_reach_only_a_live_sender():
    s = session()
    listener(s)
    progress = Progress(processed_samples=7)
    assert s.encoder_events([unit(0, 5)], progress, 0.1) == [] and s.progress is progress  # kept anyway
    s = session()
    start(s)
    s.receive_binary(pcm(0.5), 0.1)
    out = s.encoder_events([InvalidInput("a chunk the encoder refused")], Progress(), 0.2)
    refused(out, E.BAD_AUDIO, "a chunk the encoder refused")
    assert s.state == State.STREAMING


def test_a_unit_goes_to_the_client_the_listeners_and_the_resynthesis():
    s = session()
    start(s, rstream=FakeStream(), resynth={})
    s.receive_binary(pcm(0.5), 0.1)
    out = s.encoder_events([unit(0, 10)], Progress(), 0.3)
    msg = sent(out)[0]
    assert out == [A.Send(P.to_json(msg), len(P.to_json(msg))), A.Relay(msg), A.PushUnits((0,), (0.2,))]
    assert (msg.seq, msg.unit, msg.start_frame, msg.end_frame, msg.lag_s) == (0, 0, 5, 10, pytest.approx(0.2))


def test_the_end_event_reports_frames_and_forced_commits():
    s = session()
    start(s)
    s.receive_binary(pcm(0.5), 0.1)
    s.encoder_events([unit(0, 10)], Progress(), 0.2)
    text(s, '{"type":"end"}', 0.3)
    out = s.encoder_events([dataclasses.replace(end_event(25), forced_commits=3)], Progress(finished=True), 0.4)
    end = sent(out)[-1]
    assert (end.reason, end.units, end.num_frames, end.forced_commits, end.audio_s) == ("end", 1, 25, 3, 0.5)
    assert out[-1] == A.Close(P.CLOSE_NORMAL, "end") and A.ListenersDone(gone=False) in out
    assert s.outcome == "end" and s.state == State.CLOSED


# --- failures ---------------------------------------------------------------------------------------------------------


def test_failed_message_and_close_before_ready():
    s = session()
    out = s.failed(ValueError("x"), 0.1)
    refused(out, E.INTERNAL_ERROR, "this session failed (ValueError: x); the units already sent stand; other sessions "
                                   "are unaffected", fatal=True)  # fmt: skip
    assert out[-1] == A.Close(P.CLOSE_INTERNAL, E.INTERNAL_ERROR.value) and s.finished
    s = session()
    text(s, {"type": "start", "sample_rate": SR})
    out = s.failed(ValueError("x"), 0.1)  # while opening: closed, nothing to finish
    assert out[-1] == A.Close(P.CLOSE_INTERNAL, E.INTERNAL_ERROR.value) and not any(
        isinstance(m, P.EndMessage) for m in sent(out))  # fmt: skip


def test_failed_listener_and_resynthesis():
    s = session()
    listener(s, rstream=FakeStream())
    out = s.failed(RuntimeError("boom"), 0.5)
    assert A.Unsubscribe() in out and A.CloseResynth() in out and A.CancelSlot() not in out
    assert not any(isinstance(a, A.ListenersDone) for a in out)
    end = sent(out)[-1]
    assert end.reason == E.INTERNAL_ERROR.value and end.resynth["error"] == "the session failed: RuntimeError"
    s = session()
    start(s)
    text(s, '{"type":"end"}', 0.1)
    s.encoder_events([end_event(0, 0)], Progress(finished=True), 0.2)
    assert s.failed(RuntimeError("late"), 0.3) == []  # already over
    s = session()
    start(s, rstream=FakeStream(), resynth={})
    s.receive_binary(pcm(0.5), 0.1)
    s.encoder_events([end_event(10, 0)], Progress(finished=True), 0.2)  # units over, audio still coming
    out = s.failed(RuntimeError("boom"), 0.3)
    assert A.ListenersDone(gone=True) not in out and A.CloseResynth() in out and s.finished


def test_resynth_failed_and_resynth_end_with_an_error_keep_the_units():
    s = session()
    start(s, rstream=FakeStream(), resynth={})
    out = s.resynth_failed(RuntimeError("oom"), 0.1)
    refused(out, E.INTERNAL_ERROR, "resynthesis stopped: RuntimeError: oom; units are unaffected")
    assert s.resynth_end.error == "RuntimeError: oom" and s.state == State.STREAMING
    assert s.resynth_failed(RuntimeError("again"), 0.2) == []
    s = session()
    start(s, rstream=FakeStream(), resynth={})
    out = s.resynth_events([resynth_end("cuda gone")], None, 0.1)
    refused(out, E.INTERNAL_ERROR, "resynthesis stopped: cuda gone; units are unaffected")
    assert s.state == State.STREAMING and s.resynth_end.error == "cuda gone"


def test_resynth_audio_is_sent_and_empty_chunks_are_not():
    s = session()
    start(s, rstream=FakeStream(), resynth={})
    stats = object()
    out = s.resynth_events([audio(0, 0), audio(1, 240)], stats, 0.1)
    assert s.report.rstats is stats and len(out) == 1 and isinstance(out[0].data, bytes)
    chunk = P.decode_audio_chunk(out[0].data)
    assert (chunk.seq, chunk.start_sample, len(chunk.samples), out[0].nbytes) == (0, 0, 240, len(out[0].data))
    assert s.report.audio_samples == 240
    out = s.resynth_events([audio(2, 100)], None, 0.2)
    assert P.decode_audio_chunk(out[0].data).start_sample == 240


def test_after_the_close_resynthesis_events_only_update_the_stats():
    s = session()
    start(s, rstream=FakeStream(), resynth={})
    s.shutdown(0.1)
    s.encoder_events([end_event(0, 0)], Progress(finished=True), 0.2)
    s.resynth_events([resynth_end()], None, 0.3)
    assert s.finished
    assert s.resynth_events([audio(0, 100)], "late stats", 0.4) == [] and s.report.rstats == "late stats"


# --- time rules: messages and exact edges -----------------------------------------------------------------------------


def test_start_and_idle_deadlines_before_start():
    s = session(start_timeout_s=2.0, idle_timeout_s=30.0)
    assert s.next_deadline() == 2.0 and s.tick(1.999) == []
    out = s.tick(2.0)
    refused(out, E.START_TIMEOUT, "no start or subscribe within 2 s of connecting; closing", fatal=True)
    assert s.outcome == E.START_TIMEOUT.value
    s = session(start_timeout_s=30.0, idle_timeout_s=1.5)
    text(s, '{"type":"end"}', 1.0)  # a message moves the idle clock
    assert s.next_deadline() == 2.5 and s.tick(2.4) == []
    out = s.tick(2.5)
    refused(out, E.IDLE_TIMEOUT, "no message for 1.5 s; closing", fatal=True)
    assert out[-1] == A.Close(P.CLOSE_POLICY, E.IDLE_TIMEOUT.value)


def test_idle_while_streaming_edge_and_message():
    s = session(idle_timeout_s=4.0)
    start(s, now=1.0)
    s.receive_binary(pcm(0.1), 2.0)
    assert s.next_deadline() == 6.0 and s.tick(5.999) == []
    out = s.tick(6.0)
    refused(out, E.IDLE_TIMEOUT, "no message for 4 s; the units of the audio received so far follow, then end",
            fatal=True)  # fmt: skip
    assert out[-1] == A.RequestEnd() and s.state == State.ENDING and s.tick(100.0) == []


def test_stall_edge():
    s = session(max_buffer_s=1.0, stall_timeout_s=2.5, idle_timeout_s=1.0)
    start(s)
    s.receive_binary(pcm(1.0), 0.0)
    s.receive_binary(pcm(0.5), 1.0)  # held from 1.0: the stall rule replaces the idle rule
    assert s.next_deadline() == 3.5 and s.tick(3.499) == []
    out = s.tick(3.5)
    refused(out, E.BUFFER_FULL, "more than 1 s of audio queued and the server could not take more for 2.5 s; send "
                                "at most real time, or wait for units before sending more; the units of the audio "
                                "received so far follow, then end", fatal=True)  # fmt: skip


def test_session_time_of_a_sender_and_a_listener():
    s = session(max_session_s=5.0)
    start(s, now=1.0)
    assert s.next_deadline() == pytest.approx(min(6.0, 1.0 + ServerConfig().idle_timeout_s))
    s.receive_binary(pcm(0.1), 5.9)
    assert s.tick(5.999) == []
    out = s.tick(6.0)
    refused(out, E.SESSION_TIME_LIMIT, "the session reached the 5 s limit; the units of the audio received so far "
                                       "follow, then end", fatal=True)  # fmt: skip
    s = session(max_session_s=5.0)
    listener(s, now=1.0)
    assert s.next_deadline() == 6.0 and s.tick(5.999) == []
    out = s.tick(6.0)
    refused(out, E.SESSION_TIME_LIMIT, "the session reached the 5 s limit; the audio of the units received follows, "
                                       "then end", fatal=True)  # fmt: skip
    assert out[1] == A.Unsubscribe() and isinstance(sent(out)[-1], P.EndMessage)
    assert out[-1] == A.Close(P.CLOSE_POLICY, E.SESSION_TIME_LIMIT.value) and s.finished


def test_open_deadline_edge_and_message():
    s = session(open_timeout_s=2.5)
    text(s, {"type": "start", "sample_rate": SR}, 1.0)
    assert s.next_deadline() == 3.5 and s.tick(3.499) == []
    out = s.tick(3.5)
    refused(out, E.INTERNAL_ERROR, "the server could not open this session's models within 2.5 s (serve "
                                   "--open-timeout); try again later", fatal=True)  # fmt: skip
    assert s.reason == E.INTERNAL_ERROR.value and s.units_done and s.finished


def test_stats_are_sent_when_due_and_only_when_something_changed():
    s = session(stats_interval_s=1.0)
    start(s, now=0.0)
    assert s.next_deadline() == 1.0 and sent(s.tick(0.999)) == []
    s.receive_binary(pcm(0.5), 0.5)
    stats = sent(s.tick(1.0))
    assert len(stats) == 1 and isinstance(stats[0], P.Stats) and stats[0].audio_s == 0.5
    assert stats[0].elapsed_s == 1.0 and s.next_deadline() == 2.0
    assert sent(s.tick(2.0)) == []  # nothing new since
    s.encoder_events([unit(0, 10)], Progress(), 2.5)
    stats = sent(s.tick(3.0))
    assert [m.units for m in stats] == [1]
    s.receive_text('{"type":"end"}', 3.1)
    s.receive_binary(b"", 3.2)
    s.encoder_events([], Progress(processed_samples=SR // 2), 3.3)
    assert sent(s.tick(4.0)) == []  # ending normally: stats only when changed; nothing changed


def test_stats_stop_once_a_limit_ended_the_session():
    s = session(stats_interval_s=1.0, max_session_s=1.0)
    start(s)
    s.receive_binary(pcm(0.1), 0.5)
    s.tick(1.0)  # the limit
    s.encoder_events([unit(0, 5)], Progress(), 1.5)
    assert not any(isinstance(m, P.Stats) for m in sent(s.tick(2.0)))


def test_sender_stats_fields():
    s = session()
    start(s, rstream=FakeStream(lag_s=2.5), resynth={})
    s.receive_binary(pcm(0.5), 0.1)
    s.consumed(SR // 4, 0.2)
    s.listeners = 2
    st = s.stats(3.0)
    assert (st.elapsed_s, st.audio_s, st.buffered_s, st.listeners, st.resynth_lag_s) == (3.0, 0.5, 0.25, 2, 2.5)
    assert st.state_nbytes == s.report.clock.nbytes + (SR // 4) * 4 + s.outgoing_bytes and st.transmit is None
    s.resynth_end = resynth_end()
    assert s.stats(3.0).resynth_lag_s == 0.0  # its resynthesis is over
    s = session()
    listener(s)
    st = s.stats(1.0)
    assert st.resynth_lag_s is None and st.listeners == 0 and st.audio_s == 0.0


# --- next_deadline ----------------------------------------------------------------------------------------------------


def test_next_deadline_by_state():
    s = session(start_timeout_s=3.0, idle_timeout_s=2.0)
    assert s.next_deadline() == 2.0  # the earlier of the start and idle deadlines
    s = session(start_timeout_s=3.0, idle_timeout_s=20.0, max_session_s=4.0)
    listener(s, now=1.0)
    assert s.next_deadline() == 5.0
    s.receive_text('{"type":"end"}', 1.5)
    assert s.finished and s.tick(2000.0) == []
    s = session(idle_timeout_s=20.0, max_session_s=100.0, stats_interval_s=1000.0)
    start(s, now=1.0)
    s.receive_text('{"type":"end"}', 1.5)
    assert s.state == State.ENDING and s.next_deadline() == 1001.0  # ending: only the stats


# --- endings, close, outgoing rule ------------------------------------------------------------------------------------


def test_the_close_reason_is_cut_to_fit_a_close_frame():
    s = session()
    assert s._close(P.CLOSE_POLICY, "r" * 200) == [A.Close(P.CLOSE_POLICY, "r" * 120)]
    assert s.state == State.CLOSED and s._close(P.CLOSE_POLICY, "again") == []


def test_outgoing_rule_edge_and_what_a_dropped_client_releases():
    s = session(max_outgoing_bytes=5000)
    start(s, rstream=FakeStream(), resynth={})
    s.sent(10**6)
    assert s.outgoing_bytes == 0  # never below zero
    assert s._send_bytes(b"x" * 5000) == [A.Send(b"x" * 5000, 5000)]  # exactly the limit: queued
    out = s._send_bytes(b"y")
    assert out == [A.CancelSlot(), A.CloseResynth(), A.Abort(P.CLOSE_POLICY, "client_too_slow: messages not read")]
    assert s.state == State.CLOSED and s.outcome == E.CLIENT_TOO_SLOW.value
    s = session(max_outgoing_bytes=5000)
    listener(s)
    s.sent(10**6)
    assert s._send_bytes("é" * 2501) == [A.Abort(P.CLOSE_POLICY, "client_too_slow: messages not read")]  # UTF-8 bytes


def test_a_dropped_client_counts_its_error():
    metrics = Metrics()
    s = Session("s1", ServerConfig(max_outgoing_bytes=10, resume_grace_s=0), SERVER, now=0.0, metrics=metrics)
    s._send_bytes(b"x" * 11)
    assert metrics.errors_total.labels(E.CLIENT_TOO_SLOW.value)._value.get() == 1
    s = Session("s1", ServerConfig(), SERVER, now=0.0, metrics=metrics)
    text(s, '{"type":"end"}')
    assert metrics.errors_total.labels(E.NOT_STARTED.value)._value.get() == 1


def test_connection_lost_by_role_and_outcome():
    s = session()
    assert s.connection_lost(0.0) == [] and s.outcome == "no_session" and s.state == State.GONE
    assert s.connection_lost(0.1) == []
    s = session()
    listener(s, rstream=FakeStream())
    assert s.connection_lost(0.5) == [A.Unsubscribe(), A.CloseResynth()] and s.outcome == "disconnected"
    s = session()
    start(s)
    text(s, '{"type":"end"}', 0.1)
    s.encoder_events([end_event(0, 0)], Progress(finished=True), 0.2)
    assert s.outcome == "end" and s.connection_lost(0.3) == [] and s.outcome == "end"  # nothing left to release
    s = session()
    start(s)
    s.encoder_events([end_event(0, 0)], Progress(finished=False), 0.2)  # units over, the encoder not yet closed
    assert s.connection_lost(0.3) == [A.CancelSlot()]


def test_shutdown_of_a_listener_and_of_a_parked_session():
    s = session()
    listener(s)
    out = s.shutdown(1.0)
    refused(out, E.SHUTTING_DOWN, "the server is shutting down; the audio of the units received follows, then end",
            fatal=True)  # fmt: skip
    assert out[-1] == A.Close(P.CLOSE_GOING_AWAY, E.SHUTTING_DOWN.value)
    metrics = Metrics()
    s = Session("s1", ServerConfig(stats_interval_s=1000.0), SERVER, now=0.0, metrics=metrics)
    start(s)
    s.transport_lost(False, 0.5)
    assert s.shutdown(1.0) == [A.CancelSlot(), A.ListenersDone(gone=True)]
    assert s.outcome == E.SHUTTING_DOWN.value and s.parked is None
    assert metrics.parks_expired_total.labels(E.SHUTTING_DOWN.value)._value.get() == 1


def test_sender_done_for_a_listener():
    s = session()
    assert s.sender_done(False, 0.1) == []
    listener(s)
    out = s.sender_done(False, 0.2)
    assert not any(isinstance(m, P.Error) for m in sent(out)) and sent(out)[-1].reason == "end"
    assert out[-1] == A.Close(P.CLOSE_NORMAL, "end")
    s = session()
    listener(s)
    out = s.sender_done(True, 0.2)
    refused(out, E.SENDER_GONE, "the sender's connection ended; the audio of the units received follows, then end",
            fatal=True)  # fmt: skip


def test_relay_unit_only_while_listening_and_counted_for_a_bitstream_listener():
    msg = P.Unit(seq=0, unit=3, start_frame=0, end_frame=5, start_s=0.0, end_s=0.1, commit_audio_s=0.1, lag_s=0.0)
    s = session()
    assert s.relay_unit(msg, 0.0) == [] and s.report.units == 0
    listener(s, format="bitstream")
    assert s.relay_unit(msg, 0.1) == [] and s.report.units == 1
    assert s.relay_bits("header", b"hd", 0.2) == [A.Send(P.encode_bitstream_frame("header", b"hd"), 4)]
    s = session()
    listener(s)
    assert s.relay_bits("packet", b"p", 0.1) == []  # a unit listener takes no bits
    assert s.relay_unit(msg, 0.1) == [A.Send(P.to_json(msg), len(P.to_json(msg)))]


def test_resynthesis_lag_edge_and_message():
    stream = FakeStream(lag_s=5.0)
    s = session(max_resynth_lag_s=5.0, stats_interval_s=1.0)
    start(s, rstream=stream, resynth={})
    out = s.tick(1.0)  # exactly the limit: fine (only the stats)
    assert [type(m) for m in sent(out)] == [P.Stats] and len(out) == 1 and s.resynth_end is None
    stream.lag_s = 5.04
    out = s.tick(2.0)
    assert out[0] == A.CloseResynth()
    refused(out, E.RESYNTH_BEHIND, "resynthesis stopped: it fell 5.0 s behind (limit 5 s): this server cannot "
                                   "resynthesize in real time; units are unaffected")  # fmt: skip
    assert s.resynth_end.error == "it fell 5.0 s behind (limit 5 s): this server cannot resynthesize in real time"
    assert s.tick(3.0) == []  # stopped once


def test_exact_resynthesis_cut_message_and_edge():
    s = session(max_exact_resynth_s=2.0)
    start(s, rstream=FakeStream(), resynth={"left_context": None})
    s.receive_binary(pcm(0.5), 0.1)
    assert A.PushUnits((0,), (0.2,)) in s.encoder_events([unit(0, 10)], Progress(), 0.2)
    assert A.PushUnits((1,), (2.2,)) in s.encoder_events([unit(1, 110)], Progress(), 0.3)  # exactly 2 s after
    out = s.encoder_events([unit(2, 111)], Progress(), 0.4)
    why = ("unbounded context (left_context or vocoder_left_context null) is limited to 2 s of input on this server "
           "(serve --max-exact-resynth); give a number for longer streams")  # fmt: skip
    refused(out, E.RESYNTH_LIMIT, f"resynthesis ended: {why}; the audio of the units before it follows; units are "
                                  "unaffected")  # fmt: skip
    assert s._resynth_cut == why
    s.receive_text('{"type":"end"}', 0.5)
    s.encoder_events([end_event(111, 3)], Progress(finished=True), 0.6)
    end = sent(s.resynth_events([resynth_end()], None, 0.7))[-1]
    assert end.resynth["error"] == why


# --- bitstream (start.transmit) ---------------------------------------------------------------------------------------


def transmitting(durations: bool = False) -> Session:
    s = session()
    ready = sent(start(s, transmit={"coder": "uniform", "durations": durations}))[0]
    assert ready.resume_token is None and s.replay is None and not s.tx_done and s.transmit["durations"] is durations
    return s


def test_the_bitstream_header_packets_and_end():
    s = transmitting(durations=True)
    assert s.transmitted([b"early"], 1.0, {}, False, 0.0) == [
        A.Send(P.encode_bitstream_frame("packet", b"early"), 7), A.RelayBits("packet", b"early")]
    out = s.transmit_opened(b"HDR", 0.1)
    assert out == [A.Send(P.encode_bitstream_frame("header", b"HDR"), 5), A.RelayBits("header", b"HDR")]
    assert s.tx_header == b"HDR"
    s.receive_binary(pcm(0.5), 0.2)
    out = s.encoder_events([unit(0, 10)], Progress(), 0.3)
    assert A.Transmit((0,), (5,), 0.3) in out
    out = s.transmitted([b"p1", b"p2"], 1.25, {"packets": 2}, False, 0.4)
    assert out == [A.Send(P.encode_bitstream_frame("packet", b"p1"), 4), A.RelayBits("packet", b"p1"),
                   A.Send(P.encode_bitstream_frame("packet", b"p2"), 4), A.RelayBits("packet", b"p2")]  # fmt: skip
    assert s.next_deadline() == 1.25 and s.tick(1.249) == []
    assert s.tick(1.25) == [A.TransmitTick(1.25)] and s.tick(1.3) == []  # until the next deadline is reported
    assert s.stats(1.3).transmit == {"packets": 2}
    text(s, '{"type":"end"}', 1.4)
    out = s.encoder_events([end_event(10, 1)], Progress(finished=True), 1.5)
    assert A.TransmitEnd(1.5) in out and A.ListenersDone(gone=False) not in out and not s.finished  # the last packet
    out = s.transmitted([b"last"], math.inf, {"packets": 3}, True, 1.6)
    assert A.ListenersDone(gone=False) in out and out[-1] == A.Close(P.CLOSE_NORMAL, "end")
    end = sent(out)[-1]
    assert end.reason == "end" and end.stats["transmit"] == {"packets": 3}
    assert s.transmitted([b"more"], 2.0, {}, False, 1.7) == [] and s.transmit_opened(b"H", 1.8) == []


def test_units_without_durations_and_the_done_before_the_end():
    s = transmitting()
    s.transmit_opened(b"H", 0.0)
    s.receive_binary(pcm(0.5), 0.1)
    assert A.Transmit((3,), None, 0.2) in s.encoder_events([unit(3, 10)], Progress(), 0.2)
    out = s.transmitted([], 5.0, {}, True, 0.3)  # done before the units are over: no listeners told yet
    assert out == [] and s.tx_done
    assert A.Transmit((4,), None, 0.4) not in s.encoder_events([unit(4, 15)], Progress(), 0.4)
    assert s.transmitted([b"x"], 1.0, {}, False, 0.5) == []  # done: nothing more


def test_transmit_failed_message_and_what_it_releases():
    s = transmitting()
    out = s.transmit_failed(OSError("no table"), 0.1)  # before the header: the units go on
    refused(out, E.INTERNAL_ERROR, "the bitstream stopped (OSError: no table); units go on")
    assert s.tx_done and A.ListenersDone(gone=False) not in out and s.state == State.STREAMING
    s = transmitting()
    s.transmit_opened(b"H", 0.0)
    text(s, '{"type":"end"}', 0.1)
    s.encoder_events([end_event(0, 0)], Progress(finished=True), 0.2)
    assert not s.finished  # waiting for the last packet
    out = s.transmit_failed(RuntimeError("x"), 0.3)
    assert A.ListenersDone(gone=False) in out and out[-1] == A.Close(P.CLOSE_NORMAL, "end")
    assert s.transmit_failed(RuntimeError("y"), 0.4) == []
    s = transmitting()
    s.transmit_opened(b"H", 0.0)
    s.transmitted([], 1.0, {}, True, 0.1)
    assert s.transmit_failed(RuntimeError("after its end"), 0.2) == []
    s = transmitting()
    s.transmit_opened(b"H", 0.0)
    out = s.transmit_failed(RuntimeError("mid-stream"), 0.1)  # units not over: listeners learn with the units' end
    assert A.ListenersDone(gone=False) not in out and one_error(out).code == E.INTERNAL_ERROR.value
    s = session()
    start(s)
    assert s.transmit_opened(b"H", 0.0) == []  # no transmitter asked for


# --- resume.py and the core's resume --------------------------------------------------------------------------------


def test_replay_log_bound_is_exact_and_keeps_the_newest():
    log = ReplayLog(max_bytes=30)
    assert (log.nbytes, log.units_from, log.audio_from, log.units_sent, log.audio_sent, log.holding, log.final) == \
        (0, 0, 0, 0, 0, False, [])  # fmt: skip
    for seq in range(3):
        log.unit(seq, f"u{seq}", 10)
    assert log.nbytes == 30 and log.units_from == 0  # exactly max_bytes: all kept
    log.unit(3, "u3", 10)
    assert log.nbytes == 30 and log.units_from == 1 and log.units_sent == 4
    assert [d for d, _ in log.replay(1, 0)] == ["u1", "u2", "u3"]
    big = ReplayLog(max_bytes=5)
    big.unit(0, "a" * 50, 50)
    assert big.nbytes == 50 and big.units_from == 0  # the newest entry stays even alone above the bound
    big.audio(0, 10, b"\0" * 6)
    assert big.units_from == 1 and big.audio_sent == 10 and big.nbytes == 6


def test_replay_log_holds_everything_while_parked():
    log = ReplayLog(max_bytes=10)
    log.holding = True
    for seq in range(5):
        log.unit(seq, "x", 10)
    assert log.nbytes == 50 and log.units_from == 0


def test_replay_log_refusals_name_the_range():
    log = ReplayLog(max_bytes=10)
    for seq in range(3):
        log.unit(seq, "x", 6)
    log.audio(0, 100, b"\0" * 4)
    log.audio(100, 50, b"\0" * 4)
    log.audio(150, 50, b"\0" * 4)
    assert (log.units_from, log.units_sent, log.audio_from, log.audio_sent) == (3, 3, 100, 200)
    assert log.refusal(2, 100) == ("next_seq 2 is outside the units this server can replay (3..3); the client missed "
                                   "more than serve --resume-outbox-bytes")  # fmt: skip
    assert log.refusal(4, 100).startswith("next_seq 4 is outside")
    assert log.refusal(3, 99) == "audio_samples 99 is outside the audio this server can replay (100..200)"
    assert log.refusal(3, 201).startswith("audio_samples 201")
    assert log.refusal(3, 100) is None and log.refusal(3, 200) is None


def test_replay_log_audio_cut_and_units_from_next_seq():
    s = session()
    chunks = [s.report.audio_chunk(audio(i, n)) for i, n in ((0, 100), (1, 50))]
    log = ReplayLog(max_bytes=10**6)
    log.unit(0, "u0", 2)
    log.audio(0, 100, chunks[0])
    log.unit(1, "u1", 2)
    log.audio(100, 50, chunks[1])
    assert log.replay(2, 150) == []
    assert log.replay(1, 100) == [("u1", 2), (chunks[1], len(chunks[1]))]
    got = log.replay(0, 99)  # the client has all but the last sample of the first chunk
    assert [d for d, _ in got][0] == "u0" and [d for d, _ in got][2:] == ["u1", chunks[1]]
    cut = P.decode_audio_chunk(got[1][0])
    assert (cut.seq, cut.start_sample, len(cut.samples), got[1][1]) == (0, 99, 1, len(got[1][0]))
    assert cut.samples[0] == P.decode_audio_chunk(chunks[0]).samples[99]


def test_parked_bound_is_exact():
    p = Parked(since=1.0, deadline=31.0, max_bytes=100)
    assert p.nbytes == 0 and p.outbox == []
    assert p.produced(60) and p.produced(40) and p.nbytes == 100  # exactly the bound: kept
    assert not p.produced(1)


def test_parking_conditions():
    s, _ = resumable()
    s.receive_binary(pcm(0.5), 0.1)
    assert s.transport_lost(False, 2.0) == [] and s.parked == Parked(2.0, 32.0, ServerConfig().resume_outbox_bytes)
    assert s.replay.holding and s.reading and s.next_deadline() == 32.0
    assert s.transport_lost(False, 3.0) == [] and s.parked.since == 2.0  # parked once
    assert s.transport_lost(True, 3.0) == [] and s.parked is not None  # a parked session waits for its deadline
    s, _ = resumable(max_outgoing_bytes=5000)  # dropped as too slow: not parked
    s.sent(10**6)
    s._send_bytes(b"x" * 5001)
    assert s.finished and s.outcome == E.CLIENT_TOO_SLOW.value
    assert s.transport_lost(False, 1.0) == [A.CancelSlot(), A.ListenersDone(gone=True)] and s.parked is None
    assert s.state == State.GONE
    s, _ = resumable()
    s.shutdown(0.5)
    assert s.transport_lost(False, 1.0) == [A.CancelSlot(), A.ListenersDone(gone=True)] and s.parked is None
    s = session(resume_grace_s=30.0)
    listener(s)
    assert s.transport_lost(False, 1.0) == [A.Unsubscribe()] and s.state == State.GONE


def test_a_parked_session_reaches_its_session_time():
    s, _ = resumable(max_session_s=10.0)
    s.receive_binary(pcm(0.5), 0.1)
    s.transport_lost(False, 1.0)
    assert s.next_deadline() == 10.0 and s.tick(9.999) == []
    assert s.tick(10.0) == [A.RequestEnd()]  # the error waits in the outbox
    errs = [P.parse_server_message(a.data) for a in s.parked.outbox]
    assert [e.code for e in errs] == [E.SESSION_TIME_LIMIT.value]
    assert s.next_deadline() == 10.0 and s.tick(10.5) == []  # ending: the limit is not applied twice
    s = Session("s1", ServerConfig(max_session_s=10.0, resume_grace_s=5.0), SERVER, now=0.0)
    start(s)
    s.transport_lost(False, 1.0)
    assert s.next_deadline() == 6.0 and s.tick(5.999) == []
    assert s.tick(6.0) == [A.CancelSlot(), A.ListenersDone(gone=True)] and s.outcome == "resume_expired"


def test_parked_output_is_counted_and_kept_for_the_resume():
    s, _ = resumable(resume_outbox_bytes=10**6)
    s.receive_binary(pcm(0.5), 0.1)
    s.transport_lost(False, 0.2)
    s.encoder_events([unit(0, 10)], Progress(), 0.3)
    unit_bytes = s.replay.nbytes
    assert s.parked.nbytes == unit_bytes and s.parked.outbox == []  # in the log, not the outbox
    s.encoder_events([InvalidInput("bad chunk")], Progress(), 0.4)
    assert len(s.parked.outbox) == 1 and s.parked.nbytes == unit_bytes + s.parked.outbox[0].nbytes


def test_resume_answers_replays_and_carries_on():
    s, ready = resumable()
    s.receive_binary(pcm(1.0), 0.1)
    s.encoder_events([unit(i, 5 * (i + 1)) for i in range(3)], Progress(), 0.2)
    s.transport_lost(False, 0.3)
    s.encoder_events([InvalidInput("bad")], Progress(), 0.4)
    out = s.resume(resume_msg("t", 1, resend_from=SR // 4), 5.0)
    msgs = sent(out)
    assert msgs[0] == P.Resumed(samples=SR, next_seq=1) and [m.seq for m in msgs[1:3]] == [1, 2]
    assert msgs[3].code == E.BAD_AUDIO.value and len(msgs) == 4
    assert all(a.nbytes == 0 for a in out)  # the replay is not counted against max_outgoing_bytes
    assert s.outgoing_bytes == 0 and s.parked is None and not s.replay.holding
    assert (s.acked, s._acked_at, s._skip_samples) == (SR, 5.0, SR * 3 // 4)
    assert s.metrics.resumes_total._value.get() == 1
    assert s.next_deadline() == pytest.approx(5.0 + ServerConfig().idle_timeout_s)  # idle counts from the resume
    out = s.receive_binary(pcm(1.0), 5.1)  # 0.75 s overlap, 0.25 s new
    assert [len(a.samples) for a in out if isinstance(a, A.FeedAudio)] == [SR // 4]


def test_resume_refusals():
    s, _ = resumable()
    s.receive_binary(pcm(0.5), 0.1)
    assert s.resume_refusal(resume_msg("t", 0, resend_from=SR // 2)) is None  # exactly what was accepted
    assert s.resume_refusal(resume_msg("t", 0, resend_from=SR // 2 + 1)) == (
        f"resend_from {SR // 2 + 1} is past the {SR // 2} samples the server accepted: the audio between would be "
        "lost")  # fmt: skip
    assert s.resume_refusal(resume_msg("t", 1)) == s.replay.refusal(1, 0)
    s.connection_lost(0.2)
    assert s.resume_refusal(resume_msg("t", 0)) == "the session is gone or cannot resume"
    assert session().resume_refusal(resume_msg("t", 0)) == "the session is gone or cannot resume"


def test_resume_failed_message():
    s = Session("s2", ServerConfig(), SERVER, now=0.0)
    text(s, {"type": "resume", "token": "x", "next_seq": 0})
    out = s.resume_failed("no session with that resume token", 0.1)
    refused(out, E.RESUME_FAILED, "no session with that resume token; closing", fatal=True)
    assert s.role is None and s.outcome == E.RESUME_FAILED.value


def test_acks_edge_and_none_after_the_close():
    s, _ = resumable()
    s.receive_binary(pcm(0.1), 0.0)
    assert sent(s.tick(0.0)) == [P.Ack(samples=1600)]  # the first ack at once
    s.receive_binary(pcm(0.1), 0.1)
    assert s.next_deadline() == 0.25 and s.tick(0.2499) == []
    assert sent(s.tick(0.25)) == [P.Ack(samples=3200)]
    assert s._ack(0.3) == []  # nothing new
    s.receive_binary(pcm(0.1), 0.4)
    s.shutdown(0.45)
    s.encoder_events([end_event(0, 0)], Progress(finished=True), 0.5)
    assert s.finished and s.tick(1.0) == []


def test_the_end_and_close_are_kept_for_a_resume_after_the_end():
    s, _ = resumable()
    s.receive_binary(pcm(0.5), 0.1)
    text(s, '{"type":"end"}', 0.2)
    out = s.encoder_events([end_event(12, 0)], Progress(finished=True), 0.3)
    end_text = next(a.data for a in out if isinstance(a, A.Send) and '"end"' in a.data[:20])
    assert s.replay.final == [A.Send(end_text, 0), A.Close(P.CLOSE_NORMAL, "end")]
    s2, _ = resumable()
    s2.receive_binary(pcm(0.5), 0.1)
    s2.tick(s2.cfg.max_session_s)
    s2.encoder_events([end_event(12, 0)], Progress(finished=True), 0.3)
    assert s2.replay.final[-1] == A.Close(P.CLOSE_POLICY, E.SESSION_TIME_LIMIT.value)


def test_handed_over():
    s = Session("s2", ServerConfig(), SERVER, now=0.0)
    assert s.handed_over(0.1) == [] and (s.state, s.outcome) == (State.GONE, "handed_over")


def test_the_start_deadline_excludes_a_listeners_open_too():
    s = session(start_timeout_s=1.0, idle_timeout_s=30.0)
    text(s, {"type": "subscribe", "session": "abc", "token": "t"}, 0.5)
    assert not s.reading and s.tick(3.0) == []
    refused(s.subscribe_failed(E.BAD_SETTINGS, "resynthesis cannot open", 5.0), E.BAD_SETTINGS,
            "resynthesis cannot open")  # fmt: skip
    assert s.reading and s.next_deadline() == pytest.approx(5.5)  # 1 s of the client's own time, 4.5 s excluded
    assert s.tick(5.49) == [] and one_error(s.tick(5.5)).code == E.START_TIMEOUT.value


def test_an_ack_due_with_the_session_time_limit_is_kept():
    s, _ = resumable(max_session_s=5.0)
    s.receive_binary(pcm(0.1), 4.9)
    out = s.tick(5.0)
    assert [type(m) for m in sent(out)] == [P.Ack, P.Error] and out[-1] == A.RequestEnd()


def test_units_over_while_streaming_ends_and_waits_for_the_audio():
    s = session()
    start(s, rstream=FakeStream(), resynth={})
    s.receive_binary(pcm(0.5), 0.1)
    out = s.encoder_events([unit(0, 10), end_event(25, 1)], Progress(finished=True), 0.2)  # no end from the client
    assert A.EndResynth() in out and A.ListenersDone(gone=False) in out and s.state == State.ENDING
    assert s.shutdown(0.3) == [] and codes(s.tick(10**4)) == []  # ending already: the audio of its units still comes
    end = sent(s.resynth_events([resynth_end()], None, 0.4))[-1]
    assert end.reason == "end" and end.units == 1


# --- format opus (needs PyAV: the `opus` extra) -----------------------------------------------------------------------


def opus_stream(seconds: float = 1.0) -> bytes:
    from dpslm_stream.opus import OpusUplinkEncoder
    from dpslm_stream.tiny import speech_like

    enc = OpusUplinkEncoder(24000, "ogg", input_rate=SR)
    return b"".join(enc.push(speech_like(seconds, SR, seed=11).astype(np.float32)) + enc.finish())


def opus_session(**config) -> Session:
    s = session(resume_grace_s=30.0, **config)
    ready = sent(start(s, info=FULL, format="opus", options={"mode": "full"}))[0]
    assert ready.resume_token is None and s.replay is None  # an Opus stream cannot be resent from a sample offset
    return s


needs_opus = pytest.mark.skipif(not SERVER.opus, reason="format opus needs PyAV (the opus extra)")


@needs_opus
def test_opus_decoder_bound_follows_max_buffer_s_with_a_floor():
    s = opus_session(max_buffer_s=2.0)
    assert (s.opus.max_samples, s.opus.container) == (2 * P.OPUS_SAMPLE_RATE, "auto")
    s = opus_session(max_buffer_s=0.1)
    assert s.opus.max_samples == P.OPUS_SAMPLE_RATE // 2  # never below 0.5 s
    out = s.receive_binary(opus_stream(1.0), 0.1)  # 1 s in one message: more than the decoder may make of it
    refused(out, E.BAD_AUDIO, "one message decodes to more than 0.5 s of audio (the server's max_buffer_s); send "
                              "smaller messages; the units of the audio received so far follow, then end", fatal=True)  # fmt: skip
    assert out[-1] == A.RequestEnd() and s.received_samples == 0


@needs_opus
def test_opus_pages_damaged_dropped_or_truncated():
    data = opus_stream(1.0)
    pages = [i for i in range(len(data)) if data[i : i + 4] == b"OggS"]
    s = opus_session()
    assert s.receive_binary(data[: pages[2]], 0.1) == []  # the two header pages: no audio yet, nothing to say
    bad = bytearray(data[pages[2] :])
    bad[pages[3] - pages[2] + 40] ^= 0xFF  # the second audio page fails its CRC
    out = s.receive_binary(bytes(bad), 0.2)
    size = pages[4] - pages[3]
    assert kinds(out) == [A.Send, A.FeedAudio]
    refused(out, E.BAD_AUDIO, f"an Ogg page of {size} bytes failed its CRC check and was dropped (damaged data); the "
                              "stream goes on")  # fmt: skip
    s = opus_session()
    s.receive_binary(data[:500], 0.1)  # ends inside a page
    pending = s.opus.state_nbytes
    out = s.receive_text('{"type":"end"}', 0.2)
    refused(out, E.BAD_AUDIO, f"the Opus stream ended inside a page or block: its last {pending} bytes were dropped "
                              "(a truncated stream)")  # fmt: skip
    assert out[-1] == A.RequestEnd()
    s = opus_session()
    s.receive_binary(data[: pages[2]], 0.1)
    out = s.receive_binary(b"garbage" * 10, 0.2)  # not an Ogg page where one must start: the stream cannot go on
    err = one_error(out)
    assert err.code == E.BAD_AUDIO.value and err.fatal and out[-1] == A.RequestEnd()
    assert err.message.endswith("(truncated or damaged data); the units of the audio received so far follow, then end")


def test_a_grace_period_under_a_second_still_offers_resume():
    s = session(resume_grace_s=0.5)
    ready = sent(start(s))[0]
    assert ready.resume_token and ready.resume_grace_s == 0.5


def test_units_before_the_transmitter_opened_wait_for_it_and_the_end_waits_for_its_last_packet():
    """The transmitter may open late (its ULM loading): the units committed meanwhile are handed to it once it is
    open, in order with their times, and the session's end waits for its END packet; so the bitstream carries every
    unit (before, a session shorter than the load ended with no bitstream at all)."""
    s = transmitting()
    s.receive_binary(pcm(0.5), 0.05)
    out = s.encoder_events([unit(3, 10), unit(4, 20)], Progress(), 0.1)
    assert not any(isinstance(a, A.Transmit) for a in out)
    text(s, '{"type":"end"}', 0.15)
    out = s.encoder_events([end_event(20, 2)], Progress(finished=True), 0.2)
    assert not any(isinstance(a, (A.TransmitEnd, A.ListenersDone, A.Close)) for a in out) and not s.finished
    out = s.transmit_opened(b"H", 0.3)
    assert out[2:] == [A.Transmit((3,), None, 0.1), A.Transmit((4,), None, 0.1), A.TransmitEnd(0.3)]
    assert sent(out[:1]) == [P.encode_bitstream_frame("header", b"H")]
    out = s.transmitted([b"last"], math.inf, {}, True, 0.4)
    assert A.ListenersDone(gone=False) in out and out[-1] == A.Close(P.CLOSE_NORMAL, "end")
    s = transmitting()  # the transmitter cannot open: the end goes out then, listeners told
    text(s, '{"type":"end"}', 0.1)
    s.encoder_events([end_event(0, 0)], Progress(finished=True), 0.2)
    assert not s.finished
    out = s.transmit_failed(RuntimeError("no ULM"), 0.3)
    assert A.ListenersDone(gone=False) in out and out[-1] == A.Close(P.CLOSE_NORMAL, "end")
    assert s.transmit_opened(b"H", 0.4) == []


def test_the_json_depth_rule_follows_the_config():
    nested = {"type": "start", "sample_rate": SR, "options": {"a": {"b": 1}}}  # depth 3
    s = session(max_json_depth=2)
    assert one_error(text(s, nested)).code == E.BAD_JSON.value
    s = session(max_json_depth=3)
    assert one_error(text(s, nested)).code == E.BAD_MESSAGE.value  # parsed, then refused: options are flat


def test_a_connection_lost_while_opening_releases_no_slot_yet():
    s = session()
    text(s, {"type": "start", "sample_rate": SR})
    assert s.connection_lost(0.1) == [A.ListenersDone(gone=True)]  # the slot is released when the open returns


def test_the_outgoing_rule_counts_from_zero():
    s = session(max_outgoing_bytes=5000)
    assert s._send_bytes(b"x" * 5000) == [A.Send(b"x" * 5000, 5000)] and s.outgoing_bytes == 5000


def test_failures_are_logged_with_the_session(caplog):
    s = transmitting()
    with caplog.at_level("ERROR", logger="dpslm_stream.server"):
        s.transmit_failed(OSError("disk"), 0.1)
        s.failed(RuntimeError("boom"), 0.2)
    assert [r.getMessage() for r in caplog.records] == ["session s1: transmission failed: OSError: disk",
                                                       "session s1 failed: RuntimeError: boom"]  # fmt: skip
