"""The torch.hub drop-in: every entry point called exactly as the upstream READMEs and hubconf files call it.

The release files are the tiny set's (random weights, upstream formats) copied into a temporary torch.hub cache under
the release file names, so the calls go through the real release path (cache lookup, no `path=`) without network;
`torch.hub.load(<this checkout>, ..., source="local")` runs our hubconf.py as torch.hub does.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from pathlib import Path

import pytest
import torch

import hubconf as local_hubconf  # noqa: F401  (the repo root is on sys.path under pytest's rootdir)
from dpslm_stream import hub
from dpslm_stream.errors import CheckpointError, DeviceError, InvalidInput
from dpslm_stream.models import wavtokenizer as W
from dpslm_stream.tiny import speech_like

REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def release_cache(tiny_dir, tmp_path_factory):
    """A torch.hub dir whose checkpoints/ holds the tiny files under the release names."""
    root = tmp_path_factory.mktemp("hub")
    ckpts = root / "checkpoints"
    ckpts.mkdir()
    models = hub.ModelSet(str(tiny_dir))
    releases = [hub.WAVLM_LARGE, hub.CODEBOOKS[100], hub.CODEBOOKS[500], hub.PLM, hub.PHONE_TOKENIZER,
                hub.ELLAV_PHONES, hub.WAVTOKENIZER[600]]  # fmt: skip
    releases += [hub.ULM_1K[p] for p in models.pairs()] + [hub.ELLAV[p] for p in models.pairs()]
    for release in releases:
        shutil.copy(models.path(release), ckpts / release.filename)
    shutil.copy(models.path(hub.ULM_1K[(500, 4500)]), ckpts / hub.ULM_60K[(500, 4500)].filename)
    torch.manual_seed(0)
    tiny_320 = W.WavTokenizer(dataclasses.replace(W.TINY, downsamples=(8, 5, 4, 2), n_fft=1280, hop_length=320))
    torch.save(W.checkpoint_dict(tiny_320.eval()), ckpts / hub.WAVTOKENIZER[320].filename)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(root))
    yield root
    torch.hub.set_dir(old)


def load(entry, *args, **kwargs):
    kwargs.setdefault("trust_repo", True)
    return torch.hub.load(REPO, entry, *args, source="local", **kwargs)


def _wav():
    return torch.from_numpy(speech_like(1.5, 22050, seed=3))[None], 22050


def test_signatures_match_upstream():
    """Upstream's positional parameters, in order, with upstream's defaults; our extras keyword-only after them."""
    upstream = {
        "wavlm_large": ["map_location", "progress"],
        "codebook": ["layer", "k", "map_location", "progress"],
        "ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k": ["k", "lmbda", "map_location", "progress"],
        "ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k": ["k", "lmbda", "map_location", "progress"],
        "plm_us_arpa_hours_1k_steps_10k": ["k", "lmbda", "map_location", "progress"],
        "ellav_units_to_wavtokenizer": ["k", "lmbda", "map_location", "progress"],
        "ellav_phones_to_wavtokenizer": ["map_location", "progress"],
        "small_600_24k_4096": ["pretrained", "progress"],
        "small_320_24k_4096": ["pretrained", "progress"],
        "dpdp_quantizer_from_codebook": ["codebook", "lmbda", "num_neighbors"],
        "dpdp_quantizer": ["codebook_size", "codebook_dim", "lmbda", "num_neighbors"],
    }
    defaults = {"map_location": "cpu", "progress": True, "pretrained": True, "num_neighbors": None}
    for name, params in upstream.items():
        sig = inspect.signature(getattr(local_hubconf, name))
        positional = [p for p in sig.parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert [p.name for p in positional] == params, name
        for p in positional:
            if p.name in defaults:
                assert p.default == defaults[p.name], (name, p.name)
        assert all(p.kind == p.KEYWORD_ONLY for p in sig.parameters.values() if p.name not in params), name


def test_dp_slm_readme_pipeline_through_torch_hub(release_cache, capsys):
    """dp-slm README, step by step, with the entry names and keywords it uses (the repo is this checkout)."""
    wav, sr = _wav()
    k, lmbda = 500, 4500
    wavlm, extract_features = load("wavlm_large")
    with torch.inference_mode():
        features = extract_features(wavlm, wav, sr, layer=11)
    codebook = load("codebook", layer=11, k=k)
    quantizer = load("dpdp_quantizer_from_codebook", codebook=codebook, lmbda=lmbda, num_neighbors=int(0.05 * k))
    quantizer.to("cpu")
    with torch.inference_mode():
        quantized_features, units_duped = quantizer(features)
    units_deduped = torch.unique_consecutive(units_duped)
    ulm, ulm_tokenizer = load("ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k", k=k, lmbda=lmbda, force_reload=True)
    with torch.inference_mode():
        ulm_ll = ulm.loglikelihood(ulm_tokenizer.encode(units_deduped.tolist()))
    ellav = load("ellav_units_to_wavtokenizer", k=k, lmbda=lmbda)
    with torch.inference_mode():
        prompt = [f"u{unit}" for unit in units_deduped.tolist()]
        codec_ids_list, finished = ellav.generate(prompts=[prompt] * 3, max_tokens=50, max_codec_tokens_per_phone=10,
                                                  temperature=1.0, top_p=0.8)  # fmt: skip
    wavtokenizer, _, vocode = load("small_600_24k_4096", force_reload=True)
    with torch.inference_mode():
        for codec_ids in codec_ids_list:
            if len(codec_ids):
                wav_, sr_ = vocode(wavtokenizer, codec_ids[None, None, :])
                assert sr_ == 24000 and wav_.shape == (1, 600 * len(codec_ids))
    assert features.shape == (int(wav.shape[1] * 16000 / sr) // 320, wavlm.cfg.encoder_embed_dim)
    assert quantized_features.shape == features.shape and units_duped.shape == (features.shape[0],)
    assert torch.isfinite(torch.tensor(ulm_ll)) and len(codec_ids_list) == 3 and len(finished) == 3
    out = capsys.readouterr().out  # upstream prints what it loaded
    for line in ("Loaded WavLM with", "WavLM codebook loaded with shape: torch.Size([500,", "Loaded ULM model with",
                 "Loaded ELLA-V GAR model with", "Loaded WavTokenizer small_600_24k_4096 with"):  # fmt: skip
        assert line in out, (line, out)


def test_wavlm_codebooks_readme_and_hubconf_calls(release_cache, capsys):
    wav, sr = _wav()
    wavlm, extract_features = load("wavlm_large", trust_repo=True)
    wavlm.to("cpu")
    features = extract_features(wavlm, wav, sr, layer=11)  # [T, D]
    codebook = load("codebook", layer=11, k=100, progress=True).cpu()  # [K, D]
    units = torch.argmin(torch.cdist(features, codebook, p=2), dim=1)
    assert codebook.shape == (100, features.shape[1]) and units.shape == (features.shape[0],)
    # upstream hubconf signatures, positionally; layer=None (the default) is the full depth with the final LN
    model, extract = local_hubconf.wavlm_large("cpu", False)
    full = extract(model, wav, sr)
    padded = torch.nn.functional.pad(hub_resample(wav, sr), (40, 40))
    with torch.inference_mode():
        assert torch.equal(full, model(padded, None).squeeze(0))
        assert torch.equal(extract(model, wav, sr, layer=11), model(padded, 11).squeeze(0))
    assert not torch.equal(full, features)
    stored = torch.load(hub.checkpoint_dir() / hub.CODEBOOKS[500].filename, weights_only=True)["codebook"]
    assert torch.equal(local_hubconf.codebook(11, 500, "cpu", False), stored)  # the stored tensor, unchanged
    assert "WavLM codebook loaded with shape" in capsys.readouterr().out


def hub_resample(wav, sr):
    from dpslm_stream.audio import resample

    return resample(wav, sr, 16000)


def test_codebook_is_returned_as_stored_and_the_quantizer_follows_it(tmp_path):
    cb = torch.randn(7, 4, dtype=torch.float64)
    torch.save({"codebook": cb}, tmp_path / "cb.pt")
    got = hub.codebook(11, 7, path=tmp_path / "cb.pt", verbose=False)
    assert got.dtype == torch.float64 and torch.equal(got, cb)
    q = hub.dpdp_quantizer_from_codebook(got, lmbda=0.0)
    assert q.codebook.dtype == got.dtype and q.codebook.device == got.device and torch.equal(q.codebook, cb)
    q = hub.dpdp_quantizer(7, 4, 10.0, None)
    assert q.codebook.shape == (7, 4) and q.lmbda == 10.0
    feats = torch.randn(20, 4)
    q.load_state_dict({"codebook": cb.float()})
    assert q(feats)[1].shape == (20,)


def test_mistral_ulm_hubconf_calls(release_cache, capsys):
    ulm, tok = local_hubconf.ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(100, 600, "cpu", True)
    assert ulm.config.vocab_size == 101 and tok.encode([3, 4]).tolist() == [0, 4, 5]
    ulm60, _ = local_hubconf.ulm_wavlm_layer_11_dpdp_hours_60k_steps_200k(500, 4500)
    assert ulm60.config.vocab_size == 501
    model, tokenizer = local_hubconf.plm_us_arpa_hours_1k_steps_10k(100, 0)  # upstream's __main__ example
    ids = tokenizer.encode("H EY1")
    assert ids[0] == 0 and ids.tolist()[1] == tokenizer.UNK_id and ids.tolist()[2] == tokenizer.phoneme_to_id["EY1"]
    assert tokenizer.decode(tokenizer.encode("HH EY1")) == "HH EY1"
    assert torch.isfinite(torch.tensor(model.loglikelihood(tokenizer.encode("HH AH0 L OW1"))))
    plm, _ = load("plm_us_arpa_hours_1k_steps_10k", k=500, lmbda=4500)
    assert plm.config.vocab_size == tokenizer.vocab_size
    assert capsys.readouterr().out.count("Loaded ULM model with") == 4


def test_ellav_hubconf_calls(release_cache):
    ellav = local_hubconf.ellav_units_to_wavtokenizer(500, 0, map_location="cpu", progress=True)
    assert ellav.tokenizer.num_units == 500
    phones = local_hubconf.ellav_phones_to_wavtokenizer()
    assert "EY1" in phones.tokenizer.token_to_id_dict and phones.tokenizer.num_units == 0
    assert load("ellav_phones_to_wavtokenizer").config == phones.config
    # Phone prompts: the prompt is upstream's encode_infer of the phone strings (dedup, SIL dropped, BOS, first).
    prompt = ["SIL", "HH", "HH", "AH0", "L", "OW1", "SIL"]
    ranks = [phones.tokenizer.prompt_index(p) for p in prompt]
    assert phones.tokenizer.encode_prompt(ranks) == phones.tokenizer.encode_infer(prompt)
    torch.manual_seed(0)
    codes, finished = phones.generate([prompt], max_tokens=40, max_codec_tokens_per_phone=3, temperature=1.0, top_p=0.0)
    assert codes[0].dtype == torch.long and len(finished) == 1
    with pytest.raises(InvalidInput, match="phone 'XX' is not in this model's vocabulary"):
        phones.generate([["HH", "XX"]], max_tokens=5, max_codec_tokens_per_phone=3, temperature=1.0, top_p=0.0)


def test_wavtokenizer_readme_calls(release_cache, capsys):
    model, encode, decode = load("small_600_24k_4096", trust_repo=True)
    model.to("cpu")
    model.eval()
    codes = torch.randint(0, 4096, (1, 1, 9))
    wav_, sr_ = decode(model, codes)
    assert sr_ == 24000 and wav_.shape == (1, 9 * 600)
    with pytest.raises(NotImplementedError, match="only the decoder"):
        encode(model, torch.zeros(1, 24000), 24000)
    model, _, _, = load("small_320_24k_4096")  # fmt: skip
    assert model.config.hop_length == 320
    out = capsys.readouterr().out
    assert "Loaded WavTokenizer small_600_24k_4096 with" in out and "small_320_24k_4096" in out
    fresh, _, _ = local_hubconf.small_320_24k_4096(pretrained=False, progress=False, verbose=False)
    assert fresh.config == W.FULL_320 and capsys.readouterr().out == ""


def test_verbose_false_reaches_the_entries_through_torch_hub(release_cache, capsys):
    load("codebook", layer=11, k=100, verbose=False)
    load("ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k", 100, 0, verbose=False)
    assert capsys.readouterr().out == ""
    hub.codebook(11, 100, verbose=False)
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_bad_map_location_says_what_is_wrong_before_reading_the_file(release_cache):
    for where, match in (("cuda", "CUDA is not available"), ("cuda:7", "CUDA is not available"),
                         ("gpu0", "not a torch device"), (3.5, "must be a device")):  # fmt: skip
        with pytest.raises(DeviceError, match=match) as info:
            hub.ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(500, 4500, where)
        assert "corrupt" not in str(info.value)


def test_device_failures_while_moving_are_reported_as_such():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    with pytest.raises(DeviceError, match="not enough memory on cuda:0 to load ELLA-V: CUDA out of memory"):
        hub.to_device("ELLA-V", oom, torch.device("cuda:0"))

    def bad_ordinal():
        raise RuntimeError("CUDA error: invalid device ordinal")

    with pytest.raises(DeviceError, match="could not move ULM to cuda:3: CUDA error: invalid device ordinal"):
        hub.to_device("ULM", bad_ordinal, torch.device("cuda:3"))


def test_checkpoints_are_read_on_the_cpu_memory_mapped_and_legacy_files_still_load(tmp_path, tiny_dir):
    cb = {"codebook": torch.randn(5, 3)}
    torch.save(cb, tmp_path / "zip.pt")
    torch.save(cb, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert torch.equal(hub.read_checkpoint(tmp_path / name)["codebook"], cb["codebook"])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        (tmp_path / "half.pt").write_bytes((tmp_path / "zip.pt").read_bytes()[:200])
        hub.read_checkpoint(tmp_path / "half.pt")


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # WavLM copies into meta: a no-op
def test_files_are_read_on_the_cpu_and_only_the_kept_model_reaches_the_device(release_cache, monkeypatch):
    """Loading to another device (here "meta", which any machine has): torch.load always reads onto the CPU,
    memory-mapped, and the model's tensors, and nothing else, end up on the device. WavTokenizer's dropped parts
    (its encoder and training modules: every key the decoder does not keep) are never moved."""
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append((kwargs.get("map_location"), kwargs.get("mmap")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    moved = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device.type == "meta" and self.device.type != "meta":
            moved.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    wt, _, _ = hub.small_600_24k_4096(map_location="meta", verbose=False)
    assert all(p.device.type == "meta" for p in wt.parameters())
    assert len(moved) == len(wt.state_dict())  # exactly the kept tensors went to the device
    for load_entry in (lambda: hub.wavlm_large("meta", verbose=False)[0],
                       lambda: hub.ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(500, 4500, "meta", verbose=False)[0],
                       lambda: hub.ellav_units_to_wavtokenizer(500, 4500, "meta", verbose=False)):  # fmt: skip
        model = load_entry()
        assert all(p.device.type == "meta" for p in model.parameters())
    assert hub.codebook(11, 500, "meta", verbose=False).device.type == "meta"
    assert calls and all(c == ("cpu", True) for c in calls), calls
