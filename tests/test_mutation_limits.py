"""The size rules of the server's session core (dpslm_stream.server.limits) at their exact edges.

Written from the mutants `make mutants MODULES=limits` left alive (docs/mutation.md): each rule is checked on both
sides of its bound (the last value taken and the first refused), and each refusal names the option and the flag.
"""

import dataclasses

import pytest

from dpslm_stream import protocol as P
from dpslm_stream.audio import resampler_kernel_size
from dpslm_stream.server import limits
from dpslm_stream.server.backends import EncoderSessionInfo, Progress
from dpslm_stream.server.config import ServerConfig
from dpslm_stream.stream.encoder import PRESETS
from dpslm_stream.stream.resynth_options import ResynthOptions

CFG = ServerConfig()


def test_window_ranges_take_their_bounds_and_refuse_one_past():
    cfg = dataclasses.replace(CFG, max_left=200, min_hop=5, max_hop=40, max_lookahead=30, max_lag=100)
    for name, lo, hi in (("left", 0, 200), ("hop", 5, 40), ("lookahead", 0, 30)):
        assert limits.window_refusal(cfg, "cached", "low-latency", {name: lo}) is None
        assert limits.window_refusal(cfg, "cached", "low-latency", {name: hi}) is None
        above = limits.window_refusal(cfg, "cached", "low-latency", {name: hi + 1})
        assert above == (f"options.{name} = {hi + 1} frames is outside this server's range {lo}..{hi} "
                         f"(serve --max-{name} sets it)")
        if lo > 0:
            below = limits.window_refusal(cfg, "cached", "low-latency", {name: lo - 1})
            assert below == (f"options.{name} = {lo - 1} frames is outside this server's range {lo}..{hi} "
                             f"(serve --min-{name} sets it)")
    # The rules hold for mode "window" too, and not for "full" (which ignores the sizes).
    assert limits.window_refusal(cfg, "window", "low-latency", {"hop": 41}) is not None
    assert limits.window_refusal(cfg, "full", "low-latency", {"hop": 41, "left": 10_000}) is None
    assert limits.window_refusal(cfg, "full", "quality", {}) is None  # its left 250 > max_left: ignored in full
    # The preset's own sizes count when the client gives none: quality's 250-frame left context is refused here.
    assert PRESETS["quality"][0] == 250
    assert "options.left = 250" in limits.window_refusal(cfg, "cached", "quality", {})


def test_max_lag_range_is_one_to_the_server_bound():
    cfg = dataclasses.replace(CFG, max_lag=100)
    assert limits.window_refusal(cfg, "cached", None, {"max_lag": 1}) is None
    assert limits.window_refusal(cfg, "cached", None, {"max_lag": 100}) is None
    for bad in (0, 101):
        assert limits.window_refusal(cfg, "cached", None, {"max_lag": bad}) == (
            f"options.max_lag = {bad} frames is outside this server's range 1..100 (serve --max-lag)")
    assert limits.window_refusal(cfg, "full", None, {"max_lag": 101}) is not None  # checked in every mode


def test_unknown_preset_is_refused_with_the_encoder_message():
    why = limits.window_refusal(CFG, "cached", "nope", {})
    assert why is not None and why.startswith("unknown preset 'nope'")


def test_sample_rate_rule_takes_exactly_max_resampler_taps():
    taps = resampler_kernel_size(44100, 16000)
    assert taps > 0
    assert limits.sample_rate_refusal(dataclasses.replace(CFG, max_resampler_taps=taps), 44100) is None
    assert limits.sample_rate_refusal(dataclasses.replace(CFG, max_resampler_taps=taps - 1), 44100) == (
        f"sample rate 44100 Hz needs a resampling kernel of {taps:,} taps, more than this server's {taps - 1:,} "
        "(serve --max-resampler-taps); send a common rate (8000, 11025, 16000, 22050, 24000, 32000, 44100 or "
        "48000 Hz) or resample on the client")
    assert limits.sample_rate_refusal(dataclasses.replace(CFG, max_resampler_taps=1), 16000) is None  # no resampler


def test_resynth_options_error_is_bad_settings_naming_the_field():
    assert limits.resynth_options({"left_context": 7}) == ResynthOptions(left_context=7)
    assert limits.resynth_options({}) == ResynthOptions()
    with pytest.raises(P.ProtocolError) as err:
        limits.resynth_options({"holdback": -1})
    assert err.value.code == P.ErrorCode.BAD_SETTINGS
    assert str(err.value).startswith("resynth.holdback: ")


def _info(mode="cached", hop=10, lookahead=5):
    return EncoderSessionInfo(k=500, lmbda=0, mode=mode, left=125, hop=hop, lookahead=lookahead, max_lag=None)


def test_buffered_samples_counts_the_encoder_backlog_beyond_its_delay():
    sr = 16000
    delay_s = (10 + 5) * limits.FRAME_S + limits.ENCODER_DELAY_MARGIN_S  # 0.55 s
    assert delay_s == pytest.approx(0.55)
    # 2 s handed to the encoder, 1 s encoded: 1 - 0.55 s wait beyond the window's own delay.
    progress = Progress(processed_samples=2 * sr, encoded_seconds=1.0)
    assert limits.buffered_samples(_info(), progress, 100, sr) == 100 + int(2 * sr - (1.0 + delay_s) * sr)
    assert limits.buffered_samples(_info(), progress, 100, sr) == 100 + 7200
    # Within the delay nothing counts (never negative).
    assert limits.buffered_samples(_info(), Progress(processed_samples=sr, encoded_seconds=0.5), 100, sr) == 100
    # Mode full keeps everything by design: only its queue counts.
    assert limits.buffered_samples(_info(mode="full"), progress, 100, sr) == 100
    # A longer hop waits longer inside the encoder before it is backlog.
    assert limits.buffered_samples(_info(hop=20), progress, 0, sr) == int(2 * sr - (1.0 + 0.75) * sr)


def test_buffer_rule_bounds_seconds_and_bytes_inclusively():
    cfg = dataclasses.replace(CFG, max_buffer_s=1.0, max_buffer_bytes=4 * 1000, max_message_bytes=4000)
    sr = 1500
    assert limits.buffer_has_room(cfg, 0, 0, 10**9, sr)  # an empty buffer takes any frame
    assert limits.buffer_has_room(cfg, 500, 0, 1000, sr)  # 1500 samples == 1.0 s exactly
    assert not limits.buffer_has_room(cfg, 501, 0, 1000, sr)
    assert limits.buffer_has_room(cfg, 1, 500, 500, sr)  # 4 * 1000 bytes exactly
    assert not limits.buffer_has_room(cfg, 1, 501, 500, sr)
    assert limits.buffer_has_room(cfg, 1, 1, 1, sr)


def test_full_mode_and_outgoing_limits_are_inclusive():
    cfg = dataclasses.replace(CFG, max_full_s=2.0, max_outgoing_bytes=1000)
    assert not limits.full_mode_exceeded(cfg, 15000, 1000, 8000)  # 16000 samples == 2.0 s
    assert limits.full_mode_exceeded(cfg, 15000, 1001, 8000)
    assert not limits.outgoing_exceeded(cfg, 1000)
    assert limits.outgoing_exceeded(cfg, 1001)


def test_exact_resynthesis_rules():
    bounded = ResynthOptions()
    no_prompt_bound = ResynthOptions(left_context=None)
    no_vocoder_bound = ResynthOptions(vocoder_left_context=None)
    assert not limits.unbounded_resynth(None)
    assert not limits.unbounded_resynth(bounded)
    assert limits.unbounded_resynth(no_prompt_bound)
    assert limits.unbounded_resynth(no_vocoder_bound)

    off = dataclasses.replace(CFG, max_exact_resynth_s=0.0)
    on = dataclasses.replace(CFG, max_exact_resynth_s=10.0)
    assert limits.exact_resynth_refusal(off, bounded) is None
    assert limits.exact_resynth_refusal(off, None) is None
    assert limits.exact_resynth_refusal(on, no_prompt_bound) is None
    assert limits.exact_resynth_refusal(dataclasses.replace(CFG, max_exact_resynth_s=0.5), no_prompt_bound) is None
    assert limits.exact_resynth_refusal(off, no_vocoder_bound) == (
        "resynth.left_context / vocoder_left_context null (unbounded context) is disabled on this server "
        "(serve --max-exact-resynth); give a number of units / codec frames")

    assert not limits.exact_resynth_exceeded(on, no_prompt_bound, 5.0, 15.0)  # 10 s covered: still allowed
    assert limits.exact_resynth_exceeded(on, no_prompt_bound, 5.0, 15.5)
    assert not limits.exact_resynth_exceeded(on, bounded, 0.0, 1000.0)
