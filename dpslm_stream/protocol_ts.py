"""The wire protocol as TypeScript: ``python -m dpslm_stream.protocol_ts [OUT]`` renders
``clients/typescript/src/protocol.ts`` from ``dpslm_stream.protocol`` (the one definition), so the TypeScript client's
message types, error codes, close codes and binary-frame constants cannot drift from the server's.
tests/test_protocol_ts.py checks that the committed file equals this module's output.

Messages become interfaces with a literal ``type``: a field with a default is optional in client messages (the
server fills it in) and present in server messages (the server always sends every field). The Python annotations are
mapped by ``_TS_TYPES``; an annotation it does not know fails loudly rather than turning into ``unknown``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import typing
from pathlib import Path

from dpslm_stream import protocol as P
from dpslm_stream.protocol import messages
from dpslm_stream.codec.link import TransmitOptions

OUT = Path("clients") / "typescript" / "src" / "protocol.ts"  # relative to the repository root

_TS_TYPES = {"int": "number", "float": "number", "str": "string", "bool": "boolean", "dict": "Record<string, unknown>"}
# Fields whose dict holds a known shape (the option objects, the final stats): typed precisely.
_FIELD_TYPES = {
    ("Start", "options"): "StartOptions",
    ("Start", "resynth"): "ResynthOptions | null",
    ("Start", "transmit"): "TransmitOptions | null",
    ("Subscribe", "resynth"): "ResynthOptions | null",
    ("EndMessage", "stats"): "StatsFields",
}
_TS_NAMES = {"Error": "ErrorMessage"}  # the global Error class keeps its name in TypeScript
_JSON_KINDS = {int: "number", float: "number", str: "string", bool: "boolean"}


def _ts_type(annotation: str) -> str:
    parts = [p.strip() for p in annotation.split("|")]
    out = []
    for p in parts:
        if p == "None":
            out.append("null")
        elif p in _TS_TYPES:
            out.append(_TS_TYPES[p])
        else:
            raise ValueError(f"no TypeScript type for the annotation {annotation!r}: add it to _TS_TYPES")
    return " | ".join(out)


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in the dataclass's source."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _doc(text: str | None, indent: str = "") -> list[str]:
    if not text:
        return []
    text = " ".join(text.split()).replace("*/", "* /")
    return [f"{indent}/** {text} */"]


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _interface(cls: type, client: bool) -> list[str]:
    name = _TS_NAMES.get(cls.__name__, cls.__name__)
    comments = _field_comments(cls)
    lines = _doc(cls.__doc__) + [f"export interface {name} {{", f'  type: "{cls.TYPE}";']  # type: ignore[attr-defined]
    for f in dataclasses.fields(cls):
        ts = _FIELD_TYPES.get((cls.__name__, f.name)) or _ts_type(str(f.type))
        optional = "?" if client and _has_default(f) else ""
        lines += _doc(comments.get(f.name), "  ") + [f"  {f.name}{optional}: {ts};"]
    return lines + ["}"]


def _options(name: str, doc: str, kinds: dict, nullable: typing.Iterable[str] = ()) -> list[str]:
    lines = _doc(doc) + [f"export interface {name} {{"]
    for key, kind in kinds.items():
        kinds_of = kind if isinstance(kind, tuple) else (kind,)
        ts = " | ".join(dict.fromkeys(_JSON_KINDS[k] for k in kinds_of))
        lines.append(f"  {key}?: {ts}{' | null' if key in nullable else ''};")
    return lines + ["}"]


def _const(name: str, value: object, doc: str | None = None) -> list[str]:
    text = json.dumps(value)
    suffix = " as const" if isinstance(value, (list, dict)) else ""
    return _doc(doc) + [f"export const {name} = {text}{suffix};"]


def render() -> str:
    """The TypeScript module, as text."""
    client_types = typing.get_args(P.ClientMessage)
    server_types = tuple(messages._SERVER_TYPES.values())
    out = [
        "// The live units protocol, generated from dpslm_stream/protocol/ by `python -m dpslm_stream.protocol_ts`.",
        "// Do not edit: change dpslm_stream/protocol/ and regenerate (`npm run generate`); tests/test_protocol_ts.py",
        "// checks that this file equals the generator's output. docs/protocol.md explains every message for people.",
        "",
    ]
    out += _const("PROTOCOL_VERSION", P.PROTOCOL_VERSION)
    out += _const("SUPPORTED_VERSIONS", list(P.SUPPORTED_VERSIONS))
    out += _const("WS_PATH", P.WS_PATH, "the session WebSocket")
    out += _const("HEALTH_PATH", P.HEALTH_PATH)
    out += _const("METRICS_PATH", P.METRICS_PATH)
    out += _const("PAGE_PATH", P.PAGE_PATH)
    out += _const("TOKEN_QUERY_PARAM", P.TOKEN_QUERY_PARAM, "browsers cannot set WebSocket headers: ?token=...")
    out += _const("PCM_FORMATS", list(P.PCM_FORMATS), "samples in binary frames at start.sample_rate")
    out += _const("SAMPLE_FORMATS", list(P.SAMPLE_FORMATS), "every start.format (opus: compressed, sendEncoded)")
    out += ["export type SampleFormat = (typeof SAMPLE_FORMATS)[number];"]
    out += _const("BYTES_PER_SAMPLE", dict(P.BYTES_PER_SAMPLE))
    out += _const("OPUS_CONTAINERS", list(P.OPUS_CONTAINERS), "start.container of format opus")
    out += _const("OPUS_SAMPLE_RATE", P.OPUS_SAMPLE_RATE, "Opus is decoded at this rate whatever start.sample_rate says")
    out += _const("FRAME_RATE", P.FRAME_RATE, "WavLM frames (and unit boundaries) per second of audio")
    out += _const("ENCODER_MODES", list(P.ENCODER_MODES))
    out += _const("SUBSCRIBE_FORMATS", list(P.SUBSCRIBE_FORMATS))
    out += _const("MAX_TEXT_BYTES", P.MAX_TEXT_BYTES, "the server refuses larger text frames")
    out += _const("MAX_JSON_DEPTH", P.MAX_JSON_DEPTH)
    out += [""]
    out += _const("AUDIO_FRAME_KIND", P.AUDIO_FRAME_KIND, "binary server frame: resynthesized audio chunk")
    out += _const("AUDIO_HEADER_FORMAT", P.AUDIO_HEADER.format,
                  "Python struct layout: kind u8 | 3 zero bytes | seq u32 | start_sample u64, little-endian")
    out += _const("AUDIO_HEADER_BYTES", P.AUDIO_HEADER.size)
    out += _const("RESYNTH_SAMPLE_RATE", P.RESYNTH_SAMPLE_RATE)
    out += _const("BITSTREAM_FRAME_KIND", P.BITSTREAM_FRAME_KIND, "binary server frame: kind u8 | part u8 | .dpsu bytes")
    out += _const("BITSTREAM_PARTS", list(P.BITSTREAM_PARTS))
    out += ["export type BitstreamPart = (typeof BITSTREAM_PARTS)[number];", ""]

    out += _doc(P.ErrorCode.__doc__) + ["export const ErrorCode = {"]
    out += [f'  {c.name}: "{c.value}",' for c in P.ErrorCode] + ["} as const;"]
    out += ["export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];", ""]
    closes = {name: value for name, value in vars(P).items() if name.startswith("CLOSE_") and isinstance(value, int)}
    for name, value in closes.items():
        out += _const(name, value)
    out += ["/** The WebSocket close code of each fatal error code (the others are not fatal). */",
            "export const CLOSE_CODES: Readonly<Partial<Record<ErrorCode, number>>> = {"]
    out += [f'  {code.value}: {close},' for code, close in P.CLOSE_CODES.items()] + ["};"]
    out += ["export const FATAL_CODES: ReadonlySet<string> = new Set(Object.keys(CLOSE_CODES));"]
    out += ["/** Codes that are fatal only sometimes (the error message's `fatal` says), with their close code. */",
            "export const CLOSE_CODES_WHEN_FATAL: Readonly<Partial<Record<ErrorCode, number>>> = {"]
    out += [f'  {code.value}: {close},' for code, close in P.CLOSE_CODES_WHEN_FATAL.items()] + ["};", ""]

    out += _options("StartOptions", "start.options: encoder overrides (null = the preset's value).",
                    P.START_OPTIONS, P.START_OPTIONS)
    out += _options("ResynthOptions", "start.resynth / subscribe.resynth options (docs/protocol.md).",
                    P.RESYNTH_OPTIONS, P.RESYNTH_NULLABLE)
    out += _options("TransmitOptions", "start.transmit: the unit bitstream's coder and packets.",
                    TransmitOptions.json_types())
    out += [""]
    for cls in client_types:
        out += _interface(cls, client=True) + [""]
    for cls in server_types:
        out += _interface(cls, client=False) + [""]
    out += ["/** The final stats inside the end message: the stats fields without their type. */",
            'export type StatsFields = Omit<Stats, "type">;']
    names = lambda classes: " | ".join(_TS_NAMES.get(c.__name__, c.__name__) for c in classes)  # noqa: E731
    out += [f"export type ClientMessage = {names(client_types)};", f"export type ServerMessage = {names(server_types)};"]
    out += _const("SERVER_MESSAGE_TYPES", [c.TYPE for c in server_types])
    fields = {c.TYPE: [f.name for f in dataclasses.fields(c) if not _has_default(f)] for c in server_types}
    out += _const("SERVER_REQUIRED_FIELDS", fields, "fields every server message of a type carries (a parser checks them)")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stdout.write(render())
    else:
        Path(args[0]).write_text(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
