// Shared by the tests: the repository's Python, a real `dpslm-stream serve` on 127.0.0.1 (tiny random-weight models,
// a free port), the bundled sample as PCM16, and bounded waits.
import { spawn, spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { python, REPO, PACKAGE } from "../scripts/python.mjs";

export { python, REPO, PACKAGE };
export const SAMPLE_WAV = path.join(REPO, "dpslm_stream", "data", "sample.wav");

/** Mono PCM16 samples and rate of a WAV file (the RIFF chunks, by hand: the test needs nothing else). */
export function readWavPcm16(file) {
  const buf = readFileSync(file);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let rate = 0, channels = 0, bits = 0;
  for (let pos = 12; pos + 8 <= buf.length; ) {
    const id = buf.toString("ascii", pos, pos + 4);
    const size = view.getUint32(pos + 4, true);
    if (id === "fmt ") {
      channels = view.getUint16(pos + 10, true);
      rate = view.getUint32(pos + 12, true);
      bits = view.getUint16(pos + 22, true);
    } else if (id === "data") {
      if (channels !== 1 || bits !== 16) throw new Error(`${file}: expected mono PCM16, got ${channels} ch ${bits} bit`);
      const pcm = new Int16Array(size / 2);
      for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(pos + 8 + 2 * i, true);
      return { pcm, rate };
    }
    pos += 8 + size + (size % 2);
  }
  throw new Error(`${file}: no data chunk`);
}

/** Run a Python script (text) with arguments; its stdout parsed as JSON. Bounded by timeoutMs. */
export function runPython(code, args = [], timeoutMs = 180_000) {
  const r = spawnSync(python(), ["-c", code, ...args], { cwd: REPO, encoding: "utf8", timeout: timeoutMs,
                                                        maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`python failed (${r.status} ${r.signal ?? ""}): ${r.stderr}`);
  return JSON.parse(r.stdout);
}

/** Start a process that prints its WebSocket URL (ws://127.0.0.1:PORT/...) on stdout; resolves when it has.
 * The process is killed by stop() (and by its own bound, killAfterMs). */
export function startProcess(argv, { timeoutMs = 180_000, killAfterMs = 900_000, env = {} } = {}) {
  const proc = spawn(argv[0], argv.slice(1), { cwd: REPO, env: { ...process.env, PYTHONUNBUFFERED: "1", ...env },
                                               stdio: ["ignore", "pipe", "pipe"] });
  const killer = setTimeout(() => proc.kill("SIGKILL"), killAfterMs);
  killer.unref();
  let out = "";
  const stop = () =>
    new Promise((resolve) => {
      clearTimeout(killer);
      if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
      const hard = setTimeout(() => proc.kill("SIGKILL"), 20_000);
      proc.once("exit", () => { clearTimeout(hard); resolve(); });
      proc.kill("SIGTERM");
    });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { stop(); reject(new Error(`no URL within ${timeoutMs} ms: ${out}`)); }, timeoutMs);
    const onData = (d) => {
      out += d;
      const m = out.match(/ws:\/\/127\.0\.0\.1:(\d+)(\/\S*)/);
      if (m) {
        clearTimeout(timer);
        proc.stdout.off("data", onData);
        proc.stdout.resume();
        resolve({ url: `ws://127.0.0.1:${m[1]}${m[2]}`, httpUrl: `http://127.0.0.1:${m[1]}`, proc, stop,
                  output: () => out });
      }
    };
    proc.stdout.on("data", onData);
    proc.stderr.on("data", (d) => { out += d; });
    proc.once("exit", (code) => { clearTimeout(timer); reject(new Error(`exited with ${code} before serving: ${out}`)); });
  });
}

/** `dpslm-stream serve` with the tiny random-weight models (a loaded machine: generous buffer and stall limits). */
export function startServer(extra = []) {
  return startProcess([python(), "-m", "dpslm_stream", "serve", "--models", "tiny", "--host", "127.0.0.1", "--port",
                       "0", "--no-warmup", "--max-buffer", "30", "--stall-timeout", "120", "--idle-timeout", "120",
                       ...extra]);
}

/** Every message of a session's iterator, bounded by timeoutMs. */
export async function collect(iterable, timeoutMs = 240_000) {
  const messages = [];
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`session did not end within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    await Promise.race([(async () => { for await (const m of iterable) messages.push(m); })(), timeout]);
  } finally {
    clearTimeout(timer);
  }
  return messages;
}

/** Split samples into chunks of `n` (what a capture device delivers). */
export function chunked(samples, n) {
  const out = [];
  for (let i = 0; i < samples.length; i += n) out.push(samples.subarray(i, i + n));
  return out;
}

export const unitsOf = (messages) => messages.filter((m) => m.type === "unit")
  .map(({ seq, unit, start_frame, end_frame }) => ({ seq, unit, start_frame, end_frame }));

/** A TCP proxy on 127.0.0.1 in front of `target` (a ws:// URL): `url` is the target's URL through it, `cut()` drops
 * every connection through it at once without a close handshake (a TCP reset), as a network failure does. */
export async function startProxy(target) {
  const { createServer, connect } = await import("node:net");
  const t = new URL(target);
  const pairs = new Set();
  const server = createServer((client) => {
    const upstream = connect(Number(t.port), t.hostname);
    const pair = [client, upstream];
    pairs.add(pair);
    const drop = () => { pairs.delete(pair); client.destroy(); upstream.destroy(); };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = server.address().port;
  const cut = () => {
    const n = pairs.size;
    for (const [a, b] of [...pairs]) { a.resetAndDestroy(); b.resetAndDestroy(); } // TCP RST: no close frame, no FIN
    pairs.clear();
    return n;
  };
  return { url: `ws://127.0.0.1:${port}${t.pathname}`, connections: () => pairs.size, cut,
           stop: () => new Promise((resolve) => { cut(); server.close(() => resolve()); }) };
}
