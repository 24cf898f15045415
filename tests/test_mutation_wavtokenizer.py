"""WavTokenizer decoder (models/wavtokenizer.py): behaviour the mutation run showed unpinned by test_wavtokenizer.py.

The exact messages a user gets for a wrong config or a wrong checkpoint file, the bounds of the config checks, the
decoder variants the releases do not use but the code builds (plain LayerNorm instead of AdaLN, several codebooks,
another bandwidth row), the magnitude clamp, the half-precision cast and the upstream file layout that
`checkpoint_dict` writes. Models are TINY and carry RANDOM weights (tests/test_wavtokenizer.py's `random_tiny`);
the oracle is that file's float64 reference decoder."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import precision as PR
from dpslm_stream.models import wavtokenizer as W
from tests.test_wavtokenizer import HOP, random_codes, random_tiny, reference_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def raises_exactly(exc: type[Exception], message: str):
    """pytest.raises matching the whole message: what the user reads is part of the behaviour."""
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


@pytest.fixture(scope="module")
def tiny() -> W.WavTokenizer:
    return random_tiny()


# ---------------------------------------------------------------- config


def test_config_errors_name_the_rule():
    with raises_exactly(InvalidInput, "padding='center' is not supported; the releases use 'same'"):
        W.WavTokenizerConfig(padding="center")
    rule = ("must be a multiple of hop_length={hop} with an even difference (the exact overlap-add works in whole "
            "hops and trims (n_fft - hop) / 2 samples at each end)")  # fmt: skip
    with raises_exactly(InvalidInput, "n_fft=2500 " + rule.format(hop=600)):
        W.WavTokenizerConfig(n_fft=2500)
    with raises_exactly(InvalidInput, "n_fft=1202 " + rule.format(hop=601)):  # a multiple, but an odd difference
        W.WavTokenizerConfig(n_fft=1202, hop_length=601)
    with raises_exactly(InvalidInput, "dim=100 must be divisible by the 32 GroupNorm groups"):
        W.WavTokenizerConfig(dim=100)
    for field in ("vq_bins", "num_quantizers", "input_channels", "intermediate_dim"):
        with pytest.raises(InvalidInput, match=r"^all widths and counts must be positive, got WavTokenizerConfig\("):
            W.WavTokenizerConfig(**{field: 0})


def test_config_smallest_valid_values():
    cfg = W.WavTokenizerConfig(vq_bins=1, num_quantizers=1, input_channels=1, dim=32, intermediate_dim=1,
                               n_fft=1800, hop_length=600, downsamples=[6.0, 5, 5, 4])  # fmt: skip
    assert cfg.downsamples == (6, 5, 5, 4) and all(type(d) is int for d in cfg.downsamples)
    assert cfg.overlap == 3 and cfg.frame_rate == 40.0
    assert W.WavTokenizerConfig(n_fft=800, hop_length=400).overlap == 2  # an even difference that 3 does not divide


def test_config_from_dict_messages():
    d = W.FULL.to_dict()
    d["head"]["dim"] = 64
    with raises_exactly(CheckpointError, "head.dim=64 must equal backbone.dim=768"):
        W.WavTokenizerConfig.from_dict(d)
    d = W.FULL.to_dict()
    d["backbone"] = 3  # a section that is not a dict
    with raises_exactly(CheckpointError, "WavTokenizer config is missing required field 'backbone.dim'"):
        W.WavTokenizerConfig.from_dict(d)
    d = W.FULL.to_dict()
    d["backbone"]["dim"] = d["head"]["dim"] = 100
    with raises_exactly(CheckpointError, "invalid WavTokenizer config: dim=100 must be divisible by the 32 GroupNorm "
                                         "groups"):  # fmt: skip
        W.WavTokenizerConfig.from_dict(d)
    # Every field is read from its own section (a config with all values off the defaults round-trips).
    odd = W.WavTokenizerConfig(vq_bins=7, num_quantizers=2, downsamples=(8, 5, 4, 2), input_channels=3, dim=96,
                               intermediate_dim=5, num_layers=2, adanorm_num_embeddings=None, n_fft=1280,
                               hop_length=320)  # fmt: skip
    assert W.WavTokenizerConfig.from_dict(odd.to_dict()) == odd


def test_to_dict_writes_upstreams_training_fields():
    """configs.py ARGS_SMALL_600_24K_4096's feature_extractor section, training-only fields included."""
    assert W.FULL.to_dict()["feature_extractor"] == {
        "encodec_model": "encodec_24khz", "bandwidths": [6.6, 6.6, 6.6, 6.6], "train_codebooks": True,
        "num_quantizers": 1, "downsamples": [6, 5, 5, 4], "vq_bins": 4096, "vq_kmeans": 200,
    }


def test_config_from_state_dict_infers_every_field():
    cfg = W.WavTokenizerConfig(vq_bins=16, num_quantizers=3, downsamples=(8, 5, 4, 2), input_channels=8, dim=32,
                               intermediate_dim=24, num_layers=2, adanorm_num_embeddings=None, n_fft=1280,
                               hop_length=320)  # fmt: skip
    with torch.device("meta"):
        sd = W.WavTokenizer(cfg).state_dict()
    assert W.WavTokenizerConfig.from_state_dict(sd) == cfg
    with torch.device("meta"):
        ada = W.WavTokenizer(dataclasses.replace(cfg, adanorm_num_embeddings=3)).state_dict()
    assert W.WavTokenizerConfig.from_state_dict(ada).adanorm_num_embeddings == 3


def test_config_from_state_dict_messages():
    with torch.device("meta"):
        sd = W.WavTokenizer(W.TINY).state_dict()
    with raises_exactly(CheckpointError, "checkpoint state_dict is missing 'backbone.embed.weight' (not a "
                                         "WavTokenizer checkpoint?)"):  # fmt: skip
        W.WavTokenizerConfig.from_state_dict({k: v for k, v in sd.items() if k != "backbone.embed.weight"})
    with raises_exactly(CheckpointError, "checkpoint state_dict has no 'backbone.convnext.0.*' blocks"):
        W.WavTokenizerConfig.from_state_dict({k: v for k, v in sd.items() if not k.startswith("backbone.convnext.")})
    with raises_exactly(CheckpointError, "cannot infer hop_length for n_fft=1000 (known: [1280, 2400]); pass config= "
                                         "to load_checkpoint_dict"):  # fmt: skip
        W.WavTokenizerConfig.from_state_dict(dict(sd, **{"head.istft.window": torch.zeros(1000)}))


# ---------------------------------------------------------------- decoder variants and numerics


def test_fresh_model_has_upstreams_initial_layer_scale_and_adaln():
    model = W.WavTokenizer(W.WavTokenizerConfig(input_channels=8, dim=32, intermediate_dim=16, num_layers=4))
    for block in model.backbone.convnext:
        assert torch.equal(block.gamma.data, torch.full((32,), 0.25))  # layer_scale_init_value = 1 / num_layers
    for norm in [model.backbone.norm] + [b.norm for b in model.backbone.convnext]:
        assert torch.equal(norm.scale.weight.data, torch.ones(4, 32)) and norm.eps == 1e-6
        assert torch.equal(norm.shift.weight.data, torch.zeros(4, 32))
    assert torch.equal(model.head.istft.window, torch.hann_window(2400))


def _as_adaln_state(sd: dict) -> dict:
    """A plain-LayerNorm decoder's state dict in AdaLN form (one condition row), for the reference decoder."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".norm.weight") and k.startswith("backbone.")
                and not k.startswith("backbone.pos_net.")]:  # fmt: skip
        base = key[: -len("weight")]
        out[base + "scale.weight"] = out.pop(base + "weight")[None]
        out[base + "shift.weight"] = out.pop(base + "bias")[None]
    return out


def test_plain_layernorm_decoder_matches_float64_reference():
    torch.manual_seed(5)
    model = W.WavTokenizer(dataclasses.replace(W.TINY, adanorm_num_embeddings=None)).eval()
    for norm in [model.backbone.norm] + [b.norm for b in model.backbone.convnext]:  # upstream's eps, not torch's
        assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-6
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "norm" in name or name.endswith("gamma"):
                t.copy_((1.0 if name.endswith(("weight", "gamma")) else 0.0) + 0.3 * torch.randn_like(t))
            elif name.endswith("embed"):
                t.copy_(torch.randn_like(t))
            elif not name.endswith("window"):
                t.copy_(0.1 * torch.randn_like(t) if t.dim() > 1 else 0.05 * torch.randn_like(t))
    codes = random_codes(7, seed=21, batch=2)
    ours = W.decode(model, codes).double().numpy()
    ref = reference_decode(_as_adaln_state(model.state_dict()), codes)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_other_bandwidth_row_is_that_rows_affine():
    """model(codes, bandwidth_id=b) uses AdaLN row b everywhere: the same as row 0 of a model with rows swapped."""
    model, swapped = random_tiny(), random_tiny()
    with torch.no_grad():
        for name, t in swapped.state_dict().items():
            if name.endswith(("scale.weight", "shift.weight")):
                t[[0, 2]] = t[[2, 0]].clone()
    codes = random_codes(6, seed=22)
    with torch.inference_mode():
        got = model.spectra(codes, bandwidth_id=2)
        assert torch.equal(got, swapped.spectra(codes, bandwidth_id=0))
        assert not torch.allclose(got, model.spectra(codes, bandwidth_id=0))


def test_backbone_default_condition_is_row_zero(tiny):
    features = torch.randn(1, 32, 6, generator=torch.Generator().manual_seed(27))
    with torch.inference_mode():
        assert torch.equal(tiny.backbone(features), tiny.backbone(features, 0))


def test_several_codebooks_sum_their_rows(tiny):
    cfg = dataclasses.replace(W.TINY, num_quantizers=2)
    torch.manual_seed(6)
    two = W.WavTokenizer(cfg).eval()
    two.load_state_dict(dict(tiny.state_dict(), **{
        "feature_extractor.encodec.quantizer.vq.layers.1._codebook.embed": torch.randn(4096, 32)}))
    codes = torch.stack([random_codes(5, seed=23)[0], random_codes(5, seed=24)[0]])  # (2, 1, 5)
    tables = [layer._codebook.embed for layer in two.feature_extractor.encodec.quantizer.vq.layers]
    expected = (tables[0][codes[0]] + tables[1][codes[1]]).transpose(1, 2)
    assert torch.equal(two.feature_extractor(codes), expected)
    # With a zero second table, codebook 0 alone decides the audio: the one-codebook model's output.
    with torch.no_grad():
        tables[1].zero_()
    torch.testing.assert_close(W.decode(two, codes), W.decode(tiny, codes[:1]), rtol=0, atol=1e-6)


def test_magnitude_clamp_is_upstreams_100(tiny):
    head = W.ISTFTHead(W.TINY)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.zero_()
        bins = W.TINY.n_fft // 2 + 1
        head.out.bias[:3] = torch.tensor([4.6, 4.7, 10.0])  # exp: 99.48, 109.9, 22026 (log-magnitudes)
        head.out.bias[bins : bins + 3] = 0.5  # phase
    spec = head.spectrum(torch.zeros(1, 2, W.TINY.dim))
    assert spec.dtype == torch.complex64 and spec.shape == (1, bins, 2)
    torch.testing.assert_close(spec[0, :3, 0].abs(), torch.tensor([np.exp(4.6), 100.0, 100.0], dtype=torch.float32))
    torch.testing.assert_close(spec[0, :3, 0].angle(), torch.full((3,), 0.5))


def test_fast_precision_with_bf16_units_casts_the_networks_only(monkeypatch):
    monkeypatch.setattr(PR, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    model = random_tiny()
    codes = random_codes(9, seed=25)
    exact = W.decode(model, codes)
    plan = W.apply_precision(model, "fast")
    assert plan.bulk == "bf16" and model.precision_plan is plan
    assert {p.dtype for p in model.feature_extractor.buffers()} == {torch.bfloat16}
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    assert model.head.out.weight.dtype == torch.bfloat16
    assert model.head.istft.window.dtype == torch.float32  # the Hann window stays exact
    fast = W.decode(model, codes)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert 0 < ((fast - exact).norm() / exact.norm()).item() < 0.1  # bf16 rounding, not another signal
    monkeypatch.setattr(PR, "cpu_flags", lambda: frozenset({"avx512f"}))
    monkeypatch.setattr(PR, "_fbgemm_dynamic_linear", lambda: False)  # neither bf16 units nor fbgemm: float32
    other = random_tiny()
    assert W.apply_precision(other, "fast").bulk == "fp32" and other.backbone.embed.weight.dtype == torch.float32
    assert all(isinstance(b.pwconv1, torch.nn.Linear) for b in other.backbone.convnext)


# ---------------------------------------------------------------- codes


@pytest.mark.parametrize("codes,message", [
    (torch.tensor([[[0, 4096]]]), "code id 4096 is out of range: valid ids are 0..4095"),
    (torch.tensor([[[-3, 5000]]]), "code id -3 is out of range: valid ids are 0..4095"),
    (torch.tensor([[[0, 4095]]]) - 1, "code id -1 is out of range: valid ids are 0..4095"),
    (torch.tensor([1, 2, 3]), "codes must have shape (K, B, L) (e.g. ids[None, None, :]) or (K, L), got shape (3,)"),
    (torch.zeros(1, 0, 3, dtype=torch.long), "codes are empty (shape (1, 0, 3)); need at least one code per sequence"),
    (torch.zeros(1, 2, 0, dtype=torch.long), "codes are empty (shape (1, 2, 0)); need at least one code per sequence"),
    (torch.zeros(1, 1, 3, dtype=torch.complex64), "codes must be an integer tensor (int64 ids), got dtype "
                                                  "torch.complex64"),
    (torch.zeros(1, 1, 3), "codes must be an integer tensor (int64 ids), got dtype torch.float32"),
    (torch.zeros(2, 3, dtype=torch.long), "codes have K=2 codebooks, this model has 1"),
    ((1, 2), "codes must be a torch integer tensor of shape (K, B, L), got tuple"),
])  # fmt: skip
def test_bad_codes_messages(tiny, codes, message):
    with raises_exactly(InvalidInput, message):
        W.check_codes(tiny, codes)


def test_codes_of_any_int_dtype_become_int64(tiny):
    for dtype in (torch.int16, torch.int32, torch.uint8):
        checked = W.check_codes(tiny, torch.tensor([[[0, 4095 if dtype != torch.uint8 else 255]]], dtype=dtype))
        assert checked.dtype == torch.long and checked.shape == (1, 1, 2)
    assert W.check_codes(tiny, torch.tensor([[0, 4095]])).tolist() == [[[0, 4095]]]


# ---------------------------------------------------------------- checkpoint files


def test_checkpoint_dict_writes_upstreams_layout(tiny):
    extra = {
        "feature_extractor.encodec.decoder.model.0.conv.conv.bias": torch.ones(2),
        "feature_extractor.encodec.encoder.model.0.conv.conv.bias": torch.ones(3),
        "melspec_loss.mel_spec.window": torch.ones(4),
    }
    ckpt = W.checkpoint_dict(tiny, extra_state_dict=extra)
    assert ckpt["hyper_parameters"] == {"sample_rate": 24000}
    sd = ckpt["state_dict"]
    keys = list(sd)
    cb = "feature_extractor.encodec.quantizer.vq.layers.0._codebook."
    assert keys[:6] == ["feature_extractor.encodec.encoder.model.0.conv.conv.bias",
                        cb + "inited", cb + "cluster_size", cb + "embed", cb + "embed_avg",
                        "feature_extractor.encodec.decoder.model.0.conv.conv.bias"]  # fmt: skip
    tail = [k for k in keys[6:] if not k.startswith(("backbone.", "head."))]
    assert tail == [W.TRAINING_ONLY_MARKER, "melspec_loss.mel_spec.window"]
    assert keys.index("head.out.weight") > keys.index("backbone.final_layer_norm.bias")
    assert keys.index(W.TRAINING_ONLY_MARKER) > keys.index("head.istft.window")
    # A converged codebook's EMA statistics, as upstream stores them.
    embed = tiny.state_dict()["feature_extractor.encodec.quantizer.vq.layers.0._codebook.embed"]
    assert torch.equal(sd[cb + "inited"], torch.ones(1)) and torch.equal(sd[cb + "cluster_size"], torch.ones(4096))
    assert torch.equal(sd[cb + "embed"], embed) and torch.equal(sd[cb + "embed_avg"], embed)
    assert torch.equal(sd[W.TRAINING_ONLY_MARKER], torch.zeros(1))
    # Copies: editing the file's tensors leaves the model (and the other buffers) alone.
    sd[cb + "embed"].add_(1.0)
    sd["backbone.embed.bias"].add_(1.0)
    assert torch.equal(sd[cb + "embed_avg"], embed)
    assert not torch.equal(tiny.state_dict()["backbone.embed.bias"], sd["backbone.embed.bias"])


def test_loading_casts_to_float32_and_accepts_any_hyper_parameters(tiny):
    good = W.checkpoint_dict(tiny)
    doubled = {"state_dict": {k: v.double() for k, v in good["state_dict"].items()}}
    loaded = W.load_checkpoint_dict(doubled, map_location="cpu")
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float32} and not loaded.training
    codes = random_codes(5, seed=26)
    assert torch.equal(W.decode(loaded, codes), W.decode(tiny, codes))
    for hparams in ({}, {"lr": 1e-4}, None, "not a dict"):
        assert W.load_checkpoint_dict(dict(good, hyper_parameters=hparams)).config == W.TINY
    assert W.load_checkpoint_dict(dict(good, hyper_parameters={"sample_rate": 24000})).config == W.TINY
    # map_location places the tensors (the meta device stands in for a GPU here: nothing is materialised).
    assert {t.device.type for t in W.load_checkpoint_dict(good, map_location="meta").state_dict().values()} == {"meta"}
    # An explicit config is used as given (here the inferred one, written out).
    assert W.load_checkpoint_dict(good, config=W.TINY).config == W.TINY


def test_loading_messages_for_wrong_files(tiny):
    good = W.checkpoint_dict(tiny)
    sd = good["state_dict"]
    with raises_exactly(CheckpointError, "checkpoint sample_rate 16000 differs from the config's 24000"):
        W.load_checkpoint_dict(dict(good, hyper_parameters={"sample_rate": 16000}))
    with raises_exactly(CheckpointError, "expected a PyTorch-Lightning checkpoint dict with a 'state_dict' entry"):
        W.load_checkpoint_dict({"state_dict": [1]})
    cb = "feature_extractor.encodec.quantizer.vq.layers.0._codebook."
    with raises_exactly(CheckpointError, f"WavTokenizer checkpoint is missing codebook buffers: {cb}inited, "
                                         f"{cb}embed_avg"):  # fmt: skip
        W.load_checkpoint_dict({"state_dict": {k: v for k, v in sd.items() if k not in (cb + "inited",
                                                                                         cb + "embed_avg")}})
    # Lists of up to 8 keys are complete; longer ones end in ", ...". Sorted, with the count.
    blocks = [f"backbone.convnext.{i}.gamma" for i in range(9)]
    with raises_exactly(CheckpointError, "WavTokenizer checkpoint does not match the architecture: missing keys (8): "
                        + ", ".join(sorted(blocks[:8]))):  # fmt: skip
        W.load_checkpoint_dict({"state_dict": {k: v for k, v in sd.items() if k not in blocks[:8]}})
    with raises_exactly(CheckpointError, "WavTokenizer checkpoint does not match the architecture: missing keys (9): "
                        + ", ".join(sorted(blocks)[:8]) + ", ..."):  # fmt: skip
        W.load_checkpoint_dict({"state_dict": {k: v for k, v in sd.items() if k not in blocks}})
    both = {k: v for k, v in sd.items() if k != "head.out.bias"}
    both["backbone.extra"] = torch.zeros(1)
    both["backbone.embed.bias"] = torch.zeros(3)
    with raises_exactly(CheckpointError, "WavTokenizer checkpoint does not match the architecture: missing keys (1): "
                        "head.out.bias; unexpected keys (1): backbone.extra; shape mismatch (1): backbone.embed.bias "
                        "(3,) != expected (64,)"):  # fmt: skip
        W.load_checkpoint_dict({"state_dict": both})


def test_release_structure_message():
    W.check_release_structure(W.TINY, W.FULL)  # widths may differ
    with raises_exactly(CheckpointError, "checkpoint is not a small_600_24k_4096 WavTokenizer: hop_length 320 "
                        "(expected 600); n_fft 1280 (expected 2400) (a hop-320 file: load it with "
                        "small_320_24k_4096)"):  # fmt: skip
        W.check_release_structure(W.FULL_320, W.FULL)
    odd = dataclasses.replace(W.FULL, num_layers=3, vq_bins=10, adanorm_num_embeddings=None, num_quantizers=2)
    with raises_exactly(CheckpointError, "checkpoint is not a small_600_24k_4096 WavTokenizer: num_layers 3 (expected "
                        "12); num_quantizers 2 (expected 1); vq_bins 10 (expected 4096); adanorm_num_embeddings None "
                        "(expected 4)"):  # fmt: skip
        W.check_release_structure(odd, W.FULL)
    with raises_exactly(CheckpointError, "checkpoint is not a small_600_24k_4096 WavTokenizer: sample_rate 16000 "
                        "(expected 24000)"):  # fmt: skip
        W.check_release_structure(dataclasses.replace(W.FULL, sample_rate=16000), W.FULL)


def test_hop_from_n_fft_of_each_release():
    for release in (W.FULL, W.FULL_320):
        with torch.device("meta"):
            sd = W.WavTokenizer(release).state_dict()
        cfg = W.WavTokenizerConfig.from_state_dict(sd)
        assert (cfg.hop_length, cfg.downsamples, cfg.n_fft) == (release.hop_length, release.downsamples,
                                                                release.n_fft)  # fmt: skip
    assert HOP == W.FULL.hop_length


def test_entries_that_are_not_tensors_are_a_checkpoint_error(tiny):
    """A weights-only file may hold lists, numbers or strings (and keys that are not strings): a CheckpointError
    naming them, not an AttributeError from deep inside the loader (a bug the mutation work found)."""
    sd = W.checkpoint_dict(tiny)["state_dict"]
    bad = dict(sd, **{"backbone.embed.bias": [0.0] * 64, "head.istft.window": "hann"})
    with raises_exactly(CheckpointError, "WavTokenizer checkpoint entries are not tensors: backbone.embed.bias, "
                                         "head.istft.window"):  # fmt: skip
        W.load_checkpoint_dict({"state_dict": bad})
    many = dict(sd, **{f"backbone.convnext.{i}.gamma": float(i) for i in range(9)})
    with pytest.raises(CheckpointError, match=r"not tensors: backbone\.convnext\.0\.gamma, .*\.7\.gamma, \.\.\.$"):
        W.load_checkpoint_dict({"state_dict": many})
    W.load_checkpoint_dict({"state_dict": {**sd, 7: torch.zeros(1)}})  # a foreign key is dropped like others
