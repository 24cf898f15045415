"""Client messages parsed strictly (the server must never trust them): size and nesting bounded before parsing, every
field checked for type and range, each refusal a ProtocolError with its ErrorCode. Part of dpslm_stream.protocol."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


from dpslm_stream.audio import check_sample_rate
from dpslm_stream.errors import InvalidInput
from dpslm_stream.codec.link import TransmitOptions
from dpslm_stream.validate import is_int, is_number

from .messages import (
    ClientMessage, ENCODER_MODES, End, ErrorCode, MAX_RESUME_TOKEN_CHARS, OPUS_CONTAINERS, OPUS_SAMPLE_RATE,
    PROTOCOL_VERSION, ProtocolError, RESYNTH_NULLABLE, RESYNTH_OPTIONS, Resume, SAMPLE_FORMATS, START_OPTIONS,
    SUBSCRIBE_FORMATS, SUPPORTED_VERSIONS, Start, Subscribe,
)

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
    fmt = _check_type("format", obj.get("format", "pcm16"), str)
    if fmt not in SAMPLE_FORMATS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"format {fmt!r} is not supported; expected one of {SAMPLE_FORMATS}")
    container = _check_type("container", obj.get("container"), str, optional=True)
    if fmt == "opus":
        container = "auto" if container is None else container
        if container not in OPUS_CONTAINERS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"container {container!r}: expected one of {OPUS_CONTAINERS}")
    elif container is not None:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"container applies to format \"opus\" only (format is {fmt!r})")
    if "sample_rate" not in obj and fmt != "opus":
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start needs 'sample_rate' (Hz of the audio you will send)")
    try:  # Opus decodes at 48 kHz: a sample rate given with it is checked, then the decoded rate is what counts
        sample_rate = check_sample_rate(obj.get("sample_rate", OPUS_SAMPLE_RATE))
    except InvalidInput as e:
        raise ProtocolError(ErrorCode.BAD_SAMPLE_RATE, str(e)) from None
    if fmt == "opus":
        sample_rate = OPUS_SAMPLE_RATE
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
        container=container,
    )



def _parse_transmit(value: Any) -> dict | None:
    if value is None:
        return None
    try:
        return TransmitOptions.from_json(value).to_json()
    except InvalidInput as e:
        raise ProtocolError(ErrorCode.BAD_SETTINGS, f"start.transmit: {e}") from None
