// The live units protocol, generated from dpslm_stream/protocol/ by `python -m dpslm_stream.protocol_ts`.
// Do not edit: change dpslm_stream/protocol/ and regenerate (`npm run generate`); tests/test_protocol_ts.py
// checks that this file equals the generator's output. docs/protocol.md explains every message for people.
export const PROTOCOL_VERSION = 2;
export const SUPPORTED_VERSIONS = [1, 2];
/** the session WebSocket */
export const WS_PATH = "/v1/stream";
export const HEALTH_PATH = "/healthz";
export const METRICS_PATH = "/metrics";
export const PAGE_PATH = "/";
/** browsers cannot set WebSocket headers: ?token=... */
export const TOKEN_QUERY_PARAM = "token";
/** samples in binary frames at start.sample_rate */
export const PCM_FORMATS = ["pcm16", "float32"];
/** every start.format (opus: compressed, sendEncoded) */
export const SAMPLE_FORMATS = ["pcm16", "float32", "opus"];
export const BYTES_PER_SAMPLE = { "pcm16": 2, "float32": 4 };
/** start.container of format opus */
export const OPUS_CONTAINERS = ["auto", "ogg", "webm", "raw"];
/** Opus is decoded at this rate whatever start.sample_rate says */
export const OPUS_SAMPLE_RATE = 48000;
/** WavLM frames (and unit boundaries) per second of audio */
export const FRAME_RATE = 50;
export const ENCODER_MODES = ["full", "sliding", "cached"];
export const SUBSCRIBE_FORMATS = ["units", "bitstream"];
/** the server refuses larger text frames */
export const MAX_TEXT_BYTES = 16384;
export const MAX_JSON_DEPTH = 8;
/** binary server frame: resynthesized audio chunk */
export const AUDIO_FRAME_KIND = 1;
/** Python struct layout: kind u8 | 3 zero bytes | seq u32 | start_sample u64, little-endian */
export const AUDIO_HEADER_FORMAT = "<B3xIQ";
export const AUDIO_HEADER_BYTES = 16;
export const RESYNTH_SAMPLE_RATE = 24000;
/** binary server frame: kind u8 | part u8 | .dpsu bytes */
export const BITSTREAM_FRAME_KIND = 2;
export const BITSTREAM_PARTS = ["header", "packet"];
/** Stable error codes of ``error`` messages (and of the ``dpslm_errors_total`` metric). The value is the code. */
export const ErrorCode = {
    BAD_JSON: "bad_json",
    BAD_MESSAGE: "bad_message",
    UNKNOWN_TYPE: "unknown_type",
    UNSUPPORTED_VERSION: "unsupported_version",
    BAD_SAMPLE_RATE: "bad_sample_rate",
    UNKNOWN_MODEL: "unknown_model",
    BAD_SETTINGS: "bad_settings",
    UNSUPPORTED_OPTION: "unsupported_option",
    UNKNOWN_SESSION: "unknown_session",
    NOT_A_SENDER: "not_a_sender",
    NOT_STARTED: "not_started",
    ALREADY_STARTED: "already_started",
    AFTER_END: "after_end",
    BAD_AUDIO: "bad_audio",
    NON_FINITE: "non_finite",
    MESSAGE_TOO_LARGE: "message_too_large",
    BUFFER_FULL: "buffer_full",
    IDLE_TIMEOUT: "idle_timeout",
    START_TIMEOUT: "start_timeout",
    SESSION_TIME_LIMIT: "session_time_limit",
    SHUTTING_DOWN: "shutting_down",
    BUSY: "busy",
    CLIENT_TOO_SLOW: "client_too_slow",
    INTERNAL_ERROR: "internal_error",
    SENDER_GONE: "sender_gone",
    RESYNTH_BEHIND: "resynth_behind",
    RESYNTH_LIMIT: "resynth_limit",
    RESUME_FAILED: "resume_failed",
    UNAUTHORIZED: "unauthorized",
    FORBIDDEN_ORIGIN: "forbidden_origin",
};
export const CLOSE_GOING_AWAY = 1001;
export const CLOSE_INTERNAL = 1011;
export const CLOSE_INVALID_DATA = 1007;
export const CLOSE_NORMAL = 1000;
export const CLOSE_POLICY = 1008;
export const CLOSE_TOO_BIG = 1009;
export const CLOSE_TRY_AGAIN = 1013;
/** The WebSocket close code of each fatal error code (the others are not fatal). */
export const CLOSE_CODES = {
    buffer_full: 1008,
    idle_timeout: 1008,
    start_timeout: 1008,
    session_time_limit: 1008,
    client_too_slow: 1008,
    shutting_down: 1001,
    busy: 1013,
    internal_error: 1011,
    unknown_session: 1008,
    sender_gone: 1001,
    resume_failed: 1008,
};
export const FATAL_CODES = new Set(Object.keys(CLOSE_CODES));
/** Codes that are fatal only sometimes (the error message's `fatal` says), with their close code. */
export const CLOSE_CODES_WHEN_FATAL = {
    bad_audio: 1007,
};
export const SERVER_MESSAGE_TYPES = ["ready", "unit", "stats", "error", "end", "resumed", "ack"];
/** fields every server message of a type carries (a parser checks them) */
export const SERVER_REQUIRED_FIELDS = { "ready": ["session", "settings", "limits", "models", "random_weights", "server"], "unit": ["seq", "unit", "start_frame", "end_frame", "start_s", "end_s", "commit_audio_s", "lag_s"], "stats": ["elapsed_s", "audio_s", "processed_s", "buffered_s", "units", "units_per_s", "bitrate", "rtf", "lag_s", "lag_p95_s", "loglikelihood", "state_nbytes"], "error": ["code", "message"], "end": ["reason", "units", "num_frames", "audio_s", "stats"], "resumed": ["samples", "next_seq"], "ack": ["samples"] };
