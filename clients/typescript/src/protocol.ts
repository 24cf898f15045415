// The live units protocol, generated from dpslm_stream/protocol/ by `python -m dpslm_stream.protocol_ts`.
// Do not edit: change dpslm_stream/protocol/ and regenerate (`npm run generate`); tests/test_protocol_ts.py
// checks that this file equals the generator's output. docs/protocol.md explains every message for people.

export const PROTOCOL_VERSION = 2;
export const SUPPORTED_VERSIONS = [1, 2] as const;
/** the session WebSocket */
export const WS_PATH = "/v1/stream";
export const HEALTH_PATH = "/healthz";
export const METRICS_PATH = "/metrics";
export const PAGE_PATH = "/";
/** browsers cannot set WebSocket headers: ?token=... */
export const TOKEN_QUERY_PARAM = "token";
/** samples in binary frames at start.sample_rate */
export const PCM_FORMATS = ["pcm16", "float32"] as const;
/** every start.format (opus: compressed, sendEncoded) */
export const SAMPLE_FORMATS = ["pcm16", "float32", "opus"] as const;
export type SampleFormat = (typeof SAMPLE_FORMATS)[number];
export const BYTES_PER_SAMPLE = {"pcm16": 2, "float32": 4} as const;
/** start.container of format opus */
export const OPUS_CONTAINERS = ["auto", "ogg", "webm", "raw"] as const;
/** Opus is decoded at this rate whatever start.sample_rate says */
export const OPUS_SAMPLE_RATE = 48000;
/** WavLM frames (and unit boundaries) per second of audio */
export const FRAME_RATE = 50;
export const ENCODER_MODES = ["full", "sliding", "cached"] as const;
export const SUBSCRIBE_FORMATS = ["units", "bitstream"] as const;
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
export const BITSTREAM_PARTS = ["header", "packet"] as const;
export type BitstreamPart = (typeof BITSTREAM_PARTS)[number];

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
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

export const CLOSE_GOING_AWAY = 1001;
export const CLOSE_INTERNAL = 1011;
export const CLOSE_INVALID_DATA = 1007;
export const CLOSE_NORMAL = 1000;
export const CLOSE_POLICY = 1008;
export const CLOSE_TOO_BIG = 1009;
export const CLOSE_TRY_AGAIN = 1013;
/** The WebSocket close code of each fatal error code (the others are not fatal). */
export const CLOSE_CODES: Readonly<Partial<Record<ErrorCode, number>>> = {
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
export const FATAL_CODES: ReadonlySet<string> = new Set(Object.keys(CLOSE_CODES));
/** Codes that are fatal only sometimes (the error message's `fatal` says), with their close code. */
export const CLOSE_CODES_WHEN_FATAL: Readonly<Partial<Record<ErrorCode, number>>> = {
  bad_audio: 1007,
};

/** start.options: encoder overrides (null = the preset's value). */
export interface StartOptions {
  mode?: string | null;
  left?: number | null;
  hop?: number | null;
  lookahead?: number | null;
  max_lag?: number | null;
}
/** start.resynth / subscribe.resynth options (docs/protocol.md). */
export interface ResynthOptions {
  left_context?: number | null;
  holdback?: number | null;
  first_holdback?: number | null;
  greedy?: boolean;
  seed?: number | null;
  temperature?: number;
  top_p?: number;
  trigger_units?: number;
  trigger_s?: number | null;
  vocoder_left_context?: number | null;
  vocoder_lookahead?: number;
}
/** start.transmit: the unit bitstream's coder and packets. */
export interface TransmitOptions {
  coder?: string;
  packet_ms?: number;
  resync_s?: number;
  durations?: boolean;
  termination?: string;
}

/** Client -> server, first message: the stream's format and the model/encoder settings it wants. */
export interface Start {
  type: "start";
  /** input rate in Hz (any integer in [8000, 48000]; the server resamples to 16 kHz); opus: 48000 */
  sample_rate: number;
  /** "pcm16" (int16 little-endian), "float32" (IEEE little-endian), mono; or "opus" */
  format?: string;
  /** codebook size; None = the server's default pair */
  k?: number | null;
  /** DPDP duration penalty; None = the server's default pair */
  lmbda?: number | null;
  /** window preset of the streaming encoder (low-latency, balanced, quality) */
  preset?: string;
  /** add ULM log-probabilities to units */
  score?: boolean;
  /** encoder overrides: mode, left, hop, lookahead, max_lag */
  options?: StartOptions;
  /** live resynthesis: audio back from the units (RESYNTH_OPTIONS); None = off */
  resynth?: ResynthOptions | null;
  version?: number;
  /** the unit bitstream as binary frames (TRANSMIT_OPTIONS; BitstreamFrame); None = off */
  transmit?: TransmitOptions | null;
  /** format "opus" only: OPUS_CONTAINERS (default "auto") */
  container?: string | null;
}

/** Client -> server: end of the audio stream. The server sends every remaining unit, then ``end``, then closes. */
export interface End {
  type: "end";
}

/** Client -> server, first message of a listener: receive a running session's units and resynthesized audio. */
export interface Subscribe {
  type: "subscribe";
  /** the sender's session id (its ready.session) */
  session: string;
  /** the sender's ready.listen_token */
  token: string;
  /** RESYNTH_OPTIONS for the listener's own resynthesis; None = units only */
  resynth?: ResynthOptions | null;
  version?: number;
  /** "units" (JSON unit messages) or "bitstream" (the sender's BitstreamFrames; resynth must be null) */
  format?: string;
}

/** Client -> server, first message of a new connection that takes over a session whose connection dropped. */
export interface Resume {
  type: "resume";
  /** the session's ready.resume_token */
  token: string;
  /** the first unit seq the client has not received */
  next_seq: number;
  /** resynthesized 24 kHz samples the client has received */
  audio_samples?: number;
  /** input sample the client's resent audio starts at (<= resumed.samples); None: there */
  resend_from?: number | null;
  version?: number;
}

/** Server -> client, answer to start: the session id and every setting as resolved by the server. */
export interface Ready {
  type: "ready";
  session: string;
  /** sample_rate, format, k, lmbda, preset, mode, left, hop, lookahead, max_lag, score, frame_rate */
  settings: Record<string, unknown>;
  /** max_session_s, max_full_s, idle_timeout_s, max_message_bytes, max_buffer_s, stall_timeout_s */
  limits: Record<string, unknown>;
  /** the model set's source ("release", "tiny", a folder) */
  models: string;
  /** True for the tiny set: units are plumbing checks, not speech */
  random_weights: boolean;
  /** "dpslm-stream <version>" */
  server: string;
  version: number;
  /** "sender" (start) or "listener" (subscribe) */
  role: string;
  /** sender only: what a listener passes in subscribe (share it with the session id) */
  listen_token: string | null;
  /** sender only: what a reconnecting client passes in resume; None: cannot resume */
  resume_token: string | null;
  /** how long the server keeps a session whose connection dropped (0: not at all) */
  resume_grace_s: number;
}

/** Server -> client: one committed (final) deduplicated unit. ``seq`` counts 0, 1, 2, ... per session. */
export interface Unit {
  type: "unit";
  seq: number;
  unit: number;
  /** first 20 ms frame of the unit's run */
  start_frame: number;
  /** one past its last frame */
  end_frame: number;
  /** start_frame / 50 */
  start_s: number;
  end_s: number;
  /** seconds of input audio the encoder had consumed when it committed the unit */
  commit_audio_s: number;
  /** wall-clock commit lag: send time minus arrival time of the audio up to end_s */
  lag_s: number;
  /** ULM log p(unit | previous units), natural log; None unless start.score */
  logprob: number | null;
}

/** Server -> client, about once a second while audio flows, and inside ``end``. */
export interface Stats {
  type: "stats";
  /** wall time since ready */
  elapsed_s: number;
  /** input audio received */
  audio_s: number;
  /** input audio handed to the encoder */
  processed_s: number;
  /** received but not yet encoded (the bounded buffer) */
  buffered_s: number;
  /** units committed so far */
  units: number;
  /** units / audio seconds committed */
  units_per_s: number;
  /** N_units * H(unigram of this session's units) / seconds (bit/s, ZeroSyl's definition) */
  bitrate: number;
  /** this session's share of model time per second of audio (< 1: cheaper than real time) */
  rtf: number;
  /** commit lag of the latest unit */
  lag_s: number | null;
  /** 95th percentile of the commit lag over the session so far */
  lag_p95_s: number | null;
  /** sum of the units' logprobs (score=true only) */
  loglikelihood: number | null;
  /** streaming state held for this session (encoder + server buffers); bounded */
  state_nbytes: number;
  /** resynthesized audio sent (24 kHz); None without resynthesis */
  resynth_audio_s: number | null;
  /** how long the oldest unit without audio has waited (grows if not real time) */
  resynth_lag_s: number | null;
  /** resynthesis compute per second of audio made (> 1: slower than real time) */
  resynth_rtf: number | null;
  /** sender: listeners subscribed now */
  listeners: number;
  /** start.transmit: packets, payload_bps, on_wire_bps, ideal_bps, authors_bitrate... */
  transmit: Record<string, unknown> | null;
  /** sender: what its encoder runs in (exact/fast, = ready.settings.precision) */
  precision: string | null;
  /** what its resynthesis runs in (= ready.settings.resynth.precision) */
  resynth_precision: string | null;
}

/** Server -> client: ``code`` (ErrorCode value), a message that says what was wrong and what is expected. */
export interface ErrorMessage {
  type: "error";
  code: string;
  message: string;
  /** True: the session ends (remaining units, then end, then close) */
  fatal: boolean;
  /** for busy */
  retry_after_s: number | null;
}

/** Server -> client, last message of a session: why it ended and the session's totals. */
export interface EndMessage {
  type: "end";
  /** "end" (client asked), or the ErrorCode value that ended it (idle_timeout, shutting_down, ...) */
  reason: string;
  /** number of unit messages sent (the last seq + 1) */
  units: number;
  /** 20 ms frames of the whole stream */
  num_frames: number;
  audio_s: number;
  /** the final Stats fields */
  stats: StatsFields;
  /** DPDP decisions forced by max_lag (0: the units are exactly offline DPDP's) */
  forced_commits: number;
  /** resynthesis totals (units, codec_frames, audio_seconds, chunks, latencies, rtf, error) */
  resynth: Record<string, unknown> | null;
}

/** Server -> client, answer to resume: units from ``next_seq`` and audio from resume.audio_samples follow; the client resends its input audio from sample ``samples`` on. */
export interface Resumed {
  type: "resumed";
  /** input samples (per channel, at the start's sample rate) the server has accepted */
  samples: number;
  next_seq: number;
}

/** Server -> client: input samples accepted so far (the client may drop the audio it keeps for a resend below). */
export interface Ack {
  type: "ack";
  samples: number;
}

/** The final stats inside the end message: the stats fields without their type. */
export type StatsFields = Omit<Stats, "type">;
export type ClientMessage = Start | End | Subscribe | Resume;
export type ServerMessage = Ready | Unit | Stats | ErrorMessage | EndMessage | Resumed | Ack;
export const SERVER_MESSAGE_TYPES = ["ready", "unit", "stats", "error", "end", "resumed", "ack"] as const;
/** fields every server message of a type carries (a parser checks them) */
export const SERVER_REQUIRED_FIELDS = {"ready": ["session", "settings", "limits", "models", "random_weights", "server"], "unit": ["seq", "unit", "start_frame", "end_frame", "start_s", "end_s", "commit_audio_s", "lag_s"], "stats": ["elapsed_s", "audio_s", "processed_s", "buffered_s", "units", "units_per_s", "bitrate", "rtf", "lag_s", "lag_p95_s", "loglikelihood", "state_nbytes"], "error": ["code", "message"], "end": ["reason", "units", "num_frames", "audio_s", "stats"], "resumed": ["samples", "next_seq"], "ack": ["samples"]} as const;
