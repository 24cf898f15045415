"""What a session measures and reports: its unit and audio-chunk messages, commit lags, bitrate, log-likelihood, and
the ``stats`` / ``end`` messages built from them. Owned by the session core (server/session.py); bounded in memory
however long the session runs (server/meters.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

from dpslm_stream import protocol as P
from dpslm_stream.stream.events import UnitEvent
from dpslm_stream.stream.resynth_events import AudioEvent, ResynthEndEvent

from .backends import Progress
from .meters import ArrivalClock, BitrateMeter, LagHistogram

log = logging.getLogger("dpslm_stream.server")


class Report:
    def __init__(self, metrics: Any = None):
        self.metrics = metrics
        self.units = 0
        self.num_frames = 0
        self.last_unit_end_s = 0.0
        self.last_lag: float | None = None
        self.loglik: float | None = None
        self.clock = ArrivalClock()  # when the audio up to each point arrived (commit lag)
        self.lags = LagHistogram()
        self.bits = BitrateMeter()
        self.audio_chunks = 0
        self.audio_samples = 0  # 24 kHz samples sent
        self.rstats: Any = None  # the resynthesis stream's latest ResynthStats

    def unit(self, ev: UnitEvent, now: float, session_id: str) -> P.Unit:
        """The unit message of an encoder unit event (its commit lag measured now)."""
        arrived = self.clock.arrival_of(ev.end_s)
        lag = max(0.0, now - arrived) if arrived is not None else 0.0
        self.lags.add(lag)
        self.last_lag = lag
        self.bits.add(int(ev.unit))
        if ev.logprob is not None and math.isfinite(ev.logprob):
            self.loglik = (self.loglik or 0.0) + float(ev.logprob)
        if ev.seq != self.units:  # an encoder bug; the protocol promises 0, 1, 2, ...
            log.error("session %s: unit seq %d after %d units", session_id, ev.seq, self.units)
        self.units += 1
        self.last_unit_end_s = float(ev.end_s)
        self.num_frames = max(self.num_frames, int(ev.end_frame))
        if self.metrics is not None:
            self.metrics.units_total.inc()
            self.metrics.commit_lag.observe(lag)
        # JSON has no infinities: a log-probability of -inf (probability 0 in float) goes out as null.
        logprob = None if ev.logprob is None or not math.isfinite(ev.logprob) else float(ev.logprob)
        return P.Unit(seq=int(ev.seq), unit=int(ev.unit), start_frame=int(ev.start_frame), end_frame=int(ev.end_frame),
                      start_s=float(ev.start_s), end_s=float(ev.end_s), commit_audio_s=float(ev.commit_audio_s),
                      lag_s=round(lag, 4), logprob=logprob)  # fmt: skip

    def relayed(self, msg: P.Unit) -> None:
        """Listener: one of the sender's unit messages."""
        self.units += 1
        self.bits.add(int(msg.unit))
        self.last_unit_end_s = float(msg.end_s)
        self.num_frames = max(self.num_frames, int(msg.end_frame))
        self.last_lag = msg.lag_s
        self.lags.add(msg.lag_s)

    def audio_chunk(self, ev: AudioEvent) -> bytes:
        """The binary frame of a resynthesized audio event (protocol.AUDIO_HEADER, then PCM16)."""
        frame = P.encode_audio_chunk(self.audio_chunks, self.audio_samples, ev.pcm16())
        self.audio_chunks += 1
        self.audio_samples += ev.num_samples
        if self.metrics is not None:
            self.metrics.resynth_audio_seconds_total.inc(ev.num_samples / P.RESYNTH_SAMPLE_RATE)
            self.metrics.resynth_lag.observe(ev.lag_s)
        return frame

    def resynth_end_event(self, why: str) -> ResynthEndEvent:
        """The totals of a resynthesis stopped early (``why``), from its latest stats."""
        r = self.rstats
        return ResynthEndEvent(
            units=r.units if r else 0, codec_frames=r.codec_frames if r else 0,
            audio_seconds=self.audio_samples / P.RESYNTH_SAMPLE_RATE, chunks=self.audio_chunks,
            passes=r.passes if r else 0, first_audio_latency_s=r.first_audio_latency_s if r else None,
            latency_mean_s=r.latency_mean_s if r else None, latency_max_s=r.latency_max_s if r else None,
            real_time_factor=r.real_time_factor if r else 0.0, error=why,
        )  # fmt: skip

    def stats(self, elapsed_s: float, sender: dict | None, outgoing_bytes: int, resynth_lag_s: float | None) -> P.Stats:
        """``sender``: sample_rate, received, queued (samples), progress, listeners; None for a listener, whose stats
        describe the link as the receiving side sees it. ``resynth_lag_s``: None without resynthesis."""
        committed_s = self.last_unit_end_s
        resynth: dict[str, Any] = {}
        if resynth_lag_s is not None:
            rtf = self.rstats.real_time_factor if self.rstats is not None else 0.0
            resynth = {"resynth_audio_s": round(self.audio_samples / P.RESYNTH_SAMPLE_RATE, 4),
                       "resynth_lag_s": round(resynth_lag_s, 4), "resynth_rtf": round(rtf, 4)}  # fmt: skip
        common = dict(elapsed_s=round(elapsed_s, 3), units=self.units,
                      units_per_s=round(self.units / committed_s, 3) if committed_s > 0 else 0.0,
                      bitrate=round(self.bits.bitrate(committed_s), 2), lag_s=_rounded(self.last_lag, 4),
                      lag_p95_s=_rounded(self.lags.quantile(0.95), 4), **resynth)  # fmt: skip
        if sender is None:
            return P.Stats(audio_s=round(committed_s, 4), processed_s=round(committed_s, 4), buffered_s=0.0, rtf=0.0,
                           loglikelihood=None, state_nbytes=self.clock.nbytes + outgoing_bytes, **common)  # fmt: skip
        sr, p, queued = sender["sample_rate"], sender["progress"], sender["queued"]
        assert isinstance(p, Progress)
        return P.Stats(
            audio_s=round(sender["received"] / sr, 4), processed_s=round(p.processed_samples / sr, 4),
            buffered_s=round(queued / sr, 4),
            rtf=round(p.compute_seconds / p.encoded_seconds, 4) if p.encoded_seconds > 0 else 0.0,
            loglikelihood=self.loglik, state_nbytes=p.state_nbytes + queued * 4 + self.clock.nbytes + outgoing_bytes,
            listeners=sender["listeners"], **common,
        )  # fmt: skip

    def end_message(self, reason: str, stats: P.Stats, forced_commits: int,
                    resynth_end: ResynthEndEvent | None) -> P.EndMessage:  # fmt: skip
        resynth = None if resynth_end is None else _json_safe(dataclasses.asdict(resynth_end))
        return P.EndMessage(reason=reason, units=self.units, num_frames=self.num_frames, audio_s=stats.audio_s,
                            forced_commits=forced_commits, stats=_fields(stats), resynth=resynth)  # fmt: skip


def _rounded(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _fields(msg: Any) -> dict:
    return {k: v for k, v in json.loads(P.to_json(msg)).items() if k != "type"}


def _json_safe(obj: dict) -> dict:
    """Floats that JSON cannot carry (NaN, Inf) become null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in obj.items()}
