"""Encoder sessions and the batched worker (dpslm_stream.stream.session / worker) on the tiny random-weight set.

Oracles: the offline `Pipeline.encode` (units, durations, log-probs), `ULM.loglikelihood` / `unit_logprobs` on the
committed units, the same sessions run one at a time, and a clean session fed only the valid chunks.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpslm_stream import hub
from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.pipeline import Pipeline, bitrate
from dpslm_stream.stream.events import EndEvent, UnitEvent
from dpslm_stream.stream.worker import EncoderWorker
from dpslm_stream.tiny import speech_like

K, LMBDA = 500, 4500


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    return hub.ModelSet("tiny")


@pytest.fixture(scope="module")
def worker(models, device):
    """The worker under test, on the test device (DPSLM_TEST_DEVICE); the ULM oracles of the score tests run on the
    CPU."""
    return EncoderWorker(models, device, pairs=[(K, LMBDA), (100, 600)])


@pytest.fixture(scope="module")
def pipe(models, device):
    """The offline reference on the same device (units: DPDP's margins; features: same kernels)."""
    return Pipeline(models, K, LMBDA, device)


_audio_cache: dict = {}
_offline_cache: dict = {}


def audio(seconds: float, sr: int, seed: int) -> np.ndarray:
    key = (seconds, sr, seed)
    if key not in _audio_cache:
        _audio_cache[key] = speech_like(seconds, sr, seed=seed)
    return _audio_cache[key]


def offline(pipe, seconds, sr, seed):
    key = (seconds, sr, seed)
    if key not in _offline_cache:
        _offline_cache[key] = pipe.encode(audio(seconds, sr, seed), sr)
    return _offline_cache[key]


def feed(worker, session, wav, sizes, step_every=1):
    """Push wav in chunks of the given sizes (cycled), stepping after every `step_every` chunks; then end."""
    pos, i, events = 0, 0, []
    while pos < len(wav):
        n = sizes[i % len(sizes)]
        session.push(wav[pos : pos + n])
        pos += n
        i += 1
        if i % step_every == 0:
            worker.step([session])
            events += session.poll()
    session.end()
    worker.step([session])
    events += session.poll()
    assert session.closed and isinstance(events[-1], EndEvent)
    return events[:-1], events[-1]


def check_segmentation(units: list[UnitEvent], end: EndEvent):
    """Events in order, contiguous from frame 0 to the last frame, deduplicated, times consistent."""
    assert [e.seq for e in units] == list(range(len(units)))
    assert end.units == len(units)
    if units:
        assert units[0].start_frame == 0 and units[-1].end_frame == end.frames
    for a, b in zip(units, units[1:]):
        assert a.end_frame == b.start_frame and a.unit != b.unit
        assert a.commit_audio_s <= b.commit_audio_s
    for e in units:
        assert e.end_frame > e.start_frame
        assert e.start_s == pytest.approx(e.start_frame * 0.02) and e.end_s == pytest.approx(e.end_frame * 0.02)
        assert e.commit_audio_s >= e.end_s - 1e-9  # nothing is committed before its audio arrived


# ----------------------------------------------------------------------------------------------------------------
# Offline = streaming fed once


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sr=st.sampled_from([16000, 44100, 8000]), seed=st.integers(0, 1),
       sizes=st.lists(st.integers(1, 20000), min_size=1, max_size=5), step_every=st.integers(1, 4))  # fmt: skip
def test_full_mode_gives_the_offline_units_for_any_chunking(worker, pipe, sr, seed, sizes, step_every):
    ref = offline(pipe, 2.5, sr, seed)
    wav = audio(2.5, sr, seed)
    sizes = [max(s, 50) for s in sizes]
    session = worker.open_session(sr, K, LMBDA, mode="full", score=True)
    units, end = feed(worker, session, wav, sizes, step_every)
    check_segmentation(units, end)
    assert [e.unit for e in units] == ref.units
    assert [e.duration for e in units] == ref.durations
    assert [e.start_frame for e in units] == ref.starts
    np.testing.assert_allclose([e.logprob for e in units], ref.unit_logprobs, rtol=1e-5, atol=1e-4)
    assert end.seconds == pytest.approx(ref.seconds)
    assert end.frames == ref.num_frames
    assert end.bitrate == pytest.approx(bitrate([ref.units], ref.seconds))
    assert end.loglikelihood == pytest.approx(ref.loglikelihood, rel=1e-5)


def test_full_mode_end_runs_in_slices_beside_a_live_session_and_still_gives_the_offline_units(models, pipe, device,
                                                                                              monkeypatch):
    from dpslm_stream.models import wavlm as W

    # Blocks shrunk so that 8 s take the long-input path (dense only up to 150 frames), as 30 s+ do by default.
    monkeypatch.setattr(W, "ATTENTION_ELEMENTS", 4 * 150 * 150)
    monkeypatch.setattr(W, "ROW_BLOCK", 64)
    worker = EncoderWorker(models, device, pairs=[(K, LMBDA)])
    ref = pipe.encode(audio(8.0, 16000, 3), 16000)
    bulk = worker.open_session(16000, K, LMBDA, mode="full")
    bulk.push(audio(8.0, 16000, 3))
    bulk.end()
    live = worker.open_session(16000, K, LMBDA, mode="cached")
    speech = audio(6.0, 16000, 4)
    events, live_events, steps = [], [], 0
    for i in range(0, len(speech), 3200):  # 200 ms per step, while the full-mode session finishes
        live.push(speech[i : i + 3200])
        worker.step([bulk, live], full_slice_s=0.0)  # one slice per step
        events += bulk.poll()
        live_events += live.poll()
        steps += 1
    assert not bulk.closed and len(live_events) > 5  # the live session got its units meanwhile
    live.end()
    while not (bulk.closed and live.closed) and steps < 2000:
        worker.step([bulk, live], full_slice_s=0.0)
        events += bulk.poll()
        steps += 1
    assert bulk.closed and steps > 11 * 4  # at least one step per layer and attention block
    units, end = events[:-1], events[-1]
    check_segmentation(units, end)
    assert [e.unit for e in units] == ref.units and [e.duration for e in units] == ref.durations


def test_sessions_read_time_from_the_injected_clock(models, device):
    """A worker's clock reaches its sessions: full mode's slice budget is measured on it. A clock that jumps 10 s
    per reading makes a 5 s budget run one slice per step, exactly as a zero budget does on the real clock."""

    def steps_to_finish(worker, budget_s):
        s = worker.open_session(16000, K, LMBDA, mode="full")
        s.push(audio(2.0, 16000, 5))
        s.end()
        steps = 0
        while not s.closed and steps < 500:
            worker.step([s], full_slice_s=budget_s)
            steps += 1
        return steps, s

    ticks = iter(range(0, 10**9, 10))
    jumpy = EncoderWorker(models, device, pairs=[(K, LMBDA)], clock=lambda: float(next(ticks)))
    real = EncoderWorker(models, device, pairs=[(K, LMBDA)])
    (n_jumpy, s), (n_zero, _), (n_real, _) = (steps_to_finish(jumpy, 5.0), steps_to_finish(real, 0.0),
                                              steps_to_finish(real, 5.0))  # fmt: skip
    assert s.clock is jumpy.clock and n_jumpy == n_zero > n_real == 1


@pytest.mark.parametrize("sr", [16000, 22050])
def test_sliding_and_cached_reduce_to_offline_when_the_window_covers_the_input(worker, pipe, sr):
    ref = offline(pipe, 3.0, sr, 2)
    wav = audio(3.0, sr, 2)
    n = 10**4  # frames: more than the whole input
    for kwargs in (dict(mode="sliding", left=n, hop=10, lookahead=n), dict(mode="cached", left=4, hop=10, lookahead=n)):
        session = worker.open_session(sr, K, LMBDA, **kwargs)
        units, end = feed(worker, session, wav, [3001, 777])
        check_segmentation(units, end)
        assert [e.unit for e in units] == ref.units, kwargs
        assert [e.duration for e in units] == ref.durations, kwargs


# ----------------------------------------------------------------------------------------------------------------
# Streaming behaviour


@pytest.mark.parametrize("mode", ["sliding", "cached"])
def test_windowed_sessions_commit_while_audio_arrives(worker, mode):
    wav = audio(4.0, 16000, 0)
    session = worker.open_session(16000, K, LMBDA, mode=mode, preset="low-latency")
    committed_before_end = 0
    for pos in range(0, len(wav), 320):  # 20 ms chunks
        session.push(wav[pos : pos + 320])
        worker.step([session])
        committed_before_end += len(session.poll())
    assert committed_before_end > 0
    units, end = feed(worker, session, np.zeros(0, np.float32), [1])
    assert end.units >= committed_before_end
    stats = session.stats
    assert stats.units == end.units and stats.hops > 0 and stats.backlog_seconds == 0
    assert stats.commit_lag_max_s < 4.0


@pytest.mark.parametrize("mode", ["sliding", "cached"])
def test_the_front_end_runs_once_per_hop_however_small_the_chunks(worker, mode, monkeypatch):
    """20 ms chunks with a step after each: the conv stack runs when a hop needs its frames, over all of them in one
    pass, not once per chunk; the units equal those of a session stepped once at the end."""
    wav = audio(3.0, 16000, 3)
    session = worker.open_session(16000, K, LMBDA, mode=mode, preset="low-latency")
    frontend = session._frontend
    passes = []
    compute = frontend._compute
    monkeypatch.setattr(frontend, "_compute", lambda count: passes.append(count) or compute(count))
    hop, lookahead = session.config.hop, session.config.lookahead
    for pos in range(0, len(wav), 320):
        session.push(wav[pos : pos + 320])
        worker.step([session])
        # Each hop runs in the step where its last frame became complete (frame t needs samples up to 320 t + 360).
        frames = max(0, (40 + pos + 320 - 400) // 320 + 1)
        assert session.stats.hops == max(0, (frames - lookahead) // hop)
    units, _ = feed(worker, session, np.zeros(0, np.float32), [1])
    assert session.stats.hops >= 10
    assert len(passes) <= session.stats.hops + 1  # one per hop, plus the flush
    assert all(count >= hop for count in passes[1:-1])
    assert sum(passes) == len(wav) // 320
    whole = worker.open_session(16000, K, LMBDA, mode=mode, preset="low-latency")
    assert [e.unit for e in units] == [e.unit for e in feed(worker, whole, wav, [len(wav)])[0]]
    # Every session runs the worker's one packed conv stack: opening a session packs no weights.
    assert session._frontend.kernels is whole._frontend.kernels is worker.frontend


def test_scores_are_per_unit_logprobs_that_sum_to_the_loglikelihood(worker, models):
    ulm, tokenizer = models.ulm(K, LMBDA)
    wav = audio(4.0, 16000, 1)
    session = worker.open_session(16000, K, LMBDA, mode="cached", score=True)
    units, end = feed(worker, session, wav, [1600])  # 0.1 s chunks: many small scoring blocks
    ids = tokenizer.encode([e.unit for e in units])
    lps = [e.logprob for e in units]
    assert len(units) > 20
    np.testing.assert_allclose(lps, ulm.unit_logprobs(ids).numpy(), rtol=1e-5, atol=1e-4)
    assert sum(lps) == pytest.approx(ulm.loglikelihood(ids), rel=1e-5)
    assert end.loglikelihood == pytest.approx(sum(lps))


def test_bounded_score_context_is_exact_until_it_fills(worker, models):
    ulm, tokenizer = models.ulm(K, LMBDA)
    wav = audio(4.0, 16000, 1)
    session = worker.open_session(16000, K, LMBDA, mode="cached", score=True, score_context=8)
    units, _ = feed(worker, session, wav, [1600])
    exact = ulm.unit_logprobs(tokenizer.encode([e.unit for e in units])).numpy()
    lps = np.array([e.logprob for e in units])
    np.testing.assert_allclose(lps[:8], exact[:8], rtol=1e-5, atol=1e-4)
    assert np.abs(lps[8:] - exact[8:]).max() > 1e-3  # later units no longer see BOS and the oldest units


def test_batched_sessions_and_a_session_that_fell_behind_match_separate_runs(worker):
    waves = [audio(3.0, 16000, s) for s in (0, 1, 2)]
    alone = []
    for wav in waves:
        session = worker.open_session(16000, K, LMBDA, mode="cached")
        alone.append([e.unit for e in feed(worker, session, wav, [640])[0]])
    # Three sessions stepped together (equal window shapes: one forward per step for all three) ...
    sessions = [worker.open_session(16000, K, LMBDA, mode="cached") for _ in waves]
    events: list[list] = [[] for _ in waves]
    hops = []
    for pos in range(0, len(waves[0]), 640):
        for s, wav in zip(sessions, waves):
            s.push(wav[pos : pos + 640])
        hops.append(worker.step(sessions))
    for s in sessions:
        s.end()
    worker.step(sessions)
    for i, s in enumerate(sessions):
        events[i] = [e.unit for e in s.poll() if isinstance(e, UnitEvent)]
    assert events == alone
    assert max(hops) >= 3
    # ... and one session that pushed everything before its first step (pending hops share forwards).
    late = worker.open_session(16000, K, LMBDA, mode="cached")
    late.push(waves[1])
    assert worker.step([late]) == worker.max_hops_per_step
    late.end()
    worker.run_until_idle([late])
    assert [e.unit for e in late.poll() if isinstance(e, UnitEvent)] == alone[1]


def test_sessions_behind_by_different_amounts_share_forwards_one_hop_each(worker, monkeypatch):
    """Two sessions past their cache warm-up, then 1 s and 0.4 s pending: while both have hops ready, every forward
    takes one hop of each (equal shapes, one forward); the one further behind then runs its rest alone. Units as
    when run separately."""
    waves = [audio(6.0, 16000, s) for s in (4, 5)]
    alone = [[e.unit for e in feed(worker, worker.open_session(16000, K, LMBDA, mode="cached"), w, [3200])[0]]
             for w in waves]  # fmt: skip
    sessions = [worker.open_session(16000, K, LMBDA, mode="cached") for _ in waves]
    warm = 3 * 16000  # past the 2.5 s cache warm-up, stepped in lockstep
    for pos in range(0, warm, 3200):
        for s, w in zip(sessions, waves):
            s.push(w[pos : pos + 3200])
        worker.step(sessions)
    forwards: list[list[int]] = []
    run = worker.runner.run
    monkeypatch.setattr(worker.runner, "run", lambda plans: forwards.append([p.hops for p in plans]) or run(plans))
    sessions[0].push(waves[0][warm : warm + 16000])
    sessions[1].push(waves[1][warm : warm + 6400])
    worker.step(sessions)
    shared = [f for f in forwards if len(f) == 2]
    assert len(shared) >= 2 and all(f == [1, 1] for f in shared)
    assert [f for f in forwards if len(f) == 1] and max(map(max, forwards)) > 1  # the rest alone, several at once
    for s, w, start in zip(sessions, waves, (warm + 16000, warm + 6400)):
        s.push(w[start:])
        s.end()
    worker.run_until_idle(sessions)
    assert [[e.unit for e in s.poll() if isinstance(e, UnitEvent)] for s in sessions] == alone


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error or a defined no-op, and the session stays usable


def test_bad_chunks_raise_and_leave_the_session_usable(worker):
    wav = audio(2.0, 16000, 3)
    clean = worker.open_session(16000, 100, 600, mode="cached")
    expected, _ = feed(worker, clean, wav, [999])
    session = worker.open_session(16000, 100, 600, mode="cached")
    bad = [
        np.array([0.1, np.nan], np.float32), np.array([np.inf], np.float32), np.array([1, 2], np.int16),
        np.zeros((2, 100), np.float32), [0.0, 0.1], np.array([0.5j]), torch.tensor([1, 2]), np.float32(0.3),
    ]  # fmt: skip
    got, pos, i = [], 0, 0
    while pos < len(wav):
        with pytest.raises(InvalidInput):
            session.push(bad[i % len(bad)])
        session.push(np.zeros(0, np.float32))  # an empty chunk is a no-op
        session.push(wav[pos : pos + 999])
        worker.step([session])
        got += session.poll()
        pos += 999
        i += 1
    session.end()
    worker.step([session])
    got += session.poll()
    assert [e.unit for e in got if isinstance(e, UnitEvent)] == [e.unit for e in expected]
    with pytest.raises(InvalidInput, match="ended"):
        session.push(wav[:100])  # after the end
    assert worker.step([session]) == 0 and session.poll() == []  # a closed session is left alone
    session.reset()  # ... and can start over
    units, end = feed(worker, session, wav, [4000])
    assert [e.unit for e in units] == [e.unit for e in expected]


@pytest.mark.parametrize("mode", ["full", "sliding", "cached"])
def test_streams_shorter_than_one_frame_end_with_no_units(worker, mode):
    for n, sr in ((0, 16000), (319, 16000), (159, 8000), (870, 44100)):
        session = worker.open_session(sr, K, LMBDA, mode=mode, score=True)
        units, end = feed(worker, session, audio(1.0, sr, 0)[:n], [7])
        assert units == [] and end.units == 0 and end.frames == 0 and end.bitrate == 0.0
        assert end.seconds == pytest.approx(n / sr)


@pytest.mark.parametrize("kwargs, error", [
    (dict(sample_rate=7999), InvalidInput), (dict(sample_rate=48001), InvalidInput),
    (dict(sample_rate=16000.0), InvalidInput), (dict(sample_rate="16000"), InvalidInput),
    (dict(k=300, lmbda=600), UnknownModel), (dict(k=500, lmbda=4501), UnknownModel),
    (dict(k=200, lmbda=700), UnknownModel),  # released, but not in this worker's set
    (dict(mode="streaming"), InvalidInput), (dict(preset="fast"), InvalidInput), (dict(hop=0), InvalidInput),
    (dict(left=-3), InvalidInput), (dict(score="yes"), InvalidInput), (dict(max_lag=0), InvalidInput),
    (dict(score_context=0), InvalidInput),
])  # fmt: skip
def test_open_session_validates_everything(worker, kwargs, error):
    args = dict(sample_rate=16000, k=K, lmbda=LMBDA)
    args.update(kwargs)
    with pytest.raises(error) as info:
        worker.open_session(**args)
    assert len(str(info.value)) > 20  # says what was wrong and what is expected


def test_session_accepts_every_integer_rate_in_range(worker):
    for sr in (8000, 11025, 12345, 48000):
        session = worker.open_session(sr, 100, 600, mode="cached", hop=25, lookahead=2)
        units, end = feed(worker, session, audio(1.0, sr, 4), [4321])
        check_segmentation(units, end)
        assert end.frames == (-(-len(audio(1.0, sr, 4)) * 16000 // sr)) // 320
