"""WavLM (models/wavlm.py): behaviour the mutation run showed unpinned by test_wavlm.py.

The exact messages a user gets for a wrong cfg, checkpoint file, audio or call, the bounds of the cfg checks and of
the conv-spec parser, the parameter count of a partial forward pass against the parameters that pass really uses
(autograd), the variants the released model does not use (no gate, no relative position bias, GroupNorm front-end
with trained affines) against transformers or a slow reference. Models are TINY and carry RANDOM weights."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import wavlm as W
from tests.test_wavlm import _hf_twin, _rel_err, _wav

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC_EXAMPLE = '"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"'


def raises_exactly(exc: type[Exception], message: str):
    """pytest.raises matching the whole message: what the user reads is part of the behaviour."""
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


def small(**changes) -> W.WavLMConfig:
    """TINY with 2 blocks (and any other change), for tests that need a network but not its depth."""
    return dataclasses.replace(W.TINY, encoder_layers=2, **changes)


def perturbed(model: W.WavLM, seed: int = 0) -> W.WavLM:
    """Every parameter random (norm affines, biases, gate constants): a swapped or dropped one changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # 1-D weights are norm affines (Linear and conv weights have 2+ dims); grep_a is the gate constant.
            base = 1.0 if (name.endswith("weight") and p.dim() == 1) or name.endswith("grep_a") else 0.0
            if p.dim() == 1 or name.endswith("grep_a"):
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------- the conv spec parser


def test_conv_spec_accepts_upstreams_grammar():
    parse = W._parse_conv_layers
    assert parse("[(1,1,1)]") == [(1, 1, 1)]
    assert parse("[(2,3,1)] + [(4,5,6)]") == [(2, 3, 1), (4, 5, 6)]
    assert parse("2 * [(2,3,1)] + [(4,5,6)] * 2") == [(2, 3, 1)] * 2 + [(4, 5, 6)] * 2
    assert parse("[[7, 8, 9]]") == [(7, 8, 9)]
    assert parse([(512, 10, 5), [512, 3, 2]]) == [(512, 10, 5), (512, 3, 2)]  # a list is taken as is
    assert len(parse("[(2,3,1)] * 1000")) == 1000 and len(parse("1000 * [(2,3,1)]")) == 1000


@pytest.mark.parametrize("spec,reason", [
    ("[(2,3,1)] * 1001", "repeat count above 1000"),
    ("1001 * [(2,3,1)]", "repeat count above 1000"),
    ("[(2,3,1)] - [(2,3,1)]", "unsupported syntax BinOp"),
    ("[(2.0,3,1)]", "unsupported syntax Constant"),
    ("[(True,3,1)]", "unsupported syntax Constant"),
    ("[(x,3,1)]", "unsupported syntax Name"),
    ("{(2,3,1)}", "unsupported syntax Set"),
    ("[(2,3,1)", "'[' was never closed (<unknown>, line 1)"),
    ("[]", "expected a non-empty list of positive (dim, kernel, stride) triples"),
    ("[(0,3,1)]", "expected a non-empty list of positive (dim, kernel, stride) triples"),
    ("[(2,3,1,1)]", "expected a non-empty list of positive (dim, kernel, stride) triples"),
    ("[(2,3)]", "expected a non-empty list of positive (dim, kernel, stride) triples"),
])  # fmt: skip
def test_conv_spec_errors_say_why(spec, reason):
    with raises_exactly(InvalidInput, f"conv_feature_layers {spec!r} is not a list of (dim, kernel, stride) triples "
                                      f"such as {SPEC_EXAMPLE}: {reason}"):  # fmt: skip
        W._parse_conv_layers(spec)


def test_conv_spec_of_the_wrong_type():
    with pytest.raises(InvalidInput, match=r"^conv_feature_layers 5 is not a list .*: 'int' object is not iterable$"):
        W._parse_conv_layers(5)


# ---------------------------------------------------------------- the cfg checks


def test_cfg_bounds_are_tight():
    W.WavLMConfig(encoder_layers=1, encoder_embed_dim=16, encoder_attention_heads=16, conv_pos_groups=16)
    W.WavLMConfig(relative_position_embedding=True, num_buckets=4, max_distance=2)  # 4 // 4 = 1 < 2
    W.WavLMConfig(relative_position_embedding=False, num_buckets=3, max_distance=1)  # not read without the bias


@pytest.mark.parametrize("changes,message", [
    ({"encoder_layers": 0}, "WavLM config field encoder_layers must be a positive int, got 0"),
    ({"conv_pos": True}, "WavLM config field conv_pos must be a positive int, got True"),
    ({"num_buckets": 320.0}, "WavLM config field num_buckets must be a positive int, got 320.0"),
    ({"conv_bias": 0}, "WavLM config field conv_bias must be a bool, got 0"),
    ({"gru_rel_pos": "yes"}, "WavLM config field gru_rel_pos must be a bool, got 'yes'"),
    ({"extractor_mode": "group_norm"}, "extractor_mode must be 'default' or 'layer_norm', got 'group_norm'"),
    ({"activation_fn": "relu"}, "activation_fn 'relu' is not supported; WavLM releases use 'gelu'"),
    ({"encoder_attention_heads": 5}, "encoder_embed_dim 768 must be divisible by encoder_attention_heads 5"),
    ({"conv_pos_groups": 5}, "encoder_embed_dim 768 must be divisible by conv_pos_groups 5"),
    ({"relative_position_embedding": True, "num_buckets": 3},
     "num_buckets 3 / max_distance 1280: need num_buckets >= 4 and max_distance > num_buckets // 4"),
    ({"relative_position_embedding": True, "num_buckets": 8, "max_distance": 2},
     "num_buckets 8 / max_distance 2: need num_buckets >= 4 and max_distance > num_buckets // 4"),
])  # fmt: skip
def test_cfg_errors_say_what_is_wrong(changes, message):
    with raises_exactly(InvalidInput, message):
        W.WavLMConfig(**changes)


def test_cfg_from_dict_messages_and_extras():
    with raises_exactly(CheckpointError, "WavLM checkpoint 'cfg' must be a dict, got list"):
        W.WavLMConfig.from_dict([("encoder_layers", 2)])
    with raises_exactly(CheckpointError, "WavLM checkpoint cfg is invalid: WavLM config field encoder_layers must be a "
                                         "positive int, got -1"):  # fmt: skip
        W.WavLMConfig.from_dict({"encoder_layers": -1})
    cfg = W.WavLMConfig.from_dict({"encoder_layers": 3, "dropout": 0.2, "label_rate": 50})
    extra = dict(cfg.extra)
    assert cfg.encoder_layers == 3 and extra["dropout"] == 0.2 and extra["label_rate"] == 50
    assert extra["mask_prob"] == 0.65 and "encoder_layers" not in extra  # upstream defaults fill the rest
    assert list(cfg.to_dict())[: len(dataclasses.fields(cfg)) - 1] == [
        f.name for f in dataclasses.fields(cfg) if f.name != "extra"]


# ---------------------------------------------------------------- pieces and variants


def test_same_pad_trims_only_even_kernels():
    x = torch.arange(10.0).reshape(1, 1, 10)
    assert torch.equal(W.SamePad(128)(x), x[:, :, :9]) and torch.equal(W.SamePad(2)(x), x[:, :, :9])
    assert torch.equal(W.SamePad(127)(x), x) and torch.equal(W.SamePad(3)(x), x)


def test_odd_pos_conv_kernel_matches_transformers():
    torch.manual_seed(7)
    m = perturbed(W.WavLM(small(conv_pos=63, conv_pos_groups=8)), seed=7)
    hf = _hf_twin(m)
    wav = _wav(5000, seed=13)
    with torch.no_grad():
        ref = hf(F.pad(wav, (40, 40)), output_hidden_states=True).hidden_states[2].squeeze(0)
    assert _rel_err(W.extract_features(m, wav, 16000, layer=2), ref) <= 1e-4


def test_group_norm_front_end_with_trained_affine_matches_transformers():
    """WavLM-Base's GroupNorm (conv block 0) and post-LN blocks, with every affine away from (1, 0)."""
    torch.manual_seed(8)
    m = perturbed(W.WavLM(small(extractor_mode="default", layer_norm_first=False)), seed=8)
    assert m.feature_extractor.conv_layers[0][2].weight.std() > 0.1
    hf = _hf_twin(m)
    wav = _wav(6000, seed=14)
    with torch.no_grad():
        out = hf(F.pad(wav, (40, 40)), output_hidden_states=True)
    assert _rel_err(W.extract_features(m, wav, 16000, layer=2), out.hidden_states[2].squeeze(0)) <= 1e-4
    assert _rel_err(W.extract_features(m, wav, 16000, layer=None), out.last_hidden_state.squeeze(0)) <= 1e-4


def _slow_attention(attn: W.WavLMSelfAttention, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One attention call written out in float64: softmax(q k^T / sqrt(hd) + gate * bias) v, heads concatenated."""
    p = {k: v.double() for k, v in attn.state_dict().items()}
    x = x.double()
    B, T, D = x.shape
    H, hd = attn.num_heads, D // attn.num_heads

    def proj(name):
        return (x @ p[f"{name}.weight"].T + p[f"{name}.bias"]).reshape(B, T, H, hd).transpose(1, 2)

    scores = proj("q_proj") @ proj("k_proj").transpose(-1, -2) / math.sqrt(hd)
    if bias is not None:
        mask = bias.double()[None]
        if attn.gru_rel_pos:
            g = x.reshape(B, T, H, hd) @ p["grep_linear.weight"].T + p["grep_linear.bias"]  # [B, T, H, 8]
            a = torch.sigmoid(g[..., :4].sum(-1)).transpose(1, 2)[..., None]
            b = torch.sigmoid(g[..., 4:].sum(-1)).transpose(1, 2)[..., None]
            mask = (a * (b * p["grep_a"] - 1.0) + 2.0) * mask
        scores = scores + mask
    out = (torch.softmax(scores, -1) @ proj("v_proj")).transpose(1, 2).reshape(B, T, D)
    return out @ p["out_proj.weight"].T + p["out_proj.bias"]


@pytest.mark.parametrize("gru,rel", [(True, True), (False, True), (False, False)])
def test_attention_matches_slow_reference(gru, rel):
    torch.manual_seed(9)
    m = perturbed(W.WavLM(small(gru_rel_pos=gru, relative_position_embedding=rel)), seed=9)
    x = torch.randn(2, 30, 64)
    bias = m.relative_bias(30, 30)
    assert (bias is None) == (not rel) and (m.relative_bias_by_distance(30) is None) == (not rel)
    attn = m.encoder.layers[1].self_attn
    with torch.no_grad():
        torch.testing.assert_close(attn(x, bias)[0].double(), _slow_attention(attn, x, bias), rtol=1e-5, atol=1e-5)
    if rel:
        bias = bias * 4  # a strong bias: the gate decides how much of it counts
        with torch.no_grad():
            torch.testing.assert_close(attn(x, bias)[0].double(), _slow_attention(attn, x, bias), rtol=1e-5,
                                       atol=1e-5)  # fmt: skip


def test_attention_bias_shape_error():
    m = W.WavLM(small())
    x = torch.randn(1, 10, 64)
    with raises_exactly(InvalidInput, "relative bias has shape (4, 10, 9), expected [4, 10, 10] (heads, query frames, "
                                      "cached + new key frames)"):  # fmt: skip
        m.layer(0, x, m.relative_bias(10, 9))
    with raises_exactly(InvalidInput, "relative bias has shape (4, 9, 10), expected [4, 10, 10] (heads, query frames, "
                                      "cached + new key frames)"):  # fmt: skip
        m.layer(0, x, m.relative_bias(9, 10))


def test_defaults_are_dp_slms_layer_11_and_upstreams_full_depth():
    """forward / encode / the step generators default to layer 11 (DP-SLM); extract_features to None (upstream's
    full depth with the final LN)."""
    torch.manual_seed(13)
    m = perturbed(W.WavLM(W.TINY), seed=13)
    wav = _wav(2000, seed=18)
    padded = F.pad(wav, (40, 40))
    with torch.no_grad():
        x = m.frontend(padded)
        assert torch.equal(m(padded), m(padded, 11)) and not torch.equal(m(padded, 11), m(padded, 12))
        assert torch.equal(m.encode(x), m.encode(x, 11))
        assert torch.equal(W.run_steps(m.forward_steps(padded)), m(padded, 11))
        assert torch.equal(W.run_steps(m.encode_steps(x)), m.encode(x, 11))
        assert torch.equal(W.run_steps(W.extract_features_steps(m, wav, 16000)), m(padded, 11)[0])
    assert torch.equal(W.extract_features(m, wav, 16000), W.extract_features(m, wav, 16000, layer=None))
    with torch.no_grad():
        full = m(padded, None)[0]  # the last block and the final LN
    torch.testing.assert_close(W.extract_features(m, wav, 16000), full, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(W.extract_features(m, wav, 16000), W.extract_features(m, wav, 16000, layer=12))


def test_relative_buckets_on_the_requested_device():
    assert W.relative_position_buckets(3, 5, 2, 320, 800, device="meta").device.type == "meta"
    assert W.relative_position_buckets(3, 5, 2, 320, 800).device.type == "cpu"


def test_grouped_conv_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for half in (torch.bfloat16, torch.float16):
        assert W.grouped_conv_dtype(cpu, half, 2) == torch.float32 and W.grouped_conv_dtype(cpu, half, 16) == torch.float32
        assert W.grouped_conv_dtype(cpu, half, 1) == half  # not grouped: oneDNN's plain conv is fine
        assert W.grouped_conv_dtype(cuda, half, 16) == half
    assert W.grouped_conv_dtype(cpu, torch.float64, 16) == torch.float64


# ---------------------------------------------------------------- parameter counts against autograd


def _params_used(model: W.WavLM, layer: int | None) -> int:
    """Parameters that get a gradient from forward(wav, layer): the ones the computation reads."""
    model.zero_grad(set_to_none=True)
    wav = F.pad(_wav(2000, seed=15), (40, 40))
    model(wav, layer).square().sum().backward()
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("changes", [
    {},
    {"extractor_mode": "default", "layer_norm_first": False},  # post-LN: the encoder LN right after pos_conv
    {"relative_position_embedding": False, "gru_rel_pos": False},
    {"conv_feature_layers": "[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2"},  # no post_extract_proj
    {"conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] + [(48,2,2)]"},  # the last block's width
])  # fmt: skip
def test_num_parameters_are_the_ones_the_forward_pass_reads(changes):
    torch.manual_seed(10)
    m = W.WavLM(dataclasses.replace(W.TINY, encoder_layers=3, **changes))
    assert (m.post_extract_proj is None) == ("(64,2,2)" in changes.get("conv_feature_layers", ""))
    for layer in (0, 1, 3):
        assert m.num_parameters(layer) == _params_used(m, layer), layer
    full = _params_used(m, None)  # all blocks and the final LN: every parameter but mask_emb
    assert m.num_parameters() == full + m.cfg.encoder_embed_dim == sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- calls with wrong arguments


def test_frontend_and_encode_messages():
    m = W.WavLM(small())
    with raises_exactly(InvalidInput, "frontend expects a waveform [B, S] with S >= 400 samples, got shape (1, 399)"):
        m.frontend(torch.zeros(1, 399))
    with raises_exactly(InvalidInput, "frontend expects a waveform [B, S] with S >= 400 samples, got shape (400,)"):
        m.frontend(torch.zeros(400))
    assert m.frontend(torch.zeros(1, 400)).shape == (1, 1, 64)
    x = torch.randn(1, 5, 64)
    with raises_exactly(InvalidInput, "num_layers must be in 0..2, got 3"):
        m.encode(x, 3)
    with raises_exactly(InvalidInput, "num_layers must be in 0..2, got -1"):
        m.encode(x, -1)
    with torch.no_grad():
        assert torch.equal(m.encode(x, 0), m.positional(x))  # no block: the transformer input


@pytest.mark.parametrize("wav,sr,layer,message", [
    (torch.zeros(2, 800), 16000, 11, "wav must be mono audio of shape (1, T), got shape (2, 800) (mix down with "
                                     "wav.mean(0, keepdim=True))"),
    (torch.zeros(800), 16000, 11, "wav must be mono audio of shape (1, T), got shape (800,)"),
    (torch.zeros(1, 800, dtype=torch.int32), 16000, 11, "wav must be floating point in [-1, 1], got dtype torch.int32"),
    (torch.zeros(1, 800), -16000, 11, "sample rate must be a positive int (e.g. 16000), got -16000"),
    (torch.zeros(1, 800), 16000.0, 11, "sample rate must be a positive int (e.g. 16000), got 16000.0"),
    (torch.zeros(1, 0), 16000, 11, "wav is empty (0 samples); need at least one 20 ms frame (320 samples at 16 kHz)"),
    (torch.tensor([[0.0, float("-inf")]]), 16000, 11, "wav contains NaN or Inf samples"),
    (torch.zeros(1, 800), 16000, 3, "layer must be None or an int in 1..2, got 3"),
    (torch.zeros(1, 800), 16000, 0, "layer must be None or an int in 1..2, got 0"),
    (torch.zeros(1, 800), 16000, "1", "layer must be None or an int in 1..2, got '1'"),
    (torch.zeros(1, 319), 16000, 1, "audio too short: 319 samples at 16 kHz, need at least 320 (one 20 ms frame)"),
    ([[0.0] * 800], 16000, 1, "wav must be a torch.Tensor of shape (1, T), got list"),
])  # fmt: skip
def test_extract_features_messages(wav, sr, layer, message):
    with raises_exactly(InvalidInput, message):
        W.extract_features(W.WavLM(small()), wav, sr, layer=layer)


def test_extract_features_bounds_and_result():
    torch.manual_seed(11)
    m = W.WavLM(small()).eval()
    for layer in (1, 2, None):
        out = W.extract_features(m, _wav(320, seed=16), 16000, layer=layer)
        assert out.shape == (1, 64) and out.dtype == torch.float32
    # A float64 model gets float64 audio and gives float64 features.
    m64 = W.load_checkpoint_dict(W.checkpoint_dict(m), dtype=torch.float64)
    assert next(m64.parameters()).dtype == torch.float64 and not m64.training
    out64 = W.extract_features(m64, _wav(1000, seed=17), 16000, layer=2)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), W.extract_features(m, _wav(1000, seed=17), 16000, layer=2), rtol=1e-4,
                               atol=1e-4)  # fmt: skip


# ---------------------------------------------------------------- checkpoint files


def test_checkpoint_messages_for_wrong_files():
    good = W.checkpoint_dict(W.WavLM(small()))
    with raises_exactly(CheckpointError, "WavLM checkpoint must be a dict with keys 'cfg' and 'model', got list"):
        W.load_checkpoint_dict([good])
    with raises_exactly(CheckpointError, "WavLM checkpoint has no 'model' entry (found keys ['cfg', 'weights'])"):
        W.load_checkpoint_dict({"weights": good["model"], "cfg": good["cfg"]})
    with raises_exactly(CheckpointError, "WavLM checkpoint has no 'cfg' entry (found keys ['model'])"):
        W.load_checkpoint_dict({"model": good["model"]})
    with raises_exactly(CheckpointError, "WavLM checkpoint 'model' must be a state dict, got list"):
        W.load_checkpoint_dict({"cfg": good["cfg"], "model": list(good["model"].items())})
    state = dict(good["model"])
    state.pop("mask_emb")
    state.pop("encoder.layer_norm.bias")
    state["encoder.layers.1.self_attn.relative_attention_bias.weight"] = torch.zeros(320, 4)
    state["encoder.layers.0.fc1.bias"] = torch.zeros(127)
    with raises_exactly(CheckpointError, "WavLM checkpoint does not match its cfg: missing keys ['mask_emb', "
                        "'encoder.layer_norm.bias']; unexpected keys "
                        "['encoder.layers.1.self_attn.relative_attention_bias.weight']; shape mismatches "
                        "['encoder.layers.0.fc1.bias: (127,) (expected (128,))']"):  # fmt: skip
        W.load_checkpoint_dict({"cfg": good["cfg"], "model": state})


def test_legacy_weight_norm_keys_load_into_the_same_model():
    torch.manual_seed(12)
    m = perturbed(W.WavLM(small()), seed=12)
    legacy = W.checkpoint_dict(m, weight_norm_style="legacy")
    loaded = W.load_checkpoint_dict(legacy)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with raises_exactly(InvalidInput, "weight_norm_style must be 'parametrizations' or 'legacy', got 'old'"):
        W.checkpoint_dict(m, weight_norm_style="old")


def test_entries_that_are_not_tensors_are_a_checkpoint_error():
    """A weights-only file may hold lists or numbers where tensors belong, and keys that are not strings: a
    CheckpointError that says so, not an AttributeError or TypeError (a bug the mutation work found)."""
    good = W.checkpoint_dict(W.WavLM(small()))
    state = dict(good["model"], mask_emb=[0.0] * 64)
    with raises_exactly(CheckpointError, "WavLM checkpoint does not match its cfg: shape mismatches ['mask_emb: a list "
                                         "(expected a tensor of shape (64,))']"):  # fmt: skip
        W.load_checkpoint_dict({"cfg": good["cfg"], "model": state})
    with raises_exactly(CheckpointError, "WavLM checkpoint has no 'model' entry (found keys [1, 'cfg'])"):
        W.load_checkpoint_dict({1: 2, "cfg": good["cfg"]})
