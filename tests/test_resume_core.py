"""Resume after a dropped connection in the session core (server/session.py, server/resume.py), without a socket:
park, resume, replay, expiry, takeover, refusals, the outbox bound, acks and the resent audio's overlap.

The oracle: a model client that keeps only what reached it (the frames before a cut, then those after the resume)
must end with exactly the units and audio of the session, seq and samples contiguous, none lost or repeated.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpslm_stream import protocol as P
from dpslm_stream.server import actions as A
from dpslm_stream.server.config import ServerConfig
from dpslm_stream.server.metrics import Metrics
from dpslm_stream.server.session import Session, State
from dpslm_stream.stream.resynth_events import AudioEvent

from test_session_core import CACHED, SERVER, SR, FakeStream, codes, end_event, errors, kinds, pcm, sent, unit

E = P.ErrorCode


def resumable(now: float = 0.0, resynth: bool = False, **config) -> tuple[Session, P.Ready]:
    """A started sender session with resume on (grace 30 s unless given); returns it and its ready."""
    cfg = ServerConfig(**{"stats_interval_s": 1000.0, "resume_grace_s": 30.0, **config})
    s = Session("s1", cfg, SERVER, now=now, metrics=Metrics())
    fields = {"type": "start", "sample_rate": SR, **({"resynth": {}} if resynth else {})}
    assert kinds(s.receive_text(json.dumps(fields), now)) == [A.OpenSession]
    out = s.opened(CACHED, FakeStream() if resynth else None, now)
    ready = sent(out)[0]
    assert isinstance(ready, P.Ready) and ready.resume_token and ready.resume_grace_s == 30.0
    assert A.Register(ready.listen_token, ready.resume_token) in out
    return s, ready


def resume_msg(token: str, next_seq: int, audio_samples: int = 0, **extra) -> P.Resume:
    msg = P.parse_client_message(json.dumps({"type": "resume", "token": token, "next_seq": next_seq,
                                             "audio_samples": audio_samples, **extra}))  # fmt: skip
    assert isinstance(msg, P.Resume)
    return msg


def audio(seq: int, n: int) -> AudioEvent:
    return AudioEvent(seq=seq, pcm=np.full(n, 0.01 * (seq + 1), np.float32), start_s=0.0, units_done=seq, lag_s=0.0)


class ModelClient:
    """What a client receives: units (by seq) and audio (by sample), checked contiguous as they arrive."""

    def __init__(self) -> None:
        self.units: list[int] = []
        self.audio = np.zeros(0, np.float32)
        self.acked = 0
        self.ended = False

    def take(self, actions: list) -> None:
        for m in sent(actions):
            if isinstance(m, P.Unit):
                assert m.seq == len(self.units), f"unit seq {m.seq} after {len(self.units)} units"
                self.units.append(m.unit)
            elif isinstance(m, bytes):
                chunk = P.decode_audio_chunk(m)
                assert chunk.start_sample == len(self.audio)
                self.audio = np.concatenate([self.audio, chunk.samples])
            elif isinstance(m, P.Ack):
                self.acked = m.samples
            elif isinstance(m, P.EndMessage):
                self.ended = True


def test_ready_offers_no_resume_when_disabled_or_transmitting():
    for config, fields in (({"resume_grace_s": 0}, {}), ({}, {"transmit": {"coder": "uniform"}})):
        s = Session("s1", ServerConfig(stats_interval_s=1000.0, **config), SERVER, now=0.0)
        s.receive_text(json.dumps({"type": "start", "sample_rate": SR, **fields}), 0.0)
        ready = sent(s.opened(CACHED, None, 0.0))[0]
        assert ready.resume_token is None and ready.resume_grace_s == 0.0
        assert s.transport_lost(False, 1.0) != [] or s.state == State.GONE  # not parked: released at once
        assert s.state == State.GONE and s.parked is None


def test_park_replay_and_resume_lose_and_repeat_nothing():
    s, ready = resumable()
    client = ModelClient()
    s.receive_binary(pcm(1.0), 0.1)
    out = s.encoder_events([unit(i, 5 * (i + 1)) for i in range(6)], s.progress, 0.2)
    client.take(out[:3 * 2])  # the cut: the client got units 0..2 (a unit's Send, then its Relay)
    assert [type(a) for a in out[:6]] == [A.Send, A.Relay] * 3
    assert s.transport_lost(False, 0.3) == [] and s.parked is not None and s.state == State.STREAMING
    # While parked the encoder goes on; nothing is sent, the units wait.
    assert not any(isinstance(a, A.Send) for a in s.encoder_events([unit(i, 5 * (i + 1)) for i in range(6, 9)],
                                                                   s.progress, 1.0))  # fmt: skip
    assert s.next_deadline() == pytest.approx(30.3)
    out = s.resume(resume_msg(ready.resume_token, next_seq=3), 2.0)
    first = sent(out)[0]
    assert first == P.Resumed(samples=SR, next_seq=3) and s.parked is None
    client.take(out)
    assert client.units == [i % 7 for i in range(9)]
    # Streaming goes on over the new transport: the resent audio, more units, end.
    assert kinds(s.receive_binary(pcm(0.5), 2.1)) == [A.FeedAudio]
    client.take(s.encoder_events([unit(9, 50), end_event(60, 10)], s.progress, 2.2))
    assert client.units == [i % 7 for i in range(10)] and client.ended and client.acked == SR * 3 // 2
    assert s.metrics.resumes_total._value.get() == 1


def test_audio_replays_from_the_clients_sample():
    s, ready = resumable(resynth=True)
    client = ModelClient()
    out = s.resynth_events([audio(0, 480), audio(1, 240)], None, 0.1)
    client.take(out[:1])  # the first chunk arrived, the second was lost
    s.transport_lost(False, 0.2)
    assert s.resynth_events([audio(2, 720)], None, 0.3) == []  # parked: kept
    client.take(s.resume(resume_msg(ready.resume_token, next_seq=0, audio_samples=480), 1.0))
    assert len(client.audio) == 480 + 240 + 720
    ref = np.concatenate([P.decode_audio_chunk(s.report.audio_chunk(audio(i, n))).samples
                          for i, n in ((0, 480), (1, 240), (2, 720))])  # fmt: skip
    np.testing.assert_array_equal(client.audio, ref)


def test_a_chunk_the_client_has_part_of_is_cut_at_its_sample():
    s, ready = resumable(resynth=True)
    s.resynth_events([audio(0, 480)], None, 0.1)
    s.transport_lost(False, 0.2)
    out = s.resume(resume_msg(ready.resume_token, next_seq=0, audio_samples=100), 1.0)
    chunk = P.decode_audio_chunk(sent(out)[1])
    assert chunk.start_sample == 100 and len(chunk.samples) == 380 and chunk.seq == 0


def test_the_grace_period_ends_a_parked_session_and_releases_it():
    s, ready = resumable()
    s.receive_binary(pcm(0.5), 0.1)
    s.transport_lost(False, 1.0)
    assert s.tick(30.9) == [] and s.state == State.STREAMING  # within the grace period: no idle rule either
    out = s.tick(31.0)
    assert A.CancelSlot() in out and s.state == State.GONE and s.outcome == "resume_expired"
    assert s.resume_refusal(resume_msg(ready.resume_token, 0)) is not None
    assert s.metrics.parks_expired_total.labels("resume_expired")._value.get() == 1


def test_a_session_that_ends_while_parked_replays_its_end_and_close():
    s, ready = resumable()
    s.receive_binary(pcm(0.5), 0.1)
    s.receive_text('{"type":"end"}', 0.2)
    s.transport_lost(False, 0.3)  # the end reached the server, its answer did not reach the client
    out = s.encoder_events([unit(0, 5), unit(1, 10), end_event(12, 2)], s.progress, 0.5)
    assert kinds(out) == [A.Relay, A.Relay, A.ListenersDone]  # listeners are served; nothing is sent
    assert s.state == State.CLOSED and s.parked is not None and s.next_deadline() == pytest.approx(30.3)
    client = ModelClient()
    out = s.resume(resume_msg(ready.resume_token, 0), 1.0)
    client.take(out)
    assert client.units == [0, 1] and client.ended and out[-1] == A.Close(P.CLOSE_NORMAL, "end")
    assert client.acked == SR // 2  # the ack before end


def test_an_end_lost_with_its_connection_is_sent_again():
    s, ready = resumable()
    s.receive_binary(pcm(0.5), 0.1)
    s.receive_text('{"type":"end"}', 0.2)
    out = s.encoder_events([unit(0, 5), end_event(12, 1)], s.progress, 0.5)
    assert s.state == State.CLOSED and isinstance(sent(out)[-1], P.EndMessage)
    s.transport_lost(False, 0.6)  # the end and the close never arrived
    client = ModelClient()
    out = s.resume(resume_msg(ready.resume_token, 1), 1.0)
    client.take(out)
    assert client.ended and client.units == [] and out[-1] == A.Close(P.CLOSE_NORMAL, "end")


def test_a_clean_close_or_a_listener_is_not_parked():
    s, _ = resumable()
    assert A.CancelSlot() in s.transport_lost(True, 1.0) and s.state == State.GONE


def test_outbox_overflow_ends_the_parked_session():
    s, ready = resumable(resume_outbox_bytes=1000)
    s.receive_binary(pcm(1.0), 0.1)
    s.transport_lost(False, 0.2)
    out: list = []
    for i in range(20):  # each unit message is ~150 bytes
        out += s.encoder_events([unit(i, 5 * (i + 1))], s.progress, 0.3)
        if s.state == State.GONE:
            break
    assert s.state == State.GONE and s.outcome == "resume_outbox_full" and A.CancelSlot() in out
    assert 5 <= i <= 7 and not any(isinstance(a, A.Send) for a in out)
    assert s.resume_refusal(resume_msg(ready.resume_token, 0)) is not None


def test_the_replay_log_is_bounded_and_refuses_what_fell_off():
    s, ready = resumable(resume_outbox_bytes=1000)
    s.encoder_events([unit(i, 5 * (i + 1)) for i in range(20)], s.progress, 0.3)
    assert s.replay is not None and s.replay.nbytes <= 1000 and s.replay.units_from > 10
    assert "next_seq 0" in s.resume_refusal(resume_msg(ready.resume_token, 0))
    assert "next_seq 21" in s.resume_refusal(resume_msg(ready.resume_token, 21))  # beyond what was sent
    assert s.resume_refusal(resume_msg(ready.resume_token, 20)) is None
    assert "audio_samples" in s.resume_refusal(resume_msg(ready.resume_token, 20, audio_samples=1))
    assert "resend_from" in s.resume_refusal(resume_msg(ready.resume_token, 20, resend_from=1))


def test_takeover_of_a_connected_session_replays_from_the_clients_offsets():
    s, ready = resumable()
    s.receive_binary(pcm(0.5), 0.1)
    s.encoder_events([unit(i, 5 * (i + 1)) for i in range(4)], s.progress, 0.2)
    out = s.resume(resume_msg(ready.resume_token, next_seq=2), 0.3)  # not parked: the old transport is dropped
    assert [m.seq for m in sent(out) if isinstance(m, P.Unit)] == [2, 3]
    assert sent(out)[0].samples == SR // 2 and s.state == State.STREAMING and s.outgoing_bytes == 0


def test_resent_overlap_is_dropped_by_sample_offset():
    s, ready = resumable()
    s.receive_binary(pcm(1.0), 0.1)
    s.transport_lost(False, 0.2)
    s.resume(resume_msg(ready.resume_token, 0, resend_from=SR // 2), 0.3)  # it resends from 0.5 s: 0.5 s overlap
    assert s.receive_binary(pcm(0.25), 0.4) == []  # all overlap
    out = s.receive_binary(pcm(0.5), 0.5)
    assert [len(a.samples) for a in out if isinstance(a, A.FeedAudio)] == [SR // 4]
    assert s.received_samples == SR + SR // 4


def test_acks_at_most_every_quarter_second():
    s, _ = resumable()
    s.receive_binary(pcm(0.1), 0.0)
    assert sent(s.tick(0.25)) == [P.Ack(samples=1600)]
    s.receive_binary(pcm(0.1), 0.3)
    assert s.next_deadline() == pytest.approx(0.5) and s.tick(0.4) == []
    assert sent(s.tick(0.5)) == [P.Ack(samples=3200)] and s.tick(0.9) == []  # nothing new: no ack


def test_a_resume_connection_gets_resume_failed_or_hands_over():
    b = Session("s2", ServerConfig(), SERVER, now=0.0)
    out = b.receive_text(json.dumps({"type": "resume", "token": "x", "next_seq": 0}), 0.1)
    assert out == [A.Resume(P.Resume(token="x", next_seq=0))]
    out = b.resume_failed("no session with that resume token", 0.1)
    assert codes(out) == [E.RESUME_FAILED.value] and errors(out)[0].fatal
    assert out[-1] == A.Close(P.CLOSE_POLICY, E.RESUME_FAILED.value)
    c = Session("s3", ServerConfig(), SERVER, now=0.0)
    c.receive_text(json.dumps({"type": "resume", "token": "x", "next_seq": 0}), 0.1)
    assert c.handed_over(0.1) == [] and c.state == State.GONE and c.outcome == "handed_over"


@pytest.mark.parametrize("fields", [{"token": "t" * 65, "next_seq": 0}, {"token": "t", "next_seq": -1},
                                    {"token": "t"}, {"token": "t", "next_seq": 0, "audio_samples": 2**53},
                                    {"token": 5, "next_seq": 0}, {"token": "t", "next_seq": 0, "extra": 1}])  # fmt: skip
def test_bad_resume_messages_are_refused_unread(fields):
    s = Session("s2", ServerConfig(), SERVER, now=0.0)
    assert codes(s.receive_text(json.dumps({"type": "resume", **fields}), 0.1)) == [E.BAD_MESSAGE.value]


def test_a_resume_only_connection_cannot_start():
    s = Session("s2", ServerConfig(), SERVER, now=0.0, resume_only=True)
    out = s.receive_text(json.dumps({"type": "start", "sample_rate": SR}), 0.1)
    assert codes(out) == [E.BUSY.value] and out[-1] == A.Close(P.CLOSE_TRY_AGAIN, E.BUSY.value)


def test_draining_ends_a_parked_session_at_once():
    s, _ = resumable()
    s.transport_lost(False, 0.2)
    assert A.CancelSlot() in s.shutdown(0.3) and s.state == State.GONE and s.outcome == E.SHUTTING_DOWN.value


# --- the client's side (client/reconnect.py) ---------------------------------------------------------------------


def test_retained_audio_keeps_what_is_not_acked_within_its_bound():
    from dpslm_stream.client.reconnect import RetainedAudio

    signal = np.arange(1000, dtype=np.float32)
    kept = RetainedAudio(max_samples=600)
    for i in range(0, 1000, 150):
        kept.add(signal[i : i + 150])
    assert (kept.start, kept.end) == (400, 1000)  # the oldest fell off the 600-sample bound
    assert kept.since(399) is None and kept.since(1001) is None
    np.testing.assert_array_equal(kept.since(420), signal[420:])
    kept.ack(700)
    assert kept.start == 700 and kept.since(650) is None
    np.testing.assert_array_equal(kept.since(700), signal[700:])
    assert len(kept.since(1000)) == 0


def test_backoff_grows_is_capped_and_jittered():
    import random

    from dpslm_stream.client.reconnect import backoff_delays

    delays = list(backoff_delays(8, first_s=0.1, max_s=1.0, rng=random.Random(1)))
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert len(delays) == 8 and all(c / 2 <= d <= c for d, c in zip(delays, caps))
    assert len(set(delays)) == 8
