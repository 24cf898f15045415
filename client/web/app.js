// The browser client of the live units server. It mirrors dpslm_stream/protocol.py (version 1; the Python test
// suite checks that the constants below match it): start (JSON) -> ready; binary PCM16 frames; end -> remaining
// units, end message, close. Query parameters: token, k, lmbda, preset, mode, score=1, autostart=1.

const PROTOCOL_VERSION = 1;
const WS_PATH = "/v1/stream";
const HEALTH_PATH = "/healthz";
const STRIP_MAX = 400; // unit elements kept in the scrolling strip

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// Everything the page knows about the session, also read by the headless-browser test.
const state = { phase: "idle", session: null, units: 0, lastUnits: [], errors: [], ended: null, audioSent: 0, sampleRate: null };
window.dpslmState = state;

let ws = null, ctx = null, stream = null, node = null;

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
  $("m-rtf").textContent = fmt(s.rtf, 2);
  $("m-bitrate").textContent = fmt(s.bitrate, 0);
  $("m-ups").textContent = fmt(s.units_per_s, 1);
  if (s.buffered_s > 0.5) setStatus(`streaming (server behind by ${s.buffered_s.toFixed(1)} s)`);
}

function onMessage(ev) {
  if (typeof ev.data !== "string") return; // binary server frames are reserved for a later protocol version
  const msg = JSON.parse(ev.data);
  switch (msg.type) {
    case "ready":
      state.session = msg.session;
      setStatus(`streaming: session ${msg.session}, k=${msg.settings.k}, \u03bb=${msg.settings.lmbda}, ` +
                `${msg.settings.mode}/${msg.settings.preset}`);
      node.port.onmessage = (e) => {  // audio flows only once the server is ready
        if (ws && ws.readyState === WebSocket.OPEN) {
          ws.send(e.data);
          state.audioSent += e.data.byteLength / 2 / ctx.sampleRate;
          $("m-audio").textContent = state.audioSent.toFixed(1);
        }
      };
      break;
    case "unit": addUnit(msg); break;
    case "stats": showStats(msg); break;
    case "error": logError(`${msg.code}: ${msg.message}`); break;
    case "end":
      state.ended = msg;
      showStats(msg.stats);
      setStatus(`ended (${msg.reason}): ${msg.units} units in ${msg.audio_s.toFixed(1)} s`);
      break;
  }
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
  state.units = 0; state.ended = null; state.errors = []; state.audioSent = 0;
  $("strip").textContent = ""; $("log").textContent = "";
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
    ctx = new AudioContext(); // no sampleRate: capture at the device's native rate, the server resamples
    await ctx.audioWorklet.addModule("worklet.js");
    node = new AudioWorkletNode(ctx, "pcm16-capture");
    ctx.createMediaStreamSource(stream).connect(node);
    // Keep the graph pulled without playing the microphone back: a muted gain to the destination.
    const mute = ctx.createGain(); mute.gain.value = 0; node.connect(mute).connect(ctx.destination);
    if (ctx.state === "suspended") await ctx.resume();
  } catch (e) {
    logError(`microphone: ${e.name || e}: ${e.message || ""}`);
    setStatus("no microphone");
    $("start").disabled = false;
    return;
  }
  state.sampleRate = ctx.sampleRate;
  $("m-rate").textContent = ctx.sampleRate;
  const [k, lmbda] = ($("pair").value || ":").split(":").map((x) => (x === "" ? null : Number(x)));
  const token = params.get("token");
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${WS_PATH}` +
              (token ? `?token=${encodeURIComponent(token)}` : "");
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    const start = { type: "start", version: PROTOCOL_VERSION, sample_rate: ctx.sampleRate, format: "pcm16",
                    preset: $("preset").value, score: $("score").checked, options: { mode: $("mode").value } };
    if (k !== null) { start.k = k; start.lmbda = lmbda; }
    ws.send(JSON.stringify(start));
    setStatus("connecting");
  };
  ws.onmessage = onMessage;
  ws.onclose = (e) => {
    if (!state.ended) setStatus(`connection closed (${e.code}${e.reason ? " " + e.reason : ""})`);
    stopCapture();
  };
  ws.onerror = () => logError("WebSocket error (see the browser console)");
  $("stop").disabled = false;
}

function stopCapture() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  stream = null; ctx = null;
  $("start").disabled = false;
  $("stop").disabled = true;
}

function stop() {
  if (node) node.port.onmessage = null;
  if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify({ type: "end" })); setStatus("finishing"); }
  if (stream) stream.getTracks().forEach((t) => t.stop());
  $("stop").disabled = true;
}

$("start").onclick = start;
$("stop").onclick = stop;
if (params.has("preset")) $("preset").value = params.get("preset");
if (params.has("mode")) $("mode").value = params.get("mode");
$("score").checked = params.get("score") === "1";
loadPairs().then(() => { if (params.get("autostart") === "1") start(); });
