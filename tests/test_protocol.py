"""The wire protocol module: strict client-message validation (each malformed input gets its own code), lenient
server-message parsing, exact audio frame conversions, and that the browser page and docs agree with the module."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpslm_stream import protocol as P

ROOT = Path(__file__).resolve().parent.parent
E = P.ErrorCode


def start(**fields) -> str:
    return json.dumps({"type": "start", "sample_rate": 16000, **fields})


def code_of(text) -> E:
    with pytest.raises(P.ProtocolError) as info:
        P.parse_client_message(text)
    return info.value.code


def test_start_defaults_and_full_form():
    msg = P.parse_client_message(start())
    assert msg == P.Start(sample_rate=16000, format="pcm16", k=None, lmbda=None, preset="low-latency", score=False,
                          options={}, version=P.PROTOCOL_VERSION)  # fmt: skip
    full = P.parse_client_message(start(sample_rate=44100, format="float32", k=100, lmbda=600, preset="quality",
                                        score=True, options={"mode": "full", "left": 50, "hop": None}, version=1))  # fmt: skip
    assert (full.sample_rate, full.format, full.k, full.lmbda, full.preset, full.score) == \
        (44100, "float32", 100, 600, "quality", True)  # fmt: skip
    assert full.options == {"mode": "full", "left": 50}  # null options mean "the preset's value" and are dropped
    assert P.parse_client_message('{"type": "end"}') == P.End()


@pytest.mark.parametrize(
    "text, code",
    [
        ("{not json", E.BAD_JSON),
        ("[1, 2]", E.BAD_JSON),
        ('"start"', E.BAD_JSON),
        ('{"type": "hello"}', E.UNKNOWN_TYPE),
        ('{"sample_rate": 16000}', E.UNKNOWN_TYPE),  # no type at all
        ('{"type": "subscribe", "session": "x"}', E.BAD_MESSAGE),  # token missing
        ('{"type": "subscribe", "session": 3, "token": "t"}', E.BAD_MESSAGE),
        ('{"type": "subscribe", "session": "x", "token": "t", "version": 1, "resynth": {}}', E.UNSUPPORTED_OPTION),
        ('{"type": "subscribe", "session": "x", "token": "t", "resynth": {"holdback": "2"}}', E.BAD_MESSAGE),
        ('{"type": "subscribe", "session": "x", "token": "t", "channel": 2}', E.BAD_MESSAGE),
        ('{"type": "end", "now": true}', E.BAD_MESSAGE),
        ('{"type": "start"}', E.BAD_MESSAGE),  # sample_rate missing
        (start(sample_rate="16000"), E.BAD_SAMPLE_RATE),
        (start(sample_rate=True), E.BAD_SAMPLE_RATE),
        (start(sample_rate=16000.5), E.BAD_SAMPLE_RATE),
        (start(sample_rate=7999), E.BAD_SAMPLE_RATE),
        (start(sample_rate=48001), E.BAD_SAMPLE_RATE),
        (start(sample_rate=10**12), E.BAD_SAMPLE_RATE),
        (start(sample_rate=-16000), E.BAD_SAMPLE_RATE),
        (start(format="mp3"), E.BAD_MESSAGE),
        (start(format=None), E.BAD_MESSAGE),
        (start(k="500", lmbda=4500), E.BAD_MESSAGE),
        (start(k=500.0, lmbda=4500), E.BAD_MESSAGE),
        (start(score="yes"), E.BAD_MESSAGE),
        (start(preset=3), E.BAD_MESSAGE),
        (start(options=[]), E.BAD_MESSAGE),
        (start(options={"window": 3}), E.BAD_MESSAGE),
        (start(options={"left": "many"}), E.BAD_MESSAGE),
        (start(options={"mode": "turbo"}), E.BAD_SETTINGS),
        (start(version=3), E.UNSUPPORTED_VERSION),
        (start(version="1"), E.BAD_MESSAGE),
        (start(resynth={"greedy": True}, version=1), E.UNSUPPORTED_OPTION),  # resynthesis is protocol version 2
        (start(resynth=[]), E.BAD_MESSAGE),
        (start(resynth={"holdback": 1.5}), E.BAD_MESSAGE),
        (start(resynth={"greedy": "yes"}), E.BAD_MESSAGE),
        (start(resynth={"top_p": float("nan")}), E.BAD_MESSAGE),  # json.loads takes NaN; the field check does not
        (start(resynth={"colour": 1}), E.BAD_MESSAGE),
        (start(colour="blue"), E.BAD_MESSAGE),
    ],
)
def test_malformed_client_messages_get_their_code(text, code):
    assert code_of(text) == code


def test_resynth_and_subscribe_parse_to_their_dataclasses():
    msg = P.parse_client_message(start(resynth={"left_context": None, "holdback": 2, "greedy": False, "seed": 7,
                                                "top_p": 0.9}))  # fmt: skip
    assert msg.resynth == {"left_context": None, "holdback": 2, "greedy": False, "seed": 7, "top_p": 0.9}
    assert P.parse_client_message(start()).resynth is None
    sub = P.parse_client_message('{"type": "subscribe", "session": "abc", "token": "t0k"}')
    assert sub == P.Subscribe(session="abc", token="t0k", resynth={}, version=P.PROTOCOL_VERSION)
    assert P.parse_client_message('{"type": "subscribe", "session": "a", "token": "b", "resynth": null}').resynth is None


def test_audio_chunk_frames_round_trip():
    rng = np.random.default_rng(0)
    pcm = (rng.uniform(-1, 1, 2400) * 32767).astype("<i2").tobytes()
    frame = P.encode_audio_chunk(7, 123456789012, pcm)
    assert len(frame) == 16 + len(pcm) and frame[0] == P.AUDIO_FRAME_KIND and frame[1:4] == b"\0\0\0"
    chunk = P.decode_audio_chunk(frame)
    assert chunk.seq == 7 and chunk.start_sample == 123456789012
    assert chunk.start_s == pytest.approx(123456789012 / 24000)
    np.testing.assert_array_equal(chunk.samples, np.frombuffer(pcm, "<i2").astype(np.float32) / 32768)
    for bad in (b"", frame[:15], frame + b"x", bytes([9]) + frame[1:]):
        with pytest.raises(P.ProtocolError):
            P.decode_audio_chunk(bad)


def test_messages_say_what_is_expected():
    with pytest.raises(P.ProtocolError, match="spelled 'lmbda'"):
        P.parse_client_message(start(k=500, **{"lambda": 4500}))
    with pytest.raises(P.ProtocolError, match=r"\[8000, 48000\]"):
        P.parse_client_message(start(sample_rate=96000))
    assert isinstance(P.ProtocolError(E.BAD_JSON, "x"), ValueError)  # InvalidInput is a ValueError


def _server_messages():
    return [
        P.Ready(session="abc", settings={"k": 500, "lmbda": 4500, "mode": "cached"}, limits={"max_buffer_s": 5.0},
                models="tiny", random_weights=True, server="dpslm-stream 0.1.0"),
        P.Unit(seq=3, unit=17, start_frame=10, end_frame=14, start_s=0.2, end_s=0.28, commit_audio_s=0.5, lag_s=0.31,
               logprob=-2.5),
        P.Unit(seq=0, unit=0, start_frame=0, end_frame=1, start_s=0.0, end_s=0.02, commit_audio_s=0.1, lag_s=0.0),
        P.Stats(elapsed_s=1.0, audio_s=1.0, processed_s=0.9, buffered_s=0.1, units=20, units_per_s=20.0, bitrate=150.0,
                rtf=0.4, lag_s=None, lag_p95_s=None, loglikelihood=None, state_nbytes=1234),
        P.Error(code="busy", message="full", fatal=True, retry_after_s=5.0),
        P.EndMessage(reason="end", units=3, num_frames=50, audio_s=1.0, stats={"units": 3}),
    ]  # fmt: skip


@pytest.mark.parametrize("msg", _server_messages(), ids=lambda m: m.TYPE)
def test_server_messages_round_trip(msg):
    text = P.to_json(msg)
    assert json.loads(text)["type"] == msg.TYPE
    assert P.parse_server_message(text) == msg


def test_server_parsing_ignores_new_fields_and_rejects_unknown_types():
    unit = json.loads(P.to_json(_server_messages()[1]))
    assert P.parse_server_message(json.dumps({**unit, "from_the_future": 1})) == _server_messages()[1]
    with pytest.raises(P.ProtocolError):
        P.parse_server_message('{"type": "audio", "seq": 0}')  # a v2 message an old client cannot use
    with pytest.raises(P.ProtocolError):
        P.parse_server_message('{"type": "unit", "seq": 0}')  # fields missing
    with pytest.raises(ValueError):  # NaN is not JSON: the server must never emit it
        P.to_json(dataclasses.replace(_server_messages()[1], logprob=float("nan")))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-32768, 32767), min_size=1, max_size=400))
def test_pcm16_frames_are_exact(values):
    pcm = np.array(values, dtype="<i2").tobytes()
    samples = P.decode_audio(pcm, "pcm16")
    np.testing.assert_array_equal(samples, np.array(values, dtype=np.float32) / 32768)
    assert P.encode_audio(samples, "pcm16") == pcm


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=400))
def test_float32_frames_are_exact(values):
    x = np.array(values, dtype=np.float32)
    np.testing.assert_array_equal(P.decode_audio(P.encode_audio(x, "float32"), "float32"), x)


@pytest.mark.parametrize(
    "data, fmt, code",
    [
        (b"", "pcm16", E.BAD_AUDIO),
        (b"\x00\x01\x02", "pcm16", E.BAD_AUDIO),
        (b"\x00" * 6, "float32", E.BAD_AUDIO),
        (np.array([0.1, np.nan], dtype="<f4").tobytes(), "float32", E.NON_FINITE),
        (np.array([np.inf], dtype="<f4").tobytes(), "float32", E.NON_FINITE),
    ],
)
def test_bad_audio_frames(data, fmt, code):
    with pytest.raises(P.ProtocolError) as info:
        P.decode_audio(data, fmt)
    assert info.value.code == code


def test_error_and_close_codes_are_consistent():
    values = [c.value for c in E]
    assert len(values) == len(set(values))
    assert all(re.fullmatch(r"[a-z_]+", v) for v in values)
    for close in P.CLOSE_CODES.values():  # a close code a server may send (RFC 6455 §7.4.1)
        assert 1000 <= close <= 1015 and close not in (1004, 1005, 1006, 1015)
    # docs/protocol.md's table of error codes says which are fatal and with which close code: the two must agree,
    # both ways (a fatal code missing from CLOSE_CODES, or documented with another close code, fails).
    doc = (ROOT / "docs" / "protocol.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (yes|no) \|\s*(\d*)\s*\|", doc, re.M)
    assert {code for code, _, _ in rows} >= {c.value for c in P.CLOSE_CODES}
    assert len(rows) >= len(E) - 2  # every code but the two HTTP refusals has a row with a fatal column
    for code, fatal, close in rows:
        assert (E(code) in P.CLOSE_CODES) == (fatal == "yes"), code
        if fatal == "yes":
            assert close == str(P.CLOSE_CODES[E(code)]), code


def test_browser_page_mirrors_the_protocol():
    """The page runs on the TypeScript client (its compiled modules in client/web; the protocol module is generated
    from this one, tests/test_protocol_ts.py): it takes the protocol's names from there and handles every message."""
    app = (ROOT / "client" / "web" / "app.js").read_text()
    imports = dict(re.findall(r'import \{([^}]*)\} from "\./(\w+)\.js";', app)[i][::-1] for i in range(3))
    assert {"WS_PATH", "HEALTH_PATH"} <= {n.strip() for n in imports["protocol"].split(",")}
    assert "UnitsClient" in imports["client"]
    assert not re.search(r"const (PROTOCOL_VERSION|WS_PATH|HEALTH_PATH) =", app)  # no second copy of the protocol
    for module in imports:
        assert (ROOT / "client" / "web" / f"{module}.js").is_file(), module
    handled = set(re.findall(r'case "(\w+)":', app))
    # ready is connect()'s answer; the others come from the client's iterator (audio and bitstream: binary frames)
    assert handled >= {c.TYPE for c in (P.Unit, P.Stats, P.Error, P.EndMessage)} | {"audio", "bitstream"}


def test_docs_cover_every_code_and_message():
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for code in E:
        assert f"`{code.value}`" in doc, f"docs/protocol.md does not document error code {code.value}"
    for cls in (P.Start, P.Subscribe, P.Ready, P.Unit, P.Stats, P.Error, P.EndMessage):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"docs/protocol.md does not document {cls.TYPE}.{f.name}"
    for close in set(P.CLOSE_CODES.values()) | set(P.CLOSE_CODES_WHEN_FATAL.values()) | {P.CLOSE_NORMAL,
                                                                                           P.CLOSE_TOO_BIG}:
        assert str(close) in doc
