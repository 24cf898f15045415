"""WavTokenizer decoder: output shapes, parity with a slow reference written here from the spec (float64, loops),
exact chunk-wise iSTFT, upstream checkpoint format, strict loading, parameter counts, input validation."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpslm_stream.errors import CheckpointError, InvalidInput
from dpslm_stream.models import wavtokenizer as W
from dpslm_stream.stream.vocoder import IncrementalVocoder, StreamingISTFT

HOP, N_FFT = 600, 2400


def random_tiny(seed: int = 0) -> W.WavTokenizer:
    """TINY model with every tensor randomised (norm affines, AdaLN rows, layer scales included)."""
    torch.manual_seed(seed)
    model = W.WavTokenizer(W.TINY).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("window"):
                continue
            if "norm" in name or name.endswith("gamma"):
                t.copy_((1.0 if name.endswith(("weight", "gamma")) else 0.0) + 0.3 * torch.randn_like(t))
            elif name.endswith("embed"):
                t.copy_(torch.randn_like(t))
            else:
                t.copy_(0.1 * torch.randn_like(t) if t.dim() > 1 else 0.05 * torch.randn_like(t))
    return model


@pytest.fixture(scope="module")
def tiny(device) -> W.WavTokenizer:
    """The model under test, on the test device (DPSLM_TEST_DEVICE); the float64 references run on the CPU."""
    return random_tiny().to(device)


@pytest.fixture(scope="module")
def on_device(device):
    """Move a tensor to the test device (the iSTFT tests build their inputs on the CPU, seeded)."""
    return lambda t: t.to(device)


def random_codes(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 4096, (1, batch, length), generator=torch.Generator().manual_seed(seed))


def random_spectra(batch: int, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.rand(batch, N_FFT // 2 + 1, frames, generator=g) * 3
    return torch.polar(mag, torch.rand(batch, N_FFT // 2 + 1, frames, generator=g) * 2 * math.pi)


# ---------------------------------------------------------------- slow reference, float64, straight from the spec


def naive_istft_same(spec: np.ndarray, window: np.ndarray, hop: int) -> np.ndarray:
    """Frame loop: irfft * window, overlap-add at hop, divide by the summed window^2, trim (n_fft-hop)/2 each end."""
    n_fft, frames = window.shape[0], spec.shape[-1]
    out = np.zeros(spec.shape[:-2] + ((frames - 1) * hop + n_fft,))
    env = np.zeros((frames - 1) * hop + n_fft)
    for t in range(frames):
        out[..., t * hop : t * hop + n_fft] += np.fft.irfft(spec[..., t], n=n_fft) * window
        env[t * hop : t * hop + n_fft] += window**2
    keep = slice((n_fft - hop) // 2, (n_fft - hop) // 2 + frames * hop)  # the envelope is 0 only outside it
    return out[..., keep] / env[keep]


def reference_decode(sd: dict, codes: torch.Tensor) -> np.ndarray:
    """Decoder math from docs/references.md §WavTokenizer, functional, float64, from the raw state dict."""
    p = {k: v.detach().cpu().double() for k, v in sd.items()}
    conv = torch.nn.functional.conv1d

    def gn(x, pre):  # GroupNorm(32): statistics over (channels of the group x all frames)
        b, c, n = x.shape
        g = x.reshape(b, 32, (c // 32) * n)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return g.reshape(b, c, n) * p[pre + ".weight"][:, None] + p[pre + ".bias"][:, None]

    def ln(x, w, b):  # over the last axis
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6) * w + b

    def swish(x):
        return x * torch.sigmoid(x)

    def resnet(x, pre):
        h = conv(swish(gn(x, pre + ".norm1")), p[pre + ".conv1.weight"], p[pre + ".conv1.bias"], padding=1)
        h = conv(swish(gn(h, pre + ".norm2")), p[pre + ".conv2.weight"], p[pre + ".conv2.bias"], padding=1)
        return x + h

    def attn(x, pre):
        h = gn(x, pre + ".norm")
        q, k, v = (torch.einsum("oc,bcn->bon", p[f"{pre}.{n}.weight"][..., 0], h) + p[f"{pre}.{n}.bias"][:, None]
                   for n in "qkv")
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(x.shape[1]), dim=-1)
        o = torch.einsum("bij,bcj->bci", w, v)
        o = torch.einsum("oc,bcn->bon", p[pre + ".proj_out.weight"][..., 0], o)
        return x + o + p[pre + ".proj_out.bias"][:, None]

    table = p["feature_extractor.encodec.quantizer.vq.layers.0._codebook.embed"]
    x = table[codes[0]].transpose(1, 2)  # (B, C, L)
    x = conv(x, p["backbone.embed.weight"], p["backbone.embed.bias"], padding=3)
    x = resnet(resnet(x, "backbone.pos_net.0"), "backbone.pos_net.1")
    x = attn(x, "backbone.pos_net.2")
    x = resnet(resnet(x, "backbone.pos_net.3"), "backbone.pos_net.4")
    x = gn(x, "backbone.pos_net.5").transpose(1, 2)  # (B, L, C)
    x = ln(x, p["backbone.norm.scale.weight"][0], p["backbone.norm.shift.weight"][0])  # bandwidth_id 0
    i = 0
    while f"backbone.convnext.{i}.gamma" in p:
        pre = f"backbone.convnext.{i}"
        h = conv(x.transpose(1, 2), p[pre + ".dwconv.weight"], p[pre + ".dwconv.bias"], padding=3,
                 groups=x.shape[-1]).transpose(1, 2)
        h = ln(h, p[pre + ".norm.scale.weight"][0], p[pre + ".norm.shift.weight"][0])
        h = h @ p[pre + ".pwconv1.weight"].T + p[pre + ".pwconv1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        h = h @ p[pre + ".pwconv2.weight"].T + p[pre + ".pwconv2.bias"]
        x = x + p[pre + ".gamma"] * h
        i += 1
    x = ln(x, p["backbone.final_layer_norm.weight"], p["backbone.final_layer_norm.bias"])
    out = (x @ p["head.out.weight"].T + p["head.out.bias"]).transpose(1, 2)
    n_bins = out.shape[1] // 2
    spec = np.minimum(np.exp(out[:, :n_bins].numpy()), 100.0) * np.exp(1j * out[:, n_bins:].numpy())
    return naive_istft_same(spec, p["head.istft.window"].numpy(), HOP)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("length", [1, 2, 5, 37])
def test_decode_length_and_vocode(tiny, length):
    codes = random_codes(length, seed=length)
    audio = W.decode(tiny, codes)
    assert audio.shape == (1, HOP * length) and audio.dtype == torch.float32
    wav, sr = W.vocode(tiny, codes)
    assert sr == 24000 and torch.equal(wav, audio)
    assert torch.equal(W.decode(tiny, codes[:, 0]), audio)  # (K, L) accepted as upstream does


@pytest.mark.parametrize("length", [1, 3, 29])
def test_decode_matches_float64_reference(tiny, length):
    codes = random_codes(length, seed=100 + length, batch=2)
    ours = W.decode(tiny, codes).double().cpu().numpy()
    ref = reference_decode(tiny.state_dict(), codes)
    assert ours.shape == ref.shape == (2, HOP * length)
    assert np.abs(ref).max() > 1e-3  # a non-trivial signal
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_spectra_are_what_the_istft_consumes(tiny):
    codes = random_codes(11, seed=3)
    spec = W.spectra(tiny, codes)
    assert spec.shape == (1, N_FFT // 2 + 1, 11) and spec.dtype == torch.complex64
    assert torch.equal(W.istft(spec, tiny.head.istft.window, HOP), W.decode(tiny, codes))


def test_bandwidth_row_zero_is_used(tiny):
    """The AdaLN rows 1..3 must not influence decoding (upstream always passes bandwidth_id 0)."""
    codes = random_codes(9, seed=4)
    before = W.decode(tiny, codes)
    other = random_tiny()
    with torch.no_grad():
        for name, t in other.state_dict().items():
            if name.endswith(("scale.weight", "shift.weight")):
                t[1:] = 7.0
    other.to(before.device)
    assert torch.equal(W.decode(other, codes), before)


# ---------------------------------------------------------------- iSTFT


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 23])
def test_istft_matches_naive_loop(frames, on_device):
    spec = random_spectra(2, frames, seed=frames)
    window = torch.hann_window(N_FFT)
    ours = W.istft(on_device(spec), on_device(window), HOP)
    ref = naive_istft_same(spec.numpy().astype(np.complex128), window.double().numpy(), HOP)
    assert ours.shape == (2, HOP * frames)
    np.testing.assert_allclose(ours.double().cpu().numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_istft_interior_matches_torch_istft(on_device):
    """torch.istft(center=True) trims n_fft/2 instead of (n_fft-hop)/2: same signal shifted by hop/2."""
    spec = on_device(random_spectra(1, 30, seed=7))
    window = on_device(torch.hann_window(N_FFT))
    ref = torch.istft(spec, N_FFT, HOP, N_FFT, window, center=True)
    ours = W.istft(spec, window, HOP)
    torch.testing.assert_close(ours[:, HOP // 2 : HOP // 2 + ref.shape[1]], ref, rtol=0, atol=1e-5 * ref.abs().max())


@settings(max_examples=25, deadline=None)
@given(
    chunks=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=12),
    batch=st.integers(min_value=1, max_value=2),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_streaming_istft_equals_whole_sequence(on_device, chunks, batch, seed):
    frames = sum(chunks)
    spec = on_device(random_spectra(batch, max(frames, 1), seed)[:, :, :frames])
    window = on_device(torch.hann_window(N_FFT))
    stream = StreamingISTFT(window, HOP)
    outs, pushed, sizes = [], 0, set()
    for c in chunks:
        out = stream.push(spec[:, :, pushed : pushed + c])
        pushed += c
        # every sample that no later frame can touch is out: hop * frames - (n_fft - hop) / 2
        assert stream.samples_emitted == max(0, HOP * pushed - (N_FFT - HOP) // 2)
        outs.append(out)
        if pushed:
            sizes.add(stream.state_nbytes)
    outs.append(stream.flush())
    audio = torch.cat(outs, dim=1)
    assert audio.shape == (batch, HOP * frames)
    assert len(sizes) <= 1 and all(s <= batch * (N_FFT - HOP) * 4 for s in sizes)  # bounded, constant
    if frames:
        whole = W.istft(spec, window, HOP)
        torch.testing.assert_close(audio, whole, rtol=0, atol=1e-5 * whole.abs().max())


def test_streaming_istft_reset_and_errors(on_device):
    window = on_device(torch.hann_window(N_FFT))
    stream = StreamingISTFT(window, HOP)
    spec = on_device(random_spectra(1, 6, seed=1))
    first = torch.cat([stream.push(spec), stream.flush()], dim=1)
    assert stream.state_nbytes == 0 and stream.frames_pushed == 0  # flush resets
    again = torch.cat([stream.push(spec[:, :, :2]), stream.push(spec[:, :, 2:]), stream.flush()], dim=1)
    torch.testing.assert_close(again, first, rtol=0, atol=1e-6)
    stream.push(spec)
    with pytest.raises(InvalidInput, match="batch size"):
        stream.push(on_device(random_spectra(2, 1, seed=2)))
    with pytest.raises(InvalidInput, match="complex"):
        stream.push(spec.real)
    with pytest.raises(InvalidInput):
        StreamingISTFT(torch.hann_window(1000), HOP)


# ---------------------------------------------------------------- incremental vocoder


def test_incremental_vocoder_unlimited_lookahead_equals_decode(tiny):
    codes = random_codes(40, seed=9)[0, 0]
    voc = IncrementalVocoder(tiny, left_context=None, lookahead=1000)
    parts = [voc.push(codes[:5]), voc.push(codes[5:5]), voc.push(codes[5:33]), voc.push(codes[33:]), voc.flush()]
    assert all(p.numel() == 0 for p in parts[:-1])
    audio = torch.cat(parts)
    whole = W.decode(tiny, codes[None, None])[0]
    torch.testing.assert_close(audio, whole, rtol=0, atol=1e-5 * whole.abs().max())


@pytest.mark.parametrize("left_context,lookahead", [(6, 2), (None, 3), (0, 0)])
def test_incremental_vocoder_windows(tiny, left_context, lookahead):
    """One code per push: frame t comes from the window [t - C, t + R + 1); the last R frames from the flush window.
    Oracle: those window spectra, built here, put through the whole-sequence iSTFT."""
    length = 24
    codes = random_codes(length, seed=11)[0, 0]
    voc = IncrementalVocoder(tiny, left_context=left_context, lookahead=lookahead)
    audio = torch.cat([voc.push(codes[i : i + 1]) for i in range(length)] + [voc.flush()])
    assert audio.shape == (HOP * length,)

    def start(t):
        return 0 if left_context is None else max(0, t - left_context)

    frames = []
    for t in range(length - lookahead):
        frames.append(W.spectra(tiny, codes[None, None, start(t) : t + lookahead + 1])[:, :, t - start(t)])
    a = length - lookahead
    if lookahead:
        tail = W.spectra(tiny, codes[None, None, start(a) :])
        frames.extend(tail[:, :, t - start(a)] for t in range(a, length))
    expected = W.istft(torch.stack(frames, dim=-1), tiny.head.istft.window, HOP)[0]
    torch.testing.assert_close(audio, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_incremental_vocoder_state_is_bounded(tiny):
    voc = IncrementalVocoder(tiny, left_context=8, lookahead=3, min_step=4)
    codes = random_codes(200, seed=12)[0, 0]
    sizes, total = [], 0
    for i in range(0, 200, 5):
        total += voc.push(codes[i : i + 5]).numel()
        sizes.append(voc.state_nbytes)
    total += voc.flush().numel()
    assert total == HOP * 200
    assert max(sizes[5:]) == max(sizes[-10:])  # no growth with stream length
    assert voc.received == 0 and voc.state_nbytes == 0  # flush resets


def test_incremental_vocoder_bad_options(tiny):
    for kwargs in ({"lookahead": -1}, {"min_step": 0}, {"left_context": -2}, {"lookahead": 1.5}):
        with pytest.raises(InvalidInput):
            IncrementalVocoder(tiny, **kwargs)
    voc = IncrementalVocoder(tiny)
    with pytest.raises(InvalidInput, match="1-D"):
        voc.push(random_codes(3))
    with pytest.raises(InvalidInput, match="out of range"):
        voc.push(torch.tensor([1, 4096]))


# ---------------------------------------------------------------- checkpoints


def saved_and_loaded(ckpt: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def test_checkpoint_round_trip_upstream_format(tiny):
    ckpt = saved_and_loaded(W.checkpoint_dict(tiny))
    assert set(ckpt) == {"state_dict", "hyper_parameters"} and ckpt["hyper_parameters"]["sample_rate"] == 24000
    sd = ckpt["state_dict"]
    cb = "feature_extractor.encodec.quantizer.vq.layers.0._codebook."
    assert [k for k in sd if k.startswith(cb)] == [cb + n for n in ("inited", "cluster_size", "embed", "embed_avg")]
    assert W.TRAINING_ONLY_MARKER in sd
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert torch.equal(sd["head.istft.window"], torch.hann_window(N_FFT))
    assert len([k for k in sd if k.startswith(("backbone.", "head."))]) == 161  # spec: 161 + codebook = 162

    loaded = W.load_checkpoint_dict(ckpt)
    assert loaded.config == W.TINY and not loaded.training
    assert set(loaded.state_dict()) == set(tiny.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v.cpu()) for k, v in tiny.state_dict().items())
    codes = random_codes(13, seed=5)
    loaded.to(tiny.head.out.weight.device)  # same kernels as the model under test: the same audio, bit for bit
    assert torch.equal(W.decode(loaded, codes), W.decode(tiny, codes))


def test_dropped_prefixes_are_ignored(tiny):
    ckpt = W.checkpoint_dict(tiny, extra_state_dict={
        "feature_extractor.encodec.encoder.model.0.conv.conv.bias": torch.zeros(32),
        "multiresddisc.discriminators.0.convs.0.bias": torch.zeros(2),
    })
    keys = list(ckpt["state_dict"])
    assert keys[0].startswith("feature_extractor.encodec.encoder.")  # upstream order: encoder first
    W.load_checkpoint_dict(ckpt)  # strict on kept keys, the rest dropped


def test_strict_loading_errors(tiny):
    good = W.checkpoint_dict(tiny)

    missing = {"state_dict": {k: v for k, v in good["state_dict"].items() if k != "backbone.convnext.3.gamma"}}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): backbone\.convnext\.3\.gamma"):
        W.load_checkpoint_dict(missing)

    unexpected = {"state_dict": dict(good["state_dict"], **{"head.extra.weight": torch.zeros(1)})}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): head\.extra\.weight"):
        W.load_checkpoint_dict(unexpected)

    reshaped = {"state_dict": dict(good["state_dict"], **{"backbone.pos_net.2.q.weight": torch.zeros(64, 64, 3)})}
    with pytest.raises(CheckpointError, match=r"shape mismatch \(1\): backbone\.pos_net\.2\.q\.weight"):
        W.load_checkpoint_dict(reshaped)
    with pytest.raises(CheckpointError, match=r"shape mismatch \(\d+\): .*, \.\.\."):  # long lists are cut
        W.load_checkpoint_dict(good, config=W.WavTokenizerConfig(input_channels=32, dim=96, intermediate_dim=192))

    no_codebook = {"state_dict": {k: v for k, v in good["state_dict"].items() if "_codebook.embed" not in k}}
    with pytest.raises(CheckpointError, match="_codebook.embed"):
        W.load_checkpoint_dict(no_codebook)

    odd_window = {"state_dict": dict(good["state_dict"], **{"head.istft.window": torch.hann_window(1000)})}
    with pytest.raises(CheckpointError, match="n_fft=1000"):
        W.load_checkpoint_dict(odd_window)

    for bad in ({}, {"state_dict": 3}, [1, 2]):
        with pytest.raises(CheckpointError, match="state_dict"):
            W.load_checkpoint_dict(bad)
    with pytest.raises(CheckpointError, match="sample_rate"):
        W.load_checkpoint_dict(dict(good, hyper_parameters={"sample_rate": 16000}))


@pytest.mark.parametrize("config", [W.FULL, W.FULL_320, W.TINY])
def test_config_dict_round_trip(config):
    d = config.to_dict()
    assert set(d) == {"feature_extractor", "backbone", "head"}
    assert W.WavTokenizerConfig.from_dict(d) == config


def test_config_from_dict_errors():
    d = W.FULL.to_dict()
    del d["backbone"]["num_layers"]
    with pytest.raises(CheckpointError, match="backbone.num_layers"):
        W.WavTokenizerConfig.from_dict(d)
    d = W.FULL.to_dict()
    d["head"]["hop_length"] = 700
    with pytest.raises(CheckpointError, match="hop_length=700"):
        W.WavTokenizerConfig.from_dict(d)


def test_released_configs_match_upstream_args():
    """configs.py ARGS_SMALL_600_24K_4096 / ARGS_SMALL_320_24K_4096 (spec §1)."""
    for cfg, hop, n_fft, down in ((W.FULL, 600, 2400, [6, 5, 5, 4]), (W.FULL_320, 320, 1280, [8, 5, 4, 2])):
        d = cfg.to_dict()
        assert d["head"] == {"dim": 768, "n_fft": n_fft, "hop_length": hop, "padding": "same"}
        assert d["backbone"] == {"input_channels": 512, "dim": 768, "intermediate_dim": 2304, "num_layers": 12,
                                 "layer_scale_init_value": None, "adanorm_num_embeddings": 4}
        assert d["feature_extractor"]["downsamples"] == down and math.prod(down) == hop
        assert d["feature_extractor"]["vq_bins"] == 4096 and d["feature_extractor"]["num_quantizers"] == 1


@pytest.mark.parametrize("config,params", [(W.FULL, 63_808_610), (W.FULL_320, 62_947_330)])
def test_full_parameter_counts(config, params):
    """Spec §6: decode path (backbone + head) = 63,808,610; the 320 model differs only in head.out (1282 x 768).
    Upstream's whole model (80,913,988 / 80,552,420) adds the SEANet encoder and unused SEANet decoder."""
    with torch.device("meta"):
        model = W.WavTokenizer(config)
    assert sum(p.numel() for p in model.parameters()) == params
    sd = model.state_dict()
    assert len(sd) == 162
    assert tuple(sd["feature_extractor.encodec.quantizer.vq.layers.0._codebook.embed"].shape) == (4096, 512)
    assert tuple(sd["head.out.weight"].shape) == (config.n_fft + 2, 768)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "codes,match",
    [
        (torch.tensor([[[0, 4096]]]), "out of range"),
        (torch.tensor([[[-1, 3]]]), "out of range"),
        (torch.tensor([1, 2, 3]), "shape"),
        (torch.zeros(1, 1, 0, dtype=torch.long), "empty"),
        (torch.zeros(1, 1, 3), "integer"),
        (torch.zeros(1, 1, 3, dtype=torch.bool), "integer"),
        (torch.zeros(2, 1, 3, dtype=torch.long), "K=2"),
        ([[[1, 2, 3]]], "tensor"),
    ],
)
def test_bad_codes(tiny, codes, match):
    with pytest.raises(InvalidInput, match=match):
        W.decode(tiny, codes)
    with pytest.raises(ValueError):  # InvalidInput is a ValueError
        W.vocode(tiny, codes)


def test_bad_configs():
    for kwargs in ({"dim": 100}, {"n_fft": 2500}, {"padding": "center"}):
        with pytest.raises(InvalidInput):
            W.WavTokenizerConfig(**kwargs)


def test_codebook_buffers_are_required(tiny):
    """Upstream loads the feature extractor strictly: a file without the codebook's EMA buffers is rejected."""
    good = W.checkpoint_dict(tiny)
    for name in ("cluster_size", "embed_avg", "inited"):
        bad = {"state_dict": {k: v for k, v in good["state_dict"].items() if not k.endswith("_codebook." + name)}}
        with pytest.raises(CheckpointError, match=f"missing codebook buffers: .*_codebook.{name}"):
            W.load_checkpoint_dict(bad)


def test_hub_loaders_reject_other_structures(tiny, tmp_path):
    """Each hub entry point loads only files of its release's structure (widths may be reduced, as in the tiny set):
    another hop, another depth or another number of codebooks is an error, not silently different audio."""
    from dpslm_stream import hub

    def save(ckpt, name):
        path = tmp_path / name
        torch.save(ckpt, path)
        return path

    torch.manual_seed(0)
    tiny_320 = W.WavTokenizer(W.WavTokenizerConfig(input_channels=32, dim=64, intermediate_dim=192,
                                                   downsamples=(8, 5, 4, 2), n_fft=1280, hop_length=320)).eval()  # fmt: skip
    f600, f320 = save(W.checkpoint_dict(tiny), "600.ckpt"), save(W.checkpoint_dict(tiny_320), "320.ckpt")
    assert hub.small_600_24k_4096(path=f600)[0].config.hop_length == 600
    assert hub.small_320_24k_4096(path=f320)[0].config.hop_length == 320
    with pytest.raises(CheckpointError, match="hop_length 320 .*small_320_24k_4096"):
        hub.small_600_24k_4096(path=f320)
    with pytest.raises(CheckpointError, match="hop_length 600"):
        hub.small_320_24k_4096(path=f600)

    sd = W.checkpoint_dict(tiny)["state_dict"]
    shallow = {k: v for k, v in sd.items() if not k.startswith("backbone.convnext.11.")}
    with pytest.raises(CheckpointError, match="num_layers 11 .expected 12"):
        hub.small_600_24k_4096(path=save({"state_dict": shallow}, "shallow.ckpt"))
    cb = "feature_extractor.encodec.quantizer.vq.layers."
    two = dict(sd, **{k.replace(".0.", ".1.", 1): v.clone() for k, v in sd.items() if k.startswith(cb + "0.")})
    with pytest.raises(CheckpointError, match="num_quantizers 2"):
        hub.small_600_24k_4096(path=save({"state_dict": two}, "two.ckpt"))
