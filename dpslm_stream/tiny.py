"""The tiny model set: small, deterministic, RANDOM-WEIGHT versions of every network, in the upstream file formats.

It exists so that everything (loaders, CLI, server, tests, the offline demo) runs on a fresh machine with no network.
The files are named like the releases (the hash part of the name is replaced by "tiny") and are loaded through the
same loaders as the real checkpoints. Nothing produced with them is speech: units, scores and audio only prove that
the plumbing works. A file ``RANDOM_WEIGHTS`` in the folder marks it, and every command that loads it says so.

Two choices make the random set behave like the real one where the plumbing cares:
- the WavLM's residual stream is scaled so that squared distances between layer-11 frames are in the thousands, as
  they are for the real model, so the paper's lambda values (600..9000) segment the tiny features into runs;
- the codebooks are k-means centroids of the tiny WavLM's own features on speech-like synthetic audio, so DPDP
  sees clusters, not noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dpslm_stream import releases
from dpslm_stream.signals import speech_like  # noqa: F401  (re-exported for existing callers)

# (k, lambda) pairs that get a tiny ULM and ELLA-V; k=500, lambda=4500 is the default everywhere.
TINY_PAIRS: tuple[tuple[int, int], ...] = ((100, 0), (100, 600), (500, 0), (500, 4500))
TINY_CODEBOOK_KS: tuple[int, ...] = (100, 500)
TINY_VERSION = 3  # 2: the phone LM, its tokenizer and the phone ELLA-V; 3: a random WavTokenizer codebook
_SEED = 1234
# US ARPAbet (39 phones, vowels with stress 0/1/2) plus silence/noise marks: the shape of upstream's phone vocabulary.
_ARPA_VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW")
_ARPA_CONSONANTS = ("B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R", "S", "SH", "T",
                    "TH", "V", "W", "Y", "Z", "ZH")  # fmt: skip
TINY_PHONES: tuple[str, ...] = tuple(sorted([f"{v}{s}" for v in _ARPA_VOWELS for s in "012"]
                                            + list(_ARPA_CONSONANTS) + ["SIL", "SPN"]))  # fmt: skip
# Typical squared distance between consecutive layer-11 frames that the tiny WavLM is scaled to.
_TARGET_FRAME_DISTANCE = 2000.0  # gives ~48 units/s at lambda=0 and ~24 at 4500 on the sample, near the paper's rates


def default_dir() -> Path:
    """$DPSLM_STREAM_CACHE or ~/.cache/dpslm_stream, then tiny-v<version>."""
    root = os.environ.get("DPSLM_STREAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dpslm_stream"
    )
    return Path(root) / f"tiny-v{TINY_VERSION}"


def _kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ initialisation then Lloyd iterations (plain Euclidean, as the released codebooks were trained)."""
    x = x.double()
    centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        i = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centres.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c.float()


def _scale_residual_stream(state: dict, scale: float) -> None:
    """Multiply every weight that writes into WavLM's residual stream by `scale`. The transformer blocks are pre-LN,
    so their inputs are scale-invariant and the layer-11 output scales (almost exactly) with it."""
    for name, tensor in state.items():
        writes_residual = (
            name.startswith("post_extract_proj.")
            or name.startswith("encoder.pos_conv.0.") and not name.endswith(("weight_v", "original1"))
            or ".self_attn.out_proj." in name
            or ".fc2." in name
        )
        if writes_residual:
            tensor.mul_(scale)


def build_tiny_set(directory: str | os.PathLike, pairs=TINY_PAIRS, codebook_ks=TINY_CODEBOOK_KS) -> Path:
    """Write the tiny set into `directory` (created). Deterministic: the same files every time."""
    from dpslm_stream.models import ellav, ulm, wavlm, wavtokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def name(release: releases.Release) -> Path:
        stem, ext = release.filename.rsplit(".", 1)
        return directory / f"{stem[:-9]}-tiny.{ext}"  # drop "-<8 hex>" / "_<8 hex>"

    # WavLM: random init, residual stream scaled so lambda values of the paper's size matter.
    torch.manual_seed(_SEED)
    model = wavlm.WavLM(wavlm.TINY).eval()
    audio = torch.from_numpy(speech_like(48.0, 16000, seed=_SEED))[None]
    with torch.no_grad():
        feats = wavlm.extract_features(model, audio[:, : 16000 * 8], 16000, layer=11)
        typical = ((feats[1:] - feats[:-1]) ** 2).sum(-1).median().item()
        state = model.state_dict()
        _scale_residual_stream(state, math.sqrt(_TARGET_FRAME_DISTANCE / max(typical, 1e-9)))
        model.load_state_dict(state)
        feats = wavlm.extract_features(model, audio, 16000, layer=11)
    torch.save(wavlm.checkpoint_dict(model), name(releases.WAVLM_LARGE))

    gen = torch.Generator().manual_seed(_SEED)
    for k in codebook_ks:
        torch.save({"codebook": _kmeans(feats, k, iters=8, generator=gen)}, name(releases.CODEBOOKS[k]))

    for k, lmbda in pairs:
        torch.manual_seed(_SEED + k + lmbda)
        lm = ulm.ULM(ulm.config_for_k(k, ulm.TINY)).eval()
        torch.save(ulm.checkpoint_dict(lm), name(releases.ULM_1K[(k, lmbda)]))
        torch.manual_seed(_SEED + 7 * k + lmbda)
        torch.save(ellav.checkpoint_dict(ellav.random_model(k, ellav.TINY)), name(releases.ELLAV[(k, lmbda)]))

    # The phone topline: phone LM (the ULM architecture over a phone vocabulary), its tokenizer JSON, phone ELLA-V.
    phone_to_id = {p: i for i, p in enumerate(["BOS", "UNK", *TINY_PHONES])}
    (directory / releases.PHONE_TOKENIZER.filename).write_text(
        json.dumps(ulm.PhonemeTokenizer(phone_to_id).to_dict(), indent=1))
    torch.manual_seed(_SEED + 1)
    plm = ulm.ULM(dataclasses.replace(ulm.TINY, vocab_size=len(phone_to_id))).eval()
    torch.save(ulm.checkpoint_dict(plm), name(releases.PLM))
    torch.manual_seed(_SEED + 2)
    phone_tok = ellav.ELLAVTokenizer.from_phone_vocab(TINY_PHONES, 50, 4096, 40)
    phone_cfg = dataclasses.replace(ellav.TINY, vocab_size=phone_tok.vocab_size)
    torch.save(ellav.checkpoint_dict(ellav.ELLAV(phone_cfg, phone_tok).eval()), name(releases.ELLAV_PHONES))

    torch.manual_seed(_SEED)
    vocoder = wavtokenizer.WavTokenizer(wavtokenizer.TINY).eval()
    with torch.no_grad():  # a fresh codebook is zeros: every code would decode alike, and audio tests be blind to codes
        for layer in vocoder.feature_extractor.encodec.quantizer.vq.layers:
            layer._codebook.embed.normal_()
    torch.save(wavtokenizer.checkpoint_dict(vocoder), name(releases.WAVTOKENIZER[600]))

    (directory / "RANDOM_WEIGHTS").write_text(
        "This folder holds dpslm-stream's tiny model set: small networks with RANDOM weights in the upstream file\n"
        "formats. Their units, scores and audio are not speech; they exist to test the plumbing.\n"
    )
    manifest = {"version": TINY_VERSION, "pairs": [list(p) for p in pairs], "codebook_k": list(codebook_ks),
                "random_weights": True}  # fmt: skip
    (directory / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return directory


def ensure_tiny_set(directory: str | os.PathLike | None = None) -> Path:
    """Return the tiny set's folder, building it first if needed (atomically, so parallel processes are safe)."""
    directory = Path(directory) if directory is not None else default_dir()
    if (directory / "MANIFEST.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
    try:
        build_tiny_set(tmp)
        try:
            tmp.rename(directory)
        except OSError:  # another process finished first
            if not (directory / "MANIFEST.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
