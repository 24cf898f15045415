"""The server's configuration: everything `dpslm-stream serve` can set, validated once.

Every size and rate a client controls is bounded by one field here (the session core, server/session.py, applies
them; each field has a `serve` flag named after it, see server/cli.py). The defaults suit a server reachable by
anyone: a client can ask for at most these, whatever it sends.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput
from dpslm_stream.validate import check_int, check_number, is_int


@dataclass(frozen=True)
class ServerConfig:
    """Everything `dpslm-stream serve` can set. Defaults suit one machine serving a handful of live clients."""

    host: str = "127.0.0.1"
    port: int = 8765  # 0 = an ephemeral port (tests)
    models: str = "release"  # release | tiny | a folder (see dpslm_stream.hub.ModelSet)
    device: str = "cpu"
    dtype: str = "float32"
    pairs: tuple[tuple[int, int], ...] | None = None  # (k, lambda) pairs to serve; None = the encoder's default
    max_sessions: int = 16
    presets: tuple[str, ...] | None = None  # window presets clients may choose; None = all the encoder has
    modes: tuple[str, ...] = P.ENCODER_MODES  # encoder modes clients may choose (sliding costs several times more)
    token: str | None = None  # required from clients when set (?token= or Authorization: Bearer)
    allowed_origins: tuple[str, ...] = ()  # browser Origins allowed besides this server's own page; "*" = any
    # Time limits.
    start_timeout_s: float = 10.0  # a connection must send start (or subscribe) within this (time reading its frames)
    idle_timeout_s: float = 30.0  # a started sender that could send and sent nothing for this long is ended
    max_session_s: float = 3600.0
    open_timeout_s: float = 60.0  # opening a session's backends (encoder slot, resynthesis) must finish within this
    # Sizes a client controls.
    max_full_s: float = 120.0  # audio per session in mode full, which keeps the whole stream until its end
    max_message_bytes: int = 1 << 20  # larger audio frames are refused with message_too_large
    max_text_bytes: int = 16 << 10  # larger text (JSON) frames are refused with message_too_large, unparsed
    max_json_depth: int = 8  # deeper JSON nesting is refused with bad_json, unparsed
    max_buffer_s: float = 5.0  # received, not yet encoded audio per session (queued + inside the encoder)
    max_buffer_bytes: int = 4 << 20  # the same queue in bytes (float32 samples), whatever the sample rate
    stall_timeout_s: float = 10.0  # how long a full buffer may stay full before buffer_full (0: at once)
    max_outgoing_bytes: int = 8 << 20  # bytes queued for a client that does not read (then client_too_slow)
    max_left: int = 500  # window sizes (20 ms frames) a session may ask for: left context L
    min_hop: int = 5  # hop H at least this (smaller hops cost a forward per few frames: a cheap way to load the worker)
    max_hop: int = 100
    max_lookahead: int = 100  # lookahead R
    max_lag: int = 3000  # start.options.max_lag at most this (frames)
    stats_interval_s: float = 1.0
    drain_timeout_s: float = 30.0  # SIGTERM: time allowed to finish running sessions
    quantum_s: float = 0.5  # audio per session per worker round (fairness)
    warmup: bool = True  # run one short stream through the models before accepting clients
    busy_retry_after_s: float = 5.0
    # Offer live resynthesis (start.resynth, listeners). Its models load on first use, or at start-up with warmup when
    # the resynthesis shares the encoder's thread (model_threads), where a load would hold every session's units.
    resynth: bool = True
    resynth_device: str | None = None  # device of the resynthesis worker (default: device)
    resynth_dtype: str = "float32"  # ELLA-V dtype (bfloat16/float16 are meant for a GPU)
    precision: str = "exact"  # resynthesis models: "exact" (float32) or "fast" (models/precision.py picks per machine)
    encoder_precision: str = "exact"  # the streaming encoder's block linears: "exact" or "fast" (int8 on x86 CPUs)
    compile_decode: bool = False  # precision fast: ELLA-V's decode step through torch.compile (compiled in the warm-up)
    # In-process server: "shared" runs the resynthesis worker on the encoder's thread (one OpenMP team; it yields to the
    # encoder between decode steps), "separate" on a thread of its own; "auto" shares when both run on the CPU.
    model_threads: str = "auto"
    max_listeners: int = 4  # listeners per sender session
    # (k, lambda) pairs whose large models (unit LM, ELLA-V) are loaded at once, the default pair and --pairs included
    # (server/pair_budget.py): a new pair unloads the least recently used free one; when all are in use, busy.
    max_loaded_pairs: int = 3
    pair_min_idle_s: float = 30.0  # a pair is unloaded for another only once nobody held it for this long (load rate)
    max_resynth_lag_s: float = 60.0  # a session's resynthesis further behind than this is stopped (units go on)
    # Resynthesis with unbounded context (left_context or vocoder_left_context null, the exact setting) keeps every
    # unit / codec frame of the stream in each pass: it is ended after this many seconds of input (0: refused at start).
    max_exact_resynth_s: float = 60.0
    allow_tf32: bool = False  # CUDA: TF32 matmuls/convolutions (faster, not exact; see dpslm_stream.device)
    # Resampling kernel of a client's sample rate (elements, audio.resampler_kernel_size): an odd rate such as 47999 Hz
    # needs a 3 GB kernel that takes tens of seconds to build. 4M (16 MB) admits every common rate (44.1 kHz: 76k).
    max_resampler_taps: int = 4_000_000
    # Resume (server/resume.py): a sender whose connection drops without end is kept this long for a resume (0: never;
    # its slot stays taken meanwhile). What it sent (for the replay) and what it produces while parked are each kept
    # up to resume_outbox_bytes (a parked session that produces more ends). The replay of both (at most twice this)
    # is bounded by this rule, not counted against max_outgoing_bytes.
    resume_grace_s: float = 30.0
    resume_outbox_bytes: int = 2 << 20
    # Unit tables (`codec fit` files) for start.transmit coder "table", at most one per K; each K must be served.
    transmit_tables: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Every entry point (the CLI, ServerThread, the Ray gateway and its replicas) builds a ServerConfig, so
        every one of them gets these checks; errors name the field's `serve` flag."""
        positive_ints = ("max_sessions", "max_message_bytes", "max_text_bytes", "max_json_depth", "max_buffer_bytes",
                         "max_resampler_taps", "resume_outbox_bytes",
                         "max_outgoing_bytes", "min_hop", "max_hop", "max_lag", "max_listeners", "max_loaded_pairs")  # fmt: skip
        for name in positive_ints:
            check_int(flag(name), getattr(self, name), minimum=1, kind=int)
        for name in ("max_left", "max_lookahead"):
            check_int(flag(name), getattr(self, name), minimum=0, kind=int)
        check_int(flag("port"), self.port, minimum=0, maximum=65535, kind=int)
        if self.min_hop > self.max_hop:
            raise InvalidInput(f"{flag('min_hop')} ({self.min_hop}) must not exceed {flag('max_hop')} ({self.max_hop})")
        positive = ("start_timeout_s", "idle_timeout_s", "max_session_s", "open_timeout_s", "max_full_s",
                    "max_buffer_s", "stats_interval_s", "drain_timeout_s", "quantum_s", "busy_retry_after_s", "max_resynth_lag_s")  # fmt: skip
        for name in positive:
            check_number(flag(name), getattr(self, name), 0, above=True, what="number of seconds")
        for name in ("stall_timeout_s", "max_exact_resynth_s", "resume_grace_s", "pair_min_idle_s"):
            check_number(flag(name), getattr(self, name), 0)
        for name in ("warmup", "resynth", "allow_tf32", "compile_decode"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInput(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("dtype", "resynth_dtype"):
            if getattr(self, name) not in DTYPES:
                raise InvalidInput(f"{flag(name)} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise InvalidInput(f"{flag('precision')} must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.model_threads not in MODEL_THREADS:
            raise InvalidInput(f"{flag('model_threads')} must be one of {', '.join(MODEL_THREADS)}, got "
                               f"{self.model_threads!r}")  # fmt: skip
        if self.compile_decode and self.precision == "exact":
            raise InvalidInput(f"{flag('compile_decode')} compiles the fast decode step: it needs {flag('precision')} "
                               "fast")  # fmt: skip
        unknown = sorted(set(self.modes) - set(P.ENCODER_MODES))
        if unknown or not self.modes:
            raise InvalidInput(f"modes must be some of {P.ENCODER_MODES}, got {self.modes!r}")
        if self.presets is not None:
            from dpslm_stream.stream.encoder import PRESETS

            unknown = sorted(set(self.presets) - set(PRESETS))
            if unknown or not self.presets:
                raise InvalidInput(f"unknown preset(s) {unknown}; expected some of {sorted(PRESETS)}")
        for pair in self.pairs or ():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(is_int(v, int) for v in pair)):
                raise InvalidInput(f"{flag('pairs')} must be (k, lambda) pairs of integers, got {pair!r}")
        # A server cannot take a frame whose bytes exceed what its audio buffer holds.
        if self.max_message_bytes > self.max_buffer_bytes:
            raise InvalidInput(f"{flag('max_message_bytes')} ({self.max_message_bytes}) must not exceed "
                               f"{flag('max_buffer_bytes')} ({self.max_buffer_bytes})")  # fmt: skip

    def limits(self) -> dict:
        """The limits every client is told in ``ready``."""
        return {"max_session_s": self.max_session_s, "max_full_s": self.max_full_s, "idle_timeout_s": self.idle_timeout_s,
                "start_timeout_s": self.start_timeout_s, "max_message_bytes": self.max_message_bytes,
                "max_text_bytes": self.max_text_bytes, "max_buffer_s": self.max_buffer_s,
                "max_buffer_bytes": self.max_buffer_bytes, "stall_timeout_s": self.stall_timeout_s,
                "max_outgoing_bytes": self.max_outgoing_bytes, "max_left": self.max_left, "min_hop": self.min_hop,
                "max_hop": self.max_hop, "max_lookahead": self.max_lookahead, "max_lag": self.max_lag,
                "open_timeout_s": self.open_timeout_s, "max_exact_resynth_s": self.max_exact_resynth_s,
                "max_resampler_taps": self.max_resampler_taps, "resume_grace_s": self.resume_grace_s,
                "resume_outbox_bytes": self.resume_outbox_bytes}  # fmt: skip


DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("exact", "fast")
MODEL_THREADS = ("auto", "shared", "separate")


def flag(name: str) -> str:
    """The serve flag of a config field: its name with dashes (server/cli.py also keeps older spellings as aliases)."""
    return "--" + name.replace("_", "-")


CONFIG_FIELDS = tuple(f.name for f in fields(ServerConfig))
