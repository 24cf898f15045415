// The client's side of the reconnect/resume contract, against test/fake_resume_server.py (a stand-in that aborts the
// TCP connection at random points, keeps back audio, holds back units), and against the real server when it offers
// resume (ready.resume_token). A session cut 5 times yields exactly the units of an uncut one.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { UnitsClient, SessionError } from "../dist/index.js";
import { startProcess, startServer, startProxy, python, PACKAGE, readWavPcm16, SAMPLE_WAV, collect, chunked,
         unitsOf } from "./helpers.mjs";

const { pcm: sample, rate } = readWavPcm16(SAMPLE_WAV);
const audio = sample.subarray(0, 3 * rate);
const FAKE = path.join(PACKAGE, "test", "fake_resume_server.py");
const started = [];
after(async () => { await Promise.all(started.map((s) => s.stop())); });

async function fake(...args) {
  const s = await startProcess([python(), FAKE, ...args], { timeoutMs: 60_000 });
  started.push(s);
  return s;
}

/** The fake server's units of an uncut session: one per 1600 samples, the block's sum mod 1000. */
function expectedUnits(samples) {
  const units = [];
  for (let i = 0; i < samples.length; i += 1600) {
    let sum = 0;
    for (const v of samples.subarray(i, i + 1600)) sum += v;
    units.push(((sum % 1000) + 1000) % 1000);
  }
  return units;
}

const fast = { initialDelayMs: 20, maxDelayMs: 200 };

for (const seed of [1, 2, 3]) {
  test(`cut 5 times at random points (seed ${seed}): the units of an uncut session, none repeated`,
       { timeout: 60_000 }, async () => {
    const server = await fake("--drops", "5", "--seed", String(seed));
    const events = [];
    const client = new UnitsClient(server.url, { sampleRate: rate, frameMs: 30, reconnect: fast,
                                                 onReconnect: (e) => events.push(e) });
    const ready = await client.connect();
    assert.ok(ready.resume_token);
    const messages = await collect(client.stream(chunked(audio, 480), { realtime: false }), 50_000);
    assert.equal(messages.at(-1).type, "end");
    assert.equal(client.resumes, 5);
    assert.ok(events.length >= 5);
    assert.equal(messages.filter((m) => m.type === "resumed").length, 5);
    const units = unitsOf(messages);
    assert.deepEqual(units.map((u) => u.seq), units.map((_, i) => i));
    assert.deepEqual(units.map((u) => u.unit), expectedUnits(audio));
    assert.ok(client.uplinkBytes > audio.length * 2, "some audio was resent");
  });
}

test("paced like a microphone, cut 5 times: the same units", { timeout: 60_000 }, async () => {
  const server = await fake("--drops", "5", "--seed", "9");
  const client = new UnitsClient(server.url, { sampleRate: rate, frameMs: 20, reconnect: fast });
  await client.connect();
  // 4x real time: drops land while audio is still being captured, so sends during the outage are kept and resent.
  const paced = (async function* () {
    for (const c of chunked(audio, 320)) {
      await new Promise((r) => setTimeout(r, 5));
      yield c;
    }
  })();
  const messages = await collect(client.stream(paced), 50_000);
  assert.equal(client.resumes, 5);
  assert.deepEqual(unitsOf(messages).map((u) => u.unit), expectedUnits(audio));
});

test("a network cut (TCP reset) resumes too; audio sent while the connection is down follows after resumed",
     { timeout: 60_000 }, async () => {
  const server = await fake("--drops", "0");
  const proxy = await startProxy(server.url);
  started.push(proxy);
  const client = new UnitsClient(proxy.url, { sampleRate: rate, reconnect: fast });
  await client.connect();
  client.send(audio.subarray(0, rate));
  const seen = [];
  for await (const msg of client) {
    seen.push(msg);
    if (msg.type === "unit" && msg.seq === 3) {
      assert.equal(proxy.cut(), 1);
      client.send(audio.subarray(rate)); // while the connection is down: kept, sent after resumed
      client.end();
    }
  }
  assert.equal(client.resumes, 1);
  assert.deepEqual(unitsOf(seen).map((u) => u.unit), expectedUnits(audio));
});

test("an expired token ends the session with resume_failed; without reconnect a drop is connection_lost",
     { timeout: 60_000 }, async () => {
  const server = await fake("--drops", "1", "--seed", "4", "--forget");
  const client = new UnitsClient(server.url, { sampleRate: rate, reconnect: fast });
  await client.connect();
  await assert.rejects(collect(client.stream(chunked(audio, 1600)), 30_000),
                       (e) => e instanceof SessionError && e.code === "resume_failed");
  const plain = await fake("--drops", "1", "--seed", "4");
  const once = new UnitsClient(plain.url, { sampleRate: rate, reconnect: false });
  await once.connect();
  await assert.rejects(collect(once.stream(chunked(audio, 1600)), 30_000),
                       (e) => e instanceof SessionError && e.code === "connection_lost");
});

test("the real server: cut 5 times at random points, the units of an uncut session (skipped while the server " +
     "offers no resume)", { timeout: 600_000 }, async (t) => {
  const server = await startServer(["--resume-grace", "30"]).catch(() => startServer());
  started.push(server);
  const proxy = await startProxy(server.url);
  started.push(proxy);
  const settings = { sampleRate: rate, options: { mode: "cached" }, reconnect: fast };
  const probe = new UnitsClient(server.url, settings);
  const ready = await probe.connect();
  probe.close();
  if (!ready.resume_token) {
    t.skip("this server's ready carries no resume_token (the server side of resume is not merged)");
    return;
  }
  const uncut = new UnitsClient(server.url, settings);
  await uncut.connect();
  const reference = unitsOf(await collect(uncut.stream(chunked(audio, 1600))));
  assert.ok(reference.length >= 10);
  const client = new UnitsClient(proxy.url, settings);
  await client.connect();
  // Five cuts at seeded random frames of the 30 sent 20 ms apart (a cut may land while a reconnection is under way).
  let seed = 7;
  const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const frames = chunked(audio, 1600);
  const cutAt = new Set();
  while (cutAt.size < 5) cutAt.add(1 + Math.floor(random() * (frames.length - 2)));
  let cuts = 0;
  const feeding = (async () => {
    for (const [i, frame] of frames.entries()) {
      if (cutAt.has(i)) cuts += proxy.cut() > 0 ? 1 : 0;
      client.send(frame);
      await new Promise((r) => setTimeout(r, 20 + 60 * random()));
    }
    client.end();
  })();
  const seen = await collect(client, 300_000);
  await feeding;
  assert.ok(cuts >= 3, `only ${cuts} cuts found a connection`);
  // A cut that lands while a reconnection waits for resumed costs that attempt, not a resume of its own.
  assert.ok(client.resumes >= 1 && client.resumes <= cuts, `${client.resumes} resumes after ${cuts} cuts`);
  assert.equal(seen.at(-1).reason, "end");
  assert.deepEqual(unitsOf(seen), reference);
});
