"""The live link without a server: Transmitter (wall-clock packets) -> channel -> Receiver."""

import pytest

from dpslm_stream.codec import TableModel, UniformModel, fit_table
from dpslm_stream.codec.channel import Channel
from dpslm_stream.codec.link import Receiver, TransmitOptions, Transmitter
from dpslm_stream.errors import InvalidInput
from tests.test_codec import K, _markov_units


def _run(model_factory, options, units, channel=None):
    model = model_factory()
    tx = Transmitter(options.header(K, 600, model), model, t0=100.0)
    rx = Receiver(lambda h: model_factory(), channel)
    rx.on_header(tx.header_bytes())
    sent_at, delivered, now = {}, [], 100.0
    for i, u in enumerate(units):
        now += 0.037  # a commit every 37 ms; before it, the owner ticks at every deadline that passed
        while tx.next_deadline() <= now:
            t = tx.next_deadline()
            for p in tx.tick(t):
                delivered += [(t, got) for got in rx.on_packet(p, t)]
        for p in tx.on_units([u], [1] if options.durations else None, now):
            delivered += [(now, got) for got in rx.on_packet(p, now)]
        sent_at[i] = now
    for p in tx.finish(now + 1):
        rx.on_packet(p, now + 1)
    rx.drain()
    return tx, rx, sent_at, delivered


def test_options_are_validated():
    assert TransmitOptions.from_json({"coder": "ulm", "packet_ms": 40, "resync_s": 2}).resync_s == 2
    for bad in ({"coder": "gzip"}, {"packet_ms": 10}, {"packet_ms": 100.0}, {"durations": 1}, {"resync_s": -1},
                {"bogus": 1}, [], {"resync_s": float("nan")}):  # fmt: skip
        with pytest.raises(InvalidInput):
            TransmitOptions.from_json(bad)


@pytest.mark.parametrize("termination", ["packet", "segment"])
@pytest.mark.parametrize("packet_ms", [20, 100, 200])
def test_units_cross_the_link_exactly_and_within_one_packet_interval(packet_ms, termination):
    """Packet termination: every unit decodes within one packet interval of its commit. Segment termination: every
    packet still leaves at its deadline, and a unit decodes as soon as the bytes received fix it: within a few
    units (and at the latest with its segment's terminating packet, due when the segment's last interval ends)."""
    units = _markov_units(300, seed=1)
    table = fit_table([units], K)
    opts = TransmitOptions(coder="table", packet_ms=packet_ms, resync_s=1.0, durations=True, termination=termination)
    tx, rx, sent_at, delivered = _run(lambda: TableModel(table), opts, units)
    assert rx.stream.units == units and rx.stream.segments == [units]
    assert rx.decoder.report.ended and rx.decoder.report.packets_lost == 0
    i, lags = 0, []
    for t, got in delivered:
        for _ in got.units:
            lags.append(t - sent_at[i])
            i += 1
    if termination == "packet":
        assert max(lags) <= packet_ms / 1000 + 1e-9
    else:
        assert max(lags) <= 1.0 + packet_ms / 1000 + 1e-9  # at the latest when its resync segment ends
        assert max(lags) > packet_ms / 1000
    stats = tx.stats(100.0 + 300 * 0.037)
    assert stats["units"] == 300 and stats["payload_bps"] > 0 and stats["authors_bitrate"] > 0


@pytest.mark.parametrize("termination", ["packet", "segment"])
def test_a_lossy_jittery_channel_loses_only_whole_segments_and_says_so(termination):
    units = _markov_units(2000, seed=2)
    opts = TransmitOptions(coder="uniform", packet_ms=60, resync_s=0.5, termination=termination)
    channel = Channel(loss=0.05, burst=2.0, jitter_ms=80, seed=3)
    tx, rx, _, _ = _run(lambda: UniformModel(K), opts, units, channel)
    rep = rx.report()
    assert rep["channel"]["packets_dropped"] > 0
    assert rep["receiver"]["packets_lost"] <= rep["channel"]["packets_dropped"]  # trailing losses are unseen
    text = " " + " ".join(map(str, units)) + " "
    for seg in rx.stream.segments:
        assert " " + " ".join(map(str, seg)) + " " in text
    assert 0 < len(rx.stream.units) < len(units)
    assert len(rx.stream.segments) > 1 and sum(rx.stream.gaps_before[1:]) > 0
    assert rep["receiver"]["units_decoded"] == len(rx.stream.units) and rep["receiver"]["units_lost_known"] > 0
