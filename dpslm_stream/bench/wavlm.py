"""Offline WavLM-Large encoding speed: real-time factor (compute seconds per audio second) up to layer 11,
split into the conv front-end (+ LN + projection) and the transformer (positional conv + 11 blocks).

RANDOM weights with the real dimensions: speed does not depend on the weight values. Only the blocks that layer-11
features need are built and run, as `extract_features(layer=11)` does.

    dpslm-stream bench wavlm [--device cuda] [--dtype bfloat16] [--seconds 5 10 20] [--repeats 3]
    python -m dpslm_stream.bench.wavlm
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
import torch.nn.functional as F

from dpslm_stream.device import DeviceTimer, setup_model_device
from dpslm_stream.models import wavlm

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                        help="model dtype (default float32, as upstream; conv LayerNorms always run in fp32)")
    parser.add_argument("--seconds", type=float, nargs="+", default=[5.0, 10.0, 20.0],
                        help="utterance lengths to time, in seconds of 16 kHz audio (default: 5 10 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per length; the median is reported")
    parser.add_argument("--layer", type=int, default=11, help="output layer (default 11, as DP-SLM)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _timed(fn, device: torch.device) -> tuple[float, object]:
    with DeviceTimer(device) as timer:  # synchronizes on CUDA
        out = fn()
    return timer.seconds, out


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_model_device(args.device)  # TF32 off on CUDA, as the server
    dtype = _DTYPES[args.dtype]
    cfg = dataclasses.replace(wavlm.FULL, encoder_layers=args.layer)
    torch.manual_seed(0)
    with torch.device(device):
        model = wavlm.WavLM(cfg).to(dtype).eval()
    pad = (model.receptive_field - model.samples_per_frame) // 2

    print(f"WavLM-Large dimensions, RANDOM weights (speed only), layers 1..{args.layer} "
          f"({model.num_parameters(args.layer):,} parameters used)")
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}{threads}, dtype {args.dtype}, torch {torch.__version__}; "
          f"median of {args.repeats} runs after one warm-up; RTF = compute s / audio s; "
          f"'RTF best' = fastest run (less disturbed by other load on shared machines)")
    header = f"{'audio s':>8} {'frames':>7} {'front-end s':>12} {'transformer s':>14} {'total s':>8} " \
             f"{'RTF front':>10} {'RTF transf.':>12} {'RTF total':>10} {'RTF best':>9} {'x real time':>12}"
    print(header)
    print("-" * len(header))

    gen = torch.Generator().manual_seed(0)
    for seconds in args.seconds:
        n = int(round(seconds * wavlm.SAMPLE_RATE))
        wav = (0.1 * torch.randn(1, n, generator=gen)).to(device=device, dtype=dtype)
        wav = F.pad(wav, (pad, pad))
        fronts, transformers = [], []
        with torch.inference_mode():
            for i in range(args.repeats + 1):
                t_front, x = _timed(lambda: model.frontend(wav), device)
                t_transf, y = _timed(lambda: model.encode(x, args.layer), device)
                if i > 0:  # the first run is a warm-up (allocator, kernel selection)
                    fronts.append(t_front)
                    transformers.append(t_transf)
        front, transf = statistics.median(fronts), statistics.median(transformers)
        total = front + transf
        best = min(f + t for f, t in zip(fronts, transformers))
        print(f"{seconds:8.1f} {y.shape[1]:7d} {front:12.3f} {transf:14.3f} {total:8.3f} "
              f"{front / seconds:10.3f} {transf / seconds:12.3f} {total / seconds:10.3f} {best / seconds:9.3f} "
              f"{seconds / total:12.1f}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    run(_parser.parse_args())
