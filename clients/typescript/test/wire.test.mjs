// The bytes on the wire, checked against dpslm_stream/protocol/ itself (run in a subprocess) and by hand.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as P from "../dist/protocol.js";
import { floatToPcm16, pcm16ToFloat, encodeAudio, encodeAudioChunk, decodeAudioChunk, decodeBitstreamFrame,
         decodeServerBinary, parseServerMessage, ProtocolError } from "../dist/wire.js";
import { RetainedAudio } from "../dist/retained.js";
import { AsyncQueue } from "../dist/queue.js";
import { runPython } from "./helpers.mjs";

const hex = (bytes) => Buffer.from(bytes).toString("hex");

// Values at the quantisation's edges: ties (k + 0.5) / 32768 both ways, the clip points, tiny values.
const EDGES = [0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 32766.5, 32767.5, -32767.5, -32768.5, 40000, -40000, 1e-9, 12345.49]
  .map((k) => k / 32768);

test("PCM16 and float32 frames are the bytes Python's protocol.encode_audio makes; audio chunks decode as Python " +
     "encodes them", { timeout: 180_000 }, () => {
  const floats = new Float32Array(EDGES);
  const pcm = new Int16Array([0, 1, -1, 32767, -32768, 12345, -2]);
  const py = runPython(`
import json, sys, numpy as np
from dpslm_stream import protocol as P
f = np.array(json.loads(sys.argv[1]), dtype=np.float32)
pcm = np.array(json.loads(sys.argv[2]), dtype="<i2")
print(json.dumps({"pcm16": P.encode_audio(f, "pcm16").hex(), "float32": P.encode_audio(f, "float32").hex(),
                  "chunk": P.encode_audio_chunk(7, 2**40 + 3, pcm.tobytes()).hex(),
                  "bits": P.encode_bitstream_frame("packet", b"\\x01\\x02\\x03").hex()}))
`, [JSON.stringify(Array.from(floats)), JSON.stringify(Array.from(pcm))]);
  assert.equal(hex(encodeAudio(floats, "pcm16")), py.pcm16);
  assert.equal(hex(encodeAudio(floats, "float32")), py.float32);
  assert.equal(hex(encodeAudioChunk(7, 2 ** 40 + 3, pcm)), py.chunk);
  const chunk = decodeServerBinary(Buffer.from(py.chunk, "hex"));
  assert.equal(chunk.type, "audio");
  assert.equal(chunk.seq, 7);
  assert.equal(chunk.start_sample, 2 ** 40 + 3);
  assert.deepEqual(Array.from(chunk.pcm), Array.from(pcm));
  const bits = decodeServerBinary(Buffer.from(py.bits, "hex"));
  assert.deepEqual([bits.type, bits.part, Array.from(bits.data)], ["bitstream", "packet", [1, 2, 3]]);
});

test("quantisation rounds ties to even and clips; NaN is refused", () => {
  assert.deepEqual(Array.from(floatToPcm16(new Float32Array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5].map((k) => k / 32768)))),
                   [0, 2, 2, 0, -2, -2]);
  assert.deepEqual(Array.from(floatToPcm16(new Float32Array([1, -1, 2, -2]))), [32767, -32768, 32767, -32768]);
  assert.throws(() => floatToPcm16(new Float32Array([NaN])), (e) => e instanceof ProtocolError && e.code === "non_finite");
  assert.throws(() => encodeAudio(new Float32Array([Infinity]), "float32"), (e) => e.code === "non_finite");
  const pcm = new Int16Array([-32768, -1, 0, 1, 32767]);
  assert.deepEqual(Array.from(floatToPcm16(pcm16ToFloat(pcm))), Array.from(pcm)); // the identity, like Python's
  assert.deepEqual(Array.from(new Int16Array(encodeAudio(pcm, "pcm16").buffer)), Array.from(pcm));
  assert.throws(() => encodeAudio(pcm, "opus"), (e) => e.code === "bad_message");
});

test("binary frames: any alignment decodes; malformed ones raise the protocol's codes", () => {
  const frame = encodeAudioChunk(3, 480, new Int16Array([5, -6, 7]));
  const shifted = new Uint8Array(frame.length + 1);
  shifted.set(frame, 1);
  const chunk = decodeAudioChunk(shifted.subarray(1)); // an odd byte offset: no Int16Array view possible
  assert.deepEqual([chunk.seq, chunk.start_sample, Array.from(chunk.pcm)], [3, 480, [5, -6, 7]]);
  assert.throws(() => decodeAudioChunk(frame.subarray(0, 15)), (e) => e.code === P.ErrorCode.BAD_AUDIO);
  assert.throws(() => decodeAudioChunk(frame.subarray(0, 17)), (e) => e.code === P.ErrorCode.BAD_AUDIO);
  const wrong = frame.slice();
  wrong[0] = 9;
  assert.throws(() => decodeAudioChunk(wrong), (e) => e.code === P.ErrorCode.UNKNOWN_TYPE);
  assert.throws(() => decodeBitstreamFrame(new Uint8Array([2, 5, 1])), (e) => e.code === P.ErrorCode.BAD_MESSAGE);
  assert.throws(() => decodeBitstreamFrame(new Uint8Array([2, 0])), (e) => e.code === P.ErrorCode.BAD_MESSAGE);
  assert.equal(decodeBitstreamFrame(new Uint8Array([2, 0, 9])).part, "header");
});

test("server messages: every field the protocol requires is checked, unknown fields kept, unknown types refused", () => {
  const unit = { type: "unit", seq: 0, unit: 3, start_frame: 0, end_frame: 2, start_s: 0, end_s: 0.04,
                 commit_audio_s: 0.1, lag_s: 0.01, logprob: null, later_field: 1 };
  assert.deepEqual(parseServerMessage(JSON.stringify(unit)), unit);
  for (const name of P.SERVER_REQUIRED_FIELDS.unit) {
    const { [name]: _, ...rest } = unit;
    assert.throws(() => parseServerMessage(JSON.stringify(rest)), (e) => e.code === "bad_message" &&
                  e.message.includes(name));
  }
  assert.throws(() => parseServerMessage('{"type": "nope"}'), (e) => e.code === "unknown_type");
  assert.throws(() => parseServerMessage('{"type": "toString"}'), (e) => e.code === "unknown_type");
  assert.throws(() => parseServerMessage("[1]"), (e) => e.code === "unknown_type");
  assert.throws(() => parseServerMessage("{"), (e) => e.code === "bad_json");
  assert.equal(parseServerMessage('{"type": "ack", "samples": 5}').samples, 5);
  assert.throws(() => parseServerMessage('{"type": "resumed", "samples": 5}'), (e) => e.code === "bad_message");
  for (const t of ["end", "error", "ready", "stats", "unit"]) assert.ok(P.SERVER_MESSAGE_TYPES.includes(t), t);
  assert.ok(P.FATAL_CODES.has(P.ErrorCode.BUSY) && !P.FATAL_CODES.has(P.ErrorCode.BAD_AUDIO));
  assert.equal(P.CLOSE_CODES[P.ErrorCode.BUSY], P.CLOSE_TRY_AGAIN);
});

test("retained audio: acked frames go, a resend starts inside a frame, the bound drops and says so", () => {
  const r = new RetainedAudio(2, 10);
  const frame = (start, n) => Uint8Array.from({ length: 2 * n }, (_, i) => (start * 2 + i) % 256);
  r.add(0, frame(0, 4));
  r.add(4, frame(4, 4));
  assert.equal(r.samples, 8);
  r.ack(3); // inside the first frame: it stays
  assert.equal(r.samples, 8);
  r.ack(4);
  assert.equal(r.samples, 4);
  const resend = r.from(5);
  assert.deepEqual(resend.map((b) => Array.from(b)), [Array.from(frame(4, 4).subarray(2))]);
  r.add(8, frame(8, 4));
  r.add(12, frame(12, 4)); // 12 samples > 10: the oldest frame goes
  assert.ok(r.overflowed);
  assert.equal(r.from(5), null);
  assert.equal(r.from(8).length, 2);
});

test("the async queue hands items over in order, then its end or its error", async () => {
  const q = new AsyncQueue();
  const first = q.next();
  q.push(1);
  q.push(2);
  q.finish(new Error("boom"));
  q.push(3); // after the end: ignored
  assert.deepEqual(await first, { value: 1, done: false });
  assert.deepEqual(await q.next(), { value: 2, done: false });
  await assert.rejects(q.next(), /boom/);
  assert.deepEqual(await q.next(), { value: undefined, done: true });
});
