"""dpslm_stream.models.transformer and models.precision at the edges the mutants of `make mutants
MODULES=transformer` found untested (docs/mutation.md): the plans and their descriptions per machine, the KV cache's
bookkeeping and errors, grouped-query attention, the config and state-dict checks with their messages. Models have
tiny RANDOM weights; the oracles are the float32 model itself and an equivalent multi-head model."""

import dataclasses

import numpy as np
import pytest
import torch

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import precision as PR
from dpslm_stream.models import transformer as T
from dpslm_stream.models import ulm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CFG = dataclasses.replace(ulm.TINY, vocab_size=50)


def machine(monkeypatch, flags, fbgemm):
    monkeypatch.setattr(PR, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(PR, "_fbgemm_dynamic_linear", lambda: fbgemm)


@pytest.mark.parametrize("flags,fbgemm,expect", [
    # (decode, bulk) of ellav/ulm, wavlm, wavtokenizer
    ((), False, [("int8", "fp32"), ("int8", "fp32"), ("fp32", "fp32")]),
    (("avx512f", "avx512_vnni"), True, [("int8dyn", "int8dyn"), ("int8dyn", "int8dyn"), ("int8dyn", "int8dyn")]),
    (("amx_bf16",), False, [("int8", "bf16"), ("int8", "bf16"), ("bf16", "bf16")]),
    (("avx512_bf16",), True, [("int8dyn", "bf16"), ("int8dyn", "bf16"), ("bf16", "bf16")]),
])  # fmt: skip
def test_fast_plans_per_model_and_machine(monkeypatch, flags, fbgemm, expect):
    machine(monkeypatch, flags, fbgemm)
    for model, (decode, bulk) in zip(("ulm", "wavlm", "wavtokenizer"), expect):
        assert PR.plan_for(model, "fast", "cpu") == PR.Plan("fast", model, decode, bulk)
    assert PR.plan_for("ellav", "fast") == PR.Plan("fast", "ellav", *expect[0])  # the default device: the CPU
    for model in ("ellav", "wavlm", "wavtokenizer"):
        assert PR.plan_for(model, "exact", "cpu") == PR.Plan("exact", model, "fp32", "fp32")
    # A GPU: bf16 units, and neither CPU int8 kernel.
    assert PR.plan_for("ellav", "fast", torch.device("cuda")) == PR.Plan("fast", "ellav", "bf16", "bf16")
    assert PR.has_bf16_units("cuda") and not PR.has_int8_weight_kernel("cuda")
    assert not PR.has_int8_dynamic_kernel("cuda")


def test_plan_descriptions_and_machine_summary(monkeypatch):
    fbgemm = "int8 (weights per channel, activations dynamic, fbgemm)"
    assert PR.Plan("exact", "ulm", "fp32", "fp32").describe() == "ulm: exact (float32)"
    assert PR.Plan("fast", "wavtokenizer", "bf16", "bf16").describe() == \
        "wavtokenizer: fast = backbone bf16 (FFTs and norms float32)"  # fmt: skip
    assert PR.Plan("fast", "wavtokenizer", "int8dyn", "int8dyn").describe() == \
        f"wavtokenizer: fast = ConvNeXt MLPs {fbgemm}; convolutions, attention, norms, FFTs float32"  # fmt: skip
    assert PR.Plan("fast", "wavlm", "int8dyn", "int8dyn").describe() == \
        f"wavlm: fast = streaming blocks' linear layers {fbgemm}; front-end, pos_conv, norms, attention float32"  # fmt: skip
    assert PR.Plan("fast", "wavlm", "int8dyn", "bf16").describe().startswith("wavlm: fast = streaming blocks' linear "
                                                                             "layers bf16; ")  # fmt: skip
    assert PR.Plan("fast", "ellav", "int8dyn", "int8dyn").describe() == \
        f"ellav: fast = matmuls {fbgemm}; norms, RoPE, attention, logits float32"  # fmt: skip
    assert PR.Plan("fast", "ulm", "int8", "fp32").describe() == ("ulm: fast = decode matmuls int8 weight-only (bf16 "
                                                                 "activations), prefill fp32; norms, RoPE, attention, "
                                                                 "logits float32")  # fmt: skip
    as_dict = PR.Plan("fast", "ulm", "int8", "bf16").to_dict()
    assert {k: as_dict[k] for k in ("precision", "model", "decode", "bulk")} == {"precision": "fast", "model": "ulm",
                                                                              "decode": "int8", "bulk": "bf16"}  # fmt: skip
    assert PR.check_precision("fast") == "fast"
    machine(monkeypatch, {"avx2", "avx512f", "sse4_2", "amx_bf16"}, False)
    assert PR.machine_summary("cpu") == "cpu, flags: amx_bf16 avx512f avx2"
    machine(monkeypatch, {"avx2", "avx512_vnni", "avx512f", "avx512_bf16", "amx_int8", "amx_bf16", "fma"}, False)
    assert PR.machine_summary("cpu") == "cpu, flags: amx_bf16 amx_int8 avx512_bf16 avx512f avx512_vnni avx2"
    machine(monkeypatch, {"avx512bw", "avx512f", "sse4_2"}, False)  # avx512bw: the int8 kernel needs it too
    assert PR.machine_summary("cpu") == "cpu, flags: avx512f avx512bw"
    machine(monkeypatch, {"sse4_2"}, False)
    assert PR.machine_summary() == "cpu, flags: none of amx/avx512/avx2"
    assert not PR.has_bf16_units("cpu")


@pytest.mark.parametrize("decode,bulk", [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "fp32")])
def test_fast_linear_float_kernels_and_zero_rows(decode, bulk):
    """The float kernels of FastLinear are plain GEMMs in their dtype (fp32: exactly nn.Linear); a weight row of
    zeros stays zero under int8 quantization (its scale is clamped, never 0/0)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    with torch.no_grad():
        lin.weight[3] = 0
    fast = PR.FastLinear([lin], decode, bulk)
    assert fast.extra_repr() == f"32 -> 8, decode={decode}, bulk={bulk}"
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        got, want = fast(x), lin(x)
    assert got.shape == (3, 5, 8) and got.dtype == torch.float32 and torch.isfinite(got).all()
    if decode == "fp32":
        assert torch.equal(got, want)
    else:
        assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())
    torch.testing.assert_close(got[..., 3], want[..., 3].expand_as(got[..., 3]), rtol=0, atol=1e-6)  # bias only


def test_fast_conversion_refuses_non_float32_models_and_records_the_plan():
    torch.manual_seed(0)
    model = ulm.ULM(CFG).to(torch.bfloat16)
    with pytest.raises(InvalidInput, match=r"precision 'fast' converts a float32 model; this one is torch\.bfloat16"):
        PR.apply_to_transformer(model, PR.Plan("fast", "ulm", "fp32", "fp32"))
    model = ulm.ULM(CFG)
    exact = PR.transformer_precision(model, "exact", "ulm")
    assert model.precision_plan is exact and not model.fused_ops and model.layers[0].attention.wqkv is None
    fast = PR.transformer_precision(model, "fast", "ulm")  # an exact model may still be converted
    assert model.precision_plan is fast and model.fused_ops
    assert all(m.fused for m in model.modules() if isinstance(m, T.RMSNorm))


def test_grouped_query_attention_equals_multi_head_with_shared_kv_heads():
    """n_kv_heads < n_heads: query head h uses kv head h // (n_heads / n_kv_heads), as upstream's repeat_interleave.
    Oracle: the multi-head model whose k/v projections repeat each kv head's rows for its query heads."""
    gqa_cfg = dataclasses.replace(CFG, n_kv_heads=2)
    torch.manual_seed(0)
    gqa = T.Transformer(gqa_cfg).eval()
    mha = T.Transformer(CFG).eval()
    state = dict(gqa.state_dict())
    D, dim = CFG.head_dim, CFG.dim
    for i in range(CFG.n_layers):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            state[key] = state[key].view(2, D, dim).repeat_interleave(2, dim=0).reshape(4 * D, dim)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)
        cache_g, cache_m = gqa.new_cache(2, 12), mha.new_cache(2, 12)
        assert cache_g.k.shape == (CFG.n_layers, 2, 2, 12, D) and cache_m.k.shape[2] == 4
        torch.testing.assert_close(gqa(tokens[:, :6], cache_g), mha(tokens[:, :6], cache_m), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gqa(tokens[:, 6:], cache_g), mha(tokens[:, 6:], cache_m), rtol=1e-5, atol=1e-5)


def test_kv_cache_bookkeeping_and_errors():
    for args, needle in [((0, 4), "batch_size >= 1 and capacity >= 1, got 0, 4"), ((2, 0), "got 2, 0")]:
        with pytest.raises(InvalidInput, match=needle):
            T.KVCache(CFG, *args)
    with pytest.raises(InvalidInput, match="window must be a positive number of tokens or None, got 0"):
        T.KVCache(CFG, 1, 4, window=0)
    cache = T.KVCache(CFG, 2, 6, window=3)
    assert cache.nbytes == 2 * (CFG.n_layers * 2 * CFG.n_kv_heads * 6 * CFG.head_dim * 4) + (2 * 6 + 2 + 2) * 8
    positions, mask = cache.begin(4)
    assert positions.tolist() == [[0, 1, 2, 3]] * 2 and mask.shape == (2, 1, 4, 4)
    # window 3: a query sees itself and the two tokens before it
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    cache.end([4, 2])  # row 1's last two tokens were padding
    assert cache.lengths.tolist() == [4, 2] and cache.length.tolist() == [4, 2] and cache.next_pos.tolist() == [4, 2]
    assert cache.slot_pos.tolist() == [[0, 1, 2, 3, -1, -1], [0, 1, -1, -1, -1, -1]]
    with pytest.raises(InvalidInput, match="KV cache overflow: 7 slots needed, capacity is 6"):
        cache.begin(3)
    cache.k[:, 0, :, :4] = torch.arange(4.0)[:, None]
    cache.drop_oldest(2)  # positions kept, moved to the front
    assert cache.lengths.tolist() == [2, 2] and cache.slot_pos[0].tolist() == [2, 3, -1, -1, -1, -1]
    assert cache.k[0, 0, 0, :2, 0].tolist() == [2.0, 3.0] and cache.next_pos.tolist() == [4, 2]
    cache.move_row(0, 1)
    assert cache.slot_pos[1].tolist() == [2, 3, -1, -1, -1, -1] and cache.next_pos.tolist() == [4, 4]
    assert cache.k[0, 1, 0, :2, 0].tolist() == [2.0, 3.0] and cache.lengths.tolist() == [2, 2]
    with pytest.raises(InvalidInput, match="cannot resize to 2 rows x 1 slots: rows hold 2 slots"):
        cache.resize(2, 1)
    with pytest.raises(InvalidInput, match="cannot resize to 0 rows"):
        cache.resize(0, 8)
    cache.grow(4)  # not larger: nothing happens
    assert cache.capacity == 6
    cache.resize(3, 8)
    assert (cache.batch_size, cache.capacity) == (3, 8) and cache.lengths.tolist() == [2, 2, 0]
    assert cache.slot_pos[1].tolist() == [2, 3] + [-1] * 6 and cache.slot_pos[2].tolist() == [-1] * 8
    assert cache.next_pos.tolist() == [4, 4, 0] and cache.k[0, 1, 0, :2, 0].tolist() == [2.0, 3.0]
    view = cache.rows(1, 2)
    view.clear_rows()
    assert cache.lengths.tolist() == [2, 0, 0] and cache.next_pos.tolist() == [4, 0, 0]
    assert cache.slot_pos[1].tolist() == [-1] * 8 and cache.slot_pos[0, :2].tolist() == [2, 3]


@pytest.mark.parametrize("field,value,needle", [
    ("dim", 0, "model config field 'dim' must be a positive integer, got 0"),
    ("vocab_size", 50.0, "model config field 'vocab_size' must be a positive integer, got 50.0"),
    ("n_layers", True, "model config field 'n_layers' must be a positive integer, got True"),
    ("n_heads", np.int64(4), "model config field 'n_heads' must be a positive integer, got"),  # a Python int
    ("head_dim", 15, "head_dim must be even for rotary pairs, got 15"),
    ("n_kv_heads", 3, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    ("norm_eps", 0.0, "model config field 'norm_eps' must be a positive number, got 0.0"),
    ("rope_theta", float("inf"), "model config field 'rope_theta' must be a positive number, got inf"),
])  # fmt: skip
def test_config_checks_name_the_field(field, value, needle):
    with pytest.raises(CheckpointError, match=f"^{needle}"):
        T.validate_config(dataclasses.replace(CFG, **{field: value}))


def test_the_smallest_config_builds():
    smallest = dataclasses.replace(CFG, dim=1, n_layers=1, head_dim=2, hidden_dim=1, n_heads=1, n_kv_heads=1,
                                   vocab_size=1)  # fmt: skip
    T.validate_config(smallest)
    assert T.Transformer(smallest)(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 1)


def test_state_dict_checks_name_the_keys(tmp_path):
    torch.manual_seed(0)
    good = T.Transformer(CFG).state_dict()
    with torch.device("meta"):
        model = T.Transformer(CFG)
    with pytest.raises(CheckpointError, match="^what: the state dict must be a dict of tensors, got list"):
        T.load_state_dict_strict(model, [good], "what")
    extra = {**good, **{f"extra.{i}": torch.zeros(1) for i in range(10)}}
    with pytest.raises(CheckpointError, match=r"missing keys: \[\]; unexpected keys: \[extra\.0, extra\.1, extra\.2, "
                                              r"extra\.3, extra\.4, extra\.5, extra\.6, extra\.7, \.\.\.\] \(10\)$"):
        T.load_state_dict_strict(model, extra, "what")
    with pytest.raises(CheckpointError, match=r"^what: entries that are not tensors: \[norm\.weight\] \(1\)$"):
        T.load_state_dict_strict(model, {**good, "norm.weight": [1.0] * 64}, "what")
    with pytest.raises(CheckpointError, match=r"^what: shape mismatches: \[norm\.weight: checkpoint \(3,\) vs expected "
                                              r"\(64,\)\] \(1\)$"):
        T.load_state_dict_strict(model, {**good, "norm.weight": torch.ones(3)}, "what")
    with pytest.raises(CheckpointError, match=r"^what: weights must be floating point; these are not: \[norm\.weight\]"):
        T.load_state_dict_strict(model, {**good, "norm.weight": torch.ones(64, dtype=torch.int32)}, "what")
    T.load_state_dict_strict(model, good, "what")
    assert model.norm.weight.data_ptr() == good["norm.weight"].data_ptr()  # assigned (off the meta device), no copy
    with pytest.raises(FileNotFoundError):  # a missing file is not a corrupt one
        T.read_checkpoint_file(tmp_path / "missing.pt", "ULM")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"^cannot read the ULM checkpoint .*bad\.pt.* \(corrupt or truncated\?\)"):
        T.read_checkpoint_file(tmp_path / "bad.pt", "ULM")
    with pytest.raises(CheckpointError, match=r"^cfg must be a dict, got int"):
        T.read_config_fields(3, ("dim",), "cfg")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_without_fused_projections_compute_the_same_function(dtype):
    """use_fused_ops on a model whose q/k/v are separate (or whose activations are not float32): the complex rotary
    angles are split back into cos/sin for the pairwise rotation, and the additive mask replaces the boolean one."""
    torch.manual_seed(0)
    ref = T.Transformer(CFG).to(dtype).eval()
    model = T.Transformer(CFG).to(dtype).eval()
    model.load_state_dict(ref.state_dict())
    model.use_fused_ops()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        scale = float(ref(tokens).abs().max())
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=tol * scale)
        cache_a, cache_b = model.new_cache(2, 16, window=5), ref.new_cache(2, 16, window=5)
        a, b = model(tokens[:, :8], cache_a, [8, 6]), ref(tokens[:, :8], cache_b, [8, 6])
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=tol * scale)
        torch.testing.assert_close(a[1, :6], b[1, :6], rtol=0, atol=tol * scale)
        for t in range(8, 12):
            torch.testing.assert_close(model(tokens[:, t : t + 1], cache_a), ref(tokens[:, t : t + 1], cache_b),
                                       rtol=0, atol=tol * scale)  # fmt: skip
    model.use_fused_ops(False)
    assert not model.fused_ops and not any(m.fused for m in model.modules() if isinstance(m, T.RMSNorm))
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))


def test_fused_projections_with_upstream_op_order():
    """A converted model with its fused ops switched off (use_fused_ops(False)) splits the fused q/k/v projection and
    rotates pairwise: float32 kernels (Plan fp32), so the same function as the unconverted model up to rounding."""
    torch.manual_seed(0)
    model = T.Transformer(dataclasses.replace(CFG, n_kv_heads=2)).eval()  # grouped-query: unequal q/k/v widths
    ref_gqa = T.Transformer(dataclasses.replace(CFG, n_kv_heads=2)).eval()
    ref_gqa.load_state_dict(model.state_dict())
    PR.apply_to_transformer(model, PR.Plan("fast", "ulm", "fp32", "fp32"))
    model.use_fused_ops(False)
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        want = ref_gqa(tokens)
        torch.testing.assert_close(model(tokens), want, rtol=0, atol=1e-5 * float(want.abs().max()))
        cache_a, cache_b = model.new_cache(2, 12), ref_gqa.new_cache(2, 12)
        model(tokens[:, :9], cache_a), ref_gqa(tokens[:, :9], cache_b)
        torch.testing.assert_close(model(tokens[:, 9:], cache_a), ref_gqa(tokens[:, 9:], cache_b), rtol=0,
                                   atol=1e-5 * float(want.abs().max()))  # fmt: skip
    assert model.layers[0].attention.wqkv is not None and not model.fused_ops


fbgemm_here = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                 reason="torch has no fbgemm here")  # fmt: skip


@fbgemm_here
def test_int8dyn_runs_fbgemm_with_a_shared_activation_scale(monkeypatch):
    """Where torch has fbgemm, the int8dyn kernel is found and used: activations are quantized per call with one
    scale over the call's rows (documented: a row's rounding depends on the other rows), unlike the weight-only
    int8 kernel and the float32 fallback, whose rows are independent. Without VNNI the activations get 7 bits
    (reduce_range), another rounding."""
    assert PR.has_int8_dynamic_kernel("cpu")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)  # the transformers' projections have no bias
    x = torch.randn(2, 64)
    big = torch.cat([x[:1], 50 * x[1:]])  # row 1 widens the call's activation range
    with torch.no_grad():
        dyn, weight_only = PR.FastLinear([lin], "int8dyn", "int8dyn"), PR.FastLinear([lin], "int8", "fp32")
        assert not torch.equal(dyn(x)[0], dyn(big)[0])
        assert torch.equal(weight_only(x)[0], weight_only(big)[0])
        want = lin(x)
        assert float((dyn(x) - want).abs().max()) <= 0.03 * float(want.abs().max())
        monkeypatch.setattr(PR, "cpu_flags", lambda: frozenset({"avx2"}))
        seven_bits = PR.FastLinear([lin], "int8dyn", "int8dyn")
        monkeypatch.setattr(PR, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
        eight_bits = PR.FastLinear([lin], "int8dyn", "int8dyn")
        assert seven_bits.reduce_range and not eight_bits.reduce_range
        assert not torch.equal(seven_bits(x), eight_bits(x))
        assert float((seven_bits(x) - want).abs().max()) <= 0.05 * float(want.abs().max())
