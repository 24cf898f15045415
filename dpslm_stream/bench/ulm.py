"""Unit-LM scoring speed at the released size: whole-utterance loglikelihood and live incremental scoring.

RANDOM weights with the real dimensions (speed does not depend on the weight values). Incremental rows push
`--units` deduplicated units in blocks of B after a `--context`-unit history, as a live session does; DP-SLM emits
roughly 5-10 deduplicated units per second of speech, so "units/s" well above 10 means live scoring keeps up.

    dpslm-stream bench ulm [--k 500] [--lengths 100 500] [--blocks 1 4 16] [--sessions 4] [--device cuda]
    dpslm-stream bench ulm --compare-layouts [--layout-sessions 1 4 8] [--layout-lengths 256 1023] --threads 1
    python -m dpslm_stream.bench.ulm
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpslm_stream.device import setup_model_device
from dpslm_stream.device import synchronize as sync
from dpslm_stream.models import ulm
from dpslm_stream.models.transformer import KVCache

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
    parser.add_argument("--compare-layouts", action="store_true",
                        help="only compare the scorers' persistent batched cache (ScoringPool) with the previous "
                             "layout (every session's cache stacked into a fresh batched cache per step)")
    parser.add_argument("--layout-sessions", type=int, nargs="+", default=[1, 4, 8],
                        help="sessions scored together in --compare-layouts (default: 1 4 8)")
    parser.add_argument("--layout-lengths", type=int, nargs="+", default=[256, 1023],
                        help="tokens each session's cache holds in --compare-layouts (default: 256 1023)")
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
    if args.compare_layouts:
        compare_layouts(args, model, device)
        return
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


class _CopyCounter(TorchDispatchMode):
    """Bytes written by the copy and fill ops run inside it: the destination of copy_/fill_/zero_, the values of
    index_put_, the result of clone/zeros/new_zeros/full/new_full/cat."""

    IN_PLACE = {"copy_": 0, "fill_": 0, "zero_": 0, "index_put_": 2}  # op -> argument whose bytes are written
    NEW = {"clone", "zeros", "new_zeros", "full", "new_full", "cat"}

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        written = args[self.IN_PLACE[name]] if name in self.IN_PLACE else out if name in self.NEW else None
        if isinstance(written, torch.Tensor):
            self.nbytes += written.numel() * written.element_size()
        return out


def _stacked_step(model: ulm.ULM, caches: list[KVCache], units: list[int]) -> torch.Tensor:
    """The previous layout (before ScoringPool), one unit per session: every session's single-row cache is copied
    into a fresh batched cache, the forward runs there, and each row's new slot is copied back. Returns the
    next-unit log-probabilities, as `IncrementalScorer.next_logprobs`."""
    tokens = torch.tensor([[u + 1] for u in units], device=model.device)
    if len(caches) == 1:  # one session ran on its own cache
        logp = torch.log_softmax(model(tokens, caches[0], [1]), dim=-1).cpu()
        return logp[:, 0]
    lengths = [int(c.lengths[0]) for c in caches]
    batched = model.new_cache(len(caches), max(lengths) + 1, window=caches[0].window)
    for b, (c, n) in enumerate(zip(caches, lengths)):
        batched.k[:, b, :, :n] = c.k[:, 0, :, :n]
        batched.v[:, b, :, :n] = c.v[:, 0, :, :n]
        batched.slot_pos[b, :n] = c.slot_pos[0, :n]
        batched.length[b], batched.lengths[b], batched.next_pos[b] = n, n, c.next_pos[0]
    logp = torch.log_softmax(model(tokens, batched, [1] * len(caches)), dim=-1).cpu()
    for b, (c, n) in enumerate(zip(caches, lengths)):
        c.k[:, 0, :, n : n + 1] = batched.k[:, b, :, n : n + 1]
        c.v[:, 0, :, n : n + 1] = batched.v[:, b, :, n : n + 1]
        c.slot_pos[0, n : n + 1] = batched.slot_pos[b, n : n + 1]
        c.length[0], c.lengths[0], c.next_pos[0] = n + 1, n + 1, batched.next_pos[b]
    return logp[:, 0]  # [sessions, V]: each session's next-unit distribution


def _pooled_step(scorers: list[ulm.IncrementalScorer], units: list[int]) -> torch.Tensor:
    """The same step through `score_blocks` on the scorers' shared pool; their next-unit log-probabilities."""
    ulm.score_blocks(scorers, [[u] for u in units])
    return torch.stack([s.next_logprobs for s in scorers])


def _fill_row(cache: KVCache, row: int, n: int, gen: torch.Generator) -> None:
    """Row `row` as if it held `n` tokens at positions 0..n-1 (random keys/values: speed does not depend on them)."""
    cache.k[:, row, :, :n].normal_(generator=gen)
    cache.v[:, row, :, :n].normal_(generator=gen)
    cache.slot_pos[row, :n] = torch.arange(n)
    cache.length[row], cache.lengths[row], cache.next_pos[row] = n, n, n


@torch.inference_mode()
def compare_layouts(args: argparse.Namespace, model: ulm.ULM, device: torch.device, steps: int = 4) -> None:
    """One unit per session per step over caches of L tokens: the persistent batched cache against per-step
    stacking, interleaved (medians of `steps` steps after a warm-up), CPU time of this thread on the CPU."""
    from dpslm_stream.stream.session import DEFAULT_SCORE_CONTEXT, SCORE_CHUNK

    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    window = DEFAULT_SCORE_CONTEXT
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"Scoring cache layouts: one unit per session per step, window {window}, chunk {SCORE_CHUNK}; "
          f"{'CPU time of the scoring thread' if device.type == 'cpu' else 'wall time'}, median of {steps} steps")
    header = (f"{'sessions':>8} {'tokens':>6} {'stacked ms':>10} {'pool ms':>8} {'x':>5} "
              f"{'stacked MiB copied':>18} {'pool MiB copied':>15} {'max |diff|':>9}")
    print(header)
    print("-" * len(header))
    for length in args.layout_lengths:
        for sessions in args.layout_sessions:
            pool = ulm.ScoringPool(model, window, SCORE_CHUNK, rows=sessions)
            scorers = [ulm.IncrementalScorer(model, window, chunk=SCORE_CHUNK, pool=pool) for _ in range(sessions)]
            singles = []
            for row, scorer in enumerate(scorers):
                _fill_row(pool.cache, row, length, gen)
                scorer.next_logprobs = torch.zeros(model.config.vocab_size)
                single = model.new_cache(1, pool.cache.capacity, window=window)
                _fill_row(single, 0, length, gen)
                single.k[:, 0], single.v[:, 0] = pool.cache.k[:, row], pool.cache.v[:, row]  # the same history
                singles.append(single)
            times: dict[str, list[float]] = {"stacked": [], "pool": []}
            copied, scores = {}, {}
            for step in range(steps + 2):
                units = torch.randint(0, args.k, (sessions,)).tolist()
                runs = (("stacked", lambda: _stacked_step(model, singles, units)),
                        ("pool", lambda: _pooled_step(scorers, units)))  # fmt: skip
                for name, fn in runs:
                    if step == steps + 1:  # last: count the bytes copied (the dispatch mode slows it down)
                        with _CopyCounter() as counter:
                            scores[name] = fn()
                        copied[name] = counter.nbytes / 2**20
                        continue
                    sync(device)
                    t0 = clock()
                    fn()
                    sync(device)
                    if step:
                        times[name].append(clock() - t0)
            old, new = (statistics.median(times[k]) for k in ("stacked", "pool"))
            error = float((scores["stacked"] - scores["pool"]).abs().max())
            print(f"{sessions:>8} {length:>6} {1e3 * old:>10.1f} {1e3 * new:>8.1f} {old / new:>5.2f} "
                  f"{copied['stacked']:>18.1f} {copied['pool']:>15.2f} {error:>9.1e}")
    print("MiB copied: bytes written by copy/fill ops in one step (aten copy_, index_put_, clone, fill_, zeros, cat), "
          "the new tokens' own keys/values included; max |diff|: the two layouts' log-probs of the last step "
          "(the same histories)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
