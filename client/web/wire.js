// The bytes on the wire: audio frames the client sends (PCM16 / float32 little-endian), the binary frames the server
// sends (resynthesized audio chunks, unit bitstream frames) and the parsing of the server's JSON messages. The
// mirror of dpslm_stream/protocol's encode_audio / decode_audio_chunk / decode_bitstream_frame /
// parse_server_message; written by hand because it is a few DataView reads (no library adds anything here).
import { AUDIO_FRAME_KIND, AUDIO_HEADER_BYTES, BITSTREAM_FRAME_KIND, BITSTREAM_PARTS, ErrorCode, RESYNTH_SAMPLE_RATE, SERVER_REQUIRED_FIELDS, } from "./protocol.js";
/** A message that breaks the protocol; `code` is an ErrorCode value. */
export class ProtocolError extends Error {
    code;
    constructor(code, message) {
        super(`${code}: ${message}`);
        this.name = "ProtocolError";
        this.code = code;
    }
}
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
/** Seconds of a chunk's audio at the resynthesis rate. */
export function chunkSeconds(chunk) {
    return chunk.pcm.length / RESYNTH_SAMPLE_RATE;
}
/** Float samples in [-1, 1] -> PCM16 as the Python client quantises them (audio.float_to_pcm16): scaled by 32768,
 * rounded to nearest with ties to even, clipped to [-32768, 32767]. NaN/Inf are refused. */
export function floatToPcm16(samples) {
    const out = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
        const x = samples[i] * 32768;
        if (!Number.isFinite(x))
            throw new ProtocolError(ErrorCode.NON_FINITE, `sample ${i} is ${samples[i]}`);
        let r = Math.round(x); // ties toward +inf: fix the ties to even like numpy's rint
        if (r - x === 0.5 && r % 2 !== 0)
            r -= 1;
        out[i] = r > 32767 ? 32767 : r < -32768 ? -32768 : r;
    }
    return out;
}
/** PCM16 -> float samples in [-1, 1) (x / 32768, as the server decodes them). */
export function pcm16ToFloat(pcm) {
    const out = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++)
        out[i] = pcm[i] / 32768;
    return out;
}
/** Samples -> the bytes of one binary audio frame in `format` ("pcm16" or "float32", little-endian). An Int16Array is
 * sent as is (pcm16) or as x / 32768 (float32); a Float32Array is quantised for pcm16 (floatToPcm16). */
export function encodeAudio(samples, format) {
    if (format === "pcm16") {
        const pcm = samples instanceof Int16Array ? samples : floatToPcm16(samples);
        return littleEndianBytes(pcm, 2);
    }
    if (format === "float32") {
        const floats = samples instanceof Float32Array ? samples : pcm16ToFloat(samples);
        for (let i = 0; i < floats.length; i++) {
            if (!Number.isFinite(floats[i]))
                throw new ProtocolError(ErrorCode.NON_FINITE, `sample ${i} is ${floats[i]}`);
        }
        return littleEndianBytes(floats, 4);
    }
    throw new ProtocolError(ErrorCode.BAD_MESSAGE, `format must be "pcm16" or "float32" to send samples, got ${format}`);
}
function littleEndianBytes(a, width) {
    const bytes = new Uint8Array(a.byteLength);
    if (LITTLE_ENDIAN) {
        bytes.set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
        return bytes;
    }
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < a.length; i++) {
        if (width === 2)
            view.setInt16(2 * i, a[i], true);
        else
            view.setFloat32(4 * i, a[i], true);
    }
    return bytes;
}
function asBytes(data) {
    return data instanceof Uint8Array
        ? data
        : ArrayBuffer.isView(data)
            ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
            : new Uint8Array(data);
}
/** One audio chunk frame (the server's encode_audio_chunk; for tests and relays). */
export function encodeAudioChunk(seq, startSample, pcm) {
    const out = new Uint8Array(AUDIO_HEADER_BYTES + pcm.byteLength);
    const view = new DataView(out.buffer);
    view.setUint8(0, AUDIO_FRAME_KIND);
    view.setUint32(4, seq, true);
    view.setBigUint64(8, BigInt(startSample), true);
    out.set(littleEndianBytes(pcm, 2), AUDIO_HEADER_BYTES);
    return out;
}
/** Parse a resynthesized audio chunk; ProtocolError for anything else. */
export function decodeAudioChunk(data) {
    const bytes = asBytes(data);
    if (bytes.length < AUDIO_HEADER_BYTES || (bytes.length - AUDIO_HEADER_BYTES) % 2) {
        throw new ProtocolError(ErrorCode.BAD_AUDIO, `binary server frame of ${bytes.length} bytes is not an audio chunk`);
    }
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const kind = view.getUint8(0);
    if (kind !== AUDIO_FRAME_KIND)
        throw new ProtocolError(ErrorCode.UNKNOWN_TYPE, `unknown binary frame kind ${kind}`);
    const n = (bytes.length - AUDIO_HEADER_BYTES) / 2;
    const pcm = new Int16Array(n);
    if (LITTLE_ENDIAN) {
        new Uint8Array(pcm.buffer).set(bytes.subarray(AUDIO_HEADER_BYTES)); // a copy: aligned whatever the input's offset
    }
    else {
        for (let i = 0; i < n; i++)
            pcm[i] = view.getInt16(AUDIO_HEADER_BYTES + 2 * i, true);
    }
    return { type: "audio", seq: view.getUint32(4, true), start_sample: Number(view.getBigUint64(8, true)), pcm };
}
/** Parse a unit bitstream frame; ProtocolError for anything else. */
export function decodeBitstreamFrame(data) {
    const bytes = asBytes(data);
    if (bytes.length < 3 || bytes[0] !== BITSTREAM_FRAME_KIND || bytes[1] >= BITSTREAM_PARTS.length) {
        throw new ProtocolError(ErrorCode.BAD_MESSAGE, `binary server frame of ${bytes.length} bytes is not a bitstream frame`);
    }
    return { type: "bitstream", part: BITSTREAM_PARTS[bytes[1]], data: bytes.slice(2) };
}
/** A binary server frame of either kind. */
export function decodeServerBinary(data) {
    const bytes = asBytes(data);
    return bytes.length && bytes[0] === BITSTREAM_FRAME_KIND ? decodeBitstreamFrame(bytes) : decodeAudioChunk(bytes);
}
const REQUIRED = SERVER_REQUIRED_FIELDS;
/** Parse a server text frame. Unknown fields are kept (a newer server may add some), unknown types and missing
 * fields raise ProtocolError, as protocol.parse_server_message does. */
export function parseServerMessage(text) {
    let obj;
    try {
        obj = JSON.parse(text);
    }
    catch (e) {
        throw new ProtocolError(ErrorCode.BAD_JSON, `server sent invalid JSON: ${e}`);
    }
    const type = obj !== null && typeof obj === "object" && !Array.isArray(obj) ? obj.type : undefined;
    const required = typeof type === "string" && Object.hasOwn(REQUIRED, type) ? REQUIRED[type] : undefined;
    if (required === undefined) {
        throw new ProtocolError(ErrorCode.UNKNOWN_TYPE, `unknown server message: ${text.slice(0, 200)}`);
    }
    const missing = required.filter((name) => !Object.hasOwn(obj, name));
    if (missing.length) {
        throw new ProtocolError(ErrorCode.BAD_MESSAGE, `server message "${type}" is missing fields: ${missing.join(", ")}`);
    }
    return obj;
}
