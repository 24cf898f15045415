"""WavTokenizer decoder speed: real-time factor (compute seconds per audio second) of the full-size decoder,
whole-sequence `decode` and chunked `IncrementalVocoder` (windowed backbone + exact streaming iSTFT), and the
chunked output's deviation from the whole-sequence decode.

RANDOM weights with the real dimensions (small_600_24k_4096 by default): speed does not depend on the weight values,
but the deviation (SNR) of random weights says nothing about the released model's; it is plumbing only.

    dpslm-stream bench wavtokenizer [--model 600|320] [--seconds 2 5 10] [--left-context 48] [--lookahead 4]
                                    [--push 4] [--min-step 4] [--batch-streams 4 8] [--device cuda]
                                    [--dtype bfloat16] [--precision exact,fast]
    python -m dpslm_stream.bench.wavtokenizer
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from dpslm_stream.device import setup_model_device
from dpslm_stream.device import synchronize as _sync
from dpslm_stream.models import wavtokenizer as wt
from dpslm_stream.bench.options import precision_list
from dpslm_stream.models.precision import machine_summary
from dpslm_stream.stream.resynth_defaults import (
    DEFAULT_VOCODER_LEFT_CONTEXT, DEFAULT_VOCODER_LOOKAHEAD, DEFAULT_VOCODER_MIN_STEP,
)
from dpslm_stream.stream.vocoder import IncrementalVocoder, VocoderRunner, VocoderWindow

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIGS = {"600": wt.FULL, "320": wt.FULL_320}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(_CONFIGS), default="600",
                        help="small_600_24k_4096 (40 codes/s, default) or small_320_24k_4096 (75 codes/s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                        help="backbone/head dtype (default float32, as upstream); the iSTFT always runs in float32")
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 5.0, 10.0],
                        help="lengths of code sequences to decode, in seconds of audio (default: 2 5 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per length; the median is reported")
    parser.add_argument("--left-context", type=int, default=DEFAULT_VOCODER_LEFT_CONTEXT,
                        help=f"chunked: codes of left context per window (default {DEFAULT_VOCODER_LEFT_CONTEXT}, the "
                             "live default; 120 = 3 s is the training crop)")  # fmt: skip
    parser.add_argument("--lookahead", type=int, default=DEFAULT_VOCODER_LOOKAHEAD,
                        help=f"chunked: codes of lookahead (default {DEFAULT_VOCODER_LOOKAHEAD})")
    parser.add_argument("--push", type=int, default=4, help="chunked: codes per push (default 4 = 100 ms at 40 Hz)")
    parser.add_argument("--min-step", type=int, default=DEFAULT_VOCODER_MIN_STEP,
                        help=f"chunked: frames committed per backbone run (default {DEFAULT_VOCODER_MIN_STEP})")
    parser.add_argument("--no-chunked", action="store_true", help="time only the whole-sequence decode")
    parser.add_argument("--batch-streams", type=int, nargs="*", default=[4, 8],
                        help="streams whose equal-length windows (left context + min step + lookahead codes) run as "
                             "one batched backbone forward, timed against one forward per stream (default: 4 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--precision", type=_precisions, default=[],
                        help="also compare precisions side by side, e.g. exact,fast: the whole decode of --seconds' "
                             "first length and one live window (CPU time on a CPU), with the SNR against exact")


_precisions = precision_list()


def _time(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` runs after one warm-up, and the last result."""
    times, out = [], None
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        if i > 0:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _thread_time(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median CPU time of this thread over `repeats` runs after one warm-up, and the last result (CPU only: the
    figure a loaded machine does not inflate by waiting)."""
    times, out = [], None
    for i in range(repeats + 1):
        t0 = time.thread_time()
        out = fn()
        if i > 0:
            times.append(time.thread_time() - t0)
    return statistics.median(times), out


def _chunked(voc: IncrementalVocoder, codes: torch.Tensor, push: int) -> torch.Tensor:
    parts = [voc.push(codes[i : i + push]) for i in range(0, codes.numel(), push)]
    parts.append(voc.flush())
    return torch.cat(parts)


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = setup_model_device(args.device), _DTYPES[args.dtype]  # TF32 off on CUDA, as the server
    cfg = _CONFIGS[args.model]
    torch.manual_seed(0)
    with torch.device(device):
        model = wt.WavTokenizer(cfg).eval()
    with torch.no_grad():  # a fresh codebook is zeros: every code would decode alike (and the SNR mean nothing)
        for layer in model.feature_extractor.encodec.quantizer.vq.layers:
            layer._codebook.embed.normal_(generator=torch.Generator().manual_seed(1))
    # Half precision for the networks only: the Hann window and the FFTs stay float32.
    model.feature_extractor.to(dtype)
    model.backbone.to(dtype)
    model.head.out.to(dtype)
    params = sum(p.numel() for p in model.parameters())

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"WavTokenizer small_{args.model}_24k_4096 decoder, RANDOM weights (speed only; SNR is plumbing), "
          f"{params:,} parameters, {cfg.frame_rate:g} codes/s, {cfg.sample_rate} Hz")
    print(f"device {name}{threads}, dtype {args.dtype}, torch {torch.__version__}; median of {args.repeats} runs "
          f"after one warm-up; RTF = compute s / audio s")
    if not args.no_chunked:
        latency_ms = (args.lookahead + 1.5) * 1000 / cfg.frame_rate
        print(f"chunked: left context {args.left_context}, lookahead {args.lookahead}, push {args.push} codes, "
              f"commit >= {args.min_step} frames per backbone run; algorithmic latency {latency_ms:.1f} ms "
              "(+ push accumulation); SNR = whole-sequence decode vs chunked output")
    header = f"{'audio s':>8} {'codes':>6} {'whole s':>8} {'RTF whole':>10} {'x real time':>12}"
    if not args.no_chunked:
        header += f" {'chunked s':>10} {'RTF chunked':>12} {'runs':>5} {'ms/run':>7} {'SNR dB':>7}"
    print(header)
    print("-" * len(header))

    gen = torch.Generator().manual_seed(0)
    for seconds in args.seconds:
        n = max(1, round(seconds * cfg.frame_rate))
        codes = torch.randint(0, cfg.vq_bins, (n,), generator=gen)
        audio_s = n * cfg.hop_length / cfg.sample_rate
        t_whole, whole = _time(lambda c=codes: wt.decode(model, c[None, None].to(device)), device, args.repeats)
        line = f"{audio_s:8.2f} {n:6d} {t_whole:8.3f} {t_whole / audio_s:10.3f} {audio_s / t_whole:12.1f}"
        if not args.no_chunked:
            voc = IncrementalVocoder(model, args.left_context, args.lookahead, args.min_step)
            t_chunk, chunked = _time(lambda v=voc, c=codes: _chunked(v, c, args.push), device, args.repeats)
            runs = _count_runs(n, args)
            ref = whole[0].float()
            err = (chunked.float() - ref).square().sum().item()
            snr = 10 * math.log10(ref.square().sum().item() / err) if err > 0 else math.inf
            line += f" {t_chunk:10.3f} {t_chunk / audio_s:12.3f} {runs:5d} {1000 * t_chunk / runs:7.1f} {snr:7.1f}"
        print(line)
    if args.batch_streams:
        _batched_windows(model, cfg, device, args)
    if args.precision:
        _precision_rows(model, cfg, device, args)


def _precision_rows(model: wt.WavTokenizer, cfg: wt.WavTokenizerConfig, device: torch.device,
                    args: argparse.Namespace) -> None:
    """Each precision's copy of the float32 model (models/precision.py's plan for this machine), timed in the same
    run on the whole decode of the first --seconds length and on one live window; SNR of its whole decode against
    exact's (RANDOM weights: plumbing)."""
    if model.head.out.weight.dtype != torch.float32:
        raise SystemExit("--precision compares against the float32 model: leave --dtype at float32")
    n = max(1, round(args.seconds[0] * cfg.frame_rate))
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, cfg.vq_bins, (1, 1, n), generator=gen).to(device)
    length = args.left_context + args.min_step + args.lookahead
    window = VocoderWindow(codes=torch.randint(0, cfg.vq_bins, (length,), generator=gen), start=0, commit_to=length)
    timer = _time if device.type != "cpu" else _thread_time
    print(f"\nprecision ({machine_summary(device)}; {'CPU time of this thread' if device.type == 'cpu' else 'wall'}"
          f"; whole decode of {n} codes, one live window of {length} codes; SNR of the whole decode vs exact)")
    header = f"{'precision':>9} {'whole s':>8} {'x exact':>8} {'window ms':>10} {'x exact':>8} {'SNR dB':>7}  plan"
    print(header)
    print("-" * len(header))
    base: dict[str, float] = {}
    reference = None
    for precision in ["exact"] + [p for p in args.precision if p != "exact"]:
        variant = copy.deepcopy(model)
        plan = wt.apply_precision(variant, precision)
        t_whole, audio = timer(lambda v=variant: wt.decode(v, codes), device, args.repeats)
        runner = VocoderRunner(variant, max_batch=1)
        t_window, _ = timer(lambda r=runner: r.run([window]), device, args.repeats)
        audio = audio[0].float()
        if reference is None:
            reference, base = audio, {"whole": t_whole, "window": t_window}
        err = (audio - reference).square().sum().item()
        snr = 10 * math.log10(reference.square().sum().item() / err) if err > 0 else math.inf
        print(f"{precision:>9} {t_whole:8.3f} {t_whole / base['whole']:8.2f} {1e3 * t_window:10.1f} "
              f"{t_window / base['window']:8.2f} {snr:7.1f}  {plan.describe()}")


def _batched_windows(model: wt.WavTokenizer, cfg: wt.WavTokenizerConfig, device: torch.device,
                     args: argparse.Namespace) -> None:
    """One live vocoder window per stream, all of equal length: N separate forwards (before) against one forward of
    N rows (VocoderRunner, after), in the same run; and whether the batched rows equal the separate ones bit for bit."""
    length = args.left_context + args.min_step + args.lookahead
    runner = VocoderRunner(model, max_batch=max(args.batch_streams))
    what = "CPU time of this thread" if device.type == "cpu" else "wall time"
    print(f"\nvocoder windows batched across streams ({what}; {length} codes each: left context {args.left_context} + "
          f"min step {args.min_step} + lookahead {args.lookahead}); before = one forward per stream, after = one "
          "forward for all (VocoderRunner)")
    header = f"{'streams':>8} {'before ms':>10} {'after ms':>9} {'after/before':>13} {'bit-equal':>10} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(2)
    for n in args.batch_streams:
        windows = [VocoderWindow(codes=torch.randint(0, cfg.vq_bins, (length,), generator=gen), start=0,
                                 commit_to=length) for _ in range(n)]  # fmt: skip

        def separate() -> list[torch.Tensor]:
            for w in windows:
                runner.run([w])
            return [w.spectra for w in windows]

        def batched() -> list[torch.Tensor]:
            runner.run(windows)
            return [w.spectra for w in windows]

        timer = _time if device.type != "cpu" else _thread_time  # CPU: this thread's CPU time (a loaded machine)
        t_before, alone = timer(separate, device, args.repeats)
        t_after, together = timer(batched, device, args.repeats)
        equal = all(torch.equal(a, b) for a, b in zip(alone, together))
        diff = max(float((a - b).abs().max()) for a, b in zip(alone, together))
        print(f"{n:8d} {1e3 * t_before:10.1f} {1e3 * t_after:9.1f} {t_after / t_before:13.2f} {str(equal):>10} "
              f"{diff:11.2e}")


def _count_runs(n: int, args: argparse.Namespace) -> int:
    """Backbone runs the chunked schedule makes for n codes (the same rule as IncrementalVocoder.push/flush)."""
    runs, committed = 0, 0
    for received in range(args.push, n + args.push, args.push):
        received = min(received, n)
        if received - args.lookahead - committed >= args.min_step:
            runs, committed = runs + 1, received - args.lookahead
    return runs + (1 if committed < n else 0)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    run(_parser.parse_args())
