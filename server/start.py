"""The checks of a sender's ``start`` and a listener's ``subscribe`` (server/session.py), as pure functions.

Each returns what the session opens with (a ``StartPlan``, the resynthesis options) or a ``Refusal``: the error code
and the message the client is told (the connection stays open and may start again). They read the server's config
and what it serves (``ServerInfo``), never the session's state; the session core applies the result.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpslm_stream import protocol as P
from dpslm_stream.opus import INSTALL_HINT as OPUS_INSTALL_HINT
from dpslm_stream.opus import opus_available
from dpslm_stream.pipeline import default_num_neighbors
from dpslm_stream.stream.resynth_options import ResynthOptions

from . import limits
from .backends import EncoderSessionInfo
from .config import ServerConfig

E = P.ErrorCode


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What a session tells its client about the server (ready) and which models it may choose."""

    models: str
    random_weights: bool
    pairs: tuple[tuple[int, int], ...]
    default_pair: tuple[int, int]
    resynth: bool  # resynthesis offered
    transmit_table_ks: tuple[int, ...] = ()  # K of each unit table the server codes start.transmit "table" with
    opus: bool = dataclasses.field(default_factory=opus_available)  # start.format "opus" offered (PyAV installed)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a start or subscribe is refused: the error the client gets (not fatal)."""

    code: P.ErrorCode
    message: str


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """An accepted start: the encoder settings (OpenSession) and the resynthesis options (None: no resynthesis)."""

    settings: dict[str, Any]
    resynth: ResynthOptions | None


def check_start(cfg: ServerConfig, server: ServerInfo, msg: P.Start) -> StartPlan | Refusal:
    """A sender's start against what this server serves and allows: the model pair, mode and preset, window sizes,
    sample rate, resynthesis and transmission options."""
    if (msg.k is None) != (msg.lmbda is None):
        return Refusal(E.BAD_MESSAGE, "give both k and lmbda, or neither (the server's default pair)")
    k, lmbda = (msg.k, msg.lmbda) if msg.k is not None and msg.lmbda is not None else server.default_pair
    if (k, lmbda) not in server.pairs:
        served = ", ".join(f"(k={a}, lmbda={b})" for a, b in server.pairs)
        return Refusal(E.UNKNOWN_MODEL, f"(k={k}, lmbda={lmbda}) is not served here; served: {served}")
    opts = dict(msg.options)
    mode = opts.pop("mode", "cached")
    if mode not in cfg.modes or (cfg.presets is not None and msg.preset not in cfg.presets):
        presets = "any" if cfg.presets is None else ", ".join(cfg.presets)
        return Refusal(E.BAD_SETTINGS, f"mode {mode!r} / preset {msg.preset!r} is not offered here; modes: "
                                       f"{', '.join(cfg.modes)}; presets: {presets}")  # fmt: skip
    refusal = limits.window_refusal(cfg, mode, msg.preset, opts)
    if refusal is not None:
        return Refusal(E.BAD_SETTINGS, refusal)
    if msg.format == "opus" and not server.opus:
        return Refusal(E.UNSUPPORTED_OPTION, f"this server cannot decode Opus ({OPUS_INSTALL_HINT} on the server); "
                                             "send pcm16 or float32")  # fmt: skip
    refusal = limits.sample_rate_refusal(cfg, msg.sample_rate)
    if refusal is not None:
        return Refusal(E.BAD_SAMPLE_RATE, refusal)
    resynth = check_resynth(cfg, server, msg.resynth)
    if isinstance(resynth, Refusal):
        return resynth
    if msg.transmit is not None and msg.transmit["coder"] == "table" and k not in server.transmit_table_ks:
        have = f"tables for k={', '.join(map(str, server.transmit_table_ks))}" if server.transmit_table_ks \
            else "no unit table (serve --transmit-table FILE)"
        return Refusal(E.UNSUPPORTED_OPTION, f"this server has {have}, none for k={k}; transmit with coder "
                                             f"'uniform' or 'ulm'")  # fmt: skip
    settings = dict(k=k, lmbda=lmbda, mode=mode, preset=msg.preset, score=msg.score, **opts)
    return StartPlan(settings, resynth)


def check_resynth(cfg: ServerConfig, server: ServerInfo, given: dict | None) -> ResynthOptions | None | Refusal:
    """start.resynth / subscribe.resynth: None (no resynthesis), the validated options, or why they are refused."""
    if given is None:
        return None
    if not server.resynth:
        return Refusal(E.UNSUPPORTED_OPTION, "this server runs without resynthesis (started with --no-resynth); ask "
                                             "for units only")  # fmt: skip
    try:
        options = limits.resynth_options(given)
    except P.ProtocolError as e:
        return Refusal(e.code, str(e))
    refusal = limits.exact_resynth_refusal(cfg, options)
    return Refusal(E.UNSUPPORTED_OPTION, refusal) if refusal else options


def sender_settings(start: P.Start, info: EncoderSessionInfo, resynth: dict | None) -> dict[str, Any]:
    """ready.settings of a sender: what it asked for, resolved by the encoder (window sizes are null in mode full)."""
    full = info.mode == "full"
    return {"sample_rate": start.sample_rate, "format": start.format, "k": info.k, "lmbda": info.lmbda,
            "preset": start.preset, "score": start.score, "frame_rate": P.FRAME_RATE, "mode": info.mode,
            "left": None if full else info.left, "hop": None if full else info.hop,
            "lookahead": None if full else info.lookahead, "max_lag": info.max_lag,
            "num_neighbors": default_num_neighbors(info.k), "precision": info.precision, "resynth": resynth,
            **({"container": start.container} if start.format == "opus" else {})}  # fmt: skip
