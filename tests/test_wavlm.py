"""WavLM: parity with transformers' WavLMModel (same random weights), checkpoint round trips and strict loading,
parameter counts of the full-size config, frame geometry, the exactness of the chunked front-end, the cached-KV
layer call, and input validation. TINY-sized (64-d, 12 layers) so the file runs in seconds on a CPU."""

from __future__ import annotations

import dataclasses
import io
import math
import re

import numpy as np
import pytest
import torch

from dpslm_stream import audio
from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import wavlm as W

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model(device) -> W.WavLM:
    """The model under test, on the test device (DPSLM_TEST_DEVICE); transformers' twin runs on the CPU."""
    torch.manual_seed(0)
    m = W.WavLM(W.TINY).eval()
    # Default init leaves LayerNorms at (1, 0), many biases at 0 and the gate constant at 1, so that e.g. swapping
    # two LayerNorms would go unnoticed; perturb them so that every parameter matters for the output.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
        m.encoder.pos_conv[0].bias.normal_(0.0, 0.3)
        for layer in m.encoder.layers:
            layer.self_attn.grep_a.normal_(1.0, 0.5)
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.fc1, layer.self_attn.grep_linear):
                lin.bias.normal_(0.0, 0.5)
        m.encoder.layers[0].self_attn.relative_attention_bias.weight.mul_(3.0)
    return m.to(device)


def _on(model: W.WavLM, x: torch.Tensor) -> torch.Tensor:
    """`x` on `model`'s device (the tests build their inputs on the CPU, seeded)."""
    return x.to(next(model.parameters()).device)


# ------------------------------------------------------------------------------------------------------------------
# Independent oracle: transformers' WavLMModel with our weights mapped onto its key names (spec §3 gives the
# torchaudio mapping; the HF names below are read from transformers' modeling_wavlm.py).


def _hf_key(key: str) -> str:
    conv = r"^feature_extractor\.conv_layers\.(\d+)\."
    layer = r"^encoder\.layers\.(\d+)\."
    rules = [
        (conv + r"0\.weight$", r"feature_extractor.conv_layers.\1.conv.weight"),
        (conv + r"2\.1\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),  # per-block LN
        (conv + r"2\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),  # block-0 GroupNorm
        (r"^layer_norm\.(weight|bias)$", r"feature_projection.layer_norm.\1"),
        (r"^post_extract_proj\.(weight|bias)$", r"feature_projection.projection.\1"),
        (r"^mask_emb$", "masked_spec_embed"),
        (r"^encoder\.pos_conv\.0\.(.*)$", r"encoder.pos_conv_embed.conv.\1"),
        (layer + r"self_attn\.relative_attention_bias\.weight$", r"encoder.layers.\1.attention.rel_attn_embed.weight"),
        (layer + r"self_attn\.grep_linear\.(.*)$", r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
        (layer + r"self_attn\.grep_a$", r"encoder.layers.\1.attention.gru_rel_pos_const"),
        (layer + r"self_attn\.(q|k|v|out)_proj\.(.*)$", r"encoder.layers.\1.attention.\2_proj.\3"),
        (layer + r"self_attn_layer_norm\.(.*)$", r"encoder.layers.\1.layer_norm.\2"),
        (layer + r"fc1\.(.*)$", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
        (layer + r"fc2\.(.*)$", r"encoder.layers.\1.feed_forward.output_dense.\2"),
        (layer + r"final_layer_norm\.(.*)$", r"encoder.layers.\1.final_layer_norm.\2"),
        (r"^encoder\.layer_norm\.(.*)$", r"encoder.layer_norm.\1"),
    ]
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    raise KeyError(key)


def _hf_twin(model: W.WavLM):
    """transformers' WavLMModel with the same config and weights as `model`."""
    cfg = model.cfg
    dims, kernels, strides = zip(*cfg.conv_layers)
    hc = transformers.WavLMConfig(
        conv_dim=list(dims), conv_kernel=list(kernels), conv_stride=list(strides),
        feat_extract_norm="layer" if cfg.extractor_mode == "layer_norm" else "group",
        conv_bias=cfg.conv_bias, hidden_size=cfg.encoder_embed_dim, num_hidden_layers=cfg.encoder_layers,
        num_attention_heads=cfg.encoder_attention_heads, intermediate_size=cfg.encoder_ffn_embed_dim,
        num_conv_pos_embeddings=cfg.conv_pos, num_conv_pos_embedding_groups=cfg.conv_pos_groups,
        num_buckets=cfg.num_buckets, max_bucket_distance=cfg.max_distance, do_stable_layer_norm=cfg.layer_norm_first,
        hidden_act="gelu", feat_extract_activation="gelu", layer_norm_eps=1e-5,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
    )
    hf = transformers.WavLMModel(hc).eval()
    mapped = {_hf_key(k): v for k, v in W.checkpoint_dict(model)["model"].items()}
    hf.load_state_dict(mapped, strict=True)
    return hf


@pytest.fixture(scope="module")
def hf_model(model):
    return _hf_twin(model)


def _wav(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(1, n, generator=g)).clamp(-1, 1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu(), b.cpu()  # ours on the test device, the oracle's on the CPU
    return ((a - b).norm() / b.norm()).item()


# 320: one frame (T < 400 edge); 5 000: not a multiple of 320; 64 123: 200 frames (log-spaced buckets, > 80);
# 16 s: 800 frames, past the 778-frame saturation of the buckets.
@pytest.mark.parametrize("n", [320, 399, 5000, 64123, 256000])
def test_layer11_matches_transformers(model, hf_model, n):
    wav = _wav(n, seed=n)
    ours = W.extract_features(model, wav, 16000, layer=11)
    assert ours.shape == (n // 320, model.cfg.encoder_embed_dim)
    with torch.no_grad():
        out = hf_model(torch.nn.functional.pad(wav, (40, 40)), output_hidden_states=True)
    ref = out.hidden_states[11].squeeze(0)
    assert _rel_err(ours, ref) <= 1e-4
    # Sanity of the oracle itself: hidden_states[11] is the 11th block's output (transformers 5.x; same tensor
    # as in 4.x), not the 10th or 12th.
    assert _rel_err(ours, out.hidden_states[10].squeeze(0)) > 1e-2


@pytest.fixture
def small_blocks(monkeypatch):
    """Long-input block sizes shrunk so that a few seconds of audio take the blocked path (the same code as 30 s+)."""
    monkeypatch.setattr(W, "ATTENTION_ELEMENTS", 4 * 150 * 150)  # dense up to 150 frames (3 s) with 4 heads
    monkeypatch.setattr(W, "ROW_BLOCK", 64)


def test_long_inputs_run_in_blocks_and_still_match_transformers(model, hf_model, small_blocks):
    n = 96123  # 300 frames: blocked (dense only up to 150 here), rows per attention block 4 * 150^2 // (4 * 300) = 75
    wav = _wav(n, seed=n)
    blocked = W.extract_features(model, wav, 16000, layer=11)
    with torch.no_grad():
        out = hf_model(torch.nn.functional.pad(wav, (40, 40)), output_hidden_states=True)
    assert _rel_err(blocked, out.hidden_states[11].squeeze(0)) <= 1e-4
    assert _rel_err(W.extract_features(model, wav, 16000, layer=None), out.last_hidden_state.squeeze(0)) <= 1e-4
    # The plain dense computation (one bias table for all frames) agrees to float rounding.
    with torch.no_grad():
        x = model.positional(model.frontend(_on(model, torch.nn.functional.pad(wav, (40, 40)))))
        bias = model.relative_bias(x.shape[1], x.shape[1])
        for i in range(11):
            x, _ = model.layer(i, x, bias)
    torch.testing.assert_close(blocked, x[0], rtol=1e-5, atol=1e-4)
    # The work comes in slices: front-end, pos_conv and key/value projections per 64 rows, attention per block.
    slices = sum(1 for _ in model.forward_steps(_on(model, torch.nn.functional.pad(wav, (40, 40))), 11))
    assert slices == 5 + 1 + 5 + 11 * (5 + 4)  # front-end 5 x 64 rows, +1, pos_conv 5, per layer 5 k/v + 4 attention


def test_blocked_base_style_variant_matches_transformers(small_blocks, device):
    torch.manual_seed(3)
    cfg = dataclasses.replace(W.TINY, extractor_mode="default", layer_norm_first=False, encoder_layers=4)
    m = W.WavLM(cfg).eval()
    hf = _hf_twin(m)
    m.to(device)
    wav = _wav(64000, seed=12)  # 200 frames: blocked (GroupNorm front-end in one piece, post-LN blocks)
    with torch.no_grad():
        out = hf(torch.nn.functional.pad(wav, (40, 40)), output_hidden_states=True)
    assert _rel_err(W.extract_features(m, wav, 16000, layer=3), out.hidden_states[3].squeeze(0)) <= 1e-4


def test_bias_rows_are_rows_of_the_square_table(model):
    T = 900  # past the bucket saturation distance on both sides
    table, by_distance = model.relative_bias(T, T), model.relative_bias_by_distance(T)
    assert by_distance.shape == (model.cfg.encoder_attention_heads, 2 * T - 1)
    for start, rows in [(0, 1), (0, 37), (400, 100), (T - 5, 5), (0, T)]:
        assert torch.equal(W.bias_rows(by_distance, start, rows), table[:, start : start + rows])


def test_full_depth_default_path_matches_transformers(model, hf_model):
    wav = _wav(7000, seed=1)
    ours = W.extract_features(model, wav, 16000, layer=None)  # all blocks + final LN (upstream's default)
    with torch.no_grad():
        ref = hf_model(torch.nn.functional.pad(wav, (40, 40))).last_hidden_state.squeeze(0)
    assert _rel_err(ours, ref) <= 1e-4
    # layer = encoder_layers is the last block's output *without* the final LN (upstream's `layer is None` test).
    last = W.extract_features(model, wav, 16000, layer=model.cfg.encoder_layers)
    with torch.no_grad():
        assert torch.allclose(model.encoder.layer_norm(last), ours, atol=1e-5)


def test_base_style_variant_matches_transformers(device):
    # WavLM-Base's options (GroupNorm in conv block 0, post-LN blocks) are supported too; transformers has both.
    torch.manual_seed(3)
    cfg = dataclasses.replace(W.TINY, extractor_mode="default", layer_norm_first=False, encoder_layers=4)
    m = W.WavLM(cfg).eval()
    hf = _hf_twin(m)
    m.to(device)
    wav = _wav(9000, seed=11)
    with torch.no_grad():
        out = hf(torch.nn.functional.pad(wav, (40, 40)), output_hidden_states=True)
    assert _rel_err(W.extract_features(m, wav, 16000, layer=3), out.hidden_states[3].squeeze(0)) <= 1e-4
    assert _rel_err(W.extract_features(m, wav, 16000, layer=None), out.last_hidden_state.squeeze(0)) <= 1e-4


def test_frontend_matches_transformers(model, hf_model):
    wav = torch.nn.functional.pad(_wav(4321, seed=2), (40, 40))
    with torch.no_grad():
        hf_feats = hf_model.feature_extractor(wav).transpose(1, 2)
        ref, _ = hf_model.feature_projection(hf_feats)
        ours = model.frontend(_on(model, wav))
    assert _rel_err(ours, ref) <= 1e-5


# ------------------------------------------------------------------------------------------------------------------
# Relative position buckets: against transformers' implementation and against a slow reference written here.


def _slow_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    half = num_buckets // 2
    exact = half // 2
    base = half if rel > 0 else 0
    d = abs(rel)
    if d < exact:
        return base + d
    # float32 arithmetic, in the order upstream writes it
    v = np.log(np.float32(d) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    v = v * np.float32(half - exact)
    return base + min(half - 1, exact + int(np.float32(v)))


def test_relative_buckets_match_transformers_and_slow_reference(hf_model):
    n = 1200
    ours = W.relative_position_buckets(n, n, 0, 320, 800)
    hf_attn = hf_model.encoder.layers[0].attention
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    assert torch.equal(ours, hf_attn._relative_positions_bucket(rel))
    slow = torch.tensor([_slow_bucket(r, 320, 800) for r in range(-n + 1, n)])
    assert torch.equal(ours[0], slow[n - 1 :])  # row 0: rel = 0 .. n-1
    assert torch.equal(ours[:, 0], slow[: n].flip(0))  # column 0: rel = 0 .. -(n-1)
    # The facts the spec states: bucket 160 is never produced; saturation at |rel| >= 778 frames.
    assert not (ours == 160).any()
    assert ours[0, 777].item() == 318 and ours[0, 778].item() == 319 and ours[778, 0].item() == 159


def test_relative_bias_window_is_slice_of_full_table(model):
    full = model.relative_bias(300, 300)
    for q_len, k_len, off in [(35, 135, 100), (10, 300, 290), (300, 300, 0), (20, 60, 10)]:
        win = model.relative_bias(q_len, k_len, q_offset=off)
        assert torch.equal(win, full[:, off : off + q_len, :k_len])
    assert torch.equal(model.relative_bias(25, 125), full[:, 100:125, :125])  # default offset: queries are last


# ------------------------------------------------------------------------------------------------------------------
# Pieces the streaming encoder relies on


def test_frame_count_is_floor_t_over_320(model):
    rng = np.random.default_rng(0)
    for n in [320, 321, 639, 640, 641, 959, *rng.integers(320, 40000, size=8).tolist()]:
        assert W.extract_features(model, _wav(n, seed=n), 16000).shape[0] == n // 320


@pytest.mark.parametrize("m,n", [(0, 7), (5, 11), (30, 19)])
def test_frontend_chunk_with_40_sample_overlap_is_exact(model, m, n):
    total = 16000 * 2 + 77
    wav = _wav(total, seed=3)
    padded = _on(model, torch.nn.functional.pad(wav, (40, 40)))
    with torch.no_grad():
        whole = model.frontend(padded)
        # frames m..m+n-1 need original samples [320m - 40, 320(m+n) + 40) = padded [320m, 320(m+n) + 80)
        chunk = model.frontend(padded[:, 320 * m : 320 * (m + n) + 80])
    assert chunk.shape[1] == n
    torch.testing.assert_close(chunk, whole[:, m : m + n], rtol=1e-5, atol=1e-5)


def test_layer_with_cached_kv_equals_full_layer(model):
    torch.manual_seed(1)
    x = _on(model, torch.randn(2, 90, model.cfg.encoder_embed_dim))
    p = 60  # cached left-context frames
    with torch.no_grad():
        bias = model.relative_bias(90, 90)
        for i in (0, 5):
            full, (k_full, v_full) = model.layer(i, x, bias)
            _, past = model.layer(i, x[:, :p], model.relative_bias(p, p))
            tail, (k_new, v_new) = model.layer(i, x[:, p:], model.relative_bias(90 - p, 90), past_kv=past)
            torch.testing.assert_close(tail, full[:, p:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(k_new, k_full[:, :, p:])
            assert k_new.shape == (2, model.cfg.encoder_attention_heads, 90 - p, model.cfg.head_dim)


def test_encode_pieces_compose_to_forward(model):
    wav = _on(model, torch.nn.functional.pad(_wav(9000, seed=4), (40, 40)))
    with torch.no_grad():
        x = model.positional(model.frontend(wav))
        bias = model.relative_bias(x.shape[1], x.shape[1])
        for i in range(11):
            x, _ = model.layer(i, x, bias)
        assert torch.equal(x, model(wav, 11))
        assert torch.equal(model.encode(model.frontend(wav), 11), model(wav, 11))


def test_batched_equals_one_by_one(model):
    wavs = _on(model, torch.nn.functional.pad(torch.cat([_wav(4000, 5), _wav(4000, 6)]), (40, 40)))
    with torch.no_grad():
        both = model(wavs, 11)
        for b in range(2):
            torch.testing.assert_close(both[b], model(wavs[b : b + 1], 11)[0], rtol=1e-5, atol=1e-5)


def test_extract_features_resamples_through_audio_module(model):
    wav = _wav(24000, seed=7)
    expected = W.extract_features(model, audio.resample(wav, 24000, 16000), 16000)
    got = W.extract_features(model, wav, 24000)
    assert got.shape == (16000 // 320, model.cfg.encoder_embed_dim)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("style", ["parametrizations", "legacy"])
def test_checkpoint_round_trip(model, style, on_host):
    ckpt = W.checkpoint_dict(model, weight_norm_style=style)
    keys = set(ckpt["model"])
    if style == "legacy":
        assert {"encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v"} <= keys
        assert not any("parametrizations" in k for k in keys)
    else:
        assert "encoder.pos_conv.0.parametrizations.weight.original0" in keys
        assert "encoder.pos_conv.0.weight_g" not in keys
    assert set(ckpt) == {"cfg", "model"}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in ckpt["model"].values())
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    with on_host():
        loaded = W.load_checkpoint_dict(torch.load(buf, weights_only=True))
    assert not loaded.training and loaded.cfg == model.cfg
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1.cpu(), v2)
    loaded.to(next(model.parameters()).device)  # same kernels as the model under test: the same features, bit for bit
    wav = _wav(3000, seed=8)
    assert torch.equal(W.extract_features(loaded, wav, 16000), W.extract_features(model, wav, 16000))


def test_key_names_are_upstreams(model):
    keys = list(W.checkpoint_dict(model)["model"])
    n_layers = model.cfg.encoder_layers
    # 488 keys for WavLM-Large (spec §1) = 32 non-layer keys (incl. the one bias table) + 19 per layer.
    assert len(keys) == 32 + 19 * n_layers
    for k in [
        "feature_extractor.conv_layers.0.0.weight", "feature_extractor.conv_layers.6.2.1.bias", "layer_norm.weight",
        "post_extract_proj.weight", "mask_emb", "encoder.pos_conv.0.bias",
        "encoder.layers.0.self_attn.relative_attention_bias.weight", "encoder.layers.3.self_attn.grep_a",
        "encoder.layers.3.self_attn.grep_linear.weight", "encoder.layers.3.self_attn.k_proj.bias",
        "encoder.layers.3.self_attn_layer_norm.weight", "encoder.layers.3.fc1.weight", "encoder.layers.3.fc2.bias",
        "encoder.layers.3.final_layer_norm.bias", "encoder.layer_norm.weight",
    ]:
        assert k in keys
    assert "encoder.layers.1.self_attn.relative_attention_bias.weight" not in keys


def test_cfg_dict_round_trip_keeps_unknown_keys_and_upstream_defaults():
    d = W.FULL.to_dict()
    assert d["max_distance"] == 800 and d["encoder_layers"] == 24 and d["dropout"] == 0.1
    d["some_future_key"] = [1, 2]
    cfg = W.WavLMConfig.from_dict(d)
    assert cfg.to_dict() == d
    # Missing keys take upstream's defaults, as upstream's __dict__.update does (max_distance defaults to 1280).
    assert W.WavLMConfig.from_dict({"encoder_embed_dim": 64, "encoder_attention_heads": 4}).max_distance == 1280
    assert W.WavLMConfig.from_dict({"conv_feature_layers": "[(8,10,5)] + [(8,3,2)] * 2"}).conv_layers == [
        (8, 10, 5), (8, 3, 2), (8, 3, 2)
    ]


@pytest.mark.parametrize(
    "cfg_patch,match",
    [
        ({"encoder_layers": "24"}, "encoder_layers"),
        ({"layer_norm_first": 1}, "layer_norm_first"),
        ({"extractor_mode": "group"}, "extractor_mode"),
        ({"activation_fn": "swish"}, "activation_fn"),
        ({"conv_feature_layers": "__import__('os').system('true')"}, "conv_feature_layers"),
        ({"conv_feature_layers": "[(512,10)]"}, "conv_feature_layers"),
        ({"encoder_attention_heads": 5}, "divisible"),
    ],
)
def test_bad_cfg_is_checkpoint_error(cfg_patch, match):
    with pytest.raises(CheckpointError, match=match):
        W.WavLMConfig.from_dict({**W.TINY.to_dict(), **cfg_patch})


def test_strict_loading_names_the_offending_keys(model):
    good = W.checkpoint_dict(model)

    def variant(fn):
        state = dict(good["model"])
        fn(state)
        return {"cfg": dict(good["cfg"]), "model": state}

    with pytest.raises(CheckpointError, match=r"missing keys.*encoder\.layers\.2\.fc1\.bias"):
        W.load_checkpoint_dict(variant(lambda s: s.pop("encoder.layers.2.fc1.bias")))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*layers\.1\.self_attn\.relative_attention_bias"):
        W.load_checkpoint_dict(variant(lambda s: s.__setitem__(
            "encoder.layers.1.self_attn.relative_attention_bias.weight", torch.zeros(320, 4))))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*post_extract_proj\.weight: \(64, 31\)"):
        W.load_checkpoint_dict(variant(lambda s: s.__setitem__("post_extract_proj.weight", torch.zeros(64, 31))))
    # A cfg that disagrees with the weights (more layers than stored) is a missing-keys error, not a crash.
    with pytest.raises(CheckpointError, match=r"missing keys.*encoder\.layers\.12\."):
        W.load_checkpoint_dict({"cfg": {**good["cfg"], "encoder_layers": 13}, "model": good["model"]})
    with pytest.raises(CheckpointError, match="'cfg'"):
        W.load_checkpoint_dict({"model": good["model"]})
    with pytest.raises(CheckpointError, match="dict"):
        W.load_checkpoint_dict([1, 2])


def test_full_config_parameter_counts():
    with torch.device("meta"):
        full = W.WavLM(W.FULL)
    assert full.num_parameters() == 315_453_120
    assert full.num_parameters(11) == 151_692_168
    assert len(full.state_dict()) == 488
    assert (full.samples_per_frame, full.receptive_field) == (320, 400)
    assert full.relative_bias(3, 3) is not None  # meta tensors flow through the bias helper too


def test_tiny_keeps_the_semantics_of_full():
    for name in ["conv_pos", "conv_pos_groups", "num_buckets", "max_distance", "gru_rel_pos", "layer_norm_first",
                 "extractor_mode", "relative_position_embedding"]:
        assert getattr(W.TINY, name) == getattr(W.FULL, name)
    assert [(k, s) for _, k, s in W.TINY.conv_layers] == [(k, s) for _, k, s in W.FULL.conv_layers]


def test_configs_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        W.FULL.max_distance = 1280  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "wav,sr,match",
    [
        (torch.zeros(2, 16000), 16000, "mono"),
        (torch.zeros(1, 1, 16000), 16000, "mono"),
        (torch.zeros(16000), 16000, "mono"),
        (torch.zeros(1, 0), 16000, "empty"),
        (torch.zeros(1, 319), 16000, "too short"),
        (torch.zeros(1, 16000), 16000.0, "sample rate"),
        (torch.zeros(1, 16000), "16000", "sample rate"),
        (torch.zeros(1, 16000), True, "sample rate"),
        (torch.zeros(1, 16000), 0, "sample rate"),
        (torch.full((1, 16000), float("nan")), 16000, "NaN"),
        (torch.tensor([[0.0] * 500 + [float("inf")]]), 16000, "NaN or Inf"),
        (torch.zeros(1, 16000, dtype=torch.int16), 16000, "floating"),
        (np.zeros((1, 16000), np.float32), 16000, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_invalid_input(model, wav, sr, match):
    with pytest.raises(InvalidInput, match=match):
        W.extract_features(model, wav, sr)


def test_too_short_after_resampling(model):
    with pytest.raises(InvalidInput, match="too short"):
        W.extract_features(model, torch.zeros(1, 400), 48000)  # 400 samples at 48 kHz -> 134 at 16 kHz


@pytest.mark.parametrize("layer", [0, 13, -1, 11.0, True])
def test_bad_layer(model, layer):
    with pytest.raises(InvalidInput, match="layer"):
        W.extract_features(model, torch.zeros(1, 1000), 16000, layer=layer)


def test_numpy_int_sample_rate_is_accepted(model):
    assert W.extract_features(model, _wav(1000, 9), np.int64(16000)).shape == (3, 64)


def test_half_precision_keeps_conv_layernorm_in_fp32(model, on_host):
    # bf16 on the test device; the conv-block LayerNorm computes in fp32 and the result stays close to fp32's.
    ckpt = W.checkpoint_dict(model)
    with on_host():
        half = W.load_checkpoint_dict(ckpt, dtype=torch.bfloat16)
    half.to(next(model.parameters()).device)
    assert half.feature_extractor.conv_layers[0][0].weight.dtype == torch.bfloat16
    wav = _wav(8000, seed=10)
    out = W.extract_features(half, wav, 16000, layer=11)
    assert out.dtype == torch.bfloat16
    ref = W.extract_features(model, wav, 16000, layer=11)
    assert _rel_err(out.float(), ref) < 0.1


def _conv_dtypes(fn) -> list[torch.dtype]:
    """The input dtypes of every convolution `fn` runs (any path: aten.convolution and oneDNN's prepacked op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "convolution" in func.__name__:
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pos_conv_computes_in_fp32_on_cpu(model, dtype):
    # torch 2.13's oneDNN bf16 grouped conv1d is wrong for the tiny set's pos_conv shape (4 channels per group,
    # kernel 128) on AMX CPUs (relative error ~1.06): on CPU that conv must never run in half precision, on any CPU.
    half = W.load_checkpoint_dict(W.checkpoint_dict(model), dtype=dtype)
    x = torch.randn(1, 40, model.cfg.encoder_embed_dim, generator=torch.Generator().manual_seed(3))
    dtypes = _conv_dtypes(lambda: half.positional(x.to(dtype)))
    assert dtypes == [torch.float32]
    ref = model.positional(x)
    out = half.positional(x.to(dtype))
    assert out.dtype == dtype
    assert _rel_err(out.float(), ref) < 0.02  # bf16 rounding of x and the output only; a wrong kernel gives ~1


@pytest.mark.cpu_only
def test_half_precision_pos_conv_in_streaming_runner_computes_in_fp32_on_cpu(model):
    from dpslm_stream.stream.encoder import WindowRunner

    half = W.load_checkpoint_dict(W.checkpoint_dict(model), dtype=torch.bfloat16)
    runner = WindowRunner(half, num_layers=2)
    x = torch.randn(1, 64 + 10 + 63, model.cfg.encoder_embed_dim, generator=torch.Generator().manual_seed(4))
    assert set(_conv_dtypes(lambda: runner.positional(x.bfloat16()))) == {torch.float32}
    ref = WindowRunner(model, num_layers=2).positional(x)
    out = runner.positional(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert _rel_err(out.float(), ref) < 0.02
