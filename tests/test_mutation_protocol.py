"""The wire protocol's parsing at the edges the mutants of `make mutants MODULES=protocol` found untested
(docs/mutation.md): the nesting scan against a slow obvious count, the text-size bound at its exact value, frames
given as bytes, unpaired surrogates with the field they sit in, float32 frames below -1, and the codes and messages."""

import json

import numpy as np
import pytest

from dpslm_stream import protocol as P
from dpslm_stream.errors import InvalidInput


def _depth(text: str) -> int:
    """The deepest nesting of JSON text, by parsing it: the slow obvious reference of json_depth_exceeds."""
    def depth(v):
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0
    return depth(json.loads(text))


@pytest.mark.parametrize("text", ['[[1]]', '[1,[2]]', '[[[],[[]]]]', '["a]]]", [[1]]]', '["\\"]]", [[{"b": []}]]]',
                                  '{"a": "[[[[", "b": {"c": [0]}}', '[[], [], [[]]]', '"[[["', '{}'])
def test_depth_scan_matches_the_parsed_depth(text):
    d = _depth(text)
    for max_depth in range(0, 6):
        assert P.json_depth_exceeds(text, max_depth) == (d > max_depth), (text, max_depth)


def test_text_frames_up_to_the_byte_limit_are_parsed_and_bytes_are_utf8():
    end = '{"type": "end"}'
    assert P.parse_client_message(end, max_bytes=len(end)) == P.End()
    with pytest.raises(P.ProtocolError) as err:
        P.parse_client_message(end, max_bytes=len(end) - 1)
    assert err.value.code == P.ErrorCode.MESSAGE_TOO_LARGE
    assert str(err.value) == (f"text frame of {len(end)} bytes exceeds the limit of {len(end) - 1}; control "
                              "messages are small JSON objects")
    assert P.parse_client_message(end.encode()) == P.End()
    assert P.parse_client_message(bytearray(end.encode())) == P.End()
    with pytest.raises(P.ProtocolError) as err:
        P.parse_client_message(b'{"type": "end", "x": "\xff"}')
    assert err.value.code == P.ErrorCode.BAD_JSON and str(err.value).startswith("text frame is not UTF-8 (")


@pytest.mark.parametrize("text, where", [
    ('{"type": "start", "note": "\\ud800"}', "field 'note'"),
    ('{"type": "end", "\\udc00": 1}', "message"),
    ('{"type": "start", "tags": [1, ["\\ud800"]]}', "field 'tags'"),
    ('{"type": "start", "a": {"b": "\\ud800"}}', "field 'b'"),
])
def test_unpaired_surrogates_are_bad_messages_naming_the_field(text, where):
    with pytest.raises(P.ProtocolError) as err:
        P.parse_client_message(text)
    assert err.value.code == P.ErrorCode.BAD_MESSAGE
    assert str(err.value) == (f"{where} holds a string that is not valid text (an unpaired surrogate escape); "
                              "send UTF-8 text")


def test_float32_frames_are_clipped_on_both_sides_and_bad_ones_say_why():
    got = P.decode_audio(np.array([-1.5, -1.0, 0.25, 1.0, 3.0], dtype="<f4").tobytes(), "float32")
    assert got.dtype == np.float32 and got.tolist() == [-1.0, -1.0, 0.25, 1.0, 1.0]
    with pytest.raises(P.ProtocolError) as err:
        P.decode_audio(np.array([0.0, np.nan], dtype="<f4").tobytes(), "float32")
    assert err.value.code == P.ErrorCode.NON_FINITE
    assert str(err.value) == ("float32 audio frame contains 1 non-finite value(s) (NaN or Inf); expected finite "
                              "samples; the frame was dropped")
    with pytest.raises(InvalidInput) as err:
        P.decode_audio(b"\x00\x00", "opus16")
    assert str(err.value) == "format must be one of ('pcm16', 'float32'), got 'opus16'"
