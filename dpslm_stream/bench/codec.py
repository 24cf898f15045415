"""Unit-bitstream coding speed: milliseconds per unit to encode and to decode, per coder, at the released ULM size.

RANDOM weights with the real dimensions (speed does not depend on the weight values; compression does, so this
prints no bit rates: `dpslm-stream codec eval` does). The `ulm` coder runs one batch-1 step per unit at each end;
DP-SLM emits ~15-50 deduplicated units per second, so a ULM step well under 20 ms keeps a live link real time.

    dpslm-stream bench codec [--k 500] [--units 200] [--threads 1] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dpslm_stream.bench.ulm import random_model
from dpslm_stream.codec.format import Header
from dpslm_stream.codec.models import TableModel, ULMModel, UniformModel
from dpslm_stream.codec.packets import decode_stream, encode_stream
from dpslm_stream.codec.tables import fit_table
from dpslm_stream.models import ulm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--units", type=int, default=200, help="units per measurement (default 200)")
    parser.add_argument("--packet-ms", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--tiny", action="store_true", help="the tiny ULM dimensions instead of the released ones")
    parser.add_argument("--repeats", type=int, default=3)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    print(f"CPU flags: avx512_bf16={'avx512_bf16' in flags} amx_bf16={'amx_bf16' in flags}; torch threads "
          f"{args.threads}; timings on a shared machine are noisy (median of {args.repeats})")  # fmt: skip
    base = ulm.TINY if args.tiny else ulm.FULL
    model = random_model(lambda: ulm.ULM(ulm.config_for_k(args.k, base)), torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(0)
    units = [int(u) for u in rng.integers(0, args.k, args.units)]
    commits = [([u], None, 40 * i) for i, u in enumerate(units)]
    coders = {"uniform": lambda: UniformModel(args.k), "table": lambda: TableModel(fit_table([units], args.k)),
              "ulm": lambda: ULMModel(model)}  # fmt: skip
    print(f"ULM: {'tiny' if args.tiny else 'released'} dimensions (RANDOM weights), k={args.k}; {args.units} units, "
          f"{args.packet_ms} ms packets")  # fmt: skip
    print(f"{'coder':8s} {'encode ms/unit':>15s} {'decode ms/unit':>15s}")
    for name, make in coders.items():
        m = make()
        header = Header(k=args.k, lmbda=0, coder=name, packet_ms=args.packet_ms, resync_ms=5000, model_hash=m.model_hash)
        enc, dec = [], []
        for _ in range(args.repeats):
            t = time.thread_time()  # CPU time of this thread (torch runs its ops here with --threads 1)
            data, _ = encode_stream(header, m, commits)
            enc.append(time.thread_time() - t)
            t = time.thread_time()
            out = decode_stream(data, lambda h: m)
            dec.append(time.thread_time() - t)
            assert out.units == units
        print(f"{name:8s} {1000 * statistics.median(enc) / len(units):15.3f} {1000 * statistics.median(dec) / len(units):15.3f}")
    # What the ulm coder cannot go below in fp32: its one-token KV-cached forward, and that forward's weight matvecs.
    steps, matvecs = [], []
    linears = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    with torch.inference_mode():
        for _ in range(args.repeats):
            cache = model.new_cache(1, 64)
            t = time.thread_time()
            for u in units[:20]:
                model.hidden(torch.tensor([[u + 1]]), cache)
            steps.append((time.thread_time() - t) / 20)
            t = time.thread_time()
            for lin in linears:
                lin(torch.zeros(1, 1, lin.in_features))
            matvecs.append(time.thread_time() - t)
    print(f"ULM one-token KV-cached forward alone: {1000 * statistics.median(steps):.3f} ms; its Linear layers' "
          f"matrix-vector products alone: {1000 * statistics.median(matvecs):.3f} ms (fp32 weights read once a token)")
    load = open("/proc/loadavg").read().split()[:3] if __import__("os").path.exists("/proc/loadavg") else []
    print(f"load average during the run: {' '.join(load)}")
