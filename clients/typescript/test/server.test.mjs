// The real server (`dpslm-stream serve --models tiny`, random weights: the units are plumbing checks, not speech),
// driven from node: the units equal those the Python client (client/api.py UnitsClient) gets for the same audio.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { UnitsClient, ListenerClient, SessionError } from "../dist/index.js";
import { startServer, readWavPcm16, SAMPLE_WAV, runPython, collect, chunked, unitsOf } from "./helpers.mjs";

const SECONDS = 3;
let server;
const { pcm: sample, rate } = readWavPcm16(SAMPLE_WAV);
const audio = sample.subarray(0, SECONDS * rate);

// The Python client on the same audio: the first SECONDS of the bundled sample, as float32 (pcm16 / 32768, which the
// Python client quantises back to the same PCM16 bytes), in 100 ms frames.
const PYTHON_UNITS = `
import asyncio, json, sys
import soundfile as sf
from dpslm_stream.client.api import UnitsClient, chunked
from dpslm_stream import protocol as P
url, seconds, settings = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
x, sr = sf.read(${JSON.stringify(SAMPLE_WAV)}, dtype="float32")
x = x[: int(seconds * sr)]
async def main():
    async with UnitsClient(url, sample_rate=sr, **settings) as client:
        units = [dict(seq=m.seq, unit=m.unit, start_frame=m.start_frame, end_frame=m.end_frame)
                 async for m in client.stream(chunked(x, sr)) if isinstance(m, P.Unit)]
        print(json.dumps({"units": units, "reason": client.end_message.reason}))
asyncio.run(main())
`;

before(async () => { server = await startServer(); }, { timeout: 200_000 });
after(async () => { await server?.stop(); });

test("units from node equal the Python client's on the same audio (pcm16)", { timeout: 400_000 }, async () => {
  const settings = { preset: "low-latency", options: { mode: "cached" } };
  const client = new UnitsClient(server.url, { sampleRate: rate, ...settings });
  const ready = await client.connect();
  assert.equal(ready.type, "ready");
  assert.equal(ready.settings.sample_rate, rate);
  assert.equal(ready.random_weights, true);
  const messages = await collect(client.stream(chunked(audio, rate / 10)));
  const end = messages.at(-1);
  assert.equal(end.type, "end");
  assert.equal(end.reason, "end");
  const units = unitsOf(messages);
  assert.ok(units.length >= 10, `only ${units.length} units`);
  assert.equal(end.units, units.length);
  assert.deepEqual(units.map((u) => u.seq), units.map((_, i) => i));
  assert.ok(messages.some((m) => m.type === "stats") || end.stats, "stats");
  assert.equal(client.uplinkBytes, audio.length * 2);
  const py = runPython(PYTHON_UNITS, [server.url, String(SECONDS), JSON.stringify(settings)]);
  assert.equal(py.reason, "end");
  assert.deepEqual(units, py.units);
});

test("float32 samples give the same units as pcm16 (the server decodes both to the same floats)", { timeout: 400_000 },
     async () => {
  const floats = Float32Array.from(audio, (v) => v / 32768);
  const run = async (format, samples) => {
    const client = new UnitsClient(server.url, { sampleRate: rate, format, options: { mode: "cached" } });
    await client.connect();
    return unitsOf(await collect(client.stream(chunked(samples, rate / 10))));
  };
  const [a, b] = [await run("float32", floats), await run("pcm16", audio)];
  assert.ok(a.length >= 10);
  assert.deepEqual(a, b);
});

test("a refused start is a SessionError with the protocol's code", { timeout: 120_000 }, async () => {
  const bad = new UnitsClient(server.url, { sampleRate: rate, k: 7, lmbda: 7 });
  await assert.rejects(bad.connect(), (e) => e instanceof SessionError && e.code === "unknown_model");
  const rate0 = new UnitsClient(server.url, { sampleRate: 1000 });
  await assert.rejects(rate0.connect(), (e) => e instanceof SessionError && e.code === "bad_sample_rate");
});

test("resynthesized audio chunks arrive contiguous and add up to the end message's totals; a listener gets the " +
     "sender's units", { timeout: 600_000 }, async () => {
  const client = new UnitsClient(server.url, { sampleRate: rate, options: { mode: "cached" }, resynth: {} });
  const ready = await client.connect();
  const listener = new ListenerClient(server.url, { session: ready.session, listenToken: ready.listen_token,
                                                    audio: false });
  const lready = await listener.connect();
  assert.equal(lready.role, "listener");
  const heard = collect(listener);
  const messages = await collect(client.stream(chunked(audio.subarray(0, 2 * rate), rate / 10)));
  const end = messages.at(-1);
  assert.equal(end.reason, "end");
  const chunks = messages.filter((m) => m.type === "audio");
  assert.ok(chunks.length > 0, "no audio chunks");
  assert.equal(chunks.at(-1).start_sample + chunks.at(-1).pcm.length, client.audioSamples);
  assert.ok(Math.abs(client.audioSamples / 24000 - end.resynth.audio_seconds) < 1e-3);
  assert.equal(end.resynth.chunks, chunks.length);
  const listened = await heard;
  assert.equal(listened.at(-1).type, "end");
  const sent = unitsOf(messages);
  const got = unitsOf(listened);
  assert.ok(got.length > 0);
  assert.deepEqual(got, sent.slice(sent.length - got.length)); // from its join point on: the same units
});

// Opus from node: a WebM Opus stream (as MediaRecorder sends it; encoded by the repository's PyAV encoder at
// 24 kbit/s) in arbitrary pieces. Oracle (as tests/test_server_opus.py): the same bytes decoded offline by PyAV and
// sent by the Python client as float32 PCM at 48 kHz give the same units (mode full).
const PYTHON_OPUS = `
import asyncio, json, sys
import soundfile as sf
from dpslm_stream import protocol as P
from dpslm_stream.client.api import UnitsClient, chunked
from dpslm_stream.opus import OpusUplinkEncoder, decode_opus_file
url, seconds = sys.argv[1], float(sys.argv[2])
x, sr = sf.read(${JSON.stringify(SAMPLE_WAV)}, dtype="float32")
enc = OpusUplinkEncoder(24000, "webm", input_rate=sr)
data = b"".join(enc.push(x[: int(seconds * sr)]) + enc.finish())
decoded = decode_opus_file(data)
async def main():
    async with UnitsClient(url, sample_rate=P.OPUS_SAMPLE_RATE, format="float32", options={"mode": "full"}) as c:
        units = [dict(seq=m.seq, unit=m.unit, start_frame=m.start_frame, end_frame=m.end_frame)
                 async for m in c.stream(chunked(decoded, P.OPUS_SAMPLE_RATE)) if isinstance(m, P.Unit)]
    print(json.dumps({"webm": data.hex(), "units": units}))
asyncio.run(main())
`;

test("an Opus (WebM) stream sent from node gives the units of its decoded audio sent as PCM", { timeout: 400_000 },
     async (t) => {
  let py;
  try {
    py = runPython(PYTHON_OPUS, [server.url, String(SECONDS)]);
  } catch (e) {
    if (/No module named 'av'|import_av|PyAV/.test(String(e))) return t.skip("PyAV (the opus extra) is not installed");
    throw e;
  }
  const webm = Buffer.from(py.webm, "hex");
  const client = new UnitsClient(server.url, { sampleRate: 48000, format: "opus", container: "webm",
                                               options: { mode: "full" } });
  const ready = await client.connect();
  assert.equal(ready.settings.format, "opus");
  for (let i = 0; i < webm.length; i += 777) client.sendEncoded(webm.subarray(i, i + 777)); // split anywhere
  client.end();
  const messages = await collect(client);
  assert.equal(messages.at(-1).reason, "end");
  assert.equal(client.uplinkBytes, webm.length);
  assert.ok(py.units.length >= 10);
  assert.deepEqual(unitsOf(messages), py.units);
});
