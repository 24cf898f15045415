"""The streaming encoder side (dpslm_stream/stream/: encoder, session, worker, events, frontend, onednn, compare) at
the edges the mutants of `make mutants MODULES=stream_encoder` found untested (docs/mutation.md), on the tiny
random-weight model set: the analysis helpers of compare.py against slow references and the offline path, and
the session's and worker's fields, bounds and error messages.

Every figure here comes from random weights: it checks the plumbing, not the quality of the units.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from dpslm_stream.dpdp import deduplicate, dpdp
from dpslm_stream.errors import InvalidInput, UnknownModel
from dpslm_stream.models import wavlm
from dpslm_stream.models.precision import FastLinear, Plan, plan_for
from dpslm_stream.models.ulm import ScoringPool
from dpslm_stream.pipeline import Pipeline, bitrate, default_num_neighbors
from dpslm_stream.stream.compare import DITHER, StreamedEncoding, agreement, compare, edit_distance, stream_encode
from dpslm_stream.stream.encoder import WindowConfig, WindowedEncoder, WindowRunner, window_config
from dpslm_stream.stream.frontend import StreamingFrontend
from dpslm_stream.stream.onednn import PackedConv1d, PackedLinear, onednn_usable
from dpslm_stream.stream.worker import EncoderWorker
from dpslm_stream.tiny import speech_like

K, LMBDA = 500, 4500

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def worker(tiny_models):
    return EncoderWorker(tiny_models, "cpu", pairs=[(K, LMBDA), (100, 600)])


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return Pipeline(tiny_models, K, LMBDA, "cpu")


@pytest.fixture(scope="module")
def wav():
    return speech_like(1.5, 16000, seed=7)


# ----------------------------------------------------------------------------------------------------------------
# compare.py: edit distance, agreement, stream_encode, compare


def slow_edit_distance(a: list[int], b: list[int]) -> int:
    """The textbook Levenshtein table, cell by cell."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
        d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def test_edit_distance_equals_the_textbook_table():
    rng = np.random.default_rng(0)
    cases = [([], []), ([], [1, 2, 3]), ([4, 5], []), ([1], [1]), ([1, 2, 3], [3, 2, 1]), ([7] * 5, [7] * 2)]
    for _ in range(150):
        cases.append(tuple(rng.integers(0, 4, int(rng.integers(1, 12))).tolist() for _ in range(2)))
    for a, b in cases:
        assert edit_distance(a, b) == slow_edit_distance(a, b), (a, b)


def test_agreement_figures_equal_their_definitions(pipe):
    rng = np.random.default_rng(1)
    reference = pipe.features(speech_like(1.0, 16000, seed=3), 16000).float()
    features = reference + 0.3 * reference.std() * torch.from_numpy(rng.standard_normal(reference.shape)).float()
    features = features[:-4]  # shorter: compared over the common frames
    codebook = pipe.codebook.float().cpu()
    got = agreement(features, reference, codebook, LMBDA, 25)
    t = features.shape[0]
    a_units, b_units = dpdp(features, codebook, LMBDA, 25), dpdp(reference[:t], codebook, LMBDA, 25)
    a_near = [int(np.argmin(((codebook - f) ** 2).sum(1))) for f in features]
    b_near = [int(np.argmin(((codebook - f) ** 2).sum(1))) for f in reference[:t]]
    a_dedup, b_dedup = deduplicate(a_units)[0].tolist(), deduplicate(b_units)[0].tolist()
    cosine = np.mean([float(x @ y / (x.norm() * y.norm())) for x, y in zip(features, reference[:t])])
    assert got["frames"] == t
    assert got["frame_agreement"] == pytest.approx(float((a_units == b_units).float().mean()))
    assert got["kmeans_agreement"] == pytest.approx(np.mean(np.array(a_near) == np.array(b_near)))
    assert got["unit_error_rate"] == pytest.approx(slow_edit_distance(a_dedup, b_dedup) / len(b_dedup))
    assert got["feature_cosine"] == pytest.approx(cosine, rel=1e-5)
    assert 0 < got["frame_agreement"] < 1 and 0 < got["unit_error_rate"]  # the noise moved some units
    same = agreement(reference, reference, codebook, LMBDA, 25)
    assert same == {"frames": reference.shape[0], "frame_agreement": 1.0, "kmeans_agreement": 1.0,
                    "unit_error_rate": 0.0, "feature_cosine": pytest.approx(1.0)}  # fmt: skip
    empty = agreement(reference[:0], reference, codebook, LMBDA, 25)
    assert empty == {"frames": 0, "frame_agreement": 1.0, "kmeans_agreement": 1.0, "unit_error_rate": 0.0,
                     "feature_cosine": 1.0}  # fmt: skip


def test_stream_encode_in_full_mode_gives_the_offline_encoding(worker, pipe, wav):
    ref = pipe.encode(wav, 16000, keep_features=True)
    res = stream_encode(worker, wav, 16000, k=K, lmbda=LMBDA, mode="full", chunk_s=0.25, score=True,
                        keep_features=True)  # fmt: skip
    assert (res.units, res.durations, res.starts) == (ref.units, ref.durations, ref.starts)
    assert res.frame_units == ref.frame_units
    assert res.seconds == pytest.approx(1.5) and res.forced_commits == 0
    np.testing.assert_allclose(res.unit_logprobs, ref.unit_logprobs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res.features, ref.features.float())
    # Full mode commits every unit at the end of the stream: each lag is the audio after the unit's end.
    assert res.commit_lags_s == pytest.approx([1.5 - (s + d) * 0.02 for s, d in zip(res.starts, res.durations)])
    plain = stream_encode(worker, wav, 16000, k=K, lmbda=LMBDA, mode="full", chunk_s=0.25)
    assert plain.units == ref.units and plain.unit_logprobs is None and plain.features is None


def test_stream_encode_steps_the_worker_after_every_chunk(worker):
    """Chunks of chunk_s seconds, a step after each: units are committed while audio arrives, at chunk boundaries
    (commit time = unit end + commit lag is a multiple of chunk_s), down to one sample per chunk."""

    def commit_samples(res):
        return [round(((s + d) * 0.02 + lag) * sr) for s, d, lag in zip(res.starts, res.durations, res.commit_lags_s)]

    sr = 11025  # at 16 kHz every frame completes at an even sample count, which would hide the chunk size
    wav = speech_like(0.5, sr, seed=7)
    kwargs = dict(k=100, lmbda=600, mode="cached", left=4, hop=1, lookahead=0)
    fine = stream_encode(worker, wav, sr, chunk_s=1 / sr, **kwargs)
    assert len(fine.units) > 3
    assert min(commit_samples(fine)) < len(wav) // 2  # not all at the end
    # One sample per chunk: a unit is committed right after the sample that completed its decision; with two-sample
    # chunks every commit would fall on an even sample count.
    assert any(c % 2 for c in commit_samples(fine))
    coarse = stream_encode(worker, wav, sr, chunk_s=0.1, **kwargs)
    assert coarse.units == fine.units and coarse.durations == fine.durations
    assert all(c % 1102 == 0 or c == len(wav) for c in commit_samples(coarse))  # round(0.1 * 11025) = 1102


def test_streamed_encoding_to_json_fields():
    enc = StreamedEncoding(units=[3, 1, 3], durations=[2, 5, 1], starts=[0, 2, 7], seconds=0.2,
                           commit_lags_s=[0.1, 0.06, 0.04], forced_commits=1)  # fmt: skip
    out = enc.to_json()
    assert out == {
        "units": [3, 1, 3], "durations": [2, 5, 1], "starts": [0, 2, 7], "start_seconds": [0.0, 0.04, 0.14],
        "num_frames": 8, "seconds": 0.2, "units_per_second": pytest.approx(15.0),
        "bitrate": pytest.approx(bitrate([[3, 1, 3]], 0.2)), "commit_lag_s": [0.1, 0.06, 0.04], "forced_commits": 1,
    }  # fmt: skip
    assert enc.frame_units == [3, 3, 1, 1, 1, 1, 1, 3]
    json.dumps(out)
    empty = StreamedEncoding([], [], [], 0.0, [], 0).to_json()
    assert empty["units_per_second"] == 0.0 and empty["num_frames"] == 0
    scored = StreamedEncoding([1, 2], [1, 1], [0, 1], 0.04, [0.0, 0.0], 0, unit_logprobs=[-1.5, -2.0]).to_json()
    assert scored["loglikelihood"] == pytest.approx(-3.5) and scored["unit_logprobs"] == [-1.5, -2.0]


def test_compare_measures_against_offline_layer_11_and_a_seeded_dither(worker, pipe, wav):
    n = default_num_neighbors(K)
    streamed = stream_encode(worker, wav, 16000, k=K, lmbda=LMBDA, mode="cached", preset="low-latency",
                             keep_features=True)  # fmt: skip
    report = compare(worker, wav, 16000, streamed, k=K, lmbda=LMBDA, num_neighbors=n, seed=3)
    assert set(report) == {"streaming", "noise_floor"}
    reference = pipe.features(wav, 16000).float()
    codebook = pipe.codebook.float().cpu()
    assert report["streaming"] == agreement(streamed.features, reference, codebook, LMBDA, n)
    dithered = wav + np.random.default_rng(3).normal(0.0, DITHER, size=wav.shape).astype(np.float32)
    assert np.abs(dithered - wav).max() < 10 * DITHER
    assert report["noise_floor"] == agreement(pipe.features(dithered, 16000).float(), reference, codebook, LMBDA, n)
    assert 0.99 < report["noise_floor"]["feature_cosine"] < 1.0  # one LSB of dither moves the features a little
    full = stream_encode(worker, wav, 16000, k=K, lmbda=LMBDA, mode="full", keep_features=True)
    exact = compare(worker, wav, 16000, full, k=K, lmbda=LMBDA, num_neighbors=n)["streaming"]
    assert exact == {"frames": reference.shape[0], "frame_agreement": 1.0, "kmeans_agreement": 1.0,
                     "unit_error_rate": 0.0, "feature_cosine": pytest.approx(1.0)}  # fmt: skip
    with pytest.raises(ValueError, match="keep_features"):
        compare(worker, wav, 16000, stream_encode(worker, wav[:8000], 16000, k=K, lmbda=LMBDA), k=K, lmbda=LMBDA,
                num_neighbors=n)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# encoder.py: the window runner on every block layout, its options and bounds


def tiny_wavlm(**changes) -> wavlm.WavLM:
    """A tiny random WavLM whose LayerNorms are not the identity either (their default init is weight 1, bias 0:
    a second normalisation of normalised frames would change nothing)."""
    torch.manual_seed(0)
    model = wavlm.WavLM(dataclasses.replace(wavlm.TINY, **changes)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_wavlm()


@pytest.fixture(scope="module")
def frames():
    return torch.randn(47, wavlm.TINY.encoder_embed_dim, generator=torch.Generator().manual_seed(1))


def run_windows(runner, config, frames, chunk=9):
    enc = WindowedEncoder(runner, config)
    out = [enc.push(frames[a : a + chunk]) for a in range(0, frames.shape[0], chunk)]
    return torch.cat([*out, enc.flush()])


@pytest.mark.parametrize("changes", [dict(layer_norm_first=False), dict(gru_rel_pos=False),
                                     dict(relative_position_embedding=False)])  # fmt: skip
def test_windowed_modes_reduce_to_offline_on_every_block_layout(frames, changes):
    """Post-LN blocks (WavLM-Base's layout: LN after pos_conv and after each residual), ungated and absent relative
    position bias: with windows covering the input, sliding and cached are the offline computation."""
    model = tiny_wavlm(**changes)
    runner = WindowRunner(model)
    n = frames.shape[0]
    with torch.inference_mode():
        expected = model.encode(frames[None], 11)[0]
    for config in (WindowConfig("sliding", n, 7, n), WindowConfig("cached", 3, 7, n)):
        torch.testing.assert_close(run_windows(runner, config, frames), expected, atol=2e-5, rtol=1e-5,
                                   msg=f"{changes} {config.describe()}")  # fmt: skip


def test_cached_mode_with_one_frame_of_left_context_equals_the_slow_reference(model, frames):
    from test_stream_encoder import reference_cached

    frames = frames[:20]  # 5 hops: the cache holds one frame from the second on
    got = run_windows(WindowRunner(model), WindowConfig("cached", 1, 4, 2), frames)
    torch.testing.assert_close(got, reference_cached(model, frames, 1, 4, 2), atol=2e-5, rtol=1e-5)


def test_runner_profile_times_each_phase(model, frames):
    runner = WindowRunner(model)
    run_windows(runner, WindowConfig("cached", 8, 5, 2), frames)
    assert dict(runner.timings) == {}  # profiling off: nothing recorded
    runner.profile = True
    run_windows(runner, WindowConfig("cached", 8, 5, 2), frames)
    assert set(runner.timings) == {"positional", "attention", "ffn"}
    assert all(t > 0 for t in runner.timings.values())


def test_runner_layers_and_precision(model, frames):
    with torch.inference_mode():
        one_layer = model.encode(frames[None], 1)[0]
    runner = WindowRunner(model, num_layers=1)
    got = run_windows(runner, WindowConfig("sliding", 47, 7, 47), frames)
    torch.testing.assert_close(got, one_layer, atol=2e-5, rtol=1e-5)
    for bad in (0, 13):
        with pytest.raises(InvalidInput, match=r"num_layers must be in 1\.\.12, got"):
            WindowRunner(model, num_layers=bad)
    exact = WindowRunner(model)
    assert all(isinstance(m, PackedLinear) for ms in exact.linears for m in ms)
    fast = WindowRunner(model, precision="fast")
    assert fast.precision_plan == plan_for("wavlm", "fast", torch.device("cpu"))  # what the runner reports it runs
    assert exact.precision_plan == plan_for("wavlm", "exact", torch.device("cpu"))
    quantized = fast.precision_plan.bulk != "fp32"  # int8 or bf16 on this machine's CPU
    assert all(isinstance(m, FastLinear) == quantized for ms in fast.linears for m in ms)
    if quantized:
        with pytest.raises(InvalidInput, match="float32"):
            WindowRunner(tiny_wavlm().to(torch.bfloat16), precision="fast")


def test_a_fast_plan_without_faster_kernels_runs_the_exact_path(model, monkeypatch):
    """On a CPU with neither int8 nor bf16 kernels `plan_for` makes "fast" an fp32 plan: the runner then keeps the
    prepacked float32 linears (no quantized copy)."""
    from dpslm_stream.stream import encoder as encoder_module

    fp32_plan = lambda name, precision, device: Plan(precision, name, "fp32", "fp32")  # noqa: E731
    monkeypatch.setattr(encoder_module, "plan_for", fp32_plan)
    runner = WindowRunner(model, precision="fast")
    assert runner.precision_plan.precision == "fast"
    assert all(isinstance(m, PackedLinear) for ms in runner.linears for m in ms)


def test_window_config_error_messages():
    with pytest.raises(InvalidInput, match=r"window mode must be one of full, sliding, cached; got 'windowed'"):
        WindowConfig("windowed")
    with pytest.raises(InvalidInput, match=r"hop must be an integer number of 20 ms frames, got 2\.5"):
        WindowConfig("cached", 10, 2.5, 0)
    with pytest.raises(InvalidInput, match=r"lookahead must be in 0\.\.1000000 frames, got -1"):
        WindowConfig("cached", 10, 2, -1)
    with pytest.raises(InvalidInput, match=r"unknown preset 'fast'; presets are low-latency, balanced, quality"):
        window_config("cached", "fast")
    assert WindowConfig("sliding", 3, 4, 5).describe() == "sliding L=3 H=4 R=5"
    assert WindowConfig("full").describe() == "full" and WindowConfig("full").newest_frame_lag_s == math.inf


def test_encoder_and_frontend_refuse_bad_shapes_with_clear_messages(model):
    enc = WindowedEncoder(WindowRunner(model), WindowConfig("cached", 4, 2, 1))
    with pytest.raises(InvalidInput, match=r"frames must have shape \[n, 64\], got \(3, 65\)"):
        enc.add(torch.zeros(3, 65))
    with pytest.raises(InvalidInput, match=r"samples must be 1-D \(mono, 16 kHz\), got shape \(2, 10\)"):
        StreamingFrontend(model).add(torch.zeros(2, 10))
    assert enc.push(torch.zeros(0, 64)).shape == (0, 64) and enc.num_frames == 0


def test_frontend_refuses_a_groupnorm_wavlm_and_says_why():
    """A WavLM whose first conv block normalises over the whole input (extractor_mode 'default') cannot stream."""
    base = wavlm.WavLM(dataclasses.replace(wavlm.TINY, extractor_mode="default"))
    with pytest.raises(InvalidInput, match=r"extractor_mode 'layer_norm'.*got 'default', whose GroupNorm"):
        StreamingFrontend(base)


def test_frontend_takes_a_copy_of_each_chunk_in_the_model_dtype(model):
    """`add` only buffers, so the chunk it was given must not be read later: a caller that reuses its buffer before
    the compute (a microphone ring buffer) still gets the frames of what it added. A float64 chunk is converted to the
    model's dtype, giving the float32 chunk's frames."""
    x = torch.from_numpy(speech_like(0.3, 16000, seed=4))
    reference = StreamingFrontend(model)
    expected = torch.cat([reference.push(x), reference.flush()])
    frontend = StreamingFrontend(model)
    for i, a in enumerate(range(0, x.numel(), 320)):
        chunk = x[a : a + 320].clone() if i % 2 else x[a : a + 320].double()  # float32 and float64 in turn
        frontend.add(chunk)
        chunk.zero_()  # the caller reuses its buffer
    got = torch.cat([frontend.compute(), frontend.flush()])
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [64, 32])
def test_frontend_streams_the_offline_frames_with_every_parameter_random(dim):
    """The test models' LayerNorms start at weight 1 / bias 0 and WavLM-Large's convs have no bias, so a front-end
    that dropped a LayerNorm's affine part or a conv bias would pass on them: here every parameter is random (conv
    biases on), and 20 ms pushes still give `model.frontend` on the whole padded input. At dim 32 (the conv
    channels) the model has no 512 -> D projection, as upstream when the two are equal."""
    torch.manual_seed(3)
    model = wavlm.WavLM(dataclasses.replace(wavlm.TINY, conv_bias=True, encoder_embed_dim=dim,
                                            encoder_ffn_embed_dim=2 * dim)).eval()  # fmt: skip
    assert (model.post_extract_proj is None) == (dim == 32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.from_numpy(speech_like(0.5, 16000, seed=2))
    frontend = StreamingFrontend(model)
    got = torch.cat([frontend.push(x[a : a + 320]) for a in range(0, x.numel(), 320)] + [frontend.flush()])
    with torch.inference_mode():
        expected = model.frontend(torch.nn.functional.pad(x[None], (40, 40)))[0]
    assert got.shape == expected.shape == (x.numel() // 320, model.cfg.encoder_embed_dim)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# onednn.py: the prepacked kernels are used where they apply and agree with the plain ones


def test_onednn_applies_to_float32_cpu_tensors_only():
    cpu = torch.device("cpu")
    assert onednn_usable(cpu, torch.float32) == torch.backends.mkldnn.is_available()
    assert not onednn_usable(cpu, torch.float16) and not onednn_usable(cpu, torch.bfloat16)
    assert not onednn_usable(torch.device("meta"), torch.float32)


@pytest.mark.cpu_only
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_packed_linear_is_prepacked_and_equals_f_linear():
    gen = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(24, 16)
    for bias in (lin.bias, None):
        packed, plain = PackedLinear(lin.weight, bias), PackedLinear(lin.weight, bias, enabled=False)
        assert packed.packed is not None and packed.extra_nbytes == 24 * 16 * 4
        assert plain.packed is None and plain.extra_nbytes == 0
        for shape in ((5, 24), (2, 3, 24), (24,)):
            x = torch.randn(*shape, generator=gen)
            want = torch.nn.functional.linear(x, lin.weight, bias)
            torch.testing.assert_close(packed(x), want, atol=1e-5, rtol=1e-5)
            assert torch.equal(plain(x), want)
    assert PackedLinear.of(lin).packed is not None and PackedLinear.of(lin, enabled=False).packed is None
    torch.testing.assert_close(PackedLinear.of(lin)(torch.ones(3, 24)), lin(torch.ones(3, 24)), atol=1e-5, rtol=1e-5)


@pytest.mark.cpu_only
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_packed_conv1d_is_prepacked_and_equals_f_conv1d():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 50, generator=gen)
    for stride, groups in ((1, 1), (3, 1), (1, 4), (2, 2)):
        w, b = torch.randn(6 * groups, 8 // groups, 5, generator=gen), torch.randn(6 * groups, generator=gen)
        want = torch.nn.functional.conv1d(x, w, b, stride=stride, groups=groups)
        packed = PackedConv1d(w, b, stride=stride, groups=groups)
        plain = PackedConv1d(w, b, stride=stride, groups=groups, enabled=False)
        assert packed.packed is not None and packed.extra_nbytes == w.numel() * 4
        assert plain.packed is None and plain.extra_nbytes == 0
        torch.testing.assert_close(packed(x), want, atol=1e-5, rtol=1e-5, msg=f"stride {stride} groups {groups}")
        assert torch.equal(plain(x), want)
    # A half-precision grouped conv on CPU computes in float32 (wavlm.grouped_conv_dtype); the result keeps x's dtype.
    w = torch.randn(8, 2, 5, generator=gen)
    half = PackedConv1d(w.bfloat16(), None, groups=4)
    assert half.weight.dtype == torch.float32 and half.packed is not None
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.nn.functional.conv1d(x.bfloat16().float(), w.bfloat16().float(),
                                                                         groups=4), atol=0.05, rtol=0.02)  # fmt: skip
    assert PackedConv1d(w.bfloat16(), None, groups=1).weight.dtype == torch.bfloat16  # ungrouped keeps its dtype


# ----------------------------------------------------------------------------------------------------------------
# session.py / worker.py: fields, defaults, error messages, scoring pools


def run_session(worker, session, wav, chunk):
    events = []
    for a in range(0, len(wav), chunk):
        session.push(wav[a : a + chunk])
        worker.step([session])
        events += session.poll()
    session.end()
    worker.run_until_idle([session])
    return events + session.poll()


def test_session_stats_follow_the_events(worker, wav):
    session = worker.open_session(16000, 100, 600, mode="cached", preset="low-latency")
    assert session.closed is False and session.ended is False
    assert session.stats.commit_lag_max_s == 0.0 and session.stats.units == 0
    events = run_session(worker, session, wav, 1600)
    units, end = events[:-1], events[-1]
    lags = [e.commit_lag_s for e in units]
    assert len(units) > 5 and session.closed is True
    stats = session.stats
    assert stats.units == end.units == len(units)
    assert stats.commit_lag_last_s == lags[-1]
    assert stats.commit_lag_mean_s == pytest.approx(np.mean(lags))
    assert stats.commit_lag_max_s == max(lags)
    assert stats.audio_seconds == pytest.approx(1.5) and stats.encoded_seconds == pytest.approx(75 * 0.02)
    assert stats.units_per_second == pytest.approx(len(units) / (units[-1].end_frame * 0.02))
    session.reset()  # a fresh stream: every figure back to zero
    fresh = session.stats
    assert (fresh.units, fresh.audio_seconds, fresh.commit_lag_max_s, fresh.commit_lag_mean_s, fresh.bitrate) == (
        0, 0.0, 0.0, 0.0, 0.0)
    assert session.closed is False


def test_session_features_only_with_keep_features(worker, wav):
    plain = worker.open_session(16000, K, LMBDA)
    with pytest.raises(InvalidInput, match="keep_features=True"):
        plain.features()
    kept = worker.open_session(16000, K, LMBDA, keep_features=True)
    assert kept.features().shape == (0, 64)
    run_session(worker, kept, wav, 4000)
    assert kept.features().shape == (75, 64)


def test_pushing_non_finite_samples_names_them(worker):
    session = worker.open_session(16000, K, LMBDA)
    with pytest.raises(InvalidInput, match=r"^samples contains 1 non-finite value"):
        session.push(np.array([0.0, np.nan], np.float32))
    with pytest.raises(InvalidInput, match="samples must be float audio"):
        session.push(np.array([1, 2], np.int32))
    assert session.audio_seconds == 0.0


def test_worker_refuses_a_non_float_dtype(tiny_models):
    for dtype in (torch.int64, "float32"):
        with pytest.raises(InvalidInput, match=r"dtype must be a floating-point torch dtype \(e\.g\. torch\.float32\)"):
            EncoderWorker(tiny_models, "cpu", dtype=dtype, pairs=[(K, LMBDA)])


def test_unknown_pair_lists_the_available_ones(worker):
    with pytest.raises(UnknownModel, match=r"available pairs: \(500, 4500\), \(100, 600\)$"):
        worker.open_session(16000, 200, 700)


def test_scoring_sessions_share_one_forward_per_pool(worker, wav, monkeypatch):
    """Sessions of one (k, lambda) and score context are scored in one batched forward on one pool; other pairs
    in their own; sessions without scores in none. The scores equal those of each session run alone."""
    from dpslm_stream.stream import worker as worker_module

    calls = []

    def counting(scorers, blocks):
        calls.append([id(s.pool) for s in scorers])
        return real(scorers, blocks)

    real = worker_module.score_blocks
    alone = [run_session(worker, worker.open_session(16000, k, lmbda, score=True), wav, 8000) for k, lmbda in
             ((K, LMBDA), (K, LMBDA), (100, 600))]  # fmt: skip
    monkeypatch.setattr(worker_module, "score_blocks", counting)
    sessions = [worker.open_session(16000, k, lmbda, score=True) for k, lmbda in ((K, LMBDA), (K, LMBDA), (100, 600))]
    built = []
    monkeypatch.setattr(worker_module, "ScoringPool", lambda *args: built.append(args) or ScoringPool(*args))
    silent = worker.open_session(16000, K, LMBDA, score_context=5)
    assert silent._scorer is None and built == []  # no ULM cache allocated for a session without scores
    worker.open_session(16000, K, LMBDA, score=True, score_context=5)
    assert len(built) == 1  # the first scoring session of that context builds its pool
    events = [[] for _ in sessions]
    for a in range(0, len(wav), 8000):
        for s in (*sessions, silent):
            s.push(wav[a : a + 8000])
        worker.step([*sessions, silent])
        for out, s in zip(events, sessions):
            out += s.poll()
    for s in (*sessions, silent):
        s.end()
    worker.step([*sessions, silent])
    for out, s in zip(events, sessions):
        out += s.poll()
    assert all(len(set(pools)) == 1 for pools in calls)  # one forward per pool ...
    assert max(len(pools) for pools in calls) == 2  # ... over the sessions that share it
    for got, want in zip(events, alone):
        assert [(e.unit, e.start_frame) for e in got[:-1]] == [(e.unit, e.start_frame) for e in want[:-1]]
        np.testing.assert_allclose([e.logprob for e in got[:-1]], [e.logprob for e in want[:-1]], rtol=1e-5, atol=1e-5)
    assert sessions[0]._scorer.pool is sessions[1]._scorer.pool is not sessions[2]._scorer.pool


def test_ingest_time_counts_into_the_session_compute_time(tiny_models, wav):
    """The resampler and front-end work of `_ingest` is the session's own compute: with a clock that ticks 1 s per
    call, each ingest adds exactly one second (its end time minus its start time, however late the clock is)."""
    ticks = itertools.count()
    worker = EncoderWorker(tiny_models, "cpu", pairs=[(K, LMBDA)], clock=lambda: float(next(ticks)))
    session = worker.open_session(16000, K, LMBDA, mode="cached")
    for start in (0, 8000, 16000):
        session.push(wav[start : start + 8000])
        before = session.stats.compute_seconds
        session._ingest()
        assert session.stats.compute_seconds - before == 1.0


def test_session_compute_time_is_its_share_of_the_forwards_and_scoring(tiny_models, wav, monkeypatch):
    """compute_seconds = the session's own clock time (frozen here) + its share of every batched encoder forward +
    its share of every scoring forward, each measured by a DeviceTimer (replaced here by fixed durations)."""
    from dpslm_stream.stream import encoder as encoder_module
    from dpslm_stream.stream import worker as worker_module

    counts = {0.25: 0, 1.0: 0}

    def fixed_timer(seconds):
        class Timer:
            def __init__(self, device):
                counts[seconds] += 1
                self.seconds = seconds

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        return Timer

    monkeypatch.setattr(encoder_module, "DeviceTimer", fixed_timer(0.25))
    monkeypatch.setattr(worker_module, "DeviceTimer", fixed_timer(1.0))
    worker = EncoderWorker(tiny_models, "cpu", pairs=[(K, LMBDA)], clock=lambda: 0.0)
    session = worker.open_session(16000, K, LMBDA, mode="cached", score=True)
    run_session(worker, session, wav, 4000)
    assert counts[0.25] > 3 and counts[1.0] > 0
    stats = session.stats
    assert stats.compute_seconds == pytest.approx(0.25 * counts[0.25] + 1.0 * counts[1.0])
    assert stats.real_time_factor == pytest.approx(stats.compute_seconds / 1.5)
