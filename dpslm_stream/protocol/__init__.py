"""The one wire protocol of the live units server: every message, field, error code, close code and version, defined
once. The server (dpslm_stream.server) and every client (dpslm_stream.client; the TypeScript client and the browser page
through clients/typescript/src/protocol.ts, generated from this module by dpslm_stream.protocol_ts) use these
definitions; docs/protocol.md explains them for people.

The definitions live in three modules of this package, by role: ``messages`` (versions, paths, formats, error and
close codes, every message as a dataclass; server messages parsed leniently), ``client_parse`` (client messages parsed
strictly, bounded before parsing) and ``frames`` (binary audio and bitstream frames). Import the package: every public
name is here.

A session is one WebSocket connection to ``WS_PATH``:

    client                                   server
    start (JSON)                    ->
                                    <-       ready (JSON: session id, resolved settings, limits)
    audio (binary frames, PCM16 or float32 little-endian mono at the declared rate)
                                    <-       unit (JSON, seq 0, 1, 2, ... never reordered or dropped)
                                    <-       stats (JSON, about once a second)
                                    <-       audio (binary, 24 kHz PCM16 with a 16-byte header; start.resynth only)
    end (JSON)                      ->
                                    <-       the remaining units (and audio), then end (JSON), then close 1000

A sender's connection that drops without a close handshake is parked by the server for ``ready.resume_grace_s``;
a new connection sends ``resume`` (token, the first unit seq and the audio sample it lacks), gets ``resumed`` (the
input sample to resend from), the units and audio it missed, and the session goes on; ``ack`` tells the client
which of its audio the server has accepted (docs/protocol.md).

A listener (the low-bitrate link's receiving side) opens its own connection and sends ``subscribe`` with a sender's
session id and listen token (both in the sender's ``ready``); it receives the sender's units from then on and audio
resynthesized from those units alone, then ``end`` when the sender's stream is over.

Errors are JSON ``error`` messages with a stable ``code`` (see ``ErrorCode``), a human ``message`` and ``fatal``:
a non-fatal error rejects one message and the session goes on; after a fatal one the server delivers the units it
can still produce, sends ``end`` and closes with the close code of ``CLOSE_CODES``.

Version 2 added live resynthesis (``start.resynth``, binary audio frames, the resynth fields of ``stats`` and
``end``) and listener mode (``subscribe``). The parser checks ``version`` (``SUPPORTED_VERSIONS``; any other value is
``unsupported_version``) and refuses a resynthesis request in a version-1 message (``unsupported_option``); beyond
that the server answers both versions with the same messages (``ready.version`` is the server's), so a version-1
client ignores the fields it does not know.
"""

from .messages import (  # noqa: F401
    Ack, AUDIO_FRAME_KIND, AUDIO_HEADER, BYTES_PER_SAMPLE, ClientMessage, close_code, CLOSE_CODES,
    CLOSE_CODES_WHEN_FATAL, CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_INVALID_DATA, CLOSE_NORMAL, CLOSE_POLICY,
    CLOSE_TOO_BIG, CLOSE_TRY_AGAIN, ENCODER_MODES, End, EndMessage, Error, ErrorCode, FRAME_RATE, HEALTH_PATH,
    MAX_RESUME_TOKEN_CHARS, METRICS_PATH, OPUS_CONTAINERS, OPUS_SAMPLE_RATE, PAGE_PATH, parse_server_message,
    PCM_FORMATS, PROTOCOL_VERSION, ProtocolError, Ready, Resume, Resumed, RESYNTH_NULLABLE, RESYNTH_OPTIONS,
    RESYNTH_SAMPLE_RATE, SAMPLE_FORMATS, ServerMessage, Start, START_OPTIONS, Stats, Subscribe, SUBSCRIBE_FORMATS,
    SUPPORTED_VERSIONS, to_json, TOKEN_QUERY_PARAM, Unit, WS_PATH,
)
from .client_parse import (  # noqa: F401
    json_depth_exceeds, MAX_JSON_DEPTH, MAX_TEXT_BYTES, parse_client_message,
)
from .frames import (  # noqa: F401
    AudioChunk, BITSTREAM_FRAME_KIND, BITSTREAM_PARTS, BitstreamFrame, decode_audio, decode_audio_chunk,
    decode_bitstream_frame, decode_server_binary, encode_audio, encode_audio_chunk, encode_bitstream_frame,
)
