// The reconnect/resume messages, as agreed for the server side (docs/protocol.md, "Reconnect and resume"), written
// here by hand until dpslm_stream/protocol.py defines them; then they come from the generated protocol.ts.
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
export const RESUME_FAILED = "resume_failed";
export const CONTRACT_REQUIRED_FIELDS = { ack: ["samples"], resumed: ["samples", "next_seq"] };
