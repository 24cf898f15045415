"""The size rules of the session core (server/session.py), as pure functions of the config and the session's
counters: each is one rule with its own unit test (tests/test_session_core.py). The time rules (start deadline,
idle, session time, stall) are deadlines in ``Session.next_deadline`` / ``Session.tick``.
"""

from __future__ import annotations

from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput
from dpslm_stream.stream.encoder import window_config
from dpslm_stream.stream.resynth_options import ResynthOptionError, ResynthOptions

from .backends import EncoderSessionInfo, Progress
from .config import ServerConfig

FRAME_S = 1.0 / P.FRAME_RATE
# Audio inside the encoder that is not backlog: the resampler, front-end and the frames a window waits for (its hop
# and lookahead), plus this margin.
ENCODER_DELAY_MARGIN_S = 0.25


def window_refusal(cfg: ServerConfig, mode: str, preset: str, options: dict) -> str | None:
    """Window sizes: the resolved left/hop/lookahead (the preset's, or the client's overrides) within the server's
    ranges, and max_lag within 1..cfg.max_lag. Returns why they are refused (naming the option), or None."""
    try:
        wc = window_config(mode, preset, options.get("left"), options.get("hop"), options.get("lookahead"))
    except InvalidInput as e:
        return str(e)
    if mode != "full":
        for name, value, lo, hi in (("left", wc.left, 0, cfg.max_left), ("hop", wc.hop, cfg.min_hop, cfg.max_hop),
                                    ("lookahead", wc.lookahead, 0, cfg.max_lookahead)):  # fmt: skip
            if not lo <= value <= hi:
                return (f"options.{name} = {value} frames is outside this server's range {lo}..{hi} (serve "
                        f"--{'min' if value < lo else 'max'}-{name} sets it)")  # fmt: skip
    max_lag = options.get("max_lag")
    if max_lag is not None and not 1 <= max_lag <= cfg.max_lag:
        return f"options.max_lag = {max_lag} frames is outside this server's range 1..{cfg.max_lag} (serve --max-lag)"
    return None


def resynth_options(given: dict) -> ResynthOptions:
    """start.resynth / subscribe.resynth as one validated value; ProtocolError(bad_settings) naming the field."""
    try:
        return ResynthOptions.from_json(given)
    except ResynthOptionError as e:
        raise P.ProtocolError(P.ErrorCode.BAD_SETTINGS, f"resynth.{e.field}: {e}") from None


def buffered_samples(info: EncoderSessionInfo, progress: Progress, queued_samples: int, sample_rate: int) -> int:
    """Received audio not yet encoded: queued for the encoder, plus what waits inside it beyond its window's own
    delay (hops not yet run: a tiny hop makes the encoder take audio faster than it encodes it). Full mode keeps
    everything by design (max_full_s bounds it), so only its queue counts."""
    if info.mode == "full":
        return queued_samples
    delay_s = (info.hop + info.lookahead) * FRAME_S + ENCODER_DELAY_MARGIN_S
    inside = progress.processed_samples - (progress.encoded_seconds + delay_s) * sample_rate
    return queued_samples + max(0, int(inside))


def buffer_has_room(cfg: ServerConfig, buffered: int, queued: int, n: int, sample_rate: int) -> bool:
    """The buffer rule: a frame of ``n`` samples is taken when the buffered audio stays within max_buffer_s and the
    queued samples (float32) within max_buffer_bytes. An empty buffer takes any frame (max_message_bytes bounds it)."""
    if buffered == 0:
        return True
    return buffered + n <= cfg.max_buffer_s * sample_rate and 4 * (queued + n) <= cfg.max_buffer_bytes


def full_mode_exceeded(cfg: ServerConfig, received: int, n: int, sample_rate: int) -> bool:
    """Mode full keeps the whole stream until its end: at most max_full_s of audio."""
    return received + n > cfg.max_full_s * sample_rate


def outgoing_exceeded(cfg: ServerConfig, queued_bytes: int) -> bool:
    """A client that does not read: more than max_outgoing_bytes queued for it."""
    return queued_bytes > cfg.max_outgoing_bytes


def unbounded_resynth(options: ResynthOptions | None) -> bool:
    """Resynthesis whose per-pass memory and compute grow with the stream: ELLA-V's prompt keeps every unit
    (left_context null, the exact setting) or the vocoder every codec frame (vocoder_left_context null)."""
    return options is not None and (options.left_context is None or options.vocoder_left_context is None)


def exact_resynth_refusal(cfg: ServerConfig, options: ResynthOptions | None) -> str | None:
    """The exact-resynthesis rule at start: with max_exact_resynth_s = 0 the server offers bounded context only."""
    if not unbounded_resynth(options) or cfg.max_exact_resynth_s > 0:
        return None
    return ("resynth.left_context / vocoder_left_context null (unbounded context) is disabled on this server "
            "(serve --max-exact-resynth); give a number of units / codec frames")  # fmt: skip


def exact_resynth_exceeded(cfg: ServerConfig, options: ResynthOptions | None, first_end_s: float, end_s: float) -> bool:
    """The exact-resynthesis rule while streaming: unbounded context covers at most max_exact_resynth_s of input,
    counted from the end of the first unit resynthesized (a listener's from when it joined)."""
    return unbounded_resynth(options) and end_s - first_end_s > cfg.max_exact_resynth_s
