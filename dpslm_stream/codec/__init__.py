"""Transmission of DP-SLM units: a versioned, packetized, entropy-coded bitstream (`.dpsu`), sans-I/O.

    format.py   header, packets, CRCs: bytes <-> dataclasses (docs/bitstream.md is the byte-level reference)
    entropy.py  deterministic integer frequencies (and the version-1 reader, constriction's range decoder)
    rangecoder.py  a byte-wise range coder handing out settled bytes, whose decoder knows when a symbol is fixed
    segment.py  one range code (a packet or a resync segment): bytes per packet, units each packet makes decodable
    tables.py   unigram/bigram count tables for the `table` coder: fit, serialize, hash
    models.py   the coders' probability models: uniform, table, ulm (batch-1 steps with a KV cache)
    packets.py  packetizer / depacketizer (packet intervals, resync points, loss accounting), whole streams
    channel.py  channel impairments between a sender and a receiver (loss, bursts, jitter), seeded
    cli.py      `dpslm-stream codec encode|decode|fit|eval`
"""

from dpslm_stream.codec.format import CODERS, BitstreamError, Header
from dpslm_stream.codec.models import TableModel, ULMModel, UniformModel, UnitModel
from dpslm_stream.codec.packets import (
    DecodedStream, PacketDecoder, PacketEncoder, ReceiverReport, decode_stream, encode_stream,
)  # fmt: skip
from dpslm_stream.codec.tables import UnitTable, fit_table

__all__ = [
    "CODERS", "BitstreamError", "Header", "TableModel", "ULMModel", "UniformModel", "UnitModel", "DecodedStream",
    "PacketDecoder", "PacketEncoder", "ReceiverReport", "decode_stream", "encode_stream", "UnitTable", "fit_table",
]  # fmt: skip
