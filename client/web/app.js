// The browser page of the live units server, built on the TypeScript client package (clients/typescript): its
// compiled ES modules sit next to this file (`npm run sync-web` copies them; `npm test` checks the copies equal a
// fresh build), so the page speaks exactly the protocol of dpslm_stream/protocol/ (protocol.js is generated from it).
// UnitsClient sends start -> ready, the audio frames, end -> remaining units (and audio), end message; it checks the
// units' seq and the audio's contiguity, and reconnects and resumes the session if the connection drops (when the
// server offers it). The microphone: Pcm16Capture (AudioWorklet, PCM16 at the device's rate) or, with ?format=opus,
// OpusCapture (MediaRecorder, audio/webm;codecs=opus at ?opus_bitrate= bit/s, default 24000).
// With "audio back" the start carries resynth: {} and the server streams the units resynthesized into 24 kHz speech
// as binary frames, played here gaplessly. With "transmit" the start carries transmit: {coder} and the server also
// sends the session's unit bitstream as binary frames: the page counts their bytes and shows the link's payload
// bit/s (from stats) next to the authors' unigram-entropy bitrate. #uplink-bytes shows the audio bytes sent.
// Query parameters: token, k, lmbda, preset, mode, score=1, resynth=0 (no audio back), transmit=uniform|ulm,
// format=opus, opus_bitrate, autostart=1.

import { HEALTH_PATH, WS_PATH, RESYNTH_SAMPLE_RATE } from "./protocol.js";
import { UnitsClient } from "./client.js";
import { OpusCapture, Pcm16Capture } from "./capture.js";

const STRIP_MAX = 400; // unit elements kept in the scrolling strip
const PLAYBACK_SAFETY_S = 0.05; // schedule a chunk no earlier than this ahead of the playback clock
const DEFAULT_OPUS_BITRATE = 24000;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// Everything the page knows about the session, also read by the headless-browser test.
const state = { phase: "idle", session: null, listenToken: null, units: 0, lastUnits: [], errors: [], ended: null,
                audioSent: 0, sampleRate: null, resynth: false, format: "pcm16", uplinkBytes: 0, resumes: 0,
                // Resynthesized audio received (counted on arrival, whether or not the AudioContext can play it).
                audioChunks: 0, audioSamples: 0, audioSeconds: 0, audioAfterEnd: 0, audioChunksAtEnd: null,
                playback: null, playbackGaps: 0, playbackAheadS: 0, resynthLag: null,
                bitstreamFrames: 0, bitstreamBytes: 0, transmit: null };
window.dpslmState = state;

let client = null, capture = null;
// Playback of the audio back: its own AudioContext (the capture one closes when the session ends, while the last
// chunks may still be playing), kept across sessions. nextTime: where the next chunk starts on its clock.
let playCtx = null, nextTime = 0;

function setStatus(text) { state.phase = text; $("status").textContent = text; }
function logError(text) { state.errors.push(text); $("log").textContent += text + "\n"; }
function fmt(x, digits) { return x === null || x === undefined ? "\u2013" : Number(x).toFixed(digits); }

function unitColor(u) { return `hsl(${(u * 137.508) % 360}, 55%, 45%)`; } // golden-angle hues: neighbours differ

async function loadPairs() {
  try {
    const health = await (await fetch(HEALTH_PATH)).json();
    const sel = $("pair");
    for (const [k, l] of health.pairs) {
      const opt = new Option(`${k} : ${l}`, `${k}:${l}`);
      opt.selected = k === health.default_pair[0] && l === health.default_pair[1];
      sel.add(opt);
    }
    if (params.has("k") && params.has("lmbda")) sel.value = `${params.get("k")}:${params.get("lmbda")}`;
    $("models").innerHTML = `Models: <b>${health.models}</b>` +
      (health.random_weights ? ' <span class="random">(random weights: units are not speech)</span>' : "");
  } catch (e) { logError(`cannot read ${HEALTH_PATH}: ${e}`); }
}

function addUnit(msg) {
  state.units += 1;
  state.lastUnits.push(msg.unit);
  if (state.lastUnits.length > 50) state.lastUnits.shift();
  const el = document.createElement("div");
  el.className = "unit";
  el.textContent = msg.unit;
  el.title = `#${msg.seq}  ${msg.start_s.toFixed(2)}-${msg.end_s.toFixed(2)} s  lag ${msg.lag_s.toFixed(2)} s` +
    (msg.logprob === null ? "" : `  logp ${msg.logprob.toFixed(2)}`);
  el.style.background = unitColor(msg.unit);
  el.style.width = `${Math.max(14, (msg.end_frame - msg.start_frame) * 4)}px`; // 4 px per 20 ms frame
  const strip = $("strip");
  strip.appendChild(el);
  while (strip.childElementCount > STRIP_MAX) strip.firstElementChild.remove();
  strip.scrollLeft = strip.scrollWidth;
  $("m-units").textContent = state.units;
  $("m-lag").textContent = fmt(msg.lag_s, 2);
}

function showStats(s) {
  $("m-p95").textContent = fmt(s.lag_p95_s, 2);
  state.resynthLag = s.resynth_lag_s === undefined ? null : s.resynth_lag_s;
  $("m-rlag").textContent = fmt(state.resynthLag, 2);
  if (state.listenToken && s.listeners !== undefined) showShare(s.listeners);
  $("m-rtf").textContent = fmt(s.rtf, 2);
  $("m-bitrate").textContent = fmt(s.bitrate, 0);
  state.transmit = s.transmit || null; // the link's own figures (start.transmit): measured payload bit/s
  $("m-payload").textContent = state.transmit ? fmt(state.transmit.payload_bps, 0) : fmt(null);
  $("m-wire").textContent = state.transmit ? fmt(state.transmit.on_wire_bps, 0) : fmt(null);
  $("m-ups").textContent = fmt(s.units_per_s, 1);
  if (s.buffered_s > 0.5) setStatus(`streaming (server behind by ${s.buffered_s.toFixed(1)} s)`);
}

function showShare(listeners) {
  $("share").textContent = `session ${state.session}` + (state.listenToken ? `  listen_token ${state.listenToken}` : "") +
    (listeners === undefined ? "" : `  (${listeners} listener${listeners === 1 ? "" : "s"})`);
}

function showAudio() {
  // No figures before there is audio: "on" says what will happen, the counts start with the first chunk.
  $("audio").textContent = !state.resynth ? "audio back: off"
    : state.audioChunks === 0 ? (state.session ? "audio back: on, waiting for the first resynthesized audio"
                                              : "audio back: on (use headphones)")
    : `audio ${state.audioSeconds.toFixed(2)} s in ${state.audioChunks} chunks` +
      (state.playback ? ` (playback: ${state.playback})` : "");
  $("guide-audio").style.display = state.resynth ? "" : "none";
}

function resetAudio() {
  Object.assign(state, { audioChunks: 0, audioSamples: 0, audioSeconds: 0, audioAfterEnd: 0, audioChunksAtEnd: null,
                         playbackGaps: 0, playbackAheadS: 0, resynthLag: null });
  // nextTime stays: a new session's audio queues after the last one's tail
  $("m-rlag").textContent = fmt(null);
}

// A resynthesized audio chunk (the client has checked that it follows the previous one). Counted on arrival, then
// scheduled right after the previous chunk on the playback clock (or as soon as possible when playback fell behind):
// gapless while chunks keep up.
function onAudioChunk(chunk) {
  const pcm = chunk.pcm;
  if (state.ended) state.audioAfterEnd += 1;
  state.audioChunks += 1;
  state.audioSamples += pcm.length;
  state.audioSeconds = state.audioSamples / RESYNTH_SAMPLE_RATE;
  if (playCtx && pcm.length > 0) {
    const samples = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    const buffer = playCtx.createBuffer(1, pcm.length, RESYNTH_SAMPLE_RATE); // resampled to the device rate
    buffer.copyToChannel(samples, 0);
    const src = playCtx.createBufferSource();
    src.buffer = buffer;
    src.connect(playCtx.destination);
    const at = Math.max(playCtx.currentTime + PLAYBACK_SAFETY_S, nextTime);
    if (state.audioChunks > 1 && at > nextTime) state.playbackGaps += 1; // playback ran dry: audio came late
    src.start(at);
    nextTime = at + buffer.duration;
    state.playback = playCtx.state;
    state.playbackAheadS = nextTime - playCtx.currentTime;
  }
  showAudio();
}

function onReady(msg) {
  state.session = msg.session;
  state.listenToken = msg.listen_token === undefined ? null : msg.listen_token;
  showShare();
  showAudio();
  $("m-units").textContent = "0";
  $("m-audio").textContent = "0.0";
  $("uplink-bytes").textContent = "0";
  setStatus(`streaming: session ${msg.session}, k=${msg.settings.k}, \u03bb=${msg.settings.lmbda}, ` +
            `${msg.settings.mode}/${msg.settings.preset}` + (state.format === "opus" ? ", opus" : ""));
}

function onMessage(msg) {
  switch (msg.type) {
    case "unit": addUnit(msg); break;
    case "stats": showStats(msg); break;
    case "error": logError(`${msg.code}: ${msg.message}`); break;
    case "audio": onAudioChunk(msg); break;
    case "bitstream": state.bitstreamFrames += 1; state.bitstreamBytes += msg.data.length; break; // .dpsu bytes
    case "resumed": state.resumes += 1; setStatus(`streaming: session ${state.session} (resumed)`); break;
    case "end":
      state.ended = msg;
      state.audioChunksAtEnd = state.audioChunks; // the end comes after the last audio chunk
      showStats(msg.stats);
      setStatus(`ended (${msg.reason}): ${msg.units} units in ${msg.audio_s.toFixed(1)} s` +
                (msg.resynth ? `, ${state.audioSeconds.toFixed(2)} s of audio back` +
                               (msg.resynth.error ? ` (resynthesis stopped: ${msg.resynth.error})` : "") : ""));
      break;
    // "ack": the client keeps the audio the server has not acknowledged, for a resume; nothing to show.
  }
}

// The microphone's data, once the session is ready: PCM16 frames, or pieces of the Opus container.
function onCaptured(data) {
  if (!client) return;
  if (state.format === "opus") {
    client.sendEncoded(data);
    state.audioSent = capture.seconds;
  } else {
    client.send(data);
    state.audioSent += data.length / state.sampleRate;
  }
  state.uplinkBytes = client.uplinkBytes;
  $("m-audio").textContent = state.audioSent.toFixed(1);
  $("uplink-bytes").textContent = String(client.uplinkBytes);
}

async function openCapture() {
  if (state.format === "opus") {
    const bitrate = Number(params.get("opus_bitrate") || DEFAULT_OPUS_BITRATE);
    return OpusCapture.open({ bitsPerSecond: bitrate });
  }
  return Pcm16Capture.open({ workletUrl: "worklet.js" });
}

async function start() {
  $("start").disabled = true;
  $("warn").style.display = "none";
  if (!window.isSecureContext || !navigator.mediaDevices) {
    $("warn").textContent = "The microphone needs a secure page: open it as http://localhost:PORT or " +
      "http://127.0.0.1:PORT (an ssh tunnel works: ssh -L PORT:127.0.0.1:PORT host), or behind an https proxy.";
    $("warn").style.display = "block";
    $("start").disabled = false;
    return;
  }
  $("guide").className = "started";
  state.units = 0; state.ended = null; state.errors = []; state.audioSent = 0; state.uplinkBytes = 0; state.resumes = 0;
  state.session = null; state.listenToken = null; state.resynth = $("resynth").checked;
  state.format = params.get("format") === "opus" ? "opus" : "pcm16";
  state.bitstreamFrames = 0; state.bitstreamBytes = 0; state.transmit = null;
  resetAudio();
  $("strip").textContent = ""; $("log").textContent = ""; $("share").textContent = ""; showAudio();
  if (state.resynth) {
    // Created inside the click (a user gesture), so browsers let it play; its own rate, buffers are resampled.
    try {
      if (!playCtx) playCtx = new AudioContext();
      if (playCtx.state === "suspended") playCtx.resume().catch(() => {}); // headless: may stay suspended
      state.playback = playCtx.state;
    } catch (e) { logError(`audio playback unavailable: ${e}`); playCtx = null; state.playback = "unavailable"; }
  }
  try {
    capture = await openCapture();
  } catch (e) {
    logError(`microphone: ${e.name || e}: ${e.message || ""}`);
    setStatus("no microphone");
    $("start").disabled = false;
    return;
  }
  state.sampleRate = capture.sampleRate; // the device's native rate (pcm16: the server resamples); opus: 48000
  $("m-rate").textContent = capture.sampleRate;
  const [k, lmbda] = ($("pair").value || ":").split(":").map((x) => (x === "" ? null : Number(x)));
  const coder = $("transmit").value; // "" (off), "uniform" or "ulm"
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${WS_PATH}`;
  client = new UnitsClient(url, {
    token: params.get("token") || undefined, sampleRate: capture.sampleRate, format: state.format,
    preset: $("preset").value, score: $("score").checked, options: { mode: $("mode").value },
    resynth: state.resynth ? {} : null, // {}: the server's resynthesis defaults
    transmit: coder ? { coder } : null, ...(k !== null ? { k, lmbda } : {}),
    onReconnect: (e) => setStatus(`connection lost (${e.reason}): reconnecting, attempt ${e.attempt}`),
  });
  setStatus("connecting");
  $("stop").disabled = false;
  try {
    onReady(await client.connect());
    capture.ondata = onCaptured; // audio flows only once the server is ready
    if (state.format === "opus") capture.start(); // the container's header goes first
    for await (const msg of client) onMessage(msg);
  } catch (e) {
    logError(e.message || String(e));
    if (!state.ended) setStatus(`connection closed (${e.code || e})`);
  }
  stopCapture();
}

function stopCapture() {
  if (capture) capture.stop().catch(() => {});
  capture = null; client = null;
  $("start").disabled = false;
  $("stop").disabled = true;
}

async function stop() {
  $("stop").disabled = true;
  const session = client;
  if (capture) await capture.stop().catch(() => {}); // an Opus recorder delivers its last piece first
  if (session && session.ready && !session.endMessage) { session.end(); setStatus("finishing"); }
}

$("start").onclick = start;
$("stop").onclick = stop;
if (params.has("preset")) $("preset").value = params.get("preset");
if (params.has("mode")) $("mode").value = params.get("mode");
$("score").checked = params.get("score") === "1";
if (params.has("transmit")) $("transmit").value = params.get("transmit");
$("resynth").checked = params.get("resynth") !== "0";
$("resynth").onchange = () => { // between sessions: show whether the next one asks for audio back
  if (!client) { state.resynth = $("resynth").checked; showAudio(); }
};
$("resynth").onchange();
// A page opened with autostart=1 starts without a user gesture, so browsers may hold the playback context
// suspended; any click on the page lets it play.
document.addEventListener("click", () => { if (playCtx && playCtx.state === "suspended") playCtx.resume(); });
loadPairs().then(() => { if (params.get("autostart") === "1") start(); });
