"""Live resynthesis: incremental ELLA-V (re-prompting over a sliding window), incremental vocoder, batched worker.

Oracles: offline greedy generation (`Pipeline.resynthesize`, `ELLAV.generate_tokens`), a slow re-implementation of
the sliding-window schedule written here on top of `generate_tokens`, the whole-sequence iSTFT of window spectra
built here, and each session run alone against the same session run in a batch.
"""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dpslm_stream.audio import load_audio
from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.models import ellav as E
from dpslm_stream.models import wavtokenizer as W
from dpslm_stream.pipeline import Pipeline
from dpslm_stream.stream.ellav_stage import IncrementalELLAV
from dpslm_stream.stream.resynth_events import AudioEvent, ResynthEndEvent
from dpslm_stream.stream.resynth_worker import ResynthWorker

K, LMBDA = 500, 4500
EOP = 2
HOP = 600
M = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ellav64(device) -> E.ELLAV:
    """Tiny random ELLA-V in float64 (exact comparisons across batch shapes). A random model almost never emits EOP,
    so every unit would get the capped M+1 tokens; a bias on the EOP logit makes durations vary from 0 to M+1."""
    torch.manual_seed(0)
    model = E.random_model(K, E.TINY).to(device, torch.float64)  # on the test device (DPSLM_TEST_DEVICE)
    with torch.no_grad():
        model.output.bias[EOP] = 1.4
    return model


@pytest.fixture(scope="module")
def wt(device) -> W.WavTokenizer:
    """Tiny random WavTokenizer. Its codebook is randomised too: a fresh model's codebook buffer is zeros, which
    would make every code decode alike and every audio comparison here blind to the codes."""
    torch.manual_seed(0)
    model = W.WavTokenizer(W.TINY).eval()
    with torch.no_grad():
        for layer in model.feature_extractor.encodec.quantizer.vq.layers:
            layer._codebook.embed.normal_()
    return model.to(device)


def dedup(units):
    return [u for i, u in enumerate(units) if i == 0 or u != units[i - 1]]


def random_units(n, seed):
    rng = random.Random(seed)
    return dedup([rng.randrange(K) for _ in range(n)])


def make_worker(tiny_models, ellav64, wt, **kwargs) -> ResynthWorker:
    return ResynthWorker(tiny_models, ellav64.device, dtype=torch.float64, pairs=[(K, LMBDA)],
                         ellavs={(K, LMBDA): ellav64}, wavtokenizer=wt, **kwargs)  # fmt: skip


def record_codes(session) -> list[int]:
    """Spy on the codes the session hands to its vocoder."""
    codes, add = [], session.vocoder.add

    def spy(c):
        codes.extend(c.tolist())
        return add(c)

    session.vocoder.add = spy
    return codes


def audio_of(events) -> np.ndarray:
    chunks = [e.pcm for e in events if isinstance(e, AudioEvent)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def feed(worker, session, units, chunk=1, steps_between=1):
    for i in range(0, len(units), chunk):
        session.push_units(units[i : i + chunk])
        for _ in range(steps_between):
            worker.step([session])


def offline_codes(model, units):
    codes, finished = model.generate_ids([units], 10_000, M, 1.0, 0.0)
    assert finished == [True]
    return codes[0]


# ----- exactness: the reductions to offline generation ------------------------------------------------------------


@pytest.mark.parametrize("first_holdback", [None, 0])
def test_unlimited_context_equals_offline_greedy_pipeline(tiny_models, device, first_holdback):
    """Acceptance: C = L = None -> the streamed codec ids and audio are the offline Pipeline.resynthesize output
    (first_holdback, the first unit's early commit, does not apply without a bounded hold-back)."""
    units = random_units(24, seed=1)
    units_with_repeats = units[:5] + [units[4]] + units[5:]  # a repeat across a push boundary merges, as offline
    worker = ResynthWorker(tiny_models, device, pairs=[(K, LMBDA)])
    s = worker.open_session(K, LMBDA, left_context=None, holdback=None, first_holdback=first_holdback,
                            max_pass_units=None, vocoder_left_context=None, vocoder_lookahead=10**6)  # fmt: skip
    codes = record_codes(s)
    u = units_with_repeats
    for part in (u[:5], u[5:6], [], u[6:13], u[13:]):
        s.push_units(part)
        worker.step([s])
        assert s.poll() == []  # unlimited hold-back: nothing is final before end()
    s.end()
    worker.run_until_idle([s])
    events = s.poll()
    wav, offline, finished = Pipeline(tiny_models, K, LMBDA, device).resynthesize(units)[0]
    assert finished and len(offline) > 0
    assert codes == offline
    end = events[-1]
    assert isinstance(end, ResynthEndEvent) and end.error is None and end.units == len(units)
    assert end.codec_frames == len(offline) and end.passes == 1
    np.testing.assert_allclose(audio_of(events), wav[0].cpu().numpy(), rtol=0, atol=1e-6 * float(wav.abs().max()))


SAMPLE = Path(__file__).parents[1] / "dpslm_stream" / "data" / "sample.wav"


@pytest.fixture(scope="module")
def long_speech_units(tiny_models):
    """Units of the bundled speech sample played twice (14.6 s, > 200 deduplicated units)."""
    wav, sr = load_audio(SAMPLE)
    units = Pipeline(tiny_models, K, LMBDA).encode(np.concatenate([wav, wav]), sr, score=False).units
    assert len(units) >= 200
    return units


def test_exact_settings_equal_offline_on_long_speech(tiny_models, long_speech_units, device):
    """Acceptance at length: 14.6 s of speech (> 200 units, far more than the default max_pass_units), the exact
    settings with every other option at its default (as the server passes them), units arriving in pushes with
    steps in between: codec ids and audio are offline greedy resynthesis. (A pass prompt cut at max_pass_units
    units made every token differ from the first on.)"""
    units = long_speech_units
    pipe = Pipeline(tiny_models, K, LMBDA, device)
    (wav, offline, finished), = pipe.resynthesize(units)
    assert finished
    for max_batch in (1, 16):
        worker = ResynthWorker(tiny_models, device, pairs=[(K, LMBDA)], max_batch=max_batch)
        s = worker.open_session(K, LMBDA, left_context=None, holdback=None, vocoder_left_context=None,
                                vocoder_lookahead=10**6)  # fmt: skip
        codes = record_codes(s)
        feed(worker, s, units, chunk=9)
        s.end()
        worker.run_until_idle([s])
        events = s.poll()
        assert codes == offline
        assert events[-1].error is None and events[-1].codec_frames == len(offline)
        np.testing.assert_allclose(audio_of(events), wav[0].cpu().numpy(), rtol=0, atol=1e-6 * float(wav.abs().max()))
    stage = IncrementalELLAV(pipe.ellav, left_context=None, holdback=None)
    assert stage.push(units[:100]) == [] and stage.push(units[100:]) + stage.flush() == offline


def test_reprompting_with_the_whole_unit_list_continues_offline_exactly(tiny_models, ellav64, wt):
    """All units known, hold-back 3: pass 1 commits all but the last 3 units, end() runs pass 2 from a prompt with
    the generated tokens teacher-forced. With C = None both passes see offline's prompt -> offline's tokens."""
    units = random_units(30, seed=2)
    worker = make_worker(tiny_models, ellav64, wt)
    s = worker.open_session(K, LMBDA, left_context=None, holdback=3, max_pass_units=None)
    codes = record_codes(s)
    s.push_units(units)
    worker.run_until_idle([s])
    assert s.ellav.committed == len(units) - 3 and s.ellav.passes == 1
    s.end()
    worker.run_until_idle([s])
    assert s.ellav.passes == 2
    assert codes == offline_codes(ellav64, units)
    # the standalone stage gives the same
    stage = IncrementalELLAV(ellav64, left_context=None, holdback=3, max_pass_units=None)
    assert stage.push(units) + stage.flush() == codes


def test_end_during_a_pass_extends_it_to_the_last_unit(tiny_models, ellav64, wt):
    units = random_units(12, seed=3)
    worker = make_worker(tiny_models, ellav64, wt, max_decode_steps=1)
    s = worker.open_session(K, LMBDA, left_context=None, holdback=3, max_pass_units=None)
    codes = record_codes(s)
    s.push_units(units)
    worker.step([s])
    assert s.ellav.running
    s.end()
    worker.run_until_idle([s])
    assert s.ellav.passes == 1 and codes == offline_codes(ellav64, units)


def reference_sliding_window(model, units, C, L, first=None):
    """The schedule of one unit per push with a step to completion after each, written directly on generate_tokens:
    after n units are known, commit through unit n-1-L from the prompt [u_s..u_{n-1}] BOS (committed runs of
    u_s..u_{c-1}) u_c with s = max(0, c - C); at the end commit the rest. Returns the codec ids. `first`: the first
    unit is committed as soon as `first` units follow it (first_holdback)."""
    tok = model.tokenizer
    runs: list[list[int]] = []

    def commit(known, stop):
        c = len(runs)
        s = max(0, c - C)
        raw, _ = model.generate_tokens([units[s:known]], 10_000, M, 1.0, 0.0, token_prefix=[runs[s:c]])
        # Greedy generation is causal: the tokens of units c..stop do not depend on where generation stops.
        runs.extend(tok.split_units(raw[0], raw=True)[: stop - c + 1])

    for n in range(1, len(units) + 1):
        if n - 1 - L >= len(runs):
            commit(n, n - 1 - L)
        elif first is not None and not runs and n - 1 >= first:
            commit(n, 0)
    if len(runs) < len(units):
        commit(len(units), len(units) - 1)
    return [t - tok.first_codec_id for run in runs for t in run if t >= tok.first_codec_id]


@pytest.mark.parametrize("C,L,first", [(1, 0, None), (3, 2, None), (6, 1, None), (3, 2, 0), (4, 3, 1)])
def test_sliding_window_equals_reference_schedule(tiny_models, ellav64, wt, C, L, first):
    units = random_units(22, seed=10 + C)
    worker = make_worker(tiny_models, ellav64, wt)
    s = worker.open_session(K, LMBDA, left_context=C, holdback=L, first_holdback=first, max_pass_units=None)
    codes = record_codes(s)
    feed(worker, s, units)
    s.end()
    worker.run_until_idle([s])
    expected = reference_sliding_window(ellav64, units, C, L, first)
    assert codes == expected
    assert codes != offline_codes(ellav64, units)  # the window really changes what is generated
    assert s.ellav.passes == len(units) - L + (L > 0)  # an early first pass takes the place of unit 1's own
    if first == 0:  # the first unit's early commit changes its tokens here (it sees no later unit)
        assert expected != reference_sliding_window(ellav64, units, C, L)


# ----- the vocoder composition ------------------------------------------------------------------------------------


def test_audio_is_the_whole_sequence_istft_of_the_window_spectra(tiny_models, ellav64, wt):
    """Oracle written here: replay the code chunks the session gave its vocoder, take each committed frame's
    spectrum from its window [committed - C_v, received) decode, and run the whole-sequence iSTFT once."""
    units = random_units(20, seed=4)
    cv, rv, step, first_step = 6, 2, 3, 2
    worker = make_worker(tiny_models, ellav64, wt)
    s = worker.open_session(K, LMBDA, left_context=4, holdback=2, vocoder_left_context=cv, vocoder_lookahead=rv,
                            vocoder_min_step=step, vocoder_first_step=first_step)  # fmt: skip
    chunks, add = [], s.vocoder.add
    s.vocoder.add = lambda c: (chunks.append(c.clone()), add(c))[1]
    feed(worker, s, units, chunk=2)
    s.end()
    worker.run_until_idle([s])
    events = s.poll()
    codes = torch.cat(chunks)
    assert len(chunks) > 3

    frames, received, committed = [], 0, 0

    def commit(stop):
        nonlocal committed
        start = max(0, committed - cv)
        spec = W.spectra(wt, codes[None, None, start:received])
        frames.extend(spec[:, :, t - start] for t in range(committed, stop))
        committed = stop

    for c in chunks:
        received += len(c)
        if received - rv - committed >= (step if committed else first_step):  # the first window commits sooner
            commit(received - rv)
    commit(received)
    expected = W.istft(torch.stack(frames, dim=-1), wt.head.istft.window, HOP)[0].cpu().numpy()
    audio = audio_of(events)
    assert audio.shape == (HOP * len(codes),)
    np.testing.assert_allclose(audio, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_audio_arrives_before_end_and_ends_after_end(tiny_models, ellav64, wt):
    units = random_units(24, seed=5)
    worker = make_worker(tiny_models, ellav64, wt)
    s = worker.open_session(K, LMBDA, left_context=4, holdback=2)
    feed(worker, s, units[:16], chunk=4)
    early = s.poll()
    assert early and all(isinstance(e, AudioEvent) for e in early)  # audio before the stream ends, no end event
    assert 0 < early[-1].units_done < 16
    feed(worker, s, units[16:], chunk=4)
    s.end()
    worker.run_until_idle([s])
    events = early + s.poll()
    audio_events, end = events[:-1], events[-1]
    assert isinstance(end, ResynthEndEvent) and end.error is None and s.closed and not s.has_work
    assert all(isinstance(e, AudioEvent) for e in audio_events)
    assert [e.seq for e in audio_events] == list(range(len(audio_events))) == list(range(end.chunks))
    for a, b in zip(audio_events, audio_events[1:]):
        assert b.start_s == pytest.approx(a.end_s)  # contiguous, timestamped
    total = sum(e.num_samples for e in audio_events)
    assert total == HOP * end.codec_frames == HOP * s.ellav.codes_out
    assert end.audio_seconds == pytest.approx(total / 24000)
    assert end.units == len(units) and audio_events[-1].units_done == len(units)
    assert end.latency_max_s >= end.latency_mean_s >= 0 and end.first_audio_latency_s >= 0
    assert len(audio_events[0].pcm16()) == 2 * audio_events[0].num_samples
    assert worker.step([s]) == 0 and s.poll() == []  # a closed stream stays closed
    with pytest.raises(InvalidInput, match="ended"):
        s.push_units([1])


def test_first_audio_comes_as_soon_as_the_first_window_is_decoded(tiny_models, ellav64, wt):
    """The first vocoder window waits for lookahead + vocoder_first_step frames (2: the fewest that give audio,
    the iSTFT delaying 900 samples), and the step that decodes them stops its decode steps there
    (eager_first_window), so the first audio does not wait for the step's other decode steps; off, it does."""
    units = random_units(12, seed=6)
    first = {}
    for eager in (True, False):
        worker = make_worker(tiny_models, ellav64, wt, max_decode_steps=16, eager_first_window=eager)
        s = worker.open_session(K, LMBDA, left_context=4, holdback=0, vocoder_lookahead=3)
        s.push_units(units)
        for _ in range(50):
            worker.step([s])
            chunks = [e.pcm for e in s.poll() if isinstance(e, AudioEvent)]
            if chunks:
                break
        first[eager] = (s.ellav.codes_out, len(chunks[0]))
    assert first[True] == (3 + 2, 2 * HOP - 900)
    assert first[False][0] > 3 + 2 and first[False][1] == (first[False][0] - 3) * HOP - 900


def test_empty_stream_ends_cleanly(tiny_models, ellav64, wt):
    worker = make_worker(tiny_models, ellav64, wt)
    s = worker.open_session(K, LMBDA)
    s.end()
    worker.run_until_idle([s])
    (end,) = s.poll()
    assert isinstance(end, ResynthEndEvent) and end.units == 0 and end.chunks == 0 and end.error is None


def test_settings_report_every_open_session_option(tiny_models, ellav64, wt):
    """settings() (ready.settings.resynth) holds every option of open_session as the stream uses it."""
    import inspect

    worker = make_worker(tiny_models, ellav64, wt)
    options = dict(left_context=5, holdback=2, greedy=False, seed=3, temperature=0.7, top_p=0.5, trigger_units=2,
                   trigger_s=0.4, max_pass_units=9, vocoder_left_context=7, vocoder_lookahead=3, vocoder_min_step=2,
                   first_holdback=1, vocoder_first_step=3)
    assert set(options) == set(inspect.signature(worker.open_session).parameters) - {"k", "lmbda"}
    settings = worker.open_session(K, LMBDA, **options).settings()
    assert {name: settings[name] for name in options} == options
    assert settings["sample_rate"] == 24000 and settings["max_codec_tokens_per_phone"] >= 1

def test_one_set_of_defaults_per_knob():
    """The bare stages, the worker's open_session and the server's ResynthOptions default every knob alike (all
    from stream/resynth_defaults.py; the vocoder's once were 120/8/1 bare and 48/4/4 live)."""
    import inspect

    from dpslm_stream.stream import resynth_defaults as D
    from dpslm_stream.stream.resynth_options import ResynthOptions
    from dpslm_stream.stream.vocoder import IncrementalVocoder

    def defaults(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    opened = defaults(ResynthWorker.open_session)
    stage = defaults(IncrementalELLAV.__init__)
    vocoder = {f"vocoder_{n}": v for n, v in defaults(IncrementalVocoder.__init__).items()}
    assert {n: opened[n] for n in stage if n in opened} == {n: stage[n] for n in stage if n in opened}
    assert len(set(stage) & set(opened)) == 10 and vocoder == {n: opened[n] for n in vocoder}
    assert vocoder == {"vocoder_left_context": D.DEFAULT_VOCODER_LEFT_CONTEXT,
                       "vocoder_lookahead": D.DEFAULT_VOCODER_LOOKAHEAD, "vocoder_min_step": D.DEFAULT_VOCODER_MIN_STEP,
                       "vocoder_first_step": D.DEFAULT_VOCODER_FIRST_STEP}
    assert stage["max_codec_tokens_per_phone"] == defaults(ResynthWorker.__init__)["max_codec_tokens_per_phone"]
    options = ResynthOptions()
    assert all(getattr(options, n) == opened[n] for n in vars(options))


# ----- batching, sampling, isolation --------------------------------------------------------------------------------

SETTINGS = [
    dict(left_context=4, holdback=2),
    dict(left_context=None, holdback=1, max_pass_units=None),
    dict(left_context=2, holdback=0, trigger_units=2),
    dict(left_context=5, holdback=2, greedy=False, seed=7, temperature=0.9, top_p=0.8),
]


def run_sessions(worker, settings, unit_lists, fail=None):
    sessions = [worker.open_session(K, LMBDA, **kw) for kw in settings]
    if fail is not None:
        calls = {"n": 0}
        add = sessions[fail].vocoder.add

        def broken(c):
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("vocoder exploded")
            return add(c)

        sessions[fail].vocoder.add = broken
    events = [[] for _ in sessions]
    longest = max(len(u) for u in unit_lists)
    for i in range(0, longest, 3):  # streams push at their own pace: different lengths, joins and leaves
        for s, units in zip(sessions, unit_lists):
            if i < len(units) and not s.closed:
                s.push_units(units[i : i + 3])
            if i + 3 >= len(units) and not s.ended:
                s.end()
        worker.step(sessions)
        for e, s in zip(events, sessions):
            e.extend(s.poll())
    worker.run_until_idle(sessions)
    for e, s in zip(events, sessions):
        e.extend(s.poll())
    return events


def test_batched_step_equals_one_by_one(tiny_models, ellav64, wt):
    """Greedy and seeded sampling streams, joining and leaving the batch at their own pace: each stream's audio is
    what it gets alone (same pass schedule; per-stream generators). Without the early end of a step at a stream's
    first vocoder window (eager_first_window), which moves every stream's vocoder windows: with windows of bounded
    context a stream's audio then depends on when its neighbours start, as it depends on the step timing."""
    unit_lists = [random_units(n, seed=20 + n) for n in (18, 27, 9, 21)]
    batched_worker = make_worker(tiny_models, ellav64, wt, eager_first_window=False)
    batched = run_sessions(batched_worker, SETTINGS, unit_lists)
    assert batched_worker.tokens_decoded > 1.5 * batched_worker.decode_steps  # rows really were batched
    for i, (kw, units) in enumerate(zip(SETTINGS, unit_lists)):
        (alone,) = run_sessions(make_worker(tiny_models, ellav64, wt, eager_first_window=False), [kw], [units])
        assert isinstance(batched[i][-1], ResynthEndEvent) and batched[i][-1].error is None
        assert batched[i][-1].codec_frames == alone[-1].codec_frames > 0
        np.testing.assert_allclose(audio_of(batched[i]), audio_of(alone), rtol=0, atol=1e-6)


def test_streams_wait_for_a_free_row(tiny_models, ellav64, wt):
    """More due passes than rows: they queue (oldest first) and every stream still gets its complete output."""
    unit_lists = [random_units(n, seed=30 + n) for n in (10, 14, 8)]

    def run_upfront(worker, settings, lists):
        sessions = [worker.open_session(K, LMBDA, **kw) for kw in settings]
        codes = [record_codes(s) for s in sessions]
        for s, units in zip(sessions, lists):
            s.push_units(units)
            s.end()  # all units known: one pass per stream, so waiting does not change what is generated
        worker.run_until_idle(sessions)
        return [(s.poll(), c) for s, c in zip(sessions, codes)]

    worker = make_worker(tiny_models, ellav64, wt, max_batch=1)
    queued = run_upfront(worker, SETTINGS[:3], unit_lists)
    assert worker.tokens_decoded == worker.decode_steps  # one row at a time
    for i, ((events, codes), units) in enumerate(zip(queued, unit_lists)):
        ((_, alone),) = run_upfront(make_worker(tiny_models, ellav64, wt), [SETTINGS[i]], [units])
        assert events[-1].error is None and events[-1].units == len(units) and events[-1].passes == 1
        # (the audio may differ: the vocoder's windows follow how the codes were split across steps)
        assert codes == alone and len(audio_of(events)) == HOP * len(codes)


def test_seeded_sampling_is_reproducible_per_stream(tiny_models, ellav64, wt):
    units = random_units(15, seed=6)

    def codes_for(seed, **kw):
        stage = IncrementalELLAV(ellav64, 4, 1, greedy=False, seed=seed, **kw)
        out = []
        for u in units:
            out += stage.push([u])
        return out + stage.flush()

    a, b, c = codes_for(1), codes_for(1), codes_for(2)
    assert a == b and a != c
    assert codes_for(1, top_p=0.0) == codes_for(2, top_p=0.0)  # top_p = 0 is greedy, as upstream


def test_one_failing_stream_leaves_the_others_running(tiny_models, ellav64, wt):
    unit_lists = [random_units(n, seed=40 + n) for n in (15, 24, 12)]
    settings = SETTINGS[:3]
    worker = make_worker(tiny_models, ellav64, wt, eager_first_window=False)  # as test_batched_step_equals_one_by_one
    events = run_sessions(worker, settings, unit_lists, fail=1)
    end = events[1][-1]
    assert isinstance(end, ResynthEndEvent) and "vocoder exploded" in end.error
    assert sum(isinstance(e, ResynthEndEvent) for e in events[1]) == 1
    assert not any(d.rows for d in worker._decoders.values())  # its pass left the batch
    for i in (0, 2):
        (alone,) = run_sessions(make_worker(tiny_models, ellav64, wt, eager_first_window=False), [settings[i]],
                                [unit_lists[i]])  # fmt: skip
        assert events[i][-1].error is None
        np.testing.assert_allclose(audio_of(events[i]), audio_of(alone), rtol=0, atol=1e-6)


def test_close_frees_the_row_and_the_others_carry_on(tiny_models, ellav64, wt):
    """close() (the client is gone) takes the stream's pass out of the batch at once, queues no event, and leaves
    the other stream's output exactly what it is alone (the same pushes and step calls, float64)."""
    units = [random_units(30, seed=50), random_units(30, seed=51)]

    def run(with_gone: bool):
        worker = make_worker(tiny_models, ellav64, wt, max_decode_steps=2)
        kept = worker.open_session(K, LMBDA, left_context=4, holdback=1)
        gone = worker.open_session(K, LMBDA, left_context=4, holdback=1) if with_gone else None
        kept.push_units(units[1])
        if gone is not None:
            gone.push_units(units[0])
        for step in range(8):
            worker.step([s for s in (gone, kept) if s is not None])
            if step == 4 and gone is not None:
                assert gone.decoder is kept.decoder and gone.decoder.has_pass(gone) and kept.decoder.has_pass(kept)
                gone.poll()
                gone.close()
                assert not gone.decoder.has_pass(gone) and gone.decoder.rows == [kept]
                assert gone.closed and not gone.has_work and gone.poll() == []
                gone.close()  # idempotent
        kept.end()
        events = kept.poll()
        while kept.has_work:
            worker.step([s for s in (gone, kept) if s is not None])  # a closed stream listed is skipped
            events += kept.poll()
        if gone is not None:
            assert gone.poll() == [] and not gone.decoder.rows
            gone.reset()  # reopens it: a fresh stream
            assert not gone.closed and gone.stats.units == 0
        return events

    batched, alone = run(True), run(False)
    assert batched[-1].error is None and len(audio_of(alone)) > 0
    np.testing.assert_allclose(audio_of(batched), audio_of(alone), rtol=0, atol=1e-6)


def test_session_is_built_without_a_worker(ellav64, wt):
    """A ResynthSession takes its stages, decoder, clock and precision as arguments: no worker needed to make one,
    push to it, read its lag on an injected clock or close it; a worker refuses to step another worker's session."""
    from dpslm_stream.stream.ellav_batch import BatchDecoder
    from dpslm_stream.stream.resynth_session import ResynthSession
    from dpslm_stream.stream.vocoder import IncrementalVocoder

    now = [10.0]
    decoder = BatchDecoder(ellav64, max_batch=2, max_codec_tokens_per_phone=M)
    s = ResynthSession(ellav=IncrementalELLAV(ellav64, 4, 1), vocoder=IncrementalVocoder(wt), decoder=decoder,
                       clock=lambda: now[0], precision="exact")  # fmt: skip
    s.push_units([1, 2, 3])
    now[0] = 12.5
    s._ingest()
    assert s.lag_s == pytest.approx(2.5) and s.settings()["precision"] == "exact"
    plan = s._start_pass()
    decoder.admit([(s, plan)])
    assert decoder.has_pass(s)
    with pytest.raises(InvalidInput, match="at most one pass"):
        decoder.admit([(s, plan)])
    s.close()
    assert decoder.rows == []
    with pytest.raises(InvalidInput, match="own ELLA-V model"):
        ResynthSession(ellav=IncrementalELLAV(E.random_model(K, E.TINY), 4, 1), vocoder=IncrementalVocoder(wt),
                       decoder=decoder)  # fmt: skip


def test_vocoder_windows_of_equal_length_share_one_forward(wt):
    """VocoderRunner: equal-length windows of three streams run as one backbone forward (a window of another length
    gets its own), and every stream's audio matches the stream run alone. Tolerance, not bit equality: at the tiny
    widths oneDNN picks another convolution kernel for a batch (rows differ by ~3e-7 after the first conv); at the
    released widths the measured rows are bit-equal (docs/design.md)."""
    from dpslm_stream.stream.vocoder import IncrementalVocoder, VocoderRunner

    rng = np.random.default_rng(3)
    streams = [torch.from_numpy(rng.integers(0, 4096, 40)) for _ in range(4)]
    cut = [0, 9, 17, 30, 40]
    contexts = [6, 6, 6, 3]  # the fourth stream's windows are shorter once its left context fills

    def make(left_context):
        return IncrementalVocoder(wt, left_context=left_context, lookahead=2, min_step=2)

    alone = []
    for codes, c in zip(streams, contexts):
        voc = make(c)
        alone.append(torch.cat([voc.push(codes[a:b]) for a, b in zip(cut, cut[1:])] + [voc.flush()]))
    vocoders = [make(c) for c in contexts]
    runner = VocoderRunner(wt)
    audio: list[list[torch.Tensor]] = [[] for _ in streams]
    for r in range(4):
        windows = []
        for voc, codes in zip(vocoders, streams):
            voc.add(codes[cut[r] : cut[r + 1]])
            windows.append(voc.plan())
        lengths = [w.codes.numel() for w in windows]
        assert len(set(lengths[:3])) == 1 and (r == 0) == (lengths[3] == lengths[0])
        forwards = runner.forwards
        runner.run(windows)
        assert runner.forwards - forwards == len(set(lengths))  # one forward per length
        for voc, w, out in zip(vocoders, windows, audio):
            out.append(voc.complete(w))
    for voc, out, ref in zip(vocoders, audio, alone):
        got = torch.cat(out + [voc.flush()])
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_the_worker_batches_equal_vocoder_windows(tiny_models, ellav64, wt):
    """Three streams of the same units have equal windows at every step: the worker runs each round of them in one
    backbone forward, and each stream's audio equals the stream run alone (to the tolerance above)."""
    units = random_units(24, seed=61)
    worker = make_worker(tiny_models, ellav64, wt)
    (alone,) = run_sessions(make_worker(tiny_models, ellav64, wt), [SETTINGS[0]], [units])
    together = run_sessions(worker, [SETTINGS[0]] * 3, [units] * 3)
    runner = worker.vocoder_runner
    assert runner.windows == 3 * runner.forwards and runner.forwards > 3
    ref = audio_of(alone)
    for events in together:
        np.testing.assert_allclose(audio_of(events), ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_steps_that_yield_after_every_decode_step_keep_the_vocoder_cadence_and_the_audio(tiny_models, ellav64, wt):
    """step(yield_to=...) asked after each decode step ends the call there when the answer is True (the server's
    encoder waits for one decode step at most), but the vocoders still run every max_decode_steps decode steps,
    counted across calls: same windows, so the same audio, as calls that never yield (bounded context, where window
    boundaries change the audio), and no more vocoder forwards."""
    settings, unit_lists = [SETTINGS[0], SETTINGS[3]], [random_units(18, seed=71), random_units(21, seed=72)]
    results = {}
    for yielding in (False, True):
        worker = make_worker(tiny_models, ellav64, wt, max_decode_steps=4)
        sessions = [worker.open_session(K, LMBDA, **kw) for kw in settings]
        for s, units in zip(sessions, unit_lists):
            s.push_units(units)
            s.end()
        asked, per_call, turns, vocode = [], [], [], worker._vocode
        worker._vocode = lambda ss: turns.append(1) or vocode(ss)
        for _ in range(10_000):
            if not any(s.has_work for s in sessions):
                break
            before = worker.decode_steps
            worker.step(sessions, yield_to=(lambda: asked.append(1) or True) if yielding else None)
            per_call.append(worker.decode_steps - before)
        events = [s.poll() for s in sessions]
        assert all(isinstance(e[-1], ResynthEndEvent) and e[-1].error is None for e in events)
        # the streams' shares of the batched decode steps add up to the steps' time, within the worker's time
        shares = sum(s.stats.compute_seconds for s in sessions)
        assert worker.decode_seconds <= shares + 1e-9 and shares <= worker.compute_seconds + 1e-9
        results[yielding] = ([audio_of(e) for e in events], worker.vocoder_runner.forwards, worker.decode_steps,
                             per_call, len(asked), len(turns), worker.tokens_decoded)  # fmt: skip
    (plain_audio, plain_forwards, plain_steps, plain_calls, _, plain_turns, plain_tokens), (
        audio, forwards, steps, calls, asked, turns, tokens) = results.values()  # fmt: skip
    assert steps == plain_steps and forwards == plain_forwards and turns == plain_turns and tokens == plain_tokens
    # one decode step per call, the vocoders in the call of their turn's step (not in a call of their own)
    assert set(calls[:-1]) == {1} and calls[-1] <= 1  # the last call may only flush what the last step decoded
    assert max(plain_calls) == 4 and len(calls) > 3 * len(plain_calls)
    assert steps - turns <= asked < steps  # asked after each decode step but those that end at a vocoder turn
    for a, b in zip(audio, plain_audio):
        assert len(a) > 0
        np.testing.assert_array_equal(a, b)


# ----- bounded state, triggers, options -------------------------------------------------------------------------------


def test_state_is_flat_over_a_long_stream(tiny_models, ellav64, wt):
    units = random_units(260, seed=7)
    C, L, max_pass = 4, 2, 8
    worker = make_worker(tiny_models, ellav64, wt, max_decode_steps=64)
    s = worker.open_session(K, LMBDA, left_context=C, holdback=L, max_pass_units=max_pass, vocoder_left_context=8)
    sizes, caps, positions, window = [], [], [], []
    for u in units:
        s.push_units([u])
        worker.step([s])
        sizes.append(s.state_nbytes)
        decoder = s.decoder
        if decoder.cache is not None:  # allocated with the first pass
            caps.append(decoder.cache.capacity)
            positions.append(int(decoder.cache.next_pos.max()))
        window.append((len(s.ellav._units), len(s.ellav._runs)))
    assert max(n for n, _ in window) <= C + max_pass and max(r for _, r in window) <= C
    # A prompt holds <= C+max_pass units, BOS, C committed runs of <= M+2 tokens with unit and EOP, the current unit;
    # a pass then feeds back <= (max_pass-L)(M+3) tokens. Positions restart with every pass, so this bounds them.
    assert max(positions) <= (C + max_pass) + 2 + C * (M + 4) + (max_pass - L) * (M + 3)
    assert max(sizes[160:]) <= 1.5 * max(sizes[30:160])  # no growth with stream length
    assert caps[-1] == caps[30]  # the preallocated cache never grew after warm-up
    s.end()
    worker.run_until_idle([s])
    assert s.poll()[-1].units == len(units)


def test_trigger_seconds_batches_units_per_pass(tiny_models, ellav64, wt):
    units = random_units(30, seed=8)
    ends = [0.04 * (i + 1) for i in range(len(units))]  # 40 ms units
    worker = make_worker(tiny_models, ellav64, wt)
    s = worker.open_session(K, LMBDA, left_context=4, holdback=1, trigger_s=0.1)
    with pytest.raises(InvalidInput, match="end_s"):
        s.push_units(units[:2])
    for i, u in enumerate(units):
        s.push_units([u], end_s=[ends[i]])
        worker.step([s])
    assert s.ellav.passes <= len(units) // 3 + 1  # a pass only once >= 100 ms of units can be committed
    s.end()
    worker.run_until_idle([s])
    assert s.poll()[-1].units == len(units)


@pytest.mark.parametrize("kwargs,match", [
    (dict(left_context=-1), "left_context"),
    (dict(holdback=1.5), "holdback"),
    (dict(holdback="2"), "holdback"),
    (dict(max_pass_units=0), "max_pass_units"),
    (dict(holdback=4, max_pass_units=4), "larger than holdback"),
    (dict(trigger_units=0), "trigger_units"),
    (dict(trigger_s=-0.1), "trigger_s"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(greedy="yes"), "greedy"),
    (dict(seed=-3), "seed"),
    (dict(vocoder_lookahead=-1), "lookahead"),
    (dict(vocoder_min_step=0), "min_step"),
    (dict(first_holdback=-1), "first_holdback"),
    (dict(vocoder_first_step=0), "first_step"),
])  # fmt: skip
def test_bad_options_are_clear_errors(tiny_models, ellav64, wt, kwargs, match):
    worker = make_worker(tiny_models, ellav64, wt)
    with pytest.raises(InvalidInput, match=match):
        worker.open_session(K, LMBDA, **kwargs)


def test_bad_models_and_units_are_clear_errors(tiny_models, ellav64, wt):
    worker = make_worker(tiny_models, ellav64, wt)
    with pytest.raises(UnknownModel, match="valid pairs"):
        worker.open_session(K, 123)
    with pytest.raises(UnknownModel, match="not available"):
        worker.open_session(100, 0)  # released, but this worker was limited to (500, 4500)
    with pytest.raises(InvalidInput, match="dtype"):
        ResynthWorker(tiny_models, dtype=torch.int32, ellavs={(K, LMBDA): ellav64})
    s = worker.open_session(K, LMBDA)
    for bad in ([K], [-1], [1.5], "12", [True], np.array([1.0])):
        with pytest.raises(InvalidInput):
            s.push_units(bad)
    with pytest.raises(InvalidInput, match="one end time per unit"):
        s.push_units([1, 2], end_s=[0.1])
    assert not s.has_work  # nothing was queued by the failed pushes
    s.push_units(np.array([3, 4]))
    s.end()
    with pytest.raises(InvalidInput, match=f"session {s.id} belongs to another worker"):
        make_worker(tiny_models, ellav64, wt).step([s])
    worker.run_until_idle([s])
    assert s.poll()[-1].units == 2


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that read tensor values back to the host: item()/int()/bool() (aten._local_scalar_dense,
    or aten.item / aten.is_nonzero under inference mode),
    boolean-mask indexing (aten.nonzero) and Tensor.tolist (patched in by the test)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                    torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default):  # fmt: skip
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_decode_step_reads_back_once(ellav64, monkeypatch):
    """The device-hygiene budget: one batched decode step (greedy and sampling rows, rows leaving) makes exactly one
    device -> host read (the tokens and pass-over flags together); the KV cache keeps its lengths on the host."""
    from dpslm_stream.stream.ellav_batch import BatchDecoder

    decoder = BatchDecoder(ellav64, max_batch=4, max_codec_tokens_per_phone=M)
    stages = [IncrementalELLAV(ellav64, left_context=None, holdback=None, greedy=g, seed=1) for g in (True, False, True)]
    for stage, n in zip(stages, (3, 5, 8)):
        stage.add(random_units(n, seed=n))
        stage.end()
    decoder.admit([(stage, stage.next_pass()) for stage in stages])
    counter = HostSyncs()
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        counter.count += 1
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    steps = left = 0
    with counter:
        while decoder.rows and steps < 500:
            for stage, token, over in decoder.step():
                left += over
            steps += 1
    assert left == 3 and steps > 20
    assert counter.count == steps


@pytest.mark.parametrize("merge", [False, True])
def test_batched_decoder_continues_generate_exactly(ellav64, merge):
    """BatchDecoder (rows of different lengths leaving at their own time) emits each pass's offline token stream
    (generate_tokens) plus the final EOP. merge_forced feeds the unit forced after an EOP in the EOP's forward (the
    fast precision's step saving): same tokens (float64, so the other matmul shapes cannot flip a greedy choice),
    fewer steps."""
    from dpslm_stream.stream.ellav_batch import BatchDecoder

    unit_lists = [random_units(n, seed=40 + n) for n in (4, 9, 6)]
    decoder = BatchDecoder(ellav64, max_batch=3, max_codec_tokens_per_phone=M, merge_forced=merge)
    stages = [IncrementalELLAV(ellav64, left_context=None, holdback=None) for _ in unit_lists]
    for stage, units in zip(stages, unit_lists):
        stage.add(units)
        stage.end()
    decoder.admit([(stage, stage.next_pass()) for stage in stages])
    emitted = {id(s): [] for s in stages}
    steps = 0
    while decoder.rows and steps < 1000:
        for stage, token, _ in decoder.step():
            emitted[id(stage)].append(token)
        steps += 1
    total = 0
    for stage, units in zip(stages, unit_lists):
        (expected,), _ = ellav64.generate_tokens([units], 10_000, M, 1.0, 0.0)
        assert emitted[id(stage)] == expected + [EOP]
        total = max(total, len(expected) + 1)
    assert steps == total if not merge else steps < total


def test_decode_cache_rows_grow_with_the_passes_and_change_nothing(ellav64):
    """The decoder's KV cache holds as many rows as passes run at once (doubling, up to max_batch), not max_batch
    from the start. Growing it while passes run (their rows copied, with a larger capacity too, or not) changes
    nothing: each pass emits its offline token stream, and every step's logits are bit-equal to those of a decoder
    that preallocated max_batch rows (the compiled decode step's layout)."""
    from dpslm_stream.stream.ellav_batch import BatchDecoder

    unit_lists = [random_units(3 + 2 * i, seed=70 + i) for i in range(6)]

    def run(preallocate_rows, capacity):
        decoder = BatchDecoder(ellav64, max_batch=8, max_codec_tokens_per_phone=M, capacity=capacity,
                               preallocate_rows=preallocate_rows)  # fmt: skip
        stages = [IncrementalELLAV(ellav64, left_context=None, holdback=None) for _ in unit_lists]
        for stage, units in zip(stages, unit_lists):
            stage.add(units)
            stage.end()
        joins = {0: stages[:1], 3: stages[1:3], 6: stages[3:]}  # 1 pass, then 3, then 6 at once
        logits, rows, emitted = [], [], {id(s): [] for s in stages}
        for step in range(1000):
            if step in joins:
                decoder.admit([(stage, stage.next_pass()) for stage in joins[step]])
            if not decoder.rows:
                break
            for stage, token, _ in decoder.step():
                emitted[id(stage)].append(token)
            logits.append(None if decoder.logits is None else decoder.logits.clone())
            rows.append(decoder.cache.batch_size)
        return logits, rows, [emitted[id(s)] for s in stages]

    for capacity in (16, 4096):  # slots grow with the rows, or never
        grown, grown_rows, tokens = run(False, capacity)
        full, full_rows, _ = run(True, 4096)
        assert set(full_rows) == {8} and grown_rows[0] == 1 and max(grown_rows) == 8 and 4 in grown_rows
        for units, got in zip(unit_lists, tokens):
            (expected,), _ = ellav64.generate_tokens([units], 10_000, M, 1.0, 0.0)
            assert got == expected + [EOP]
        assert len(grown) == len(full) > 20
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grown, full))
