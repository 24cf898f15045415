"""The one wire protocol of the live units server: every message, field, error code, close code and version, defined
once. The server (dpslm_stream.server) and every client (dpslm_stream.client, the browser page mirrors it in
client/web/app.js) use these definitions; docs/protocol.md explains them for people.

A session is one WebSocket connection to ``WS_PATH``:

    client                                   server
    start (JSON)                    ->
                                    <-       ready (JSON: session id, resolved settings, limits)
    audio (binary frames, PCM16 or float32 little-endian mono at the declared rate)
                                    <-       unit (JSON, seq 0, 1, 2, ... never reordered or dropped)
                                    <-       stats (JSON, about once a second)
                                    <-       audio (binary, 24 kHz PCM16 with a 16-byte header; start.resynth only)
    end (JSON)                      ->
                                    <-       the remaining units (and audio), then end (JSON), then close 1000

A sender's connection that drops without a close handshake is parked by the server for ``ready.resume_grace_s``;
a new connection sends ``resume`` (token, the first unit seq and the audio sample it lacks), gets ``resumed`` (the
input sample to resend from), the units and audio it missed, and the session goes on; ``ack`` tells the client
which of its audio the server has accepted (docs/protocol.md).

A listener (the low-bitrate link's receiving side) opens its own connection and sends ``subscribe`` with a sender's
session id and listen token (both in the sender's ``ready``); it receives the sender's units from then on and audio
resynthesized from those units alone, then ``end`` when the sender's stream is over.

Errors are JSON ``error`` messages with a stable ``code`` (see ``ErrorCode``), a human ``message`` and ``fatal``:
a non-fatal error rejects one message and the session goes on; after a fatal one the server delivers the units it
can still produce, sends ``end`` and closes with the close code of ``CLOSE_CODES``.

Version 2 added live resynthesis (``start.resynth``, binary audio frames, the resynth fields of ``stats`` and
``end``) and listener mode (``subscribe``). The parser checks ``version`` (``SUPPORTED_VERSIONS``; any other value is
``unsupported_version``) and refuses a resynthesis request in a version-1 message (``unsupported_option``); beyond
that the server answers both versions with the same messages (``ready.version`` is the server's), so a version-1
client ignores the fields it does not know.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Union

import numpy as np

from dpslm_stream.audio import check_finite, check_sample_rate, float32le_to_float, float_to_pcm16, pcm16_to_float
from dpslm_stream.errors import InvalidInput
from dpslm_stream.codec.link import TransmitOptions
from dpslm_stream.stream.resynth_options import ResynthOptions
from dpslm_stream.validate import is_int, is_number

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

# HTTP paths served on the one port.
WS_PATH = "/v1/stream"  # the WebSocket endpoint
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
PAGE_PATH = "/"  # the browser page (client/web/index.html); its assets are served next to it

TOKEN_QUERY_PARAM = "token"  # browsers cannot set headers on a WebSocket: the token may come as ?token=...

SAMPLE_FORMATS = ("pcm16", "float32")
BYTES_PER_SAMPLE = {"pcm16": 2, "float32": 4}
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
    BAD_AUDIO = "bad_audio"  # an empty frame or a byte count that is not a whole number of samples
    NON_FINITE = "non_finite"  # NaN or Inf float32 samples
    MESSAGE_TOO_LARGE = "message_too_large"  # an audio frame above max_message_bytes, a text frame above max_text_bytes
    # Limits: fatal, the session ends (units received so far are still delivered, then end).
    BUFFER_FULL = "buffer_full"  # the client kept sending while the server's bounded audio buffer stayed full
    IDLE_TIMEOUT = "idle_timeout"
    START_TIMEOUT = "start_timeout"  # no start (or subscribe) accepted within start_timeout_s of connecting
    SESSION_TIME_LIMIT = "session_time_limit"
    SHUTTING_DOWN = "shutting_down"  # the server drains (SIGTERM): no new sessions, running ones are finished
    BUSY = "busy"  # all session slots are taken: try again later (sent at once after the handshake)
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
    sample_rate: int  # input rate in Hz (any integer in [8000, 48000]; the server resamples to 16 kHz)
    format: str = "pcm16"  # "pcm16" (int16 little-endian) or "float32" (IEEE little-endian), mono
    k: int | None = None  # codebook size; None = the server's default pair
    lmbda: int | None = None  # DPDP duration penalty; None = the server's default pair
    preset: str = "low-latency"  # window preset of the streaming encoder (low-latency, balanced, quality)
    score: bool = False  # add ULM log-probabilities to units
    options: dict = field(default_factory=dict)  # encoder overrides: mode, left, hop, lookahead, max_lag
    resynth: dict | None = None  # live resynthesis: audio back from the units (RESYNTH_OPTIONS); None = off
    version: int = PROTOCOL_VERSION
    transmit: dict | None = None  # the unit bitstream as binary frames (TRANSMIT_OPTIONS; BitstreamFrame); None = off


# Encoder overrides accepted in start.options, with their JSON types (None = keep the preset's value).
START_OPTIONS = {"mode": str, "left": int, "hop": int, "lookahead": int, "max_lag": int}
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


# ---------------------------------------------------------------------------------------------------------------------
# Parsing. Client messages are checked strictly (the server must never trust them); server messages leniently
# (a newer server may add fields, which an older client ignores).


# Client text frames are bounded before they are parsed: at most MAX_TEXT_BYTES (UTF-8) and MAX_JSON_DEPTH levels of
# nesting (a start message has 3), so no input can make the parser recurse deeply or allocate much.
MAX_TEXT_BYTES = 16 << 10
MAX_JSON_DEPTH = 8


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than ``max_depth`` (brackets inside strings do not count). One
    linear scan, no recursion: it runs before the parser sees the text."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _check_text(value: Any, where: str = "message") -> None:
    """Every string of a parsed message (keys included) must be encodable text: JSON's \\u escapes can spell unpaired
    UTF-16 surrogates, which no UTF-8 encoder takes (the nesting is already bounded)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{where} holds a string that is not valid text (an unpaired "
                                                       "surrogate escape); send UTF-8 text") from None  # fmt: skip
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"field {k!r}" if isinstance(k, str) and k.isidentifier() else where)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)


def _load_object(text: str | bytes, max_bytes: int = MAX_TEXT_BYTES, max_depth: int = MAX_JSON_DEPTH) -> dict:
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(ErrorCode.BAD_JSON, f"text frame is not UTF-8 ({e})") from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ProtocolError(ErrorCode.MESSAGE_TOO_LARGE, f"text frame of {size} bytes exceeds the limit of "
                                                         f"{max_bytes}; control messages are small JSON objects")  # fmt: skip
    if json_depth_exceeds(text, max_depth):
        raise ProtocolError(ErrorCode.BAD_JSON, f"JSON nested deeper than {max_depth} levels; messages are flat "
                                                "objects (see docs/protocol.md)")  # fmt: skip
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"text frame is not valid JSON ({e}); expected a JSON object "
                                                'such as {"type": "start", ...}') from None  # fmt: skip
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, f"expected a JSON object with a \"type\" field, got {type(obj).__name__}")
    _check_text(obj)
    return obj


def _check_type(name: str, value: Any, kind: type, optional: bool = False) -> Any:
    """Check one JSON field's type (bool is not an int; ints are accepted where floats are)."""
    if value is None and optional:
        return None
    ok = is_int(value, int) if kind is int else isinstance(value, kind)
    if kind is float:
        ok = is_number(value)
    if not ok:
        names = {int: "an integer", str: "a string", bool: "true or false", float: "a number", dict: "an object"}
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {name!r} must be {names[kind]}"
                                                   f"{' or null' if optional else ''}, got {json.dumps(value)}")  # fmt: skip
    return value


def parse_client_message(text: str | bytes, max_bytes: int = MAX_TEXT_BYTES,
                         max_depth: int = MAX_JSON_DEPTH) -> ClientMessage:  # fmt: skip
    """Parse a client text frame into Start, End or Subscribe; raise ProtocolError with the right code otherwise
    (frames above ``max_bytes`` or nested deeper than ``max_depth`` are refused before parsing)."""
    obj = _load_object(text, max_bytes, max_depth)
    kind = obj.get("type")
    if kind == Start.TYPE:
        return _parse_start(obj)
    if kind == End.TYPE:
        extra = sorted(set(obj) - {"type"})
        if extra:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"end takes no fields, got {extra}")
        return End()
    if kind == Subscribe.TYPE:
        return _parse_subscribe(obj)
    if kind == Resume.TYPE:
        return _parse_resume(obj)
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}; expected one of "
                                                f"{[Start.TYPE, End.TYPE, Subscribe.TYPE, Resume.TYPE]} (audio goes in binary "
                                                "frames)")  # fmt: skip


def _check_version(obj: dict) -> int:
    version = _check_type("version", obj.get("version", PROTOCOL_VERSION), int)
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version} is not supported; "
                                                           f"this server speaks {list(SUPPORTED_VERSIONS)}")  # fmt: skip
    return version


def _parse_resynth(where: str, value: Any, version: int) -> dict | None:
    """Type-check a resynth options object (values are checked by the resynthesis worker)."""
    if value is None:
        return None
    if version < 2:
        raise ProtocolError(ErrorCode.UNSUPPORTED_OPTION, f"{where} needs protocol version 2 (send \"version\": 2)")
    _check_type(where, value, dict)
    for name, item in value.items():
        if name not in RESYNTH_OPTIONS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown {where} option {name!r}; expected "
                                                       f"{sorted(RESYNTH_OPTIONS)}")  # fmt: skip
        _check_type(f"{where}.{name}", item, RESYNTH_OPTIONS[name], optional=name in RESYNTH_NULLABLE)
    return dict(value)


def _parse_subscribe(obj: dict) -> Subscribe:
    allowed = {"type"} | {f.name for f in dataclasses.fields(Subscribe)}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown subscribe field(s) {unknown}; expected "
                                                   f"{sorted(allowed - {'type'})}")  # fmt: skip
    version = _check_version(obj)
    for name in ("session", "token"):
        if name not in obj:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"subscribe needs {name!r} (from the sender's ready message)")
        _check_type(name, obj[name], str)
    fmt = _check_type("format", obj.get("format", "units"), str)
    if fmt not in SUBSCRIBE_FORMATS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"subscribe.format {fmt!r}: expected one of {SUBSCRIBE_FORMATS}")
    resynth = _parse_resynth("subscribe.resynth", obj.get("resynth", {}), version)
    if fmt == "bitstream" and obj.get("resynth") is not None:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a bitstream listener resynthesizes on its own side: send "
                                                   "\"resynth\": null with \"format\": \"bitstream\"")  # fmt: skip
    return Subscribe(session=obj["session"], token=obj["token"], version=version,
                     resynth=None if fmt == "bitstream" else resynth, format=fmt)  # fmt: skip


def _parse_resume(obj: dict) -> Resume:
    allowed = {"type"} | {f.name for f in dataclasses.fields(Resume)}
    unknown = sorted(set(obj) - allowed)
    if unknown or "token" not in obj or "next_seq" not in obj:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"resume takes token and next_seq (and audio_samples, resend_from, "
                                                   f"version); got {sorted(set(obj) - {'type'})}")  # fmt: skip
    token = _check_type("token", obj["token"], str)
    if len(token) > MAX_RESUME_TOKEN_CHARS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"resume token of {len(token)} characters is not one of ours")
    numbers = {name: _check_type(name, obj.get(name), int, optional=True) for name in ("next_seq", "audio_samples",
                                                                                       "resend_from")}  # fmt: skip
    if numbers["next_seq"] is None or any(v is not None and not 0 <= v < 2**53 for v in numbers.values()):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"resume needs next_seq, audio_samples and resend_from as "
                                                   f"integers in [0, 2**53), got {numbers}")  # fmt: skip
    return Resume(token=token, next_seq=numbers["next_seq"], audio_samples=numbers["audio_samples"] or 0,
                  resend_from=numbers["resend_from"], version=_check_version(obj))  # fmt: skip


def _parse_start(obj: dict) -> Start:
    allowed = {"type"} | {f.name for f in dataclasses.fields(Start)}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        hint = " (the duration penalty is spelled 'lmbda')" if "lambda" in unknown else ""
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown start field(s) {unknown}{hint}; "
                                                   f"expected {sorted(allowed - {'type'})}")  # fmt: skip
    version = _check_version(obj)
    if "sample_rate" not in obj:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start needs 'sample_rate' (Hz of the audio you will send)")
    try:
        sample_rate = check_sample_rate(obj["sample_rate"])
    except InvalidInput as e:
        raise ProtocolError(ErrorCode.BAD_SAMPLE_RATE, str(e)) from None
    fmt = _check_type("format", obj.get("format", "pcm16"), str)
    if fmt not in SAMPLE_FORMATS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"format {fmt!r} is not supported; expected one of {SAMPLE_FORMATS}")
    options = _check_type("options", obj.get("options", {}), dict)
    for name, value in options.items():
        if name not in START_OPTIONS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown start option {name!r}; expected {sorted(START_OPTIONS)}")
        _check_type(f"options.{name}", value, START_OPTIONS[name], optional=True)
    if options.get("mode") is not None and options["mode"] not in ENCODER_MODES:
        raise ProtocolError(ErrorCode.BAD_SETTINGS, f"unknown mode {options['mode']!r}; expected one of {ENCODER_MODES}")
    return Start(
        sample_rate=sample_rate,
        format=fmt,
        k=_check_type("k", obj.get("k"), int, optional=True),
        lmbda=_check_type("lmbda", obj.get("lmbda"), int, optional=True),
        preset=_check_type("preset", obj.get("preset", "low-latency"), str),
        score=_check_type("score", obj.get("score", False), bool),
        options={name: value for name, value in options.items() if value is not None},
        resynth=_parse_resynth("start.resynth", obj.get("resynth"), version),
        version=version,
        transmit=_parse_transmit(obj.get("transmit")),
    )


@dataclass(frozen=True)
class AudioChunk:
    """Server -> client binary frame: resynthesized audio (see AUDIO_HEADER). ``samples`` is float32 in [-1, 1)."""

    seq: int
    start_sample: int  # at 24 kHz, from the start of the session's resynthesized audio
    samples: np.ndarray

    @property
    def start_s(self) -> float:
        return self.start_sample / RESYNTH_SAMPLE_RATE


def encode_audio_chunk(seq: int, start_sample: int, pcm16: bytes) -> bytes:
    """One binary server frame: the header, then little-endian PCM16 samples at 24 kHz."""
    return AUDIO_HEADER.pack(AUDIO_FRAME_KIND, seq, start_sample) + pcm16


def decode_audio_chunk(data: bytes) -> AudioChunk:
    """Parse a binary server frame (ProtocolError for anything that is not an audio chunk)."""
    if len(data) < AUDIO_HEADER.size or (len(data) - AUDIO_HEADER.size) % 2:
        raise ProtocolError(ErrorCode.BAD_AUDIO, f"binary server frame of {len(data)} bytes is not an audio chunk")
    kind, seq, start = AUDIO_HEADER.unpack_from(data)
    if kind != AUDIO_FRAME_KIND:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown binary frame kind {kind}")
    return AudioChunk(seq, start, pcm16_to_float(data[AUDIO_HEADER.size :]))


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


# ---------------------------------------------------------------------------------------------------------------------
# Audio frames


def decode_audio(data: bytes, fmt: str) -> np.ndarray:
    """A binary audio frame -> float32 samples; ProtocolError for empty frames, partial samples and NaN/Inf.
    Finite float32 samples outside [-1, 1] are clipped to it (the range PCM16 covers; the models were trained on it)."""
    if fmt not in BYTES_PER_SAMPLE:
        raise InvalidInput(f"format must be one of {SAMPLE_FORMATS}, got {fmt!r}")
    width = BYTES_PER_SAMPLE[fmt]
    if len(data) == 0:
        raise ProtocolError(ErrorCode.BAD_AUDIO, "empty audio frame; send at least one sample per binary frame")
    if len(data) % width:
        raise ProtocolError(ErrorCode.BAD_AUDIO, f"audio frame of {len(data)} bytes is not a whole number of {fmt} "
                                                 f"samples ({width} bytes each); the frame was dropped")  # fmt: skip
    if fmt == "pcm16":
        return pcm16_to_float(data)  # every int16 is a finite sample
    samples = float32le_to_float(data)
    try:
        check_finite(samples, "float32 audio frame")
    except InvalidInput as e:
        raise ProtocolError(ErrorCode.NON_FINITE, f"{e}; the frame was dropped") from None
    return np.clip(samples, -1.0, 1.0, out=samples)


def encode_audio(samples: np.ndarray, fmt: str) -> bytes:
    """Float samples in [-1, 1] -> one binary audio frame in ``fmt`` (what clients send)."""
    if fmt == "pcm16":
        return float_to_pcm16(np.asarray(samples, dtype=np.float32))
    if fmt == "float32":
        return np.asarray(samples, dtype="<f4").tobytes()
    raise InvalidInput(f"format must be one of {SAMPLE_FORMATS}, got {fmt!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The unit bitstream (start.transmit, subscribe.format = "bitstream"): binary frames, server -> client.
#   kind (uint8, BITSTREAM_FRAME_KIND) | part (uint8: 0 the stream header, 1 a packet) | the .dpsu bytes
# docs/bitstream.md defines the header and packet bytes. A transmitting sender gets its own session's frames; a
# bitstream listener gets the header first, then every packet from its subscription on (it decodes from the next
# RESYNC packet: dpslm_stream.codec.PacketDecoder skips what comes before).

BITSTREAM_FRAME_KIND = 2
BITSTREAM_PARTS = ("header", "packet")
SUBSCRIBE_FORMATS = ("units", "bitstream")


@dataclass(frozen=True)
class BitstreamFrame:
    part: str  # "header" or "packet"
    data: bytes


def encode_bitstream_frame(part: str, data: bytes) -> bytes:
    return bytes((BITSTREAM_FRAME_KIND, BITSTREAM_PARTS.index(part))) + data


def decode_bitstream_frame(data: bytes) -> BitstreamFrame:
    if len(data) < 3 or data[0] != BITSTREAM_FRAME_KIND or data[1] >= len(BITSTREAM_PARTS):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"binary server frame of {len(data)} bytes is not a bitstream frame")
    return BitstreamFrame(BITSTREAM_PARTS[data[1]], bytes(data[2:]))


def decode_server_binary(data: bytes) -> "AudioChunk | BitstreamFrame":
    """A binary server frame of either kind: resynthesized audio or the unit bitstream."""
    if len(data) and data[0] == BITSTREAM_FRAME_KIND:
        return decode_bitstream_frame(data)
    return decode_audio_chunk(data)


def _parse_transmit(value: Any) -> dict | None:
    if value is None:
        return None
    try:
        return TransmitOptions.from_json(value).to_json()
    except InvalidInput as e:
        raise ProtocolError(ErrorCode.BAD_SETTINGS, f"start.transmit: {e}") from None
