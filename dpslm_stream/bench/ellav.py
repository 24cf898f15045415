"""ELLA-V generation speed at the released size: prefill and decode, codec tokens per second, batch 1 and batched.

RANDOM weights with the real dimensions (speed does not depend on the weight values, but what a random model
generates does: it emits codec tokens, EOPs and stray tokens in other proportions than a trained one). So the
table reports decode steps/s (one step = one generated token per row, whatever it is) and the codec tokens/s this
run produced, plus the seconds of 40 Hz audio per second a trained model would make at that step rate: a trained
model spends 40 + 2U steps per second of audio (U deduplicated units/s; DP-SLM's k=500, lambda=4500 gives U ~ 10).

    dpslm-stream bench ellav [--k 500] [--batch 1 4 8] [--units 25] [--steps 48] [--device cuda]
    python -m dpslm_stream.bench.ellav
"""

from __future__ import annotations

import argparse
import time

import torch

from dpslm_stream.bench.ulm import random_model, sync
from dpslm_stream.device import setup_model_device
from dpslm_stream.models import ellav

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=500, help="codebook size K (default 500)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="prompts per call (default: 1 4 8)")
    parser.add_argument("--units", type=int, default=25, help="deduplicated units per prompt (default 25)")
    parser.add_argument("--steps", type=int, default=48, help="max_tokens: decode steps per call (default 48)")
    parser.add_argument("--units-per-second", type=float, default=10.0,
                        help="U, deduplicated units per second of speech, for the audio-rate column (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = setup_model_device(args.device), _DTYPES[args.dtype]  # TF32 off on CUDA, as the server
    tokenizer = ellav.ELLAVTokenizer.for_units(args.k)
    config = ellav.config_for_k(args.k)
    model = random_model(lambda: ellav.ELLAV(config, tokenizer), device, dtype)
    gen = torch.Generator().manual_seed(0)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"ELLA-V, released dimensions (K={args.k}, {n_params:,} parameters), RANDOM weights (speed only)")
    print(f"device {name}{threads}, dtype {args.dtype}, torch {torch.__version__}; prompts of {args.units} units, "
          f"{args.steps} decode steps, temperature 1, top_p 0.8, M = 10")
    header = (f"{'batch':>6} {'prefill s':>10} {'ms/step':>8} {'steps/s':>8} {'tokens/s':>9} {'codec tok/s':>12} "
              f"{'audio s/s':>10}")
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        prompts = [torch.randint(0, args.k, (args.units,), generator=gen).tolist() for _ in range(batch)]

        def call(max_tokens: int):
            sync(device)
            t0 = time.perf_counter()
            codes, _ = model.generate(prompts, max_tokens, 10, 1.0, 0.8, generator=torch.Generator().manual_seed(1))
            sync(device)
            return time.perf_counter() - t0, sum(len(c) for c in codes)

        call(2)  # warm-up
        t_prefill, _ = call(0)
        t_total, n_codec = call(args.steps)
        per_step = (t_total - t_prefill) / args.steps
        steps_per_s = 1 / per_step
        # A trained model needs 40 + 2U decode steps per second of audio for each row.
        audio_rate = batch * steps_per_s / (40 + 2 * args.units_per_second)
        print(f"{batch:>6} {t_prefill:>10.3f} {1e3 * per_step:>8.1f} {steps_per_s:>8.1f} {batch * steps_per_s:>9.1f} "
              f"{n_codec / (t_total - t_prefill):>12.1f} {audio_rate:>10.2f}")
    print()
    print("steps/s: per row (all rows advance together); tokens/s = batch x steps/s; codec tok/s: what this random "
          "model emitted; audio s/s: seconds of 24 kHz audio per second of compute for a trained model at U units/s.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
