"""The Opus uplink through the session core and a real server on 127.0.0.1 (tiny random-weight models: the units are
plumbing checks, not speech).

Oracle: the units of an Opus session equal the units of the same audio decoded offline by PyAV (``av.open`` on the
whole file; for raw packets, a fresh libavcodec decoder) and sent as float32 PCM at 48 kHz, and (mode full) the
offline pipeline's units of that audio. Malformed streams end in bad_audio errors, never anything else, while a
healthy session beside them is unaffected."""

from __future__ import annotations

import asyncio
import json
import random
import struct
from argparse import Namespace

import numpy as np
import pytest
import websockets

av = pytest.importorskip("av", reason="the Opus uplink needs PyAV (pip install 'dpslm-stream[opus]')")

from dpslm_stream import protocol as P  # noqa: E402
from dpslm_stream.client.stream import run as stream_run  # noqa: E402
from dpslm_stream.client.stream import stream_audio  # noqa: E402
from dpslm_stream.opus import OpusUplinkEncoder, decode_opus_file  # noqa: E402
from dpslm_stream.server import actions as A  # noqa: E402
from dpslm_stream.server.app import ServerConfig, ServerThread  # noqa: E402
from dpslm_stream.server.backends import EncoderSessionInfo  # noqa: E402
from dpslm_stream.server.session import ServerInfo, Session  # noqa: E402
from dpslm_stream.stream.events import EndEvent  # noqa: E402
from dpslm_stream.tiny import speech_like  # noqa: E402

from server_oracle import offline_units  # noqa: E402

E = P.ErrorCode
SR = 16000
OPUS_SR = P.OPUS_SAMPLE_RATE


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerConfig(port=0, models="tiny", max_sessions=40, idle_timeout_s=20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def wav() -> np.ndarray:
    return speech_like(3.0, SR, seed=11).astype(np.float32)


def opus_messages(wav: np.ndarray, container: str, bitrate: int = 24000) -> list[bytes]:
    """What the Python client sends for ``wav`` (the encoder is deterministic)."""
    enc = OpusUplinkEncoder(bitrate, container, input_rate=SR)
    out = []
    for i in range(0, len(wav), SR // 10):
        out += enc.push(wav[i : i + SR // 10])
    return out + enc.finish()


def decode_offline(messages: list[bytes], container: str) -> np.ndarray:
    """The oracle's audio: PyAV's demuxer on the whole file, or (raw) a decoder with a header of no pre-skip."""
    if container != "raw":
        return decode_opus_file(b"".join(messages))
    ctx = av.CodecContext.create("opus", "r")
    ctx.extradata = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 0, OPUS_SR, 0, 0)
    return np.concatenate([f.to_ndarray()[0] for m in messages for f in ctx.decode(av.Packet(m))])


async def raw_session(url: str, frames: list[bytes], start: dict) -> tuple[list[P.Unit], list[P.Error], P.EndMessage,
                                                                            int]:  # fmt: skip
    """Send start, the binary frames, end; return the units, errors, the end message and the close code."""
    async with websockets.connect(url, compression=None, max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        ready = P.parse_server_message(await asyncio.wait_for(ws.recv(), 60))
        assert isinstance(ready, P.Ready), ready

        async def send() -> None:
            try:
                for frame in frames:
                    await ws.send(frame)
                await ws.send('{"type":"end"}')
            except websockets.ConnectionClosed:
                pass  # ended by the server (a fatal error): the receiving side reports it

        sender = asyncio.create_task(send())
        units, errors = [], []
        while True:
            msg = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(msg, bytes):
                continue
            msg = P.parse_server_message(msg)
            if isinstance(msg, P.Unit):
                units.append(msg)
            elif isinstance(msg, P.Error):
                errors.append(msg)
            elif isinstance(msg, P.EndMessage):
                await ws.wait_closed()
                await sender
                return units, errors, msg, ws.close_code


def split_randomly(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, len(data) // 200)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@pytest.mark.parametrize("container", ["ogg", "webm", "raw"])
def test_opus_units_equal_the_decoded_audio_sent_as_pcm(server, wav, container):
    messages = opus_messages(wav, container)
    decoded = decode_offline(messages, container)
    # Ogg and WebM are byte streams: split them at random points; raw is one packet per frame by definition.
    frames = messages if container == "raw" else split_randomly(b"".join(messages), random.Random(3))
    opus = dict(format="opus", container=container if container != "ogg" else "auto", options={"mode": "full"})
    units, errors, end, close = asyncio.run(raw_session(server.url, frames, opus))
    assert errors == [] and end.reason == "end" and close == P.CLOSE_NORMAL
    pcm = P.encode_audio(decoded, "float32")
    pcm_frames = [pcm[i : i + 19200] for i in range(0, len(pcm), 19200)]  # 100 ms frames
    ref_units, ref_errors, ref_end, _ = asyncio.run(raw_session(server.url, pcm_frames, dict(
        format="float32", sample_rate=OPUS_SR, options={"mode": "full"})))  # fmt: skip
    assert [(u.unit, u.start_frame, u.end_frame) for u in units] == [(u.unit, u.start_frame, u.end_frame)
                                                                      for u in ref_units]  # fmt: skip
    assert end.audio_s == ref_end.audio_s == len(decoded) / OPUS_SR and ref_errors == []
    assert [u.unit for u in units] == offline_units(decoded, OPUS_SR)
    if container != "raw":
        assert len(decoded) == 3 * OPUS_SR  # pre-skip and end trimming: exactly the input's length


def test_stream_command_sends_opus_and_reports_the_uplink(server, wav, tmp_path, capsys):
    """`dpslm-stream stream FILE --format opus --opus-bitrate 24000`: the units are those of the decoded audio, and
    the uplink is printed (24 kbit/s instead of PCM16's 256 kbit/s)."""
    import soundfile as sf

    path = tmp_path / "speech.wav"
    sf.write(path, wav, SR, subtype="FLOAT")
    out = tmp_path / "units.json"
    args = Namespace(files=[path], url=server.url, token=None, k=None, lmbda=None, preset="low-latency", mode="full",
                     score=False, format="opus", opus_bitrate=24000, opus_container="ogg", pace="fast", chunk_ms=100.0,
                     json=out, quiet=True, resynth=False, resynth_options=None, audio_out=None, reconnect=True)  # fmt: skip
    assert stream_run(args) == 0
    doc = json.loads(out.read_text())
    decoded = decode_offline(opus_messages(wav, "ogg"), "ogg")
    assert doc["files"][str(path)]["units"] == offline_units(decoded, OPUS_SR)
    assert doc["stream"]["settings"]["format"] == "opus" and doc["stream"]["settings"]["sample_rate"] == OPUS_SR
    line = next(l for l in capsys.readouterr().err.splitlines() if "uplink" in l)
    nbytes = int(line.split("uplink ")[1].split()[0])
    assert nbytes == len(b"".join(opus_messages(wav, "ogg")))
    assert 15_000 < 8 * nbytes / 3.0 < 40_000  # about 24 kbit/s (VBR), against 256 kbit/s of PCM16 at 16 kHz
    # The same through the library: UnitsClient counts the bytes it sends, whatever the format.
    res = asyncio.run(stream_audio(server.url, wav, SR, format="pcm16", options={"mode": "full"}))
    assert res.uplink_bytes == 2 * len(wav)


def malformed_streams(wav: np.ndarray, rng: random.Random) -> dict[str, tuple[list[bytes], dict]]:
    ogg = b"".join(opus_messages(wav, "ogg", 16000))
    webm = b"".join(opus_messages(wav, "webm", 16000))
    flipped = bytearray(ogg)
    for _ in range(6):
        flipped[rng.randrange(200, len(flipped))] ^= 1 << rng.randrange(8)
    streams = {
        "truncated ogg": (split_randomly(ogg[: rng.randrange(len(ogg) // 3, len(ogg))], rng), {}),
        "truncated webm": (split_randomly(webm[: rng.randrange(len(webm) // 3, len(webm))], rng), {}),
        "bit flips": (split_randomly(bytes(flipped), rng), {}),
        "garbage ogg": ([ogg[:3000], rng.randbytes(3000)], {"container": "ogg"}),
        "garbage webm": ([rng.randbytes(2000)], {"container": "webm"}),
        "garbage raw": ([rng.randbytes(rng.randint(1, 400)) for _ in range(20)], {"container": "raw"}),
        "pcm as opus": ([P.encode_audio(wav[:4800], "pcm16")], {"container": "ogg"}),
        "six channels": ([_ogg_page(2, 0, [b"OpusHead" + struct.pack("<BBHIhB", 1, 6, 0, OPUS_SR, 0, 1) +
                                           bytes([4, 2, 0, 4, 1, 2, 3, 5])])], {}),  # fmt: skip
        "opus bomb": ([_bomb()], {}),
    }
    return streams


def _ogg_page(flags: int, granule: int, packets: list[bytes], seq: int = 0) -> bytes:
    from dpslm_stream.opus_framing import ogg_crc

    lacing = b"".join(bytes([255] * (len(p) // 255) + [len(p) % 255]) for p in packets)
    page = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, 9, seq, 0, len(lacing)) + lacing + b"".join(packets)
    return page[:22] + struct.pack("<I", ogg_crc(page)) + page[26:]


def _bomb() -> bytes:
    """1-byte packets of 60 ms each (SILK, no payload): 255 of them per page, 7 pages = 107 s of audio in 3.8 KB, in
    one message: more than the server's max_buffer_s (5 s) decoded from one message."""
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 0, OPUS_SR, 0, 0)
    tags = b"OpusTags" + struct.pack("<II", 0, 0)
    pages = [_ogg_page(2, 0, [head]), _ogg_page(0, 0, [tags], 1)]
    pages += [_ogg_page(0, -1, [bytes([3 << 3])] * 255, 2 + i) for i in range(7)]
    return b"".join(pages)


def test_malformed_opus_streams_end_in_bad_audio_and_other_sessions_are_unaffected(server, wav):
    rng = random.Random(20)
    streams = malformed_streams(wav, rng)

    async def victim():
        return await stream_audio(server.url, wav, SR, format="opus", options={"mode": "full"}, chunk_ms=100,
                                  realtime=True)  # fmt: skip

    async def main():
        v = asyncio.create_task(victim())
        results = await asyncio.gather(*(raw_session(server.url, frames, {"format": "opus", **fields})
                                         for frames, fields in streams.values()))  # fmt: skip
        return dict(zip(streams, results)), await v

    results, victim_result = asyncio.run(main())
    for name, (units, errors, end, close) in results.items():
        assert all(e.code == E.BAD_AUDIO.value and e.message for e in errors), (name, errors)
        fatal = [e for e in errors if e.fatal]
        if fatal:  # the decoder could not go on: the units of the audio decoded so far, end, close 1007
            assert end.reason == "bad_audio" and close == P.CLOSE_INVALID_DATA, name
        else:
            assert end.reason == "end" and close == P.CLOSE_NORMAL, name
        assert [u.seq for u in units] == list(range(len(units))) == list(range(end.units)), name
    for name in ("garbage ogg", "garbage webm", "pcm as opus", "six channels", "opus bomb"):
        assert results[name][3] == P.CLOSE_INVALID_DATA, name
    assert "more than 5 s" in results["opus bomb"][1][0].message
    assert any("ended inside" in e.message for e in results["truncated ogg"][1] + results["truncated webm"][1])
    # The healthy session beside them: exactly the units of its decoded audio.
    decoded = decode_offline(opus_messages(wav, "ogg"), "ogg")
    assert victim_result.errors == [] and [u.unit for u in victim_result.units] == offline_units(decoded, OPUS_SR)


# --- the session core ----------------------------------------------------------------------------------------------

FULL = EncoderSessionInfo(500, 4500, "full", 125, 10, 5, None)


def core(opus: bool = True) -> Session:
    server = ServerInfo("tiny", True, ((500, 4500),), (500, 4500), True, opus=opus)
    return Session("s1", ServerConfig(stats_interval_s=1000.0), server, now=0.0)


def sent(actions) -> list:
    return [P.parse_server_message(a.data) for a in actions if isinstance(a, A.Send) and isinstance(a.data, str)]


def test_a_server_without_pyav_refuses_opus():
    s = core(opus=False)
    out = sent(s.receive_text('{"type": "start", "format": "opus"}', 0.0))
    assert [m.code for m in out] == [E.UNSUPPORTED_OPTION.value] and "PyAV" in out[0].message


def test_core_decodes_opus_at_48_khz_and_a_bomb_ends_the_session(wav):
    s = core()
    out = s.receive_text('{"type": "start", "format": "opus", "container": "ogg"}', 0.0)
    assert [type(a) for a in out] == [A.OpenSession] and out[0].sample_rate == OPUS_SR
    ready = sent(s.opened(FULL, None, 0.0))[0]
    assert ready.settings["sample_rate"] == OPUS_SR and ready.settings["container"] == "ogg"
    assert ready.resume_token is None  # an Opus stream cannot be resent from a sample offset
    data = b"".join(opus_messages(wav, "ogg"))
    fed = [a for a in s.receive_binary(data, 0.1) if isinstance(a, A.FeedAudio)]
    assert len(fed) == 1 and np.array_equal(fed[0].samples, decode_opus_file(data))
    s2 = core()
    s2.receive_text('{"type": "start", "format": "opus"}', 0.0)
    s2.opened(FULL, None, 0.0)
    out = s2.receive_binary(_bomb(), 0.1)
    errors = [m for m in sent(out) if isinstance(m, P.Error)]
    assert [(e.code, e.fatal) for e in errors] == [(E.BAD_AUDIO.value, True)]
    assert not any(isinstance(a, A.FeedAudio) for a in out) and A.RequestEnd in [type(a) for a in out]
    end = s2.encoder_events([EndEvent(units=0, seconds=0.0, frames=0, bitrate=0.0)], s2.progress, 0.2)
    assert [a.code for a in end if isinstance(a, A.Close)] == [P.CLOSE_INVALID_DATA]


def test_core_counts_a_partial_page_in_its_state_and_reports_it_at_end(wav):
    s = core()
    s.receive_text('{"type": "start", "format": "opus"}', 0.0)
    s.opened(FULL, None, 0.0)
    data = b"".join(opus_messages(wav, "ogg"))
    s.receive_binary(data[: len(data) // 2], 0.1)  # ends inside a page
    pending = s.opus.state_nbytes
    assert 0 < pending < 65307 and s.stats(0.2).state_nbytes >= pending
    out = s.receive_text('{"type": "end"}', 0.3)
    errors = [m for m in sent(out) if isinstance(m, P.Error)]
    assert [(e.code, e.fatal) for e in errors] == [(E.BAD_AUDIO.value, False)]
    assert f"last {pending} bytes" in errors[0].message and A.RequestEnd in [type(a) for a in out]


class FakeSoundDevice:
    """sounddevice as the mic client uses it: one 48 kHz input device whose stream delivers ``wav`` in 20 ms blocks
    (from a thread, as PortAudio's callback does), then silence is not sent: the stream just stops delivering."""

    PortAudioError = RuntimeError

    def __init__(self, wav: np.ndarray):
        self.wav = wav

    def query_devices(self, device=None, kind=None) -> dict:
        return {"name": "fake", "index": 0, "max_input_channels": 1, "default_samplerate": float(OPUS_SR)}

    def InputStream(self, *, device, channels, samplerate, dtype, blocksize, callback):  # noqa: N802 (the API's name)
        import contextlib
        import threading

        wav = self.wav

        def deliver() -> None:
            for i in range(0, len(wav), blocksize):
                block = wav[i : i + blocksize]
                callback(block[:, None].copy(), len(block), None, None)

        @contextlib.contextmanager
        def stream():
            thread = threading.Thread(target=deliver, daemon=True)
            thread.start()
            yield
            thread.join()

        return stream()


def test_mic_command_sends_opus(server, wav, tmp_path, monkeypatch, capsys):
    """`dpslm-stream mic --format opus` with a fake 48 kHz input device: the units are those of the captured audio
    Opus-coded and decoded (the encoder's frames do not depend on the capture blocks), and the summary reports the
    uplink bytes."""
    from dpslm_stream.client import mic

    captured = speech_like(2.0, OPUS_SR, seed=12).astype(np.float32)
    monkeypatch.setattr(mic, "import_sounddevice", lambda: FakeSoundDevice(captured))
    out = tmp_path / "mic.json"
    args = Namespace(url=server.url, token=None, k=None, lmbda=None, preset="low-latency", mode="full", score=False,
                     format="opus", opus_bitrate=24000, opus_container="ogg", reconnect=True, device=None,
                     list_devices=False, seconds=3.0, block_ms=20.0, json=out, resynth=False, resynth_options=None,
                     output_device=None, jitter_ms=150.0)  # fmt: skip
    assert mic.run(args) == 0
    enc = OpusUplinkEncoder(24000, "ogg")
    decoded = decode_opus_file(b"".join(enc.push(captured) + enc.finish()))
    assert json.loads(out.read_text())["files"]["microphone"]["units"] == offline_units(decoded, OPUS_SR)
    summary = capsys.readouterr().out
    assert "uplink" in summary and "bytes of opus audio" in summary
