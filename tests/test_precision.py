"""The precision knob (models/precision.py): `exact` changes nothing; `fast` picks kernels per machine and stays close
to exact (tiny RANDOM-weight models: these bounds check the plumbing; quality on real checkpoints is measured by
`dpslm-stream bench ellav --precision exact,fast`)."""

import shutil

import numpy as np
import pytest
import torch

from dpslm_stream.errors import InvalidInput
from dpslm_stream.models import ellav as E
from dpslm_stream.models import precision as PR
from dpslm_stream.models import ulm as U
from dpslm_stream.models import wavtokenizer as W
from dpslm_stream.pipeline import Pipeline
from dpslm_stream.stream.resynth_events import AudioEvent, ResynthEndEvent
from dpslm_stream.stream.resynth_worker import ResynthWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")
K, LMBDA = 500, 4500


def tiny_ellav(seed=0) -> E.ELLAV:
    torch.manual_seed(seed)
    return E.random_model(K, E.TINY)


def test_exact_changes_nothing():
    model, ref = tiny_ellav(), tiny_ellav()
    plan = PR.transformer_precision(model, "exact", "ellav")
    assert plan.decode == plan.bulk == "fp32" and model.precision_plan is plan
    assert model.state_dict().keys() == ref.state_dict().keys()
    tokens = torch.randint(0, 4600, (2, 30))
    assert torch.equal(model(tokens), ref(tokens))
    assert model.generate_ids([[1, 2, 3, 4]], 60, 10, 1.0, 0.0) == ref.generate_ids([[1, 2, 3, 4]], 60, 10, 1.0, 0.0)


VNNI = frozenset({"avx512f", "avx512bw", "avx512_vnni"})


@pytest.mark.parametrize("flags,fbgemm,builds,expect", [
    (frozenset(), False, True, ("int8", "fp32", "fp32")),
    (frozenset({"avx512f", "avx512_vnni"}), True, True, ("int8dyn", "int8dyn", "int8dyn")),  # no avx512bw: no kernel
    (VNNI, True, True, ("int8gemv", "int8dyn", "int8dyn")),
    (VNNI, True, False, ("int8dyn", "int8dyn", "int8dyn")),  # the kernel did not build (no compiler)
    (VNNI | {"amx_bf16", "amx_int8"}, False, True, ("int8gemv", "bf16", "bf16")),
    (frozenset({"avx512f", "amx_bf16", "amx_int8"}), False, True, ("int8", "bf16", "bf16")),
    (frozenset({"avx512_bf16"}), True, True, ("int8dyn", "bf16", "bf16")),
])  # fmt: skip
def test_fast_plan_follows_the_machine(monkeypatch, flags, fbgemm, builds, expect):
    monkeypatch.setattr(PR, "cpu_flags", lambda: flags)
    monkeypatch.setattr(PR, "_fbgemm_dynamic_linear", lambda: fbgemm)
    monkeypatch.setattr(PR.int8_gemv, "load", lambda: builds)
    ellav, vocoder = PR.plan_for("ellav", "fast", "cpu"), PR.plan_for("wavtokenizer", "fast", "cpu")
    assert (ellav.decode, ellav.bulk, vocoder.bulk) == expect
    assert "fast" in ellav.describe() and PR.plan_for("ulm", "exact", "cpu").describe().endswith("exact (float32)")
    with pytest.raises(InvalidInput, match="precision must be one of exact, fast"):
        PR.plan_for("ellav", "fastest", "cpu")


@pytest.mark.parametrize("decode,bulk", [("int8", "fp32"), ("int8dyn", "fp32"), ("int8dyn", "int8dyn"),
                                         ("int8row", "int8dyn"), ("int8row", "fp32"), ("int8gemv", "int8dyn"),
                                         ("int8gemv", "fp32")])  # fmt: skip
@pytest.mark.parametrize("rows", [1, 5, PR.DECODE_ROWS, PR.DECODE_ROWS + 1, 40])
def test_int8_linear_is_close_to_float32(rows, decode, bulk):
    """Both kernels of FastLinear (int8 for few rows: weight-only, or with 8-bit activations per call or per row;
    the bulk GEMM for many) against fp32: per-channel int8 weights and bf16 or 8-bit activations keep the error
    around 1% of the output's scale."""
    if "int8dyn" in (decode, bulk) and not PR.has_int8_dynamic_kernel("cpu"):
        pytest.skip("torch has no fbgemm here")
    if decode == "int8gemv" and not PR.has_int8_gemv_kernel("cpu"):
        pytest.skip("no AVX512-VNNI or no C++ compiler here")
    torch.manual_seed(rows)
    a, b = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(64, 32, bias=True)
    fused = PR.FastLinear([a, b], decode, bulk)
    assert hasattr(fused, "weight") == (bulk != "int8dyn")  # no float copy where every row count runs int8
    x = torch.randn(rows, 64)
    with torch.no_grad():
        expected = torch.cat([a(x), b(x)], dim=-1)
        got = fused(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 0.03 * float(expected.abs().max())


def test_fast_transformer_stays_close_and_fuses_projections():
    model, ref = tiny_ellav(), tiny_ellav()
    PR.transformer_precision(model, "fast", "ellav")
    block = model.layers[0]
    assert block.attention.wqkv is not None and block.feed_forward.w13 is not None
    assert not hasattr(block.attention, "wq") and isinstance(model.output, torch.nn.Linear)  # logits stay fp32
    with torch.inference_mode():
        tokens = torch.randint(0, 4600, (1, 40))
        scale = float(ref(tokens).abs().max())
        assert float((model(tokens) - ref(tokens)).abs().max()) <= 0.05 * scale  # bulk path
        cache_a, cache_b = model.new_cache(1, 64), ref.new_cache(1, 64)
        model(tokens[:, :30], cache_a), ref(tokens[:, :30], cache_b)
        for t in range(30, 40):  # decode path, one row
            got, want = model(tokens[:, t : t + 1], cache_a), ref(tokens[:, t : t + 1], cache_b)
            assert float((got - want).abs().max()) <= 0.05 * scale
    with pytest.raises(InvalidInput, match="already converted"):
        PR.transformer_precision(model, "fast", "ellav")


def test_fast_ulm_log_probs_are_close():
    torch.manual_seed(1)
    model = U.ULM(U.config_for_k(K, U.TINY)).eval()
    ref = U.ULM(U.config_for_k(K, U.TINY)).eval()
    ref.load_state_dict(model.state_dict())
    PR.transformer_precision(model, "fast", "ulm")
    ids = U.UnitTokenizer(K).encode(torch.randint(0, K, (50,)))
    err = (model.unit_logprobs(ids) - ref.unit_logprobs(ids)).abs().max()
    assert float(err) <= 0.05


def test_fast_worker_streams_and_reports_its_plan(tiny_models):
    worker = ResynthWorker(tiny_models, pairs=[(K, LMBDA)], precision="fast")
    assert worker.precision_plans["precision"] == "fast" and "ellav: fast" in worker.precision_plans["ellav"]
    s = worker.open_session(K, LMBDA, left_context=4, holdback=1)
    assert s.settings()["precision"] == "fast"
    rng = np.random.default_rng(0)
    units = [int(u) for u in rng.integers(0, K, 20)]
    units = [u for i, u in enumerate(units) if i == 0 or u != units[i - 1]]
    for i in range(0, len(units), 4):
        s.push_units(units[i : i + 4])
        worker.step([s])
    s.end()
    worker.run_until_idle([s])
    events = s.poll()
    end = events[-1]
    assert isinstance(end, ResynthEndEvent) and end.error is None and end.units == len(units)
    audio = np.concatenate([e.pcm for e in events if isinstance(e, AudioEvent)])
    assert len(audio) == 600 * end.codec_frames > 0 and np.isfinite(audio).all()


def test_bad_precision_settings_are_clear_errors(tiny_models):
    with pytest.raises(InvalidInput, match="precision must be one of"):
        ResynthWorker(tiny_models, precision="turbo")
    with pytest.raises(InvalidInput, match="picks the dtypes itself"):
        ResynthWorker(tiny_models, dtype=torch.float64, precision="fast")
    with pytest.raises(InvalidInput, match="precision must be one of"):
        Pipeline(tiny_models, K, LMBDA, precision="int3")


def test_fast_pipeline_resynthesizes_and_reports(tiny_models):
    pipe = Pipeline(tiny_models, K, LMBDA, precision="fast")
    (wav, codes, finished), = pipe.resynthesize([3, 7, 9, 11])
    assert finished and wav.shape[-1] == 600 * len(codes) > 0
    plans = pipe.precision_plans()
    assert set(plans) == {"ellav", "wavtokenizer"} and all("fast" in p for p in plans.values())
    assert W.apply_precision(W.WavTokenizer(W.TINY), "exact").bulk == "fp32"


def test_int8_vocoder_mlps_stay_close_and_convert_once(monkeypatch):
    """Where fbgemm runs and there are no bf16 units, a fast vocoder's ConvNeXt MLPs run int8 (the rest float32):
    its audio stays close to float32's (RANDOM tiny weights: plumbing), and converting twice changes nothing."""
    if not PR.has_int8_dynamic_kernel("cpu"):
        pytest.skip("torch has no fbgemm here")
    monkeypatch.setattr(PR, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    def model():
        torch.manual_seed(0)
        m = W.WavTokenizer(W.TINY).eval()
        with torch.no_grad():  # a random codebook (the constructor's is zeros: every code would decode alike)
            for layer in m.feature_extractor.encodec.quantizer.vq.layers:
                layer._codebook.embed.normal_()
        return m

    ref, fast = model(), model()
    plan = W.apply_precision(fast, "fast")
    assert (plan.decode, plan.bulk) == ("int8dyn", "int8dyn") and fast.precision_plan is plan
    blocks = fast.backbone.convnext
    assert all(isinstance(b.pwconv1, PR.FastLinear) and isinstance(b.pwconv2, PR.FastLinear) for b in blocks)
    assert isinstance(fast.backbone.embed, torch.nn.Conv1d) and isinstance(fast.head.out, torch.nn.Linear)
    first = blocks[0].pwconv1
    W.convert_mlps(fast, plan)
    assert blocks[0].pwconv1 is first
    codes = torch.randint(0, W.TINY.vq_bins, (1, 1, 40))
    with torch.inference_mode():
        want, got = ref(codes), fast(codes)
    snr = 10 * torch.log10((want**2).sum() / ((want - got) ** 2).sum())
    assert got.shape == want.shape and float(snr) > 25


def test_fused_ops_compute_the_upstream_functions():
    """Transformer.use_fused_ops (a fast plan's F.rms_norm, complex RoPE on q and k together, additive mask) on
    float32 weights against upstream's op order: the same functions up to float rounding, cached decode included."""
    model, ref = tiny_ellav(), tiny_ellav()
    PR.apply_to_transformer(model, PR.Plan("fast", "ellav", "fp32", "fp32"))
    assert model.fused_ops and not ref.fused_ops
    with torch.inference_mode():
        tokens = torch.randint(0, 4600, (2, 40))
        scale = float(ref(tokens).abs().max())
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=1e-5 * scale)
        cache_a, cache_b = model.new_cache(2, 64), ref.new_cache(2, 64)
        model(tokens[:, :30], cache_a, [30, 25]), ref(tokens[:, :30], cache_b, [30, 25])
        for t in range(30, 40):
            torch.testing.assert_close(model(tokens[:, t : t + 1], cache_a), ref(tokens[:, t : t + 1], cache_b),
                                       rtol=0, atol=1e-5 * scale)  # fmt: skip


def test_fast_streaming_encoder_stays_close_to_exact(tiny_models):
    """The cached low-latency encoder with precision "fast" (int8 block linears where fbgemm exists) against the
    same worker in "exact": the same number of frames, features within a small angle, and mostly the same units
    (tiny RANDOM weights: plumbing; `dpslm-stream bench encoder --precision exact,fast` measures full size)."""
    from dpslm_stream.signals import speech_like
    from dpslm_stream.stream.compare import agreement, stream_encode
    from dpslm_stream.stream.worker import EncoderWorker

    exact = EncoderWorker(tiny_models, pairs=[(K, LMBDA)])
    fast = EncoderWorker(tiny_models, pairs=[(K, LMBDA)], wavlm=exact.wavlm, precision="fast")
    assert exact.runner.precision_plan.precision == "exact" and "wavlm: fast" in fast.runner.precision_plan.describe()
    if PR.has_int8_dynamic_kernel("cpu"):
        assert isinstance(fast.runner.linears[0][0], PR.FastLinear)
    wav = speech_like(3.0, 16000, seed=3)
    runs = [stream_encode(w, wav, 16000, k=K, lmbda=LMBDA, mode="cached", preset="low-latency", keep_features=True)
            for w in (exact, fast)]  # fmt: skip
    a = agreement(runs[1].features, runs[0].features, exact._codebook(K), LMBDA, 5)
    assert runs[1].features.shape == runs[0].features.shape
    # measured 0.99997 / 0.98 / 0.97; every output scaled by 1.1 instead gives 0.991 / 0.83 / 0.72
    assert a["feature_cosine"] > 0.999 and a["kmeans_agreement"] > 0.9 and a["frame_agreement"] > 0.9, a
    with pytest.raises(InvalidInput, match="precision must be one of"):
        EncoderWorker(tiny_models, pairs=[(K, LMBDA)], wavlm=exact.wavlm, precision="quick")


def test_fast_encoder_projects_q_k_v_in_one_matmul_bit_equal_to_three(tiny_models):
    """A fast WindowRunner stacks each block's q/k/v weights into one FastLinear: with one scale per output channel
    and one activation quantization per call, its q, k and v equal those of three separate FastLinears bit for bit,
    at the few rows of one stream and the many of a batch (the decode and the bulk kernel)."""
    from dpslm_stream.stream.worker import EncoderWorker

    fast = EncoderWorker(tiny_models, pairs=[(K, LMBDA)], precision="fast")
    runner, plan = fast.runner, fast.runner.precision_plan
    if plan.bulk == "fp32":
        pytest.skip("fast is exact on this machine: nothing is fused")
    attn = runner.blocks[0].self_attn
    assert len(runner.linears[0]) == 4 and runner.linears[0][0].out_features == 3 * runner.dim
    separate = [PR.FastLinear([m], plan.decode, plan.bulk) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    torch.manual_seed(0)
    for rows in (3, 8 * 15):
        h = torch.randn(1, rows, runner.dim)
        with torch.inference_mode():
            fused = runner._project_qkv(runner.linears[0][:1], h)
            three = runner._project_qkv(separate, h)
        assert all(torch.equal(a, b) for a, b in zip(fused, three))


def test_server_builds_its_encoder_in_the_configured_precision(tiny_dir):
    from dpslm_stream.server.app import ServerConfig, build_encoder

    worker = build_encoder(ServerConfig(models=str(tiny_dir), pairs=((K, LMBDA),), encoder_precision="fast"))
    assert worker.runner.precision_plan.precision == "fast"
    assert build_encoder(ServerConfig(models=str(tiny_dir), pairs=((K, LMBDA),))).runner.precision_plan.precision \
        == "exact"  # fmt: skip


@pytest.mark.parametrize("decode,bulk", [("int8", "fp32"), ("int8dyn", "int8dyn"), ("int8row", "fp32"),
                                         ("int8gemv", "int8dyn")])  # fmt: skip
def test_fast_linear_takes_empty_and_non_finite_rows(decode, bulk):
    """fbgemm refuses to pick an activation scale for no rows or all-NaN rows: FastLinear answers like a float layer
    (an empty output; NaN out) instead of raising, for few rows (decode) and many (bulk) alike."""
    if "int8dyn" in (decode, bulk) and not PR.has_int8_dynamic_kernel("cpu"):
        pytest.skip("torch has no fbgemm here")
    if decode == "int8gemv" and not PR.has_int8_gemv_kernel("cpu"):
        pytest.skip("no AVX512-VNNI or no C++ compiler here")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    fast = PR.FastLinear([lin], decode, bulk)
    with torch.no_grad():
        assert fast(torch.zeros(0, 64)).shape == (0, 32) and fast(torch.zeros(2, 0, 64)).shape == (2, 0, 32)
        assert torch.isnan(fast(torch.full((2, 64), float("nan")))).all()
        many = fast(torch.full((PR.DECODE_ROWS + 4, 64), float("nan")))  # the bulk kernel's float fallback
        assert many.shape == (PR.DECODE_ROWS + 4, 32) and torch.isnan(many).all()


def test_int8row_rows_do_not_depend_on_their_neighbours():
    """The compiled step's kernel quantizes each row's activations with its own scale: a row's output is the same
    bit for bit alone or among other rows (fbgemm's int8dyn shares one scale per call, so it cannot promise this)."""
    torch.manual_seed(3)
    fast = PR.FastLinear([torch.nn.Linear(64, 48)], "int8row", "fp32")
    x = torch.randn(6, 64) * torch.logspace(-2, 2, 6)[:, None]  # rows of very different scales
    with torch.no_grad():
        together = fast(x)
        assert all(torch.equal(together[i : i + 1], fast(x[i : i + 1])) for i in range(6))


@pytest.mark.parametrize("flags,fbgemm,decode", [
    (frozenset({"avx512f", "avx512_vnni"}), True, "int8row"),
    (frozenset(), False, "int8row"),
    (frozenset({"avx512f", "amx_bf16", "amx_int8"}), False, "int8row"),
    (VNNI, True, "int8gemv"),  # the kernel is an op the compiler calls as it is
])  # fmt: skip
def test_compiled_decode_plan(monkeypatch, flags, fbgemm, decode):
    """compile_decode keeps the fast plan's bulk kernel and swaps the CPU's int8 decode kernel for the one the
    compiler can fuse; it changes nothing for exact, or for models that are not transformers."""
    monkeypatch.setattr(PR, "cpu_flags", lambda: flags)
    monkeypatch.setattr(PR, "_fbgemm_dynamic_linear", lambda: fbgemm)
    monkeypatch.setattr(PR.int8_gemv, "load", lambda: True)
    plain, compiled = PR.plan_for("ellav", "fast", "cpu"), PR.plan_for("ellav", "fast", "cpu", compile_decode=True)
    assert (compiled.decode, compiled.bulk, compiled.compiled) == (decode, plain.bulk, True) and not plain.compiled
    assert compiled.describe().endswith("decode step compiled (torch.compile)")
    assert PR.plan_for("ellav", "exact", "cpu", compile_decode=True) == PR.plan_for("ellav", "exact", "cpu")
    assert PR.plan_for("wavtokenizer", "fast", "cpu", compile_decode=True) == PR.plan_for("wavtokenizer", "fast")
    assert compiled.to_dict()["compiled"] is True


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")  # fmt: skip
def test_compiled_decode_step_equals_the_eager_step():
    """The decode step through torch.compile (one graph for a batch of two rows of different lengths) computes what
    the same model computes eagerly: logits and every KV-cache slot equal to float rounding, over several steps, with
    the cache written in place. Compiles once on the tiny model (tens of seconds; longer on a loaded machine)."""
    model = tiny_ellav()
    plan = PR.transformer_precision(model, "fast", "ellav", compile_decode=True)
    assert plan.compiled and model.compiled_layers is not None
    tokens = torch.randint(0, 4600, (2, 40))
    with torch.inference_mode():
        compiled, eager = model.new_cache(2, 64), model.new_cache(2, 64)
        model(tokens[:, :30], compiled, [30, 25]), model(tokens[:, :30], eager, [30, 25])  # prefill: eager both
        scale = 0.0
        for t in range(30, 34):
            got = model(tokens[:, t : t + 1], compiled)
            model.compiled_layers, layers = None, model.compiled_layers
            want = model(tokens[:, t : t + 1], eager)
            model.compiled_layers = layers
            scale = max(scale, float(want.abs().max()))
            assert float((got - want).abs().max()) <= 1e-4 * scale
        for a, b in ((compiled.k, eager.k), (compiled.v, eager.v)):
            assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())
        assert (compiled.lengths == eager.lengths).all() and torch.equal(compiled.slot_pos, eager.slot_pos)


def test_bench_ellav_takes_the_compiled_variant():
    import argparse

    from dpslm_stream.bench.ellav import _precisions

    assert _precisions("exact, fast-compiled,fast") == ["exact", "fast-compiled", "fast"]
    with pytest.raises(argparse.ArgumentTypeError, match="fast-compiled"):
        _precisions("exact,int4")


def test_bench_wavtokenizer_takes_precisions():
    import argparse

    from dpslm_stream.bench.wavtokenizer import _precisions

    assert _precisions("exact,fast") == ["exact", "fast"]
    with pytest.raises(argparse.ArgumentTypeError, match="exact, fast"):
        _precisions("exact,int8")


def test_compile_decode_needs_fast(tiny_models):
    from dpslm_stream.server.app import ServerConfig

    with pytest.raises(InvalidInput, match="needs precision 'fast'"):
        ResynthWorker(tiny_models, pairs=[(K, LMBDA)], compile_decode=True)
    with pytest.raises(InvalidInput, match="--compile-decode .* needs --precision fast"):
        ServerConfig(compile_decode=True)
    assert ServerConfig(compile_decode=True, precision="fast").compile_decode
    with pytest.raises(InvalidInput, match="compile_decode must be True or False"):
        ServerConfig(compile_decode="yes", precision="fast")


def test_warm_up_runs_two_streams_and_resets_the_counters(tiny_models):
    worker = ResynthWorker(tiny_models, pairs=[(K, LMBDA)], precision="fast")
    worker.warm_up(123, 456)  # a pair the worker lacks: its first pair instead
    assert (worker.compute_seconds, worker.decode_steps, worker.tokens_decoded) == (0.0, 0, 0)
    assert worker.vocoder_runner.forwards == 0
    s = worker.open_session(K, LMBDA, left_context=4, holdback=1)
    s.push_units([3, 4, 5])
    s.end()
    worker.run_until_idle([s])
    assert worker.decode_steps > 0 and isinstance(s.poll()[-1], ResynthEndEvent)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")  # fmt: skip
def test_server_with_compile_decode_warms_up_and_streams_audio():
    """serve --precision fast --compile-decode: the resynthesis worker compiles ELLA-V's decode step during the
    server's warm-up (tiny set), reports it in ready.settings, and a stream gets its audio."""
    import asyncio

    from dpslm_stream.client import UnitsClient, chunked
    from dpslm_stream.server.app import ServerConfig, ServerThread
    from dpslm_stream.tiny import speech_like

    cfg = ServerConfig(port=0, models="tiny", precision="fast", compile_decode=True)
    with ServerThread(cfg) as srv:
        worker = srv.server.resynth.worker
        assert worker.compile_decode and worker.decode_steps == 0
        assert all(m.compiled_layers is not None for m in worker._ellavs.values()) and worker._ellavs

        async def main():
            async with UnitsClient(srv.url, sample_rate=16000, resynth={}) as c:
                msgs = [m async for m in c.stream(chunked(speech_like(1.0, 16000, seed=2), 16000, 100))]
                return c.ready, msgs

        ready, msgs = asyncio.run(asyncio.wait_for(main(), 300))
    assert ready.settings["resynth"]["precision"] == "fast"
    assert worker.precision_plans["ellav"].endswith("decode step compiled (torch.compile)")
    assert any(type(m).__name__ == "AudioChunk" for m in msgs) and msgs[-1].reason == "end"
