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
    ('{"type": "start", "a": {"\\ud800": 1}}', "field 'a'"),  # a bad key is named by the field holding it
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


_START_FIELDS = "['container', 'format', 'k', 'lmbda', 'options', 'preset', 'resynth', 'sample_rate', 'score', 'transmit', 'version']"
_SUB = '{"type": "subscribe", "session": "a", "token": "b"'


@pytest.mark.parametrize("text, code, message", [
    ('{"type": "start", "sample_rate": 16000, "foo": 1}', "bad_message",
     f"unknown start field(s) ['foo']; expected {_START_FIELDS}"),
    ('{"type": "start", "sample_rate": 16000, "lambda": 1}', "bad_message",
     f"unknown start field(s) ['lambda'] (the duration penalty is spelled 'lmbda'); expected {_START_FIELDS}"),
    ('{"type": "start", "sample_rate": 16000, "preset": 5}', "bad_message", "field 'preset' must be a string, got 5"),
    ('{"type": "start", "sample_rate": 16000, "score": 1}', "bad_message",
     "field 'score' must be true or false, got 1"),
    ('{"type": "start", "sample_rate": 16000, "options": []}', "bad_message",
     "field 'options' must be an object, got []"),
    (_SUB + ', "format": 3}', "bad_message", "field 'format' must be a string, got 3"),
    (_SUB + ', "format": "mp3"}', "bad_message", "subscribe.format 'mp3': expected one of ('units', 'bitstream')"),
    (_SUB + ', "format": "bitstream", "resynth": {}}', "bad_message",
     'a bitstream listener resynthesizes on its own side: send "resynth": null with "format": "bitstream"'),
    (_SUB + ', "resynth": 5}', "bad_message", "field 'subscribe.resynth' must be an object, got 5"),
    ('{"type": "end", "x": 1}', "bad_message", "end takes no fields, got ['x']"),
    ('{"type": "nope"}', "unknown_type",
     "unknown message type 'nope'; expected one of ['start', 'end', 'subscribe', 'resume'] (audio goes in binary frames)"),
])
def test_client_message_errors_have_their_code_and_say_what_is_expected(text, code, message):
    with pytest.raises(P.ProtocolError) as err:
        P.parse_client_message(text)
    assert (err.value.code.value, str(err.value)) == (code, message)


def test_subscribe_resynth_is_for_units_listeners_only():
    assert P.parse_client_message(_SUB + ', "format": "units", "resynth": {}}').resynth == {}
    assert P.parse_client_message(_SUB + ', "format": "bitstream"}').format == "bitstream"


def test_server_message_errors_quote_the_type_and_at_most_200_characters():
    text = '{"type": "' + "z" * 300 + '"}'
    with pytest.raises(P.ProtocolError) as err:
        P.parse_server_message(text)
    assert err.value.code == P.ErrorCode.UNKNOWN_TYPE and str(err.value) == f"unknown server message: {text[:200]}"
    with pytest.raises(P.ProtocolError) as err:
        P.parse_server_message('{"type": "unit"}')
    assert err.value.code == P.ErrorCode.BAD_MESSAGE
    assert str(err.value).startswith("server message 'unit' is missing fields: ")


def test_start_transmit_is_parsed_with_its_defaults_and_bad_options_are_bad_settings():
    start = '{"type": "start", "sample_rate": 16000, "transmit": %s}'
    assert P.parse_client_message(start % "null").transmit is None
    assert P.parse_client_message(start % "{}").transmit == {"coder": "uniform", "packet_ms": 100, "resync_s": 5.0,
                                                              "durations": False, "termination": "packet"}
    with pytest.raises(P.ProtocolError) as err:
        P.parse_client_message(start % '{"nope": 1}')
    assert err.value.code == P.ErrorCode.BAD_SETTINGS
    assert str(err.value) == "start.transmit: unknown transmit option 'nope'; known: coder, packet_ms, resync_s, durations, termination"


def test_bitstream_frames_round_trip_and_malformed_ones_are_bad_messages():
    assert P.encode_bitstream_frame("header", b"h") == b"\x02\x00h"
    assert P.encode_bitstream_frame("packet", b"xy") == b"\x02\x01xy"
    assert P.decode_bitstream_frame(b"\x02\x01xy") == P.BitstreamFrame("packet", b"xy")
    assert P.decode_server_binary(b"\x02\x00h") == P.BitstreamFrame("header", b"h")
    chunk = P.decode_server_binary(P.encode_audio_chunk(3, 160, b"\x00\x40"))
    assert isinstance(chunk, P.AudioChunk) and (chunk.seq, chunk.start_sample) == (3, 160)
    for bad in (b"\x02\x01", b"\x02\x02z", b"\x03\x00z"):
        with pytest.raises(P.ProtocolError) as err:
            P.decode_bitstream_frame(bad)
        assert err.value.code == P.ErrorCode.BAD_MESSAGE
        assert str(err.value) == f"binary server frame of {len(bad)} bytes is not a bitstream frame"
