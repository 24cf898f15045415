"""Behaviour of the resynthesis half that tests/test_stream_resynth.py and test_stream_stages.py left open, found by
mutation testing (docs/mutation.md, group stream_resynth): option bounds checked for tightness with the exact field
named, the PCM16 clipping of audio events, and (tiny random-weight models) the stages' edge cases.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from dpslm_stream.stream.resynth_events import AudioEvent
from dpslm_stream.stream.resynth_options import MAX_PASS_UNITS, MAX_SEED, ResynthOptionError, ResynthOptions

# ----- ResynthOptions: every bound is tight, every refusal names its field ------------------------------------------


def test_resynth_options_accept_every_bound_exactly():
    """The lowest (and highest) value each option allows is accepted, kept as given."""
    edge = dict(left_context=0, holdback=0, seed=0, temperature=0.0, top_p=0.0, trigger_units=1, trigger_s=0.0,
                vocoder_left_context=0, vocoder_lookahead=0)
    assert dataclasses.asdict(ResynthOptions(**edge)) == {**dataclasses.asdict(ResynthOptions()), **edge}
    top = ResynthOptions(seed=MAX_SEED, top_p=1.0, holdback=MAX_PASS_UNITS - 1)
    assert (top.seed, top.top_p, top.holdback) == (MAX_SEED, 1.0, MAX_PASS_UNITS - 1)
    nulls = ResynthOptions(**{name: None for name in ResynthOptions.NULLABLE})
    assert all(getattr(nulls, name) is None for name in ResynthOptions.NULLABLE)


@pytest.mark.parametrize("field,value,words", [
    ("left_context", -1, ">= 0 or null"),
    ("holdback", -1, ">= 0 or null"),
    ("holdback", MAX_PASS_UNITS, f"below {MAX_PASS_UNITS}"),
    ("seed", -1, ">= 0 or null"),
    ("seed", MAX_SEED + 1, ">= 0 or null"),
    ("temperature", -0.5, ">= 0"),
    ("top_p", -0.1, ">= 0 and <= 1"),
    ("top_p", 1.01, ">= 0 and <= 1"),
    ("trigger_units", 0, ">= 1,"),
    ("trigger_units", None, ">= 1,"),
    ("trigger_s", -0.01, ">= 0"),
    ("vocoder_left_context", -1, ">= 0 or null"),
    ("vocoder_lookahead", -1, ">= 0,"),
    ("vocoder_lookahead", None, ">= 0,"),
    ("temperature", None, ">= 0"),
    ("greedy", 1, "true or false"),
])  # fmt: skip
def test_resynth_options_refuse_just_past_each_bound_naming_the_field(field, value, words):
    with pytest.raises(ResynthOptionError) as info:
        ResynthOptions(**{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(field) and words in str(info.value) and repr(value) in str(info.value)


def test_resynth_options_from_json_names_the_first_unknown_option():
    with pytest.raises(ResynthOptionError) as info:
        ResynthOptions.from_json({"zeta": 1, "alpha": 2, "holdback": 1})
    assert info.value.field == "alpha" and "['alpha', 'zeta']" in str(info.value)
    with pytest.raises(ResynthOptionError) as info:
        ResynthOptions.from_json({"bogus": 1})
    assert info.value.field == "bogus"
    assert ResynthOptions.from_json(None) == ResynthOptions() == ResynthOptions.from_json({})
    assert ResynthOptions.from_json({"holdback": None, "seed": 5}) == ResynthOptions(holdback=None, seed=5)


def test_resynth_options_json_types():
    assert ResynthOptions.json_types() == {
        "left_context": int, "holdback": int, "first_holdback": int, "greedy": bool, "seed": int, "temperature": float, "top_p": float,
        "trigger_units": int, "trigger_s": float, "vocoder_left_context": int, "vocoder_lookahead": int,
    }  # fmt: skip


# ----- AudioEvent ---------------------------------------------------------------------------------------------------


def test_audio_event_pcm16_clips_to_the_16_bit_range():
    pcm = np.array([-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0], np.float32)
    event = AudioEvent(seq=0, pcm=pcm, start_s=1.0, units_done=0, lag_s=0.0)
    assert np.frombuffer(event.pcm16(), "<i2").tolist() == [-32768, -32768, -16384, 0, 8192, 32767, 32767]
    assert event.num_samples == 7 and event.end_s == pytest.approx(1.0 + 7 / 24000)


# ----- the stages and the worker on tiny random-weight models ------------------------------------------------------
# (the fixtures of tests/test_stream_resynth.py: float64 ELLA-V with a biased EOP logit,
# a WavTokenizer with a random codebook)

import torch  # noqa: E402

from dpslm_stream.errors import InvalidInput  # noqa: E402
from dpslm_stream.models import ellav as E  # noqa: E402
from dpslm_stream.models import wavtokenizer as W  # noqa: E402
from dpslm_stream.stream.ellav_batch import BatchDecoder  # noqa: E402
from dpslm_stream.stream.ellav_stage import IncrementalELLAV  # noqa: E402
from dpslm_stream.stream.resynth_worker import ResynthWorker  # noqa: E402
from dpslm_stream.stream.vocoder import IncrementalVocoder, StreamingISTFT  # noqa: E402
from tests.test_stream_resynth import (  # noqa: E402,F401  (fixtures and helpers)
    EOP, K, LMBDA, M, ellav64, make_worker, random_units, wt,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def codes_of(stage: IncrementalELLAV, units: list[int], chunk: int = 1) -> list[int]:
    out: list[int] = []
    for i in range(0, len(units), chunk):
        out += stage.push(units[i : i + chunk])
    return out + stage.flush()


def test_incremental_ellav_takes_the_lowest_bounds_and_names_bad_settings(ellav64):
    """left_context 0 (no committed run in any prompt: each pass is [u_c] BOS u_c), max_pass_units 1, M = 0 are
    valid settings; a bad model or M is refused with the option named. (C = 0 is not the reference schedule of
    test_stream_resynth.py: generate_tokens on an empty prefix takes u_c for the stream's first unit, allowed M+2
    codec tokens; the stage keeps the stream's cap of M+1 for every later unit.)"""
    units = random_units(9, seed=70)
    stage = IncrementalELLAV(ellav64, left_context=0, holdback=0, max_pass_units=1)
    prompts, next_pass = [], stage.next_pass
    stage.next_pass = lambda: (lambda p: (prompts.append(p and list(p.prompt)), p)[1])(next_pass())
    codes = codes_of(stage, units)
    tok = ellav64.tokenizer
    assert [p for p in prompts if p] == [tok.encode_prompt([u], token_prefix=[]) for u in units]
    assert len(codes) > len(units) and codes != codes_of(IncrementalELLAV(ellav64, 1, 0, max_pass_units=1), units)
    assert IncrementalELLAV(ellav64, left_context=3, holdback=None, max_codec_tokens_per_phone=0,
                            seed=0).max_codec_tokens_per_phone == 0  # fmt: skip
    with pytest.raises(InvalidInput, match="^model must be an ELLAV model, got str$"):
        IncrementalELLAV("model")
    with pytest.raises(InvalidInput, match="^max_codec_tokens_per_phone must be an integer >= 0, got -1$"):
        IncrementalELLAV(ellav64, max_codec_tokens_per_phone=-1)
    with pytest.raises(InvalidInput, match="^max_batch must be an integer >= 1, got 0$"):
        BatchDecoder(ellav64, max_batch=0, max_codec_tokens_per_phone=M)


def test_units_as_tensors_and_arrays(ellav64):
    """A 1-D integer tensor is units like a list; a 2-D or float tensor or array is refused saying what it got."""
    stage = IncrementalELLAV(ellav64, left_context=3, holdback=1)
    assert stage.check_units(torch.tensor([3, 4])) == ([3, 4], [None, None])
    assert stage.check_units(np.array([5], np.int32)) == ([5], [None])
    for bad, shown in ((torch.tensor([[1, 2]]), "tensor (1, 2) torch.int64"), (torch.tensor([1.0]), "torch.float32"),
                       (np.array([[1]]), "array (1, 1) int64"), (np.array([1.0]), "array (1,) float64")):
        with pytest.raises(InvalidInput, match=r"^units must be a 1-D integer sequence, got .*" + re.escape(shown)):
            stage.check_units(bad)


def test_a_repeated_unit_moves_its_end_time_for_trigger_s(ellav64):
    """A unit equal to the last one continues it: its end time moves, and trigger_s sees the longer unit."""
    stage = IncrementalELLAV(ellav64, left_context=4, holdback=0, trigger_s=0.1)
    assert stage.add([5], end_s=[0.04]) == 1 and not stage.pass_due()
    assert stage.add([5], end_s=[0.12]) == 0 and stage.pass_due()
    stage.add([7, 8], end_s=[0.13, 0.14])
    assert stage.next_pass() is not None  # commits unit 0 (5) up to 8 (hold-back 0)


def test_the_pass_cache_holds_the_longest_pass(ellav64):
    """PassPlan.max_new_tokens bounds what a pass feeds back: a cache reserved exactly (capacity 1, so the decoder
    allocates exactly what the admitted pass may need) holds a pass whose every unit runs to the cap (EOP never
    chosen before M+1 codec tokens), and its tokens are offline generation's."""
    model = E.random_model(K, E.TINY).to(torch.float64)
    with torch.no_grad():
        model.output.bias[: model.tokenizer.first_codec_id] = -1e9  # codec tokens only; EOP when forced at the cap
    units = random_units(12, seed=71)
    decoder = BatchDecoder(model, max_batch=1, max_codec_tokens_per_phone=M, capacity=1)
    stage = IncrementalELLAV(model, left_context=None, holdback=None)
    stage.add(units)
    stage.end()
    plan = stage.next_pass()
    decoder.admit([(stage, plan)])
    assert decoder.cache.capacity == len(plan.prompt) + len(units) * (M + 3) + 1
    emitted = []
    while decoder.rows and len(emitted) < 1000:
        emitted += [token for _, token, _ in decoder.step()]
    (expected,), _ = model.generate_tokens([units], 10_000, M, 1.0, 0.0)
    assert emitted == expected + [EOP]
    assert sum(t >= model.tokenizer.first_codec_id for t in expected) == (M + 1) * len(units) + 1


def test_the_cache_grows_in_blocks_of_64_slots(ellav64):
    """A pass longer than the cache holds grows it to the next multiple of 64 slots (its own need + 1)."""
    decoder = BatchDecoder(ellav64, max_batch=1, max_codec_tokens_per_phone=M, capacity=1)
    plans = []
    for units in (random_units(2, seed=72), random_units(14, seed=73)):
        stage = IncrementalELLAV(ellav64, left_context=None, holdback=None)
        stage.add(units)
        stage.end()
        plans.append(stage.next_pass())
        decoder.admit([(stage, plans[-1])])
        while decoder.rows:
            decoder.step()
    need = len(plans[1].prompt) + plans[1].max_new_tokens(M) + 1
    assert decoder.cache.capacity == -(-need // 64) * 64 > len(plans[0].prompt) + plans[0].max_new_tokens(M) + 1


class Clock:
    """A worker clock that only moves when told (every measured interval is then exact)."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_compute_seconds_add_up_exactly(tiny_models, ellav64, wt):
    """One stream, a clock that moves only inside the measured work (a prefill 100 s, a decode step 1 s, a vocoder
    forward 1000 s): the worker's counters start at 0 and are exactly those sums, and the stream's compute time
    (its end event's real-time factor) is all of it."""
    clock = Clock()
    worker = make_worker(tiny_models, ellav64, wt, clock=clock)
    assert (worker.compute_seconds, worker.prefill_seconds, worker.decode_seconds, worker.vocoder_seconds,
            worker.decode_steps, worker.tokens_decoded) == (0, 0, 0, 0, 0, 0)  # fmt: skip
    s = worker.open_session(K, LMBDA, left_context=3, holdback=1)
    counts = {"admit": 0, "step": 0, "run": 0}

    def costing(name, fn, seconds):
        def run(*args):
            if name != "run" or args[0]:
                counts[name] += 1
                clock.now += seconds
            return fn(*args)

        return run

    s.decoder.admit = costing("admit", s.decoder.admit, 100.0)
    s.decoder.step = costing("step", s.decoder.step, 1.0)
    worker.vocoder_runner.run = costing("run", worker.vocoder_runner.run, 1000.0)
    units = random_units(14, seed=74)
    for i in range(0, len(units), 3):
        s.push_units(units[i : i + 3])
        worker.step([s])
    s.end()
    worker.run_until_idle([s])
    end = s.poll()[-1]
    assert counts["admit"] > 3 and counts["step"] > 20 and counts["run"] > 3
    assert worker.prefill_seconds == 100 * counts["admit"]
    assert worker.decode_seconds == counts["step"] == worker.decode_steps == worker.tokens_decoded
    assert worker.vocoder_seconds == 1000 * counts["run"]
    total = worker.prefill_seconds + worker.decode_seconds + worker.vocoder_seconds
    assert worker.compute_seconds == total == s.stats.compute_seconds
    assert end.error is None and end.real_time_factor == total / end.audio_seconds


def test_due_passes_take_turns_for_one_row(tiny_models, ellav64, wt):
    """Two streams always due, one row: the oldest due pass goes first, so they alternate (a stream whose pass just
    ran queues behind the one that waited)."""
    worker = make_worker(tiny_models, ellav64, wt, max_batch=1, clock=Clock(tick=1.0))
    a, b = (worker.open_session(K, LMBDA, left_context=3, holdback=0, max_pass_units=1) for _ in range(2))
    assert (a.id, b.id) == (0, 1) and worker.open_session(K, LMBDA).id == 2  # ids are distinct
    order, admit = [], a.decoder.admit
    a.decoder.admit = lambda jobs: (order.extend(s.id for s, _ in jobs), admit(jobs))[1]
    a.push_units(random_units(5, seed=75))
    b.push_units(random_units(5, seed=76))
    worker.run_until_idle([a, b])
    assert order == [0, 1] * 5


def test_worker_options_and_plans(tiny_models):
    """available_pairs without `pairs` is every pair of the set plus the models given; precision 'fast' refuses
    other dtypes and runs with float32; precision_plans names each model's plan; bad counts name the option."""
    def ellav():
        torch.manual_seed(0)
        return E.random_model(K, E.TINY)

    all_pairs = set(tiny_models.pairs())
    assert len(all_pairs) > 1
    worker = ResynthWorker(tiny_models, ellavs={(K, LMBDA): ellav()})
    assert worker.available_pairs() == sorted(all_pairs | {(K, LMBDA)})
    assert worker.precision_plans == {"precision": "exact", "ellav": "ellav: exact (float32)",
                                      "wavtokenizer": "wavtokenizer: exact (float32)"}  # fmt: skip
    with pytest.raises(InvalidInput, match="^precision 'fast' picks the dtypes itself: leave dtype and vocoder_dtype"):
        ResynthWorker(tiny_models, dtype=torch.float64, precision="fast")
    fast = ResynthWorker(tiny_models, precision="fast", ellavs={(K, LMBDA): ellav()})
    assert fast.precision_plans["precision"] == "fast" and fast.precision_plans["ellav"].startswith("ellav: fast")
    for name in ("max_batch", "max_decode_steps", "max_codec_tokens_per_phone"):
        with pytest.raises(InvalidInput, match=f"^{name} must be an integer"):
            ResynthWorker(tiny_models, **{name: -1})


def test_a_float64_vocoder_still_sends_float32_audio(tiny_models, ellav64):
    """vocoder_dtype moves the backbone (the iSTFT window stays float32); the audio events carry float32 PCM."""
    torch.manual_seed(0)
    voc = W.WavTokenizer(W.TINY).eval()
    worker = make_worker(tiny_models, ellav64, voc, vocoder_dtype=torch.float64)
    assert voc.head.out.weight.dtype == torch.float64 and voc.head.istft.window.dtype == torch.float32
    s = worker.open_session(K, LMBDA, left_context=3, holdback=1)
    s.push_units(random_units(6, seed=77))
    s.end()
    worker.run_until_idle([s])
    events = s.poll()
    assert events[-1].error is None and len(events) > 1
    assert all(e.pcm.dtype == np.float32 for e in events[:-1])


def test_vocoder_and_istft_refusals_say_what_they_got(wt):
    for kwargs, message in ((dict(min_step=0), "min_step (frames) must be an integer >= 1, got 0"),
                            (dict(lookahead=-1), "lookahead (frames) must be an integer >= 0, got -1"),
                            (dict(left_context=-1), "left_context (frames) must be an integer >= 0, got -1")):
        with pytest.raises(InvalidInput, match=f"^{re.escape(message)}$"):
            IncrementalVocoder(wt, **kwargs)
    voc = IncrementalVocoder(wt)
    for bad, shown in (([1, 2], "[1, 2]"), (torch.zeros(2, 2, dtype=torch.long), "torch.Size([2, 2])")):
        with pytest.raises(InvalidInput, match=f"^push\\(\\) takes a 1-D integer tensor of new codes, got "
                                               f"{re.escape(shown)}$"):  # fmt: skip
            voc.push(bad)
    istft = StreamingISTFT(wt.head.istft.window, W.TINY.hop_length)
    bins = W.TINY.n_fft // 2 + 1
    with pytest.raises(InvalidInput, match=re.escape(f"(B, {bins}, T), got torch.float32 (1, {bins}, 2)")):
        istft.push(torch.zeros(1, bins, 2))
    with pytest.raises(InvalidInput, match=re.escape(f"(B, {bins}, T), got torch.complex64 (1, 3, 2)")):
        istft.push(torch.zeros(1, 3, 2, dtype=torch.complex64))
    assert istft.push(torch.zeros(2, bins, 0, dtype=torch.complex64)).shape == (2, 0)


def test_a_closed_session_reports_itself(tiny_models, ellav64, wt):
    worker = make_worker(tiny_models, ellav64, wt)
    s = worker.open_session(K, LMBDA)
    s.push_units([1, 2, 3])
    s.close()
    assert "closed=True" in repr(s) and not s.has_work and isinstance(s.state_nbytes, int)
    s.reset()
    assert "closed=False" in repr(s) and s.state_nbytes == 0


def test_allow_tf32_reaches_the_device_setup(tiny_models, monkeypatch):
    """allow_tf32 is handed to the device setup (on CUDA it turns TF32 matmuls on; on the CPU it changes nothing, so
    the call is what can be checked here)."""
    import dpslm_stream.stream.resynth_worker as resynth_worker

    calls, setup = [], resynth_worker.setup_model_device

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return setup(*args, **kwargs)

    monkeypatch.setattr(resynth_worker, "setup_model_device", spy)
    for allow in (True, False):
        ResynthWorker(tiny_models, "cpu", allow_tf32=allow)
    assert calls == [(("cpu", True), {}), (("cpu", False), {})]


def test_later_prompts_teacher_force_exactly_the_tokens_each_unit_generated(ellav64):
    """Each pass's prompt re-feeds, for every committed unit, [unit, the tokens generated inside it, EOP]: the run as
    `split_units(raw=True)` cuts the passes' token streams (without the forced unit token that opens a unit), so a
    continuation sees what offline generation saw. A tiny random model's output barely depends on its prompt, so
    comparing codes alone misses a prompt that repeats the forced unit token (mutant `IncrementalELLAV.take` 18)."""
    units = random_units(12, seed=71)
    stage = IncrementalELLAV(ellav64, left_context=None, holdback=0, max_pass_units=3)
    plans, streams = [], []
    next_pass, take = stage.next_pass, stage.take

    def recording_next_pass():
        plan = next_pass()
        if plan is not None:
            plans.append(plan)
            streams.append([])
        return plan

    def recording_take(token, done):
        streams[-1].append(token)
        return take(token, done)

    stage.next_pass, stage.take = recording_next_pass, recording_take
    codes_of(stage, units, chunk=4)  # chunks of 4: passes of up to 3 units, so a forced unit follows an EOP in one
    tok = ellav64.tokenizer
    runs: list[list[int]] = []
    assert len(plans) > 2 and any(plan.stop > plan.start for plan in plans)
    for plan, stream in zip(plans, streams):
        assert plan.start == len(runs)  # left_context None: every committed unit is teacher-forced
        forced = [t for i, run in enumerate(runs) for t in [plan.unit_tokens[i], *run, tok.EOP_id]]
        assert plan.prompt == [*plan.unit_tokens, tok.BOS_id, *forced, plan.unit_tokens[plan.start]]
        runs += tok.split_units(stream, raw=True)[: plan.stop - plan.start + 1]
    assert len(runs) == len(plans[-1].unit_tokens)
