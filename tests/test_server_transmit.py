"""start.transmit through the live server: the session's unit bitstream as binary frames, bitstream listeners, and
the `receive` client; 8 concurrent senders decode exactly (tiny RANDOM-weight set: plumbing)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from dpslm_stream import protocol as P
from dpslm_stream.client import ListenerClient, UnitsClient, chunked
from dpslm_stream.codec.cli import ModelCache
from dpslm_stream.codec.link import Receiver
from dpslm_stream.hub import ModelSet
from dpslm_stream.server.app import ServerConfig, ServerThread
from dpslm_stream.tiny import speech_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CACHE = ModelCache(ModelSet("tiny"))


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerConfig(port=0, models="tiny", max_sessions=40, idle_timeout_s=30), resynth=None) as srv:
        yield srv


async def _session(url: str, wav: np.ndarray, transmit: dict, listen: bool = True) -> dict:
    # score=True: the server's worker batches the sessions' ULM scoring; the coder's own batch-1 steps must not care.
    sender = UnitsClient(url, sample_rate=16000, transmit=transmit, score=True)
    ready = await sender.connect()
    out = {"units": [], "frames": [], "listener_frames": [], "stats": []}
    listener = None
    if listen:
        listener = ListenerClient(url, session=ready.session, listen_token=ready.listen_token, format="bitstream")
        await listener.connect()

    async def send():
        async for msg in sender.stream(chunked(wav, 16000, 100.0)):
            if isinstance(msg, P.Unit):
                out["units"].append(int(msg.unit))
                assert msg.logprob is not None
            elif isinstance(msg, P.BitstreamFrame):
                out["frames"].append((msg, asyncio.get_running_loop().time()))
            elif isinstance(msg, P.Stats):
                out["stats"].append(msg)

    async def receive():
        async for msg in listener:
            if isinstance(msg, P.BitstreamFrame):
                out["listener_frames"].append(msg)

    await asyncio.gather(send(), *([receive()] if listen else []))
    out["end"] = sender.end_message
    return out


def _decode(frames) -> tuple[list[int], Receiver]:
    rx = Receiver(CACHE.for_header)
    for f in frames:
        if f.part == "header":
            rx.on_header(f.data)
        else:
            rx.on_packet(f.data, 0.0)
    rx.drain()
    return rx.stream.units, rx


def test_eight_concurrent_transmitting_senders_decode_exactly(server):
    wavs = [speech_like(2.0, seed=s).astype(np.float32) for s in range(8)]
    coders = ["ulm", "uniform"] * 4

    async def main():
        return await asyncio.gather(*[_session(server.url, w, {"coder": c, "packet_ms": 60, "resync_s": 1.0})
                                      for w, c in zip(wavs, coders)])  # fmt: skip

    results = asyncio.run(main())
    for res, coder in zip(results, coders):
        assert res["units"], "no units"
        own, rx = _decode([f for f, _ in res["frames"]])
        assert own == res["units"], coder  # the sender's own bitstream
        heard, rx2 = _decode(res["listener_frames"])
        assert heard == res["units"], coder  # the listener's copy, decoded on its batch-1 path
        assert rx.decoder.report.ended and rx.decoder.report.packets_lost == 0
        assert rx.header.coder == coder and rx.header.packet_ms == 60
        final = res["end"].stats["transmit"]  # the end message's stats carry the link's figures
        assert final["units"] == len(res["units"]) and final["payload_bps"] > 0 and final["authors_bitrate"] > 0


def test_transmit_options_and_bitstream_subscriptions_are_checked(server):
    async def main():
        sender = UnitsClient(server.url, sample_rate=16000, transmit={"coder": "gzip"})
        with pytest.raises(Exception, match="transmit.coder"):
            await sender.connect()
        plain = UnitsClient(server.url, sample_rate=16000)
        ready = await plain.connect()
        listener = ListenerClient(server.url, session=ready.session, listen_token=ready.listen_token, format="bitstream")
        with pytest.raises(Exception, match="does not transmit"):
            await listener.connect()
        await plain.close()

    asyncio.run(main())


def test_receive_cli_decodes_and_resynthesizes_on_its_side_with_and_without_loss(server, tmp_path, tiny_dir, capsys):
    import soundfile as sf

    from dpslm_stream.cli import main

    clip = tmp_path / "clip.wav"
    sf.write(clip, speech_like(3.0, seed=5).astype(np.float32), 16000)
    common = ["receive", "--url", server.url, "--send", str(clip), "--pace", "fast", "--models", str(tiny_dir),
              "--coder", "ulm", "--packet-ms", "40", "--resync-s", "0.5"]  # fmt: skip
    out = tmp_path / "clean.json"
    assert main([*common, "--json", str(out), "--audio-out", str(tmp_path / "rx.wav")]) == 0
    doc = json.loads(out.read_text())
    assert doc["exact"] and doc["units_lost"] == 0 and doc["receiver"]["packets_lost"] == 0
    wav, sr = sf.read(tmp_path / "rx.wav")
    assert sr == 24000 and len(wav) > 0
    lossy = tmp_path / "lossy.json"
    assert main([*common, "--json", str(lossy), "--loss", "0.3", "--burst", "2", "--jitter-ms", "30", "--seed", "4"]) == 0
    doc = json.loads(lossy.read_text())
    assert doc["channel"]["packets_dropped"] > 0 and doc["segments_match_sender"]
    assert doc["units_lost"] > 0 and not doc["exact"]
    said = capsys.readouterr().out
    assert "lost" in said and "channel:" in said


def test_session_core_transmit_wiring_without_sockets():
    """The core hands units to the transmitter, asks for a tick at the packet deadline, sends the frames it gets
    back (and relays them), and ends only after the END packet; listeners hear of the end after it."""
    from dpslm_stream.server import actions as A
    from dpslm_stream.server.backends import Progress
    from tests.test_session_core import end_event, kinds, sent, session, start, unit

    s = session()
    out = start(s, transmit={"coder": "uniform", "packet_ms": 100})
    assert s.transmit["coder"] == "uniform"
    out = s.transmit_opened(b"HDR", 0.1)
    assert sent(out) == [P.encode_bitstream_frame("header", b"HDR")] and A.RelayBits("header", b"HDR") in out
    out = s.encoder_events([unit(0, 10)], Progress(), 0.2)
    tx = [a for a in out if isinstance(a, A.Transmit)]
    assert len(tx) == 1 and tx[0].units == (0,) and tx[0].durations is None and tx[0].at == 0.2
    out = s.transmitted([], 0.3, {"payload_bps": 1.0}, False, 0.2)  # the transmitter says: packet due at 0.3
    assert s.next_deadline() == 0.3
    assert [a for a in s.tick(0.3) if isinstance(a, A.TransmitTick)] == [A.TransmitTick(0.3)]
    out = s.transmitted([b"P0"], float("inf"), {"payload_bps": 2.0}, False, 0.31)
    assert sent(out) == [P.encode_bitstream_frame("packet", b"P0")] and A.RelayBits("packet", b"P0") in out
    # The stream ends: the transmitter finishes first; end and ListenersDone wait for its last packet.
    s.receive_text('{"type": "end"}', 0.4)
    out = s.encoder_events([end_event(10)], Progress(finished=True), 0.5)
    assert A.TransmitEnd(0.5) in out and A.ListenersDone(gone=False) not in out
    assert not any(isinstance(m, P.EndMessage) for m in sent(out))
    out = s.transmitted([b"END"], float("inf"), {"payload_bps": 3.0}, True, 0.6)
    msgs = sent(out)
    assert msgs[0] == P.encode_bitstream_frame("packet", b"END") and isinstance(msgs[-1], P.EndMessage)
    assert A.ListenersDone(gone=False) in out and msgs[-1].stats["transmit"] == {"payload_bps": 3.0}
    assert kinds(out)[-1] is A.Close


def test_a_bitstream_listener_joining_late_decodes_from_the_next_resync_point(server):
    wav = speech_like(4.0, seed=9).astype(np.float32)

    async def main():
        sender = UnitsClient(server.url, sample_rate=16000, transmit={"coder": "ulm", "packet_ms": 40, "resync_s": 0.5})
        ready = await sender.connect()
        sent: list[int] = []
        heard: list = []

        async def send():
            async for msg in sender.stream(chunked(wav, 16000, 100.0), realtime=True):
                if isinstance(msg, P.Unit):
                    sent.append(int(msg.unit))

        async def listen():
            while len(sent) < 10:  # join once the stream is well under way
                await asyncio.sleep(0.05)
            listener = ListenerClient(server.url, session=ready.session, listen_token=ready.listen_token,
                                      format="bitstream")  # fmt: skip
            await listener.connect()
            async for msg in listener:
                if isinstance(msg, P.BitstreamFrame):
                    heard.append(msg)

        await asyncio.gather(send(), listen())
        return sent, heard

    sent, heard = asyncio.run(main())
    assert heard[0].part == "header"
    units, rx = _decode(heard)
    assert 0 < len(units) < len(sent)
    assert " ".join(map(str, units)) in " ".join(map(str, sent)) and sent[-len(units):] == units
    assert rx.decoder.report.resyncs >= 1  # decoding began at a RESYNC packet (earlier ones, if any, were skipped)
    assert rx.decoder.report.ended and rx.decoder.report.packets_damaged == 0
