"""Models the benchmarks share: WavLM-Large-sized encoders with RANDOM weights (speed does not depend on the
weight values; units made with them are meaningless)."""

from __future__ import annotations

import dataclasses

import torch


def full_size_encoder_worker(device: str = "cpu", **worker_kwargs):
    """An EncoderWorker around a WavLM-Large-sized model (11 blocks, random weights) for the pair (500, 4500), with a
    codebook of 500 of the model's own layer-11 frames so that DPDP sees distances of the features' own scale."""
    from dpslm_stream.models import wavlm
    from dpslm_stream.stream.worker import EncoderWorker
    from dpslm_stream.signals import speech_like

    torch.manual_seed(0)
    model = wavlm.WavLM(dataclasses.replace(wavlm.FULL, encoder_layers=11)).eval()
    with torch.inference_mode():
        feats = wavlm.extract_features(model, torch.from_numpy(speech_like(10.0, 16000, seed=5))[None], 16000, layer=11)
    codebook = feats[torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(0))[:500]].clone()
    return EncoderWorker("tiny", device=device, pairs=[(500, 4500)], wavlm=model, codebooks={500: codebook},
                         **worker_kwargs)  # fmt: skip


def encoder_worker(models: str, device: str = "cpu", **worker_kwargs):
    """An EncoderWorker for (500, 4500): from a model set (tiny, release, a folder) or, for "full", random weights at
    WavLM-Large size."""
    from dpslm_stream.stream.worker import EncoderWorker

    if models == "full":
        return full_size_encoder_worker(device, **worker_kwargs)
    return EncoderWorker(models, device=device, pairs=[(500, 4500)], **worker_kwargs)
