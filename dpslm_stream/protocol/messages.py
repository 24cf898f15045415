"""The protocol's vocabulary: versions, paths, formats, error and close codes, and every message as a dataclass whose
fields are exactly its JSON fields; server messages are parsed here too (leniently: a newer server may add fields).
Part of dpslm_stream.protocol (its docstring describes the whole protocol)."""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Union


from dpslm_stream.errors import InvalidInput
from dpslm_stream.stream.resynth_options import ResynthOptions

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

# HTTP paths served on the one port.
WS_PATH = "/v1/stream"  # the WebSocket endpoint
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
PAGE_PATH = "/"  # the browser page (client/web/index.html); its assets are served next to it

TOKEN_QUERY_PARAM = "token"  # browsers cannot set headers on a WebSocket: the token may come as ?token=...

PCM_FORMATS = ("pcm16", "float32")  # samples in binary frames at start.sample_rate
SAMPLE_FORMATS = (*PCM_FORMATS, "opus")  # every start.format; "opus": compressed (dpslm_stream/opus.py decodes it)
BYTES_PER_SAMPLE = {"pcm16": 2, "float32": 4}
# start.container of format "opus": "auto" (told by the first bytes: Ogg pages, a WebM/EBML header, else raw), "ogg"
# and "webm" (byte streams split anywhere, as MediaRecorder emits them), "raw" (one Opus packet per binary frame, as
# WebCodecs' AudioEncoder emits them). Opus is decoded at OPUS_SAMPLE_RATE whatever start.sample_rate says.
OPUS_CONTAINERS = ("auto", "ogg", "webm", "raw")
OPUS_SAMPLE_RATE = 48000
FRAME_RATE = 50  # WavLM frames (and unit boundaries) per second of audio

# Resynthesized audio (server -> client binary frames): 24 kHz mono PCM16 after a 16-byte little-endian header
#   kind (uint8, AUDIO_FRAME_KIND) | 3 zero bytes | seq (uint32, 0, 1, 2, ... per session) | start_sample (uint64)
# start_sample counts 24 kHz samples from the start of the session's resynthesized audio; chunks are contiguous
# (start_sample of chunk n+1 = start_sample + samples of chunk n). 16 bytes keep the PCM 2-byte aligned for
# Int16Array views in browsers.
AUDIO_FRAME_KIND = 1
AUDIO_HEADER = struct.Struct("<B3xIQ")
RESYNTH_SAMPLE_RATE = 24000


class ErrorCode(str, Enum):
    """Stable error codes of ``error`` messages (and of the ``dpslm_errors_total`` metric). The value is the code."""

    # Malformed messages: the message is rejected, the session goes on.
    BAD_JSON = "bad_json"  # a text frame that is not a JSON object
    BAD_MESSAGE = "bad_message"  # a JSON message with a missing, misspelled, mistyped or out-of-range field
    UNKNOWN_TYPE = "unknown_type"  # a "type" this protocol version does not define
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_SAMPLE_RATE = "bad_sample_rate"  # not an integer in [8000, 48000] Hz, or one whose resampler is too costly
    UNKNOWN_MODEL = "unknown_model"  # a (k, lambda) pair the server has not loaded
    BAD_SETTINGS = "bad_settings"  # an unknown preset or mode, or window options the encoder refuses
    UNSUPPORTED_OPTION = "unsupported_option"  # an option this server does not offer (e.g. resynth when disabled)
    UNKNOWN_SESSION = "unknown_session"  # subscribe: no running session with that id, or a wrong listen token
    NOT_A_SENDER = "not_a_sender"  # audio, start or end on a listener connection
    NOT_STARTED = "not_started"  # audio or end before start
    ALREADY_STARTED = "already_started"  # a second start on one connection
    AFTER_END = "after_end"  # audio after end
    BAD_AUDIO = "bad_audio"  # an empty frame, a partial sample, or malformed Opus data (fatal when it cannot go on)
    NON_FINITE = "non_finite"  # NaN or Inf float32 samples
    MESSAGE_TOO_LARGE = "message_too_large"  # an audio frame above max_message_bytes, a text frame above max_text_bytes
    # Limits: fatal, the session ends (units received so far are still delivered, then end).
    BUFFER_FULL = "buffer_full"  # the client kept sending while the server's bounded audio buffer stayed full
    IDLE_TIMEOUT = "idle_timeout"
    START_TIMEOUT = "start_timeout"  # no start (or subscribe) accepted within start_timeout_s of connecting
    SESSION_TIME_LIMIT = "session_time_limit"
    SHUTTING_DOWN = "shutting_down"  # the server drains (SIGTERM): no new sessions, running ones are finished
    BUSY = "busy"  # all session slots are taken (sent at once after the handshake), or every (k, lambda) pair the
    # server keeps loaded is in use and a start needs another (not fatal): try again after retry_after_s
    CLIENT_TOO_SLOW = "client_too_slow"  # the client does not read its messages; the connection is dropped
    INTERNAL_ERROR = "internal_error"  # a bug or a model failure in this session; other sessions are unaffected
    SENDER_GONE = "sender_gone"  # listener: the sender's connection ended before its stream did
    RESYNTH_BEHIND = "resynth_behind"  # the session's resynthesis fell too far behind and was stopped (units go on)
    RESYNTH_LIMIT = "resynth_limit"  # resynthesis with unbounded context reached max_exact_resynth_s (units go on)
    RESUME_FAILED = "resume_failed"  # resume: an unknown or expired token, or offsets the server cannot replay from
    # Handshake refusals: HTTP status codes, no WebSocket (named here for the metrics).
    UNAUTHORIZED = "unauthorized"  # HTTP 401: missing or wrong token
    FORBIDDEN_ORIGIN = "forbidden_origin"  # HTTP 403: a browser Origin not in the allowlist


# WebSocket close codes (RFC 6455 section 7.4.1) the server uses.
CLOSE_NORMAL = 1000  # after end
CLOSE_GOING_AWAY = 1001  # server shutdown (drain)
CLOSE_POLICY = 1008  # a limit was exceeded (idle, session time, buffer)
CLOSE_TOO_BIG = 1009  # a frame above the hard size cap (the library closes before the server sees it)
CLOSE_INTERNAL = 1011  # internal error
CLOSE_TRY_AGAIN = 1013  # busy
CLOSE_INVALID_DATA = 1007  # a fatal bad_audio: Opus data the decoder cannot go on from

CLOSE_CODES: dict[ErrorCode, int] = {
    ErrorCode.BUFFER_FULL: CLOSE_POLICY,
    ErrorCode.IDLE_TIMEOUT: CLOSE_POLICY,
    ErrorCode.START_TIMEOUT: CLOSE_POLICY,
    ErrorCode.SESSION_TIME_LIMIT: CLOSE_POLICY,
    ErrorCode.CLIENT_TOO_SLOW: CLOSE_POLICY,
    ErrorCode.SHUTTING_DOWN: CLOSE_GOING_AWAY,
    ErrorCode.BUSY: CLOSE_TRY_AGAIN,
    ErrorCode.INTERNAL_ERROR: CLOSE_INTERNAL,
    ErrorCode.UNKNOWN_SESSION: CLOSE_POLICY,
    ErrorCode.SENDER_GONE: CLOSE_GOING_AWAY,
    ErrorCode.RESUME_FAILED: CLOSE_POLICY,
}
# Codes that are fatal only sometimes (bad_audio: a damaged frame is dropped, an Opus stream that cannot go on ends).
CLOSE_CODES_WHEN_FATAL: dict[ErrorCode, int] = {ErrorCode.BAD_AUDIO: CLOSE_INVALID_DATA}


def close_code(code: ErrorCode) -> int:
    """The close code of a session ended by a fatal ``code``."""
    return CLOSE_CODES[code] if code in CLOSE_CODES else CLOSE_CODES_WHEN_FATAL[code]


class ProtocolError(InvalidInput):
    """A message that breaks the protocol; ``code`` is the ErrorCode sent back in the ``error`` message."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)


# ---------------------------------------------------------------------------------------------------------------------
# Messages. Each is a dataclass whose fields are exactly the JSON fields (plus "type"), so the JSON is the dataclass.


@dataclass(frozen=True)
class Start:
    """Client -> server, first message: the stream's format and the model/encoder settings it wants."""

    TYPE: ClassVar[str] = "start"
    sample_rate: int  # input rate in Hz (any integer in [8000, 48000]; the server resamples to 16 kHz); opus: 48000
    format: str = "pcm16"  # "pcm16" (int16 little-endian), "float32" (IEEE little-endian), mono; or "opus"
    k: int | None = None  # codebook size; None = the server's default pair
    lmbda: int | None = None  # DPDP duration penalty; None = the server's default pair
    preset: str = "low-latency"  # window preset of the streaming encoder (low-latency, balanced, quality)
    score: bool = False  # add ULM log-probabilities to units
    options: dict = field(default_factory=dict)  # encoder overrides: mode, left, hop, lookahead, max_lag
    resynth: dict | None = None  # live resynthesis: audio back from the units (RESYNTH_OPTIONS); None = off
    version: int = PROTOCOL_VERSION
    transmit: dict | None = None  # the unit bitstream as binary frames (TRANSMIT_OPTIONS; BitstreamFrame); None = off
    container: str | None = None  # format "opus" only: OPUS_CONTAINERS (default "auto")


# Encoder overrides accepted in start.options, with their JSON types (None = keep the preset's value).
START_OPTIONS = {"mode": str, "left": int, "hop": int, "lookahead": int, "max_lag": int}
SUBSCRIBE_FORMATS = ("units", "bitstream")  # subscribe.format: unit messages, or the unit bitstream (frames.py)
ENCODER_MODES = ("full", "sliding", "cached")  # "full": exact offline units, all at end; the others stream

# Resynthesis options of start.resynth / subscribe.resynth, with their JSON types. Units are deduplicated units
# (left_context C, holdback L; null = unlimited, the exact setting) and 25 ms codec frames (vocoder_*).
# Defined once by dpslm_stream.stream.resynth_options.ResynthOptions (which also validates the values).
RESYNTH_OPTIONS = ResynthOptions.json_types()
RESYNTH_NULLABLE = ResynthOptions.NULLABLE


@dataclass(frozen=True)
class Subscribe:
    """Client -> server, first message of a listener: receive a running session's units and resynthesized audio."""

    TYPE: ClassVar[str] = "subscribe"
    session: str  # the sender's session id (its ready.session)
    token: str  # the sender's ready.listen_token
    resynth: dict | None = field(default_factory=dict)  # RESYNTH_OPTIONS for the listener's own resynthesis; None = units only
    version: int = PROTOCOL_VERSION
    format: str = "units"  # "units" (JSON unit messages) or "bitstream" (the sender's BitstreamFrames; resynth must be null)


@dataclass(frozen=True)
class End:
    """Client -> server: end of the audio stream. The server sends every remaining unit, then ``end``, then closes."""

    TYPE: ClassVar[str] = "end"


@dataclass(frozen=True)
class Ready:
    """Server -> client, answer to start: the session id and every setting as resolved by the server."""

    TYPE: ClassVar[str] = "ready"
    session: str
    settings: dict  # sample_rate, format, k, lmbda, preset, mode, left, hop, lookahead, max_lag, score, frame_rate
    limits: dict  # max_session_s, max_full_s, idle_timeout_s, max_message_bytes, max_buffer_s, stall_timeout_s
    models: str  # the model set's source ("release", "tiny", a folder)
    random_weights: bool  # True for the tiny set: units are plumbing checks, not speech
    server: str  # "dpslm-stream <version>"
    version: int = PROTOCOL_VERSION
    role: str = "sender"  # "sender" (start) or "listener" (subscribe)
    listen_token: str | None = None  # sender only: what a listener passes in subscribe (share it with the session id)
    resume_token: str | None = None  # sender only: what a reconnecting client passes in resume; None: cannot resume
    resume_grace_s: float = 0.0  # how long the server keeps a session whose connection dropped (0: not at all)


@dataclass(frozen=True)
class Resume:
    """Client -> server, first message of a new connection that takes over a session whose connection dropped."""

    TYPE: ClassVar[str] = "resume"
    token: str  # the session's ready.resume_token
    next_seq: int  # the first unit seq the client has not received
    audio_samples: int = 0  # resynthesized 24 kHz samples the client has received
    resend_from: int | None = None  # input sample the client's resent audio starts at (<= resumed.samples); None: there
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Resumed:
    """Server -> client, answer to resume: units from ``next_seq`` and audio from resume.audio_samples follow; the
    client resends its input audio from sample ``samples`` on."""

    TYPE: ClassVar[str] = "resumed"
    samples: int  # input samples (per channel, at the start's sample rate) the server has accepted
    next_seq: int


@dataclass(frozen=True)
class Ack:
    """Server -> client: input samples accepted so far (the client may drop the audio it keeps for a resend below)."""

    TYPE: ClassVar[str] = "ack"
    samples: int


@dataclass(frozen=True)
class Unit:
    """Server -> client: one committed (final) deduplicated unit. ``seq`` counts 0, 1, 2, ... per session."""

    TYPE: ClassVar[str] = "unit"
    seq: int
    unit: int
    start_frame: int  # first 20 ms frame of the unit's run
    end_frame: int  # one past its last frame
    start_s: float  # start_frame / 50
    end_s: float
    commit_audio_s: float  # seconds of input audio the encoder had consumed when it committed the unit
    lag_s: float  # wall-clock commit lag: send time minus arrival time of the audio up to end_s
    logprob: float | None = None  # ULM log p(unit | previous units), natural log; None unless start.score


@dataclass(frozen=True)
class Stats:
    """Server -> client, about once a second while audio flows, and inside ``end``."""

    TYPE: ClassVar[str] = "stats"
    elapsed_s: float  # wall time since ready
    audio_s: float  # input audio received
    processed_s: float  # input audio handed to the encoder
    buffered_s: float  # received but not yet encoded (the bounded buffer)
    units: int  # units committed so far
    units_per_s: float  # units / audio seconds committed
    bitrate: float  # N_units * H(unigram of this session's units) / seconds (bit/s, ZeroSyl's definition)
    rtf: float  # this session's share of model time per second of audio (< 1: cheaper than real time)
    lag_s: float | None  # commit lag of the latest unit
    lag_p95_s: float | None  # 95th percentile of the commit lag over the session so far
    loglikelihood: float | None  # sum of the units' logprobs (score=true only)
    state_nbytes: int  # streaming state held for this session (encoder + server buffers); bounded
    resynth_audio_s: float | None = None  # resynthesized audio sent (24 kHz); None without resynthesis
    resynth_lag_s: float | None = None  # how long the oldest unit without audio has waited (grows if not real time)
    resynth_rtf: float | None = None  # resynthesis compute per second of audio made (> 1: slower than real time)
    listeners: int = 0  # sender: listeners subscribed now
    transmit: dict | None = None  # start.transmit: packets, payload_bps, on_wire_bps, ideal_bps, authors_bitrate...
    precision: str | None = None  # sender: what its encoder runs in (exact/fast, = ready.settings.precision)
    resynth_precision: str | None = None  # what its resynthesis runs in (= ready.settings.resynth.precision)


@dataclass(frozen=True)
class Error:
    """Server -> client: ``code`` (ErrorCode value), a message that says what was wrong and what is expected."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False  # True: the session ends (remaining units, then end, then close)
    retry_after_s: float | None = None  # for busy


@dataclass(frozen=True)
class EndMessage:
    """Server -> client, last message of a session: why it ended and the session's totals."""

    TYPE: ClassVar[str] = "end"
    reason: str  # "end" (client asked), or the ErrorCode value that ended it (idle_timeout, shutting_down, ...)
    units: int  # number of unit messages sent (the last seq + 1)
    num_frames: int  # 20 ms frames of the whole stream
    audio_s: float
    stats: dict  # the final Stats fields
    forced_commits: int = 0  # DPDP decisions forced by max_lag (0: the units are exactly offline DPDP's)
    resynth: dict | None = None  # resynthesis totals (units, codec_frames, audio_seconds, chunks, latencies, rtf, error)


ClientMessage = Union[Start, End, Subscribe, Resume]
ServerMessage = Union[Ready, Unit, Stats, Error, EndMessage, Resumed, Ack]
_SERVER_TYPES: dict[str, type] = {c.TYPE: c for c in (Ready, Unit, Stats, Error, EndMessage, Resumed, Ack)}
MAX_RESUME_TOKEN_CHARS = 64  # a resume token longer than this is refused unread (the server's are 22)


def to_json(msg: Any) -> str:
    """One message as compact JSON text, with its "type" first. NaN/Inf are refused (they are not JSON)."""
    body = {"type": msg.TYPE, **dataclasses.asdict(msg)}
    return json.dumps(body, separators=(",", ":"), allow_nan=False)



def parse_server_message(text: str | bytes) -> ServerMessage:
    """Parse a server text frame; unknown fields are ignored (forward compatibility), unknown types raise."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"server sent invalid JSON: {e}") from None
    cls = _SERVER_TYPES.get(str(obj.get("type"))) if isinstance(obj, dict) else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown server message: {str(text)[:200]}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in obj.items() if k in names})
    except TypeError as e:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"server message {obj.get('type')!r} is missing fields: {e}") from None

