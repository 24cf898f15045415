#!/usr/bin/env python3
"""Independent hand-made mutation check (docs/mutation.md, "Hand-made mutants").

mutmut (scripts/mutants.py) swaps operators one at a time; these are small realistic bugs a developer could write
instead (an off-by-one in a window, a bound checked with the wrong comparison, a dropped reset, a wrong error code,
a missing scale, ...). Each mutant is a (file, old, new) string replacement plus the test files a developer would
run for that module. For each: apply, run those tests (``pytest -x -q``), record killed/survived, restore the file.
Files are restored even on failure or Ctrl-C (try/finally plus a SIGTERM handler).

    .venv/bin/python scripts/handmade_mutants.py              # all mutants
    .venv/bin/python scripts/handmade_mutants.py -k 3 7       # some, by number
    .venv/bin/python scripts/handmade_mutants.py --check      # only check that every `old` occurs exactly once
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


_DPDP = ("tests/test_dpdp.py", "tests/test_mutation_dpdp.py")
_AUDIO = ("tests/test_audio.py", "tests/test_mutation_audio.py")
_PROTO = ("tests/test_protocol.py", "tests/test_mutation_protocol.py")
_LIMITS = ("tests/test_server_limits.py", "tests/test_session_core.py", "tests/test_mutation_limits.py")
_SESSION = ("tests/test_session_core.py", "tests/test_resume_core.py", "tests/test_mutation_session.py")
_TRANSFORMER = ("tests/test_mutation_transformer.py", "tests/test_ulm.py")
_ULM = ("tests/test_ulm.py", "tests/test_mutation_ulm.py")
_ELLAV = ("tests/test_ellav.py", "tests/test_mutation_ellav.py")
_WT = ("tests/test_wavtokenizer.py", "tests/test_mutation_wavtokenizer.py")
_WAVLM = ("tests/test_wavlm.py", "tests/test_mutation_wavlm.py")
_ENC = ("tests/test_stream_encoder.py", "tests/test_mutation_stream_encoder.py")
_RESYNTH = ("tests/test_mutation_stream_resynth.py", "tests/test_stream_stages.py")
_CODEC = ("tests/test_codec.py", "tests/test_codec_link.py")
_HANDMADE = ("tests/test_mutation_handmade.py",)

MUTANTS: list[Mutant] = [
    Mutant("dpslm_stream/dpdp.py", "new_base = max(self.frames_committed - 1, 0)",
           "new_base = max(self.frames_committed, 0)", _DPDP,
           "DPDP trims the per-frame window one frame too far (drops the committed frame's history)"),
    Mutant("dpslm_stream/dpdp.py", "-1 if self.max_lag is None else self.max_lag,",
           "-1 if self.max_lag is None else self.max_lag + 1,", _DPDP,
           "DPDP max_lag off by one: a decision may wait one frame longer than asked"),
    Mutant("dpslm_stream/audio.py", "self._buf.new_zeros(self._width + self._orig)])",
           "self._buf.new_zeros(self._width)])", _AUDIO,
           "resampler flush pads width zeros but forgets the extra block (last partial block lost)"),
    Mutant("dpslm_stream/audio.py", "self._n_out = 0  # output samples emitted so far",
           "pass  # output samples emitted so far (reset forgot it)", _AUDIO,
           "resampler reset() does not zero the emitted-sample count (stale state across streams)"),
    Mutant("dpslm_stream/audio.py", "_PCM16_SCALE), -32768, 32767)", "_PCM16_SCALE), -32767, 32767)", _AUDIO,
           "float->PCM16 clips symmetrically to +-32767 (int16 -32768 no longer round-trips)"),
    Mutant("dpslm_stream/protocol/frames.py",
           'raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown binary frame kind {kind}")',
           'raise ProtocolError(ErrorCode.BAD_AUDIO, f"unknown binary frame kind {kind}")', _PROTO,
           "unknown server binary frame kind reported as BAD_AUDIO instead of UNKNOWN_TYPE"),
    Mutant("dpslm_stream/protocol/client_parse.py", "    if size > max_bytes:", "    if size >= max_bytes:", _PROTO,
           "a control message of exactly max_bytes is refused (>= instead of >)"),
    Mutant("dpslm_stream/protocol/client_parse.py", "if depth > max_depth:", "if depth >= max_depth:", _PROTO,
           "JSON nested exactly max_depth deep is refused (>= instead of >)"),
    Mutant("server/limits.py", "if not lo <= value <= hi:", "if not lo <= value < hi:", _LIMITS,
           "window option equal to the server's maximum (left/hop/lookahead) is refused"),
    Mutant("server/limits.py", "not 1 <= max_lag <= cfg.max_lag", "not 0 <= max_lag <= cfg.max_lag", _LIMITS,
           "max_lag = 0 accepted (lower bound off by one)"),
    Mutant("server/limits.py", "4 * (queued + n) <= cfg.max_buffer_bytes", "4 * queued <= cfg.max_buffer_bytes",
           _LIMITS, "buffer byte rule forgets to count the incoming frame (limit not enforced for it)"),
    Mutant("server/limits.py", "end_s - first_end_s > cfg.max_exact_resynth_s", "end_s > cfg.max_exact_resynth_s",
           _LIMITS, "exact-resynthesis limit counted from stream start instead of the first resynthesized unit"),
    Mutant("server/resume.py", "self.units_from <= next_seq <= self.units_sent",
           "self.units_from <= next_seq < self.units_sent", _SESSION,
           "resume with next_seq == units sent (client has everything) is refused"),
    Mutant("server/resume.py", "cut = P.AUDIO_HEADER.size + 2 * (audio_samples - e.first)",
           "cut = P.AUDIO_HEADER.size + (audio_samples - e.first)", _SESSION,
           "replayed partial audio chunk cut in samples instead of bytes (missing x2 for int16)"),
    Mutant("server/resume.py", "self.units_from = old.end", "self.units_from = old.first", _SESSION,
           "evicting a unit from the replay log leaves units_from one seq too low"),
    Mutant("server/session.py", "if len(data) > self.cfg.max_message_bytes:",
           "if len(data) >= self.cfg.max_message_bytes:", _SESSION + ("tests/test_server_limits.py",),
           "audio frame of exactly max_message_bytes refused"),
    Mutant("server/session.py", "return dropped + self._limit(E.SESSION_TIME_LIMIT, f\"mode full keeps",
           "return dropped + self._limit(E.BUFFER_FULL, f\"mode full keeps", _SESSION + ("tests/test_server_limits.py",),
           "mode-full length limit reported as BUFFER_FULL instead of SESSION_TIME_LIMIT"),
    Mutant("dpslm_stream/models/transformer.py", "mask &= key_pos > query_pos - self.window",
           "mask &= key_pos >= query_pos - self.window", _TRANSFORMER,
           "sliding-window attention sees W + 1 tokens (window bound off by one)"),
    Mutant("dpslm_stream/models/transformer.py", "xf.pow(2).mean(-1, keepdim=True) + self.eps)",
           "xf.pow(2).mean(-1, keepdim=True))", _TRANSFORMER, "RMSNorm (unfused path) without eps"),
    Mutant("dpslm_stream/models/ulm.py", "drop_oldest(self.max_context - 1)", "drop_oldest(self.max_context)",
           _ULM, "windowed ULM scorer keeps one token too many in its KV cache (cache position off by one)"),
    Mutant("dpslm_stream/models/ellav.py", "force_eop = state.since_eop > max_codec_tokens_per_phone + 1",
           "force_eop = state.since_eop >= max_codec_tokens_per_phone + 1", _ELLAV,
           "ELLA-V forces EOP one codec token early (M instead of M + 1 per unit)"),
    Mutant("dpslm_stream/models/ellav.py", "probs = torch.softmax(logits.float() / temperature, dim=-1)",
           "probs = torch.softmax(logits.float(), dim=-1)", _ELLAV,
           "ELLA-V nucleus sampling ignores the temperature"),
    Mutant("dpslm_stream/models/wavtokenizer.py", "return audio.flatten(1)[:, pad : pad + hop_length * t]",
           "return audio.flatten(1)[:, pad + 1 : pad + 1 + hop_length * t]", _WT,
           "WavTokenizer iSTFT trims one sample too many at the start (output shifted by one sample)"),
    Mutant("dpslm_stream/models/wavlm.py", "buckets = (rel > 0).long() * half", "buckets = (rel >= 0).long() * half",
           _WAVLM, "WavLM relative position: distance 0 put in the right-hand bucket half"),
    Mutant("dpslm_stream/stream/encoder.py", "return (self.hop + self.lookahead - 1) * FRAME_SECONDS",
           "return (self.hop + self.lookahead) * FRAME_SECONDS", _ENC,
           "streaming encoder reports the oldest frame's lag one frame too high"),
    Mutant("dpslm_stream/stream/vocoder.py", "env = envelope(self.window, self.hop, min(t, self.overlap))",
           "env = envelope(self.window, self.hop, t)", _RESYNTH + ("tests/test_wavtokenizer.py",),
           "streaming iSTFT flush envelope not capped at the overlap (wrong edge normalisation)"),
    Mutant("dpslm_stream/stream/resynth_session.py", "            self._seq += 1\n", "", _RESYNTH,
           "resynthesis audio chunk seq number not incremented"),
    Mutant("dpslm_stream/codec/packets.py", "self._expected = (packet.seq + 1) % _SEQ_MOD",
           "self._expected = packet.seq % _SEQ_MOD", _CODEC,
           "codec depacketizer expects the same seq again: every packet looks like a loss"),
]


def _check() -> list[str]:
    bad = []
    for i, m in enumerate(MUTANTS, 1):
        n = (ROOT / m.file).read_text().count(m.old)
        if n != 1:
            bad.append(f"#{i} {m.file}: `old` occurs {n} times")
    return bad


def run(indices: list[int], extra_tests: bool, timeout: int) -> list[tuple[int, str, float]]:
    results = []
    for i in indices:
        m = MUTANTS[i - 1]
        path = ROOT / m.file
        original = path.read_text()
        try:
            path.write_text(original.replace(m.old, m.new, 1))
            tests = list(m.tests) + (list(_HANDMADE) if extra_tests else [])
            t0 = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                      cwd=ROOT, capture_output=True, text=True, timeout=timeout)
                # rc 1: a test failed; rc 2: collection/import failed (a developer would see that too)
                status = "survived" if proc.returncode == 0 else "killed" if proc.returncode in (1, 2) else \
                    f"rc={proc.returncode}"
            except subprocess.TimeoutExpired:
                status = "timeout"
            dt = time.monotonic() - t0
        finally:
            path.write_text(original)
        results.append((i, status, dt))
        print(f"#{i:2d} {status:9s} {dt:6.0f}s  {m.file}: {m.what}", flush=True)
    return results


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", type=int, nargs="*", help="mutant numbers (1-based); default all")
    ap.add_argument("--check", action="store_true", help="only check that each mutant applies")
    ap.add_argument("--no-handmade-tests", action="store_true",
                    help="do not add tests/test_mutation_handmade.py (the suite as it was before this check)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per mutant (default 300)")
    args = ap.parse_args()
    bad = _check()
    for b in bad:
        print(b)
    if bad or args.check:
        return 1 if bad else 0
    signal.signal(signal.SIGTERM, _interrupt)  # so `finally` restores the mutated file on kill too
    indices = args.k or list(range(1, len(MUTANTS) + 1))
    results = run(indices, not args.no_handmade_tests and (ROOT / _HANDMADE[0]).exists(), args.timeout)
    killed = sum(s == "killed" for _, s, _ in results)
    print(f"killed {killed}/{len(results)}; survivors: {[i for i, s, _ in results if s != 'killed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
