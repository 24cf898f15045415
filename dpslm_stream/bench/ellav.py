"""ELLA-V decode speed at the released size, per precision side by side: the live decode step (BatchDecoder: one
batched forward, the control loop, one host read), prefill, and how far `fast` is from `exact`.

RANDOM weights with the real dimensions (speed does not depend on the weight values, but what a random model
generates does: it emits codec tokens, EOPs and stray tokens in other proportions than a trained one). A trained
model spends 40 + 2U decode steps per second of audio (U deduplicated units/s), so one real-time stream needs a step
of <= 1000 / (40 + 2U) ms (11 ms at U = 25, 17 ms at U = 10).

Columns: ms/step (median over repeats; every precision timed in the same run, interleaved), ratio to exact,
non-matmul ms/step (the step's CPU time outside the weight matmuls: the same live steps timed with every weight
matmul returning a zero output; dispatch, norms, RoPE, attention, cache writes, the control loop), host reads per
step. Agreement (batch 1, the same prompt): greedy tokens of
`fast` against `exact` until the first difference and overall, and the max |logit error| with both models fed the
exact model's tokens (teacher forcing), relative to the largest |logit|. On random weights these are plumbing
figures; rerun on the released checkpoint with `--models release` for real ones.

    dpslm-stream bench ellav [--precision exact,fast,fast-compiled] [--batch 1 8] [--units 25] [--steps 48]
                             [--models random]
    python -m dpslm_stream.bench.ellav
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn as nn

from dpslm_stream import hub
from dpslm_stream.bench.options import precision_list
from dpslm_stream.bench.ulm import random_model, sync
from dpslm_stream.device import setup_model_device
from dpslm_stream.models import ellav
from dpslm_stream.models.precision import PRECISIONS, FastLinear, machine_summary, transformer_precision
from dpslm_stream.stream.ellav_batch import BatchDecoder
from dpslm_stream.stream.ellav_stage import IncrementalELLAV


# Rows of the table: the precisions, and "fast-compiled" (precision fast with compile_decode: the decode step
# through torch.compile, models/precision.py plan_for).
VARIANTS = (*PRECISIONS, "fast-compiled")


_precisions = precision_list(VARIANTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=500, help="codebook size K (default 500)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--precision", type=_precisions, default=["exact", "fast"],
                        help="precisions to compare, e.g. exact,fast (default both); fast-compiled: fast with the "
                             "decode step through torch.compile (a few minutes of compilation first)")
    parser.add_argument("--models", default="random",
                        help="random (released dimensions, random weights; default) or a model set (release, DIR)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="passes per step (default: 1 8)")
    parser.add_argument("--units", type=int, default=25, help="deduplicated units per prompt (default 25)")
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed per repeat (default 48)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per row; medians reported (default 3)")
    parser.add_argument("--agreement-steps", type=int, default=96, help="greedy tokens compared (default 96)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def load(args: argparse.Namespace, variant: str, device: torch.device) -> ellav.ELLAV:
    if args.models == "random":
        tokenizer = ellav.ELLAVTokenizer.for_units(args.k)
        model = random_model(lambda: ellav.ELLAV(ellav.config_for_k(args.k), tokenizer), device, torch.float32)
    else:
        model = hub.ModelSet(args.models).ellav(args.k, hub.DEFAULT_LMBDA, map_location=device).to(device).eval()
    compiled = variant == "fast-compiled"
    transformer_precision(model, "fast" if compiled else variant, "ellav", compile_decode=compiled)
    return model


def prompts_for(args: argparse.Namespace, batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    out = []
    for _ in range(batch):
        units = torch.randint(0, args.k, (args.units,), generator=gen).tolist()
        out.append([u for i, u in enumerate(units) if i == 0 or u != units[i - 1]])
    return out


def time_steps(model: ellav.ELLAV, prompts: list[list[int]], steps: int, device: torch.device) -> dict:
    """Prefill the passes, then time `steps` live decode steps (greedy; a finished pass is re-admitted)."""
    decoder = BatchDecoder(model, max_batch=len(prompts), max_codec_tokens_per_phone=10)

    def admit(units):
        stage = IncrementalELLAV(model, left_context=None, holdback=None)
        stage.add(units)
        stage.end()
        return stage, stage.next_pass()

    sync(device)
    t0 = time.perf_counter()
    decoder.admit([admit(u) for u in prompts])
    sync(device)
    prefill = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = decoder.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        again = [prompts[i % len(prompts)] for i, (_, _, over) in enumerate(out) if over]
        if again:
            decoder.admit([admit(u) for u in again])
    return {"prefill": prefill, "step": statistics.median(times), "cpu": statistics.median(cpu)}


@contextlib.contextmanager
def matmuls_skipped(model: ellav.ELLAV):
    """Every weight matmul of `model` (nn.Linear, FastLinear) returns zeros of its output's shape while inside: what
    is left of a decode step is its cost outside the matmuls (the control loop then sees flat logits)."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, FastLinear))]
    for m in linears:
        m.forward = lambda x, n=m.out_features: x.new_zeros(*x.shape[:-1], n)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


@torch.inference_mode()
def agreement(exact: ellav.ELLAV, fast: ellav.ELLAV, prompt: list[int], steps: int) -> dict:
    a, _ = exact.generate_tokens([prompt], steps, 10, 1.0, 0.0)
    b, _ = fast.generate_tokens([prompt], steps, 10, 1.0, 0.0)
    a, b = a[0], b[0]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)
    # teacher forcing on the exact tokens: prompt + generated, one forward each
    encoded = exact.tokenizer.encode_prompt(prompt) + a
    tokens = torch.tensor([encoded], device=exact.device)
    ref, got = exact(tokens), fast(tokens)
    cache_r, cache_f = exact.new_cache(1, len(encoded)), fast.new_cache(1, len(encoded))
    n0 = len(encoded) - len(a)
    exact(tokens[:, :n0], cache_r), fast(tokens[:, :n0], cache_f)
    step_err = 0.0
    for t in range(n0, len(encoded)):  # the decode path (few-row kernels)
        r, g = exact(tokens[:, t : t + 1], cache_r), fast(tokens[:, t : t + 1], cache_f)
        step_err = max(step_err, float((r - g).abs().max()))
    scale = float(ref.abs().max())
    return {"first_diff": first, "agree": same, "prefill_err": float((ref - got).abs().max()) / scale,
            "decode_err": step_err / scale, "tokens": len(a)}  # fmt: skip


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_model_device(args.device)  # TF32 off on CUDA, as the server
    precisions = list(dict.fromkeys(args.precision))
    models = {p: load(args, p, device) for p in precisions}
    with torch.device("meta"):
        n_params = sum(p.numel() for p in ellav.random_model(args.k, ellav.FULL).parameters())
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    weights = "RANDOM weights (speed and plumbing only)" if args.models == "random" else f"model set {args.models}"
    print(f"ELLA-V, released dimensions (K={args.k}, {n_params:,} parameters), {weights}")
    print(f"device {machine_summary(device)}{threads}, torch {torch.__version__}; prompts of {args.units} units, "
          f"{args.steps} live decode steps x {args.repeats} repeats (medians), greedy, M = 10")
    for p in precisions:
        print(f"  {p}: {models[p].precision_plan.describe()}")
    header = (f"{'precision':>9} {'batch':>5} {'prefill s':>9} {'ms/step':>8} {'x exact':>7} {'CPU ms/step':>11} "
              f"{'x exact':>7} {'non-matmul ms':>13} {'reads/step':>10}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        prompts = prompts_for(args, batch)
        runs = {p: [] for p in precisions}
        outside = {p: [] for p in precisions}
        for p in precisions:
            if models[p].precision_plan.compiled:  # compile every shape the timed steps meet before timing them
                t0 = time.perf_counter()
                time_steps(models[p], prompts, args.steps, device)
                with matmuls_skipped(models[p]):
                    time_steps(models[p], prompts, args.steps, device)
                print(f"  ({p}: torch.compile warm-up {time.perf_counter() - t0:.0f} s, batch {batch})")
        for _ in range(max(1, args.repeats)):
            for p in precisions:  # interleaved: contention from other processes hits every precision alike
                runs[p].append(time_steps(models[p], prompts, args.steps, device))
                with matmuls_skipped(models[p]):
                    outside[p].append(time_steps(models[p], prompts, args.steps, device)["cpu"])
        ref = runs["exact" if "exact" in runs else precisions[0]]
        base, base_cpu = (statistics.median(r[key] for r in ref) for key in ("step", "cpu"))
        for p in precisions:
            step, cpu = (statistics.median(r[key] for r in runs[p]) for key in ("step", "cpu"))
            prefill = statistics.median(r["prefill"] for r in runs[p])
            print(f"{p:>9} {batch:>5} {prefill:>9.3f} {1e3 * step:>8.1f} {step / base:>7.2f} {1e3 * cpu:>11.1f} "
                  f"{cpu / base_cpu:>7.2f} {1e3 * statistics.median(outside[p]):>13.1f} {1:>10}")  # fmt: skip
    if "exact" in models and len(models) > 1 and args.agreement_steps > 0:
        prompt = prompts_for(args, 1)[0]
        print("\nagreement with exact (batch 1, greedy, the same prompt; RANDOM weights: plumbing)" if
              args.models == "random" else "\nagreement with exact (batch 1, greedy, the same prompt)")  # fmt: skip
        for p in precisions:
            if p == "exact":
                continue
            a = agreement(models["exact"], models[p], prompt, args.agreement_steps)
            print(f"  {p}: identical greedy tokens for the first {a['first_diff']} of {a['tokens']}, "
                  f"{100 * a['agree']:.1f}% position-wise; max |logit error| / max |logit|: decode "
                  f"{a['decode_err']:.4f}, prefill {a['prefill_err']:.4f}")  # fmt: skip
    print("\nms/step: wall time (inflated when other processes share the cores); CPU ms/step: this process's CPU "
          "time per step (with --threads 1 about the uncontended wall time); non-matmul: CPU time per step with the "
          "weight matmuls skipped; reads/step: device -> host reads per live decode step (counted by "
          "tests/test_stream_resynth.py). A trained model needs 40 + 2U steps per second of audio.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
