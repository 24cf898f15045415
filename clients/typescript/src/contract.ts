// The reconnect/resume messages as agreed with the server side (COMMON.md's contract), written here by hand so that
// the client works with a protocol.py with or without them. Their names differ from the generated ones (Ack, Resume,
// Resumed in protocol.ts once protocol.py defines them), so both can be exported side by side.
//
//   ready gains resume_token (string, or null when the server cannot resume this session) and resume_grace_s.
//   server -> client {"type": "ack", "samples": N}: input samples (at the client's rate) the server has accepted so
//     far; the client may drop the audio it keeps below N.
//   After an abrupt disconnect (no end) a new connection's first message is
//     {"type": "resume", "version": 2, "token": T, "next_seq": S, "audio_samples": A}
//   (S: the first unit seq not received; A: 24 kHz resynthesized samples received), answered by
//     {"type": "resumed", "samples": N, "next_seq": S}
//   then the server replays units from S and audio from A, and the client resends its audio from sample N.
//   An unknown or expired token is the fatal error resume_failed.

/** Server -> client: the input samples the server has accepted so far. */
export interface AckMessage {
  type: "ack";
  samples: number;
}

/** Client -> server, first message of a reconnection. */
export interface ResumeMessage {
  type: "resume";
  version: number;
  token: string;
  /** the first unit seq the client has not received */
  next_seq: number;
  /** resynthesized 24 kHz samples the client has received (0 without resynthesis) */
  audio_samples: number;
}

/** Server -> client, answer to resume: resend the input audio from `samples` on. */
export interface ResumedMessage {
  type: "resumed";
  samples: number;
  next_seq: number;
}

/** The fields ready gains. */
export interface ReadyResumeFields {
  resume_token?: string | null;
  resume_grace_s?: number;
}

export const RESUME_FAILED = "resume_failed";

export type ContractServerMessage = AckMessage | ResumedMessage;
export const CONTRACT_REQUIRED_FIELDS = { ack: ["samples"], resumed: ["samples", "next_seq"] } as const;
