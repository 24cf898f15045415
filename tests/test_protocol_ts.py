"""The TypeScript client's protocol module is generated from dpslm_stream/protocol/ (dpslm_stream/protocol_ts.py):
the committed clients/typescript/src/protocol.ts must equal the generator's output, so the two cannot drift. The
page's compiled copy (client/web/protocol.js) carries the same constants; `npm test` checks it equals a fresh build."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from dpslm_stream import protocol as P
from dpslm_stream import protocol_ts

ROOT = Path(__file__).resolve().parents[1]
TS = ROOT / protocol_ts.OUT


def test_committed_protocol_ts_is_the_generated_one():
    assert TS.read_text() == protocol_ts.render(), (
        f"{protocol_ts.OUT} is stale: run `.venv/bin/python -m dpslm_stream.protocol_ts {protocol_ts.OUT}` "
        "(or `npm run generate` in clients/typescript), then `npm run sync-web`")


def test_generated_types_name_every_message_field_and_code():
    ts = protocol_ts.render()
    for code in P.ErrorCode:
        assert f'  {code.name}: "{code.value}",' in ts
    for cls in (P.Start, P.End, P.Subscribe, P.Ready, P.Unit, P.Stats, P.Error, P.EndMessage):
        name = "ErrorMessage" if cls is P.Error else cls.__name__
        body = re.search(rf"export interface {name} {{\n(.*?)\n}}", ts, re.S).group(1)
        fields = re.findall(r"^  (\w+)\??: ", body, re.M)
        assert fields == ["type"] + [f.name for f in dataclasses.fields(cls)], name
        assert f'  type: "{cls.TYPE}";' in body
    # Client messages: a field with a default may be left out; server messages always carry every field.
    start = re.search(r"export interface Start {\n(.*?)\n}", ts, re.S).group(1)
    assert "  sample_rate: number;" in start and "  format?: string;" in start
    assert "  logprob: number | null;" in ts


def test_the_pages_compiled_protocol_module_has_the_generated_constants():
    page = (ROOT / "client" / "web" / "protocol.js").read_text()
    consts = re.findall(r"^export const (\w+) = (.*?);$", protocol_ts.render(), re.M)
    assert len(consts) > 20
    for name, value in consts:
        if not value.endswith("as const") and "\n" not in value:
            assert f"export const {name} = {value};" in page, name
