"""Unit-LM scoring speed at the released size: whole-utterance loglikelihood and live incremental scoring.

RANDOM weights with the real dimensions (speed does not depend on the weight values). Incremental rows push
`--units` deduplicated units in blocks of B after a `--context`-unit history, as a live session does; DP-SLM emits
roughly 5-10 deduplicated units per second of speech, so "units/s" well above 10 means live scoring keeps up.

    dpslm-stream bench ulm [--k 500] [--lengths 100 500] [--blocks 1 4 16] [--sessions 4] [--device cuda]
    python -m dpslm_stream.bench.ulm
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from dpslm_stream.device import setup_model_device
from dpslm_stream.device import synchronize as sync
from dpslm_stream.models import ulm

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=500, help="codebook size K (vocabulary K + 1; default 500)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 500],
                        help="utterance lengths (units) for whole-utterance loglikelihood (default: 100 500)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16],
                        help="block sizes for incremental scoring (default: 1 4 16)")
    parser.add_argument("--units", type=int, default=48, help="units pushed per incremental measurement (default 48)")
    parser.add_argument("--context", type=int, default=100, help="units already in the session before timing")
    parser.add_argument("--max-context", type=int, default=None, help="IncrementalScorer max_context (default: none)")
    parser.add_argument("--sessions", type=int, nargs="*", default=[4],
                        help="also time score_blocks over this many sessions at each block size (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per loglikelihood row; median reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--precision", default="exact",
                        help="exact, or exact,fast: also time incremental scoring with the fast plan side by side and "
                             "measure its log-prob error against exact (default exact)")


def random_model(build: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """`build()` with random N(0, 0.02) weights (norms 1), skipping the slow default init of 200M parameters."""
    with torch.device("meta"):
        model = build()
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval()


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = setup_model_device(args.device), _DTYPES[args.dtype]  # TF32 off on CUDA, as the server
    config = ulm.config_for_k(args.k)
    model = random_model(lambda: ulm.ULM(config), device, dtype)
    tok = ulm.UnitTokenizer(args.k)
    gen = torch.Generator().manual_seed(0)

    def units(n: int) -> list[int]:
        return torch.randint(0, args.k, (n,), generator=gen).tolist()

    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"ULM, released dimensions (K={args.k}, {n_params:,} parameters), RANDOM weights (speed only)")
    print(f"device {name}{threads}, dtype {args.dtype}, torch {torch.__version__}")
    print()
    print("Whole-utterance loglikelihood (one forward), median of", args.repeats, "runs after a warm-up")
    header = f"{'units':>7} {'seconds':>9} {'ms/unit':>9} {'units/s':>9}"
    print(header)
    print("-" * len(header))
    for n in args.lengths:
        ids = tok.encode(units(n)).to(device)
        times = []
        for i in range(args.repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            model.loglikelihood(ids)
            sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"{n:>7} {t:>9.3f} {1e3 * t / n:>9.2f} {n / t:>9.1f}")

    print()
    print(f"Incremental scoring: {args.units} units pushed in blocks after a {args.context}-unit history "
          f"(max_context={args.max_context})")
    header = f"{'sessions':>8} {'block':>6} {'ms/block':>9} {'ms/unit':>9} {'units/s':>9} {'state MiB':>10}"
    print(header)
    print("-" * len(header))
    for sessions in [1] + [s for s in args.sessions if s > 1]:
        for block in args.blocks:
            scorers = [ulm.IncrementalScorer(model, max_context=args.max_context) for _ in range(sessions)]
            ulm.score_blocks(scorers, [units(args.context) for _ in scorers])
            ulm.score_blocks(scorers, [units(block) for _ in scorers])  # warm-up at this shape
            n_blocks = max(1, args.units // block)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n_blocks):
                ulm.score_blocks(scorers, [units(block) for _ in scorers])
            sync(device)
            t = (time.perf_counter() - t0) / n_blocks
            per_unit = t / (block * sessions)
            mib = sum(s.state_nbytes for s in scorers) / sessions / 2**20
            print(f"{sessions:>8} {block:>6} {1e3 * t:>9.1f} {1e3 * per_unit:>9.2f} {1 / per_unit:>9.1f} {mib:>10.1f}")
    print()
    print("units/s counts all sessions together; one live session needs ~5-10 units/s. "
          "state MiB: KV cache per session.")
    if "fast" in args.precision.split(","):
        compare_precisions(args, model, config, device, units)


def compare_precisions(args, exact: ulm.ULM, config, device, units) -> None:
    """Incremental scoring, exact and fast interleaved (medians), and fast's log-prob error against exact."""
    from dpslm_stream.models.precision import machine_summary, transformer_precision

    fast = random_model(lambda: ulm.ULM(config), device, torch.float32)  # same seed: the same weights
    plan = transformer_precision(fast, "fast", "ulm")
    print(f"\nPrecision ({machine_summary(device)}): {plan.describe()}")
    header = f"{'block':>6} {'exact ms/unit':>13} {'fast ms/unit':>12} {'x exact':>7}"
    print(header)
    print("-" * len(header))
    for block in args.blocks:
        times = {"exact": [], "fast": []}
        for _ in range(max(1, args.repeats)):
            for name, model in (("exact", exact), ("fast", fast)):
                scorer = ulm.IncrementalScorer(model, max_context=args.max_context)
                scorer.push(units(args.context))
                n_blocks = max(1, args.units // block)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n_blocks):
                    scorer.push(units(block))
                sync(device)
                times[name].append((time.perf_counter() - t0) / (n_blocks * block))
        e, f = (statistics.median(times[k]) for k in ("exact", "fast"))
        print(f"{block:>6} {1e3 * e:>13.2f} {1e3 * f:>12.2f} {f / e:>7.2f}")
    seq = units(200)
    errs = []
    for block in (1, 16):
        a, b = ulm.IncrementalScorer(exact), ulm.IncrementalScorer(fast)
        for i in range(0, len(seq), block):
            errs.append(float((a.push(seq[i : i + block]) - b.push(seq[i : i + block])).abs().max()))
    whole = float((exact.unit_logprobs(ulm.UnitTokenizer(args.k).encode(seq).to(device))
                   - fast.unit_logprobs(ulm.UnitTokenizer(args.k).encode(seq).to(device))).abs().max())  # fmt: skip
    print(f"fast vs exact, 200 units (RANDOM weights: plumbing): max |log-prob error| {max(errs):.4f} nats "
          f"incremental (blocks of 1 and 16), {whole:.4f} whole-utterance")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
