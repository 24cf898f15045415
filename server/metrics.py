"""Prometheus metrics of one server instance, on a registry of its own (no process-global state, so several servers,
e.g. in tests, never share counters). Served as text at protocol.METRICS_PATH."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Commit lag of a real-time session is a fraction of a second to a few seconds; step times are milliseconds.
LAG_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """Every metric the server exports. prometheus_client objects are thread-safe: the encoder thread and the
    event loop both update them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_active = Gauge("dpslm_sessions_active", "sessions holding a slot (connected WebSockets)",
                                     registry=r)  # fmt: skip
        self.sessions_max = Gauge("dpslm_sessions_max", "configured session slots", registry=r)
        self.sessions_total = Counter("dpslm_sessions_total", "sessions ended, by how they ended", ["reason"],
                                      registry=r)  # fmt: skip
        self.rejected_total = Counter("dpslm_rejected_total", "connections refused before a session started",
                                      ["reason"], registry=r)  # fmt: skip
        self.errors_total = Counter("dpslm_errors_total", "error messages sent, by code", ["code"], registry=r)
        self.audio_seconds_total = Counter("dpslm_audio_seconds_total", "input audio received (seconds)", registry=r)
        self.units_total = Counter("dpslm_units_total", "units sent", registry=r)
        self.buffered_seconds = Gauge("dpslm_buffered_audio_seconds", "audio received but not yet encoded, all "
                                      "sessions (seconds)", registry=r)  # fmt: skip
        self.commit_lag = Histogram("dpslm_commit_lag_seconds", "wall-clock lag from the arrival of a unit's audio "
                                    "to the unit being sent", buckets=LAG_BUCKETS, registry=r)  # fmt: skip
        self.step_seconds = Histogram("dpslm_step_seconds", "model worker step time (one batched step over all "
                                      "sessions with work; steps that ran the encoder)", buckets=STEP_BUCKETS,
                                      registry=r)  # fmt: skip
        self.batch_size = Histogram("dpslm_batch_sessions", "sessions per encoder forward, mean over one model "
                                    "worker step (steps that ran the encoder)", buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.worker_busy_seconds = Counter("dpslm_worker_busy_seconds_total", "time the model worker spent in "
                                           "model code", registry=r)  # fmt: skip
        self.resynth_step_seconds = Histogram("dpslm_resynth_step_seconds", "resynthesis worker step time (batched "
                                              "ELLA-V decode steps + vocoder windows)", buckets=STEP_BUCKETS,
                                              registry=r)  # fmt: skip
        self.resynth_batch_size = Histogram("dpslm_resynth_batch_sessions", "sessions in one resynthesis step",
                                            buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.resynth_audio_seconds_total = Counter("dpslm_resynth_audio_seconds_total", "resynthesized audio sent "
                                                   "(seconds)", registry=r)  # fmt: skip
        self.resumes_total = Counter("dpslm_resumes_total", "sessions resumed on a new connection", registry=r)
        self.parks_expired_total = Counter("dpslm_parks_expired_total", "parked sessions (connection dropped) that "
                                           "ended without a resume, by why", ["reason"], registry=r)  # fmt: skip
        self.resynth_lag = Histogram("dpslm_resynth_lag_seconds", "resynthesis lag when an audio chunk is sent",
                                     buckets=LAG_BUCKETS, registry=r)  # fmt: skip

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
