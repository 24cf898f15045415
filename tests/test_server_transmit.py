"""start.transmit through the live server: the session's unit bitstream as binary frames, bitstream listeners, and
the `receive` client; 8 concurrent senders decode exactly with every coder and both terminations, the table coder
with the server's --transmit-table (tiny RANDOM-weight set: plumbing)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from dpslm_stream import protocol as P
from dpslm_stream.client import ListenerClient, UnitsClient, chunked
from dpslm_stream.codec import BitstreamError, Header, fit_table
from dpslm_stream.codec.cli import ModelCache
from dpslm_stream.codec.link import Receiver
from dpslm_stream.errors import InvalidInput
from dpslm_stream.hub import ModelSet
from dpslm_stream.server.app import Server, ServerConfig, ServerThread
from dpslm_stream.tiny import speech_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CACHE = ModelCache(ModelSet("tiny"))


def _table(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return fit_table([rng.integers(0, k, size=2000).tolist()], k, order=2)


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tables") / "k500.dpst"
    _table(500).save(path)
    return path


@pytest.fixture(scope="module")
def server(table_file):
    config = ServerConfig(port=0, models="tiny", max_sessions=40, idle_timeout_s=30, transmit_tables=(str(table_file),))
    with ServerThread(config, resynth=None) as srv:
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


def test_eight_concurrent_transmitting_senders_decode_exactly(server, table_file):
    wavs = [speech_like(2.0, seed=s).astype(np.float32) for s in range(8)]
    coders = ["ulm", "table", "uniform", "table", "ulm", "uniform", "table", "ulm"]
    terminations = ["packet", "segment"] * 4
    packet_ms = [20, 60, 100, 200, 60, 20, 40, 100]

    async def main():
        return await asyncio.gather(*[
            _session(server.url, w, {"coder": c, "packet_ms": p, "resync_s": 1.0, "termination": t})
            for w, c, t, p in zip(wavs, coders, terminations, packet_ms)])  # fmt: skip

    results = asyncio.run(main())
    for res, coder, termination, p in zip(results, coders, terminations, packet_ms):
        assert res["units"], "no units"
        own, rx = _decode([f for f, _ in res["frames"]])
        assert own == res["units"], coder  # the sender's own bitstream
        heard, rx2 = _decode(res["listener_frames"])
        assert heard == res["units"], coder  # the listener's copy, decoded on its batch-1 path
        assert rx.decoder.report.ended and rx.decoder.report.packets_lost == 0
        assert rx.header.coder == coder and rx.header.packet_ms == p and rx.header.termination == termination
        if coder == "table":  # the server's table travels inside the header
            assert rx.header.table == table_file.read_bytes()
        final = res["end"].stats["transmit"]  # the end message's stats carry the link's figures
        assert final["units"] == len(res["units"]) and final["payload_bps"] > 0 and final["authors_bitrate"] > 0


def test_transmit_options_and_bitstream_subscriptions_are_checked(server):
    async def main():
        sender = UnitsClient(server.url, sample_rate=16000, transmit={"coder": "gzip"})
        with pytest.raises(Exception, match="transmit.coder"):
            await sender.connect()
        sender = UnitsClient(server.url, sample_rate=16000, transmit={"coder": "ulm", "termination": "never"})
        with pytest.raises(Exception, match="transmit.termination"):
            await sender.connect()
        # The server's only table is for k=500: a table-coded session of the k=100 pair is refused.
        sender = UnitsClient(server.url, sample_rate=16000, k=100, lmbda=600, transmit={"coder": "table"})
        with pytest.raises(Exception, match="tables for k=500, none for k=100"):
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
    table = tmp_path / "table.json"  # the table coder, segment termination: the receiver needs no table file
    assert main([*common[:-6], "--coder", "table", "--termination", "segment", "--json", str(table)]) == 0
    doc = json.loads(table.read_text())
    assert doc["exact"] and doc["header"]["coder"] == "table" and doc["header"]["termination"] == "segment"
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


def test_transmit_tables_are_checked_at_startup(tmp_path, table_file):
    """A table for a K the server does not serve, two tables for one K, or a file that is not a table: a clear error
    before the server listens."""
    other = tmp_path / "k77.dpst"
    _table(77).save(other)
    junk = tmp_path / "junk.dpst"
    junk.write_bytes(b"not a table")
    for tables, match in (((str(other),), "k=77, but this server serves k=100, 500"),
                          ((str(table_file), str(table_file)), "a second table for k=500"),
                          ((str(junk),), "not a unit table"),
                          ((str(tmp_path / "missing.dpst"),), "cannot read")):  # fmt: skip
        with pytest.raises(InvalidInput, match=match):
            Server(ServerConfig(port=0, models="tiny", transmit_tables=tables), resynth=None)


def test_a_table_stream_with_another_table_or_a_wrong_table_hash_is_refused(server):
    """The header names the table by its hash: a header whose inline table is another one (CRC recomputed), or a
    receiver holding another table, is a 'wrong model' error, never other units."""
    import struct
    import zlib

    wav = speech_like(1.5, seed=2).astype(np.float32)
    res = asyncio.run(_session(server.url, wav, {"coder": "table", "packet_ms": 60}, listen=False))
    frames = [f for f, _ in res["frames"]]
    units, _ = _decode(frames)
    assert units == res["units"]
    header = Header.parse(frames[0].data)[0]
    swapped = Header(**{**header.__dict__, "table": _table(500, seed=1).to_bytes()}).to_bytes()
    with pytest.raises(BitstreamError, match="wrong model"):
        Receiver(CACHE.for_header).on_header(swapped)
    body = bytearray(frames[0].data[:-4])
    body[20:36] = bytes(16)  # another hash for the same inline table
    with pytest.raises(BitstreamError, match="wrong model"):
        Receiver(CACHE.for_header).on_header(bytes(body) + struct.pack(">I", zlib.crc32(bytes(body))))


def test_a_session_shorter_than_its_transmitters_open_still_gets_every_unit_in_the_bitstream():
    """The ulm coder's first use of a pair loads its unit LM (seconds at released size). Units committed meanwhile
    wait in the session core and go to the transmitter once it is open; the session's end waits for its END packet.
    Here the load takes 1.5 s and the whole session 0.5 s of audio: before, it ended with no bitstream at all."""
    from dpslm_stream.stream.worker import EncoderWorker
    from tests.test_pair_budget import RecordingSet

    models = RecordingSet("tiny", slow=((100, 600),), delay_s=1.5)
    cfg = ServerConfig(port=0, models="tiny", warmup=False, resynth=False)
    wav = speech_like(0.5, seed=12).astype(np.float32)

    async def main(url):
        async with UnitsClient(url, sample_rate=16000, k=100, lmbda=600, transmit={"coder": "ulm"}) as c:
            msgs = [m async for m in c.stream(chunked(wav, 16000, 100.0), realtime=False)]
        return msgs

    with ServerThread(cfg, encoder=EncoderWorker(models)) as srv:
        msgs = asyncio.run(asyncio.wait_for(main(srv.url), 60))
    units = [int(m.unit) for m in msgs if isinstance(m, P.Unit)]
    frames = [m for m in msgs if isinstance(m, P.BitstreamFrame)]
    assert units and frames and frames[0].part == "header" and isinstance(msgs[-1], P.EndMessage)
    assert [r[1] for r in models.loads if r[0] == "ulm"] == [(100, 600)]  # the load did happen, and took 1.5 s
    decoded, rx = _decode(frames)
    assert decoded == units and rx.decoder.report.ended and msgs[-1].stats["transmit"]["units"] == len(units)
