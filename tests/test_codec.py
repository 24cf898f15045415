"""The unit bitstream without the ULM: integer frequencies, range-coded packets, format, tables, loss, bad input."""

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpslm_stream.codec import (
    BitstreamError, Header, PacketDecoder, TableModel, UniformModel, UnitTable, decode_stream, encode_stream,
    fit_table,
)  # fmt: skip
from dpslm_stream.codec.channel import Channel
from dpslm_stream.codec.entropy import TOTAL, RangeReader, encode_packet, frequencies_from_logits, frequencies_from_weights
from dpslm_stream.codec.tables import read_unit_sequences
from dpslm_stream.errors import InvalidInput

K = 100


def _markov_units(n, seed=0, k=K):
    """Units from a peaked random bigram chain, so the table coder has something to learn."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(k, 0.05), size=k)
    u, out = 0, []
    for _ in range(n):
        u = int(rng.choice(k, p=trans[u]))
        out.append(u)
    return out


def _commits(units, seed=0, dur=True):
    """One commit per unit, 20-120 ms apart; durations 1..80 frames (a few escapes past 63)."""
    rng = random.Random(seed)
    t, out = 0, []
    for u in units:
        t += rng.randint(20, 120)
        out.append(([u], [rng.choice([1, 2, 3, 5, 9, 70])] if dur else None, t))
    return out


@pytest.fixture(scope="module")
def table():
    return fit_table([_markov_units(3000, seed=s) for s in range(3)], K, order=2)


def _header(model, **kw):
    kw = {"k": K, "lmbda": 600, "packet_ms": 100, "resync_ms": 2000, "durations": True, **kw}
    return Header(coder=model.coder, model_hash=model.model_hash, **kw)


# --- integer frequencies and packets ----------------------------------------------------------------------------------


@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=600))
@settings(max_examples=60, deadline=None)
def test_frequencies_have_a_floor_an_exact_total_and_follow_the_logits(logits):
    f = frequencies_from_logits(np.array(logits, dtype=np.float32))
    assert f.dtype == np.int64 and f.min() >= 1 and int(f.sum()) == TOTAL
    x = np.array(logits, dtype=np.float32)
    i, j = int(np.argmax(x)), int(np.argmin(x))
    assert f[i] + len(f) >= f[j]  # equal on the grid, the rounding remainder (< K) goes to the lowest id
    assert np.array_equal(f, frequencies_from_logits(np.array(logits, dtype=np.float32)))  # deterministic


def test_frequencies_match_the_softmax_closely():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=500) * 3
    p = np.exp(logits - logits.max())
    p /= p.sum()
    q = frequencies_from_logits(logits) / TOTAL
    assert np.sum(p * np.log2(p / q)) < 0.002  # KL in bits per symbol: the grid costs next to nothing


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_a_packet_decodes_to_its_symbols_and_costs_at_most_two_bytes_over_its_information(data):
    k = data.draw(st.integers(2, 1000))
    n = data.draw(st.integers(1, 30))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    freqs = [frequencies_from_logits(rng.normal(size=k) * rng.uniform(0, 6)) for _ in range(n)]
    symbols = [int(rng.integers(k)) for _ in range(n)]
    payload = encode_packet(freqs, symbols)
    reader = RangeReader(payload)
    assert [reader.decode(f) for f in freqs] == symbols
    information = -sum(math.log2(f[s] / TOTAL) for f, s in zip(freqs, symbols))
    assert 8 * len(payload) <= information + 16


def test_weights_scale_down_without_overflow():
    f = frequencies_from_weights(np.array([2**60, 1, 0, 2**40], dtype=np.int64))
    assert int(f.sum()) == TOTAL and f.min() >= 1 and f[0] > f[3] > f[1]


# --- header and format ------------------------------------------------------------------------------------------------


def test_header_round_trips_and_rejects_damage():
    h = Header(k=500, lmbda=4500, coder="table", packet_ms=40, resync_ms=3000, model_hash=bytes(range(16)),
               durations=True, table=b"xyz")  # fmt: skip
    data = h.to_bytes()
    assert Header.parse(data + b"rest") == (h, len(data))
    with pytest.raises(BitstreamError, match="magic"):
        Header.parse(b"RIFF" + data[4:])
    with pytest.raises(BitstreamError, match="version 9"):
        Header.parse(data[:4] + b"\x09" + data[5:])
    for i in range(5, len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(BitstreamError):
            Header.parse(bytes(bad))
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            Header.parse(data[:n])


@pytest.mark.parametrize("packet_ms", [20, 60, 200])
def test_uniform_and_table_streams_round_trip(table, packet_ms):
    units = _markov_units(400, seed=7)
    commits = _commits(units)
    for model in (UniformModel(K), TableModel(table), TableModel(fit_table([units], K, order=1))):
        header = _header(model, packet_ms=packet_ms)
        data, stats = encode_stream(header, model, commits)
        out = decode_stream(data, lambda h: model)
        assert out.units == units and out.durations == [c[1][0] for c in commits]
        assert out.report.units_decoded == len(units) and out.report.ended
        assert stats.packets == out.report.packets_received and out.report.packets_lost == 0
        assert stats.resyncs == out.report.resyncs >= 2
        # Every packet leaves at the end of its interval: each carries units of one interval only.
        assert stats.packets <= len({t // packet_ms for _, _, t in commits}) + 1


def test_units_are_sent_within_one_packet_interval_of_their_commit(table):
    from dpslm_stream.codec.packets import PacketEncoder

    model = TableModel(table)
    enc = PacketEncoder(_header(model, packet_ms=80), model)
    dec = PacketDecoder(_header(model, packet_ms=80), TableModel(table))
    pending = {}  # unit index -> commit time
    got, i, clock = [], 0, 0
    for units, durs, t in _commits(_markov_units(200, seed=3)):
        for tick in range(clock, t + 1, 10):  # the sender's clock advances every 10 ms
            clock = tick + 10
            for p in enc.advance(tick):
                decoded = dec.push(p).units
                for _ in decoded:
                    assert tick - pending.pop(len(got)) <= 80 + 10
                    got.append(_)
        pending[i] = t
        i += 1
        for p in enc.push(units, durs, t):
            got += dec.push(p).units
    for p in enc.finish():
        got += dec.push(p).units
    assert len(got) == 200


def test_efficiency_payload_is_within_one_percent_and_32_bits_per_terminated_segment(table):
    units = _markov_units(3000, seed=11)
    for model in (UniformModel(K), TableModel(table)):
        # One termination per resync segment: packets as long as the resync period.
        header = _header(model, packet_ms=200, resync_ms=200, durations=False)
        commits = [([u], None, 40 * i) for i, u in enumerate(units)]  # 25 units/s, 5 per packet
        _, stats = encode_stream(header, model, commits)
        assert stats.payload_bits <= stats.ideal_bits * 1.01 + 32 * stats.resyncs
        # Shorter packets inside longer resync segments: one termination per packet (measured ~2.3 bits).
        header = _header(model, packet_ms=40, resync_ms=5000, durations=False)
        _, stats = encode_stream(header, model, commits)
        assert stats.payload_bits <= stats.ideal_bits * 1.01 + 16 * stats.packets


# --- tables -----------------------------------------------------------------------------------------------------------


def test_table_file_round_trips_and_hashes_its_content(table, tmp_path):
    path = tmp_path / "t.dpst"
    table.save(path)
    back = UnitTable.load(path)
    assert back.k == K and np.array_equal(back.unigram, table.unigram) and np.array_equal(back.bigram, table.bigram)
    assert back.model_hash == table.model_hash
    other = fit_table([_markov_units(100, seed=99)], K)
    assert other.model_hash != table.model_hash
    with pytest.raises(BitstreamError):
        UnitTable.from_bytes(b"not a table")


def test_units_are_read_from_corpus_output_json_and_text(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "units.txt").write_text("spk1/a 1 2 3\nspk1/b 4 5\n")
    (tmp_path / "u.json").write_text('{"files": {"x.wav": {"units": [7, 8]}}}')
    (tmp_path / "bare.txt").write_text("9 10 11\n\n")
    assert read_unit_sequences(tmp_path / "corpus") == [[1, 2, 3], [4, 5]]
    assert read_unit_sequences(tmp_path / "u.json") == [[7, 8]]
    assert read_unit_sequences(tmp_path / "bare.txt") == [[9, 10, 11]]
    with pytest.raises(InvalidInput):
        fit_table([[1, 200]], K)


# --- bad input --------------------------------------------------------------------------------------------------------


def test_wrong_table_or_k_is_a_clear_error(table):
    units = _markov_units(50)
    model = TableModel(table)
    data, _ = encode_stream(_header(model), model, _commits(units))
    other = TableModel(fit_table([_markov_units(500, seed=5)], K))
    with pytest.raises(BitstreamError, match="wrong model"):
        decode_stream(data, lambda h: other)
    with pytest.raises(BitstreamError, match="k=100 units but the table model has k=50"):
        decode_stream(data, lambda h: TableModel(fit_table([[1, 2]], 50)))
    with pytest.raises(BitstreamError, match="coded with 'table'"):
        decode_stream(data, lambda h: UniformModel(K))


def test_every_truncation_and_every_bit_flip_is_an_error_or_the_exact_units(table):
    units = _markov_units(40, seed=2)
    model = TableModel(table)
    data, _ = encode_stream(_header(model, packet_ms=100), model, _commits(units, seed=2))
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            decode_stream(data[:n], lambda h: model)
    rng = random.Random(0)
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        try:
            out = decode_stream(bytes(bad), lambda h: model)
        except BitstreamError:
            continue
        assert out.units == units  # a flip the CRC misses would have to leave the units intact
    # Lossy decoding of the same damage never raises past the header and only returns true segments.
    text = " ".join(map(str, units))
    header_len = len(_header(model).to_bytes())
    for pos in range(header_len, len(data), 3):
        bad = bytearray(data)
        bad[pos] ^= 0x55
        out = decode_stream(bytes(bad), lambda h: model, strict=False)
        for seg in out.segments:
            assert " ".join(map(str, seg)) in text


def test_packets_lost_on_a_channel_cost_only_their_resync_segments(table):
    units = _markov_units(1500, seed=4)
    model = TableModel(table)
    header = _header(model, packet_ms=60, resync_ms=1000)
    from dpslm_stream.codec.packets import PacketEncoder

    enc = PacketEncoder(header, model)
    sent = []  # (packet bytes, units in it)
    for us, ds, t in _commits(units, seed=4):
        for p in enc.push(us, ds, t):
            sent.append(p)
    sent += enc.finish()
    # Units per sent packet, from a clean decode.
    clean = PacketDecoder(header, TableModel(table))
    per_packet = [clean.push(p).units for p in sent]
    assert sum(per_packet, []) == units
    for burst in (None, 3.0):
        channel = Channel(loss=0.1, burst=burst, seed=1)
        dec = PacketDecoder(header, TableModel(table))
        delivered = [p for i, p in enumerate(sent) for _ in channel.send(p, i * 60)]
        seqs_delivered = {int.from_bytes(p[:2], "big") for p in delivered}
        results = [dec.push(p) for p in delivered]
        rep = dec.report
        assert rep.packets_lost == channel.report.packets_dropped > 0
        assert rep.packets_damaged == 0
        # A packet decodes iff every packet from its segment's resync packet up to it arrived; then exactly.
        resync_of = []
        last = 0
        for i, p in enumerate(sent):
            if p[2] & 1:
                last = i
            resync_of.append(last)
        for r in results:
            i = r.seq
            intact = all(j in seqs_delivered for j in range(resync_of[i], i + 1))
            assert (r.status == "ok") == intact
            if r.status == "ok":
                assert r.units == per_packet[i]
        assert rep.units_decoded + rep.units_lost_known <= len(units)
        assert rep.units_decoded == sum(len(r.units) for r in results)
        assert rep.recoveries >= 1


def test_channel_is_seeded_keeps_order_and_hits_its_mean_loss():
    a = Channel(loss=0.3, burst=4.0, jitter_ms=50, seed=9)
    b = Channel(loss=0.3, burst=4.0, jitter_ms=50, seed=9)
    pa = [a.send(bytes([i % 256]), i * 20.0) for i in range(20000)]
    assert pa == [b.send(bytes([i % 256]), i * 20.0) for i in range(20000)]
    times = [t for got in pa for t, _ in got]
    assert times == sorted(times) and a.report.max_delay_ms >= 40
    assert 0.27 < a.report.packets_dropped / 20000 < 0.33
    with pytest.raises(InvalidInput):
        Channel(loss=1.5)


def test_huge_counts_and_hostile_tables_are_handled():
    big = UnitTable(3, np.array([2**40, 2**41, 1], dtype=np.int64), np.array([[2**40, 5, 0], [0, 0, 2**41], [1, 1, 1]], dtype=np.int64))
    model = TableModel(big)
    model.advance(1)
    f = model.frequencies()
    assert int(f.sum()) == 1 << 24 and f[2] > f[0] >= 1
    import struct
    import zlib

    bomb = zlib.compress(b"DPST" + struct.pack(">BBH", 1, 2, 65535) + bytes(10))  # a K x K bigram table: refused
    with pytest.raises(BitstreamError):
        UnitTable.from_bytes(bomb)
    with pytest.raises(BitstreamError, match="larger than"):
        UnitTable.from_bytes(zlib.compress(bytes(300 << 20), 9))
