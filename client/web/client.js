// UnitsClient: one live session with the dpslm-stream server (the mirror of the Python client/api.py UnitsClient).
//
//   const client = new UnitsClient("ws://127.0.0.1:8765/v1/stream", { sampleRate: 16000 });
//   const ready = await client.connect();
//   client.send(pcm);                       // Int16Array or Float32Array, mono at sampleRate
//   client.end();
//   for await (const msg of client) { if (msg.type === "unit") console.log(msg.seq, msg.unit); }
//
// The iterator yields every server message after ready (unit, stats, error, ack, resumed, end) and the decoded
// binary frames (audio chunks, bitstream frames), and ends after the end message. It checks the protocol's promises:
// units arrive as seq 0, 1, 2, ... and audio chunks contiguously; a gap or a repeat is a SessionError("protocol").
//
// Reconnect: when the connection drops before the end message and the server offered a resume token
// (ready.resume_token), the client reconnects with backoff within ready.resume_grace_s, sends `resume` with the next
// unit seq and the audio samples it has, and resends its audio from the sample the server reports in `resumed`.
// Until then it keeps every frame the server has not acknowledged (`ack`); send() goes on working meanwhile.
import { PROTOCOL_VERSION, TOKEN_QUERY_PARAM, ErrorCode, BYTES_PER_SAMPLE } from "./protocol.js";
import { AsyncQueue } from "./queue.js";
import { RetainedAudio } from "./retained.js";
import { decodeServerBinary, encodeAudio, parseServerMessage, ProtocolError } from "./wire.js";
/** The server refused or ended the session; `code` is an ErrorCode value, or "connection_failed", "connection_lost",
 * "timeout", "protocol" (the server broke a promise of the protocol). */
export class SessionError extends Error {
    code;
    retryAfterS;
    constructor(code, message, retryAfterS = null) {
        super(`${code}: ${message}`);
        this.name = "SessionError";
        this.code = code;
        this.retryAfterS = retryAfterS;
    }
}
const DEFAULT_RECONNECT = {
    enabled: true,
    initialDelayMs: 250,
    maxDelayMs: 5000,
    maxAttempts: 20,
    maxRetainedSeconds: 120,
    attemptTimeoutMs: 10000,
};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
/** What a sender and a listener share: the connection, the message checks, the iterator. */
export class Session {
    firstMessage;
    url;
    ready = null;
    endMessage = null;
    /** bytes of binary (audio) frames sent, resends included */
    uplinkBytes = 0;
    /** resynthesized 24 kHz samples received */
    audioSamples = 0;
    /** reconnections that resumed the session */
    resumes = 0;
    ws = null;
    reconnect;
    nextSeq = 0;
    joinAnySeq = false; // a listener joins a running stream at whatever seq comes first
    #nextAudioSeq = 0; // null: the first chunk after a resume sets it
    #queue = new AsyncQueue();
    #pending = null;
    #fatal = null;
    #closedByUser = false;
    #reconnecting = false;
    #opts;
    #WebSocket;
    constructor(url, opts, firstMessage) {
        this.firstMessage = firstMessage;
        const u = new URL(url);
        if (opts.token)
            u.searchParams.set(TOKEN_QUERY_PARAM, opts.token);
        this.url = u.toString();
        this.#opts = opts;
        const impl = opts.WebSocket ?? globalThis.WebSocket;
        if (!impl)
            throw new Error("no WebSocket class: pass options.WebSocket (node 20: run with --experimental-websocket)");
        this.#WebSocket = impl;
        const r = opts.reconnect;
        this.reconnect = { ...DEFAULT_RECONNECT, ...(typeof r === "object" ? r : { enabled: r ?? true }) };
    }
    /** Open the connection, send the first message, wait for ready; SessionError on refusal (busy, bad settings, ...). */
    async connect() {
        const ws = await this.#open();
        const ready = this.#await("ready", ws);
        ws.send(JSON.stringify(this.firstMessage));
        this.ready = (await ready);
        return this.ready;
    }
    /** Whether the connection is open now (false while reconnecting). */
    get connected() {
        return this.ws !== null && this.ws.readyState === this.#WebSocket.OPEN && !this.#reconnecting;
    }
    /** Bytes queued by the WebSocket and not yet sent (0 when not connected). */
    get bufferedAmount() {
        return this.ws && this.connected ? this.ws.bufferedAmount : 0;
    }
    [Symbol.asyncIterator]() {
        return this.#queue;
    }
    /** Close the connection now (no end: use end() and read to the end message for every unit). Iteration stops. */
    close() {
        this.#closedByUser = true;
        this.#queue.finish();
        this.ws?.close(1000);
    }
    sendText(msg) {
        if (this.connected)
            this.ws.send(JSON.stringify(msg));
    }
    sendBinary(bytes) {
        if (!this.connected)
            return;
        this.ws.send(bytes);
        this.uplinkBytes += bytes.length;
    }
    /** A session that may resume after a drop (senders override). */
    canResume() {
        return false;
    }
    /** Resend what the server lacks after `resumed` (senders override). */
    afterResume(_msg) { }
    /** The audio the server acknowledged (senders override). */
    onAck(_samples) { }
    /** Open a WebSocket within `timeoutMs`: a handshake cut short may fire neither close nor error in every
     * implementation, so the timer is what bounds it. */
    #open(timeoutMs = this.#timeoutMs) {
        return new Promise((resolve, reject) => {
            let ws;
            try {
                ws = new this.#WebSocket(this.url);
            }
            catch (e) {
                reject(new SessionError("connection_failed", `cannot connect to ${this.url}: ${e}`));
                return;
            }
            ws.binaryType = "arraybuffer";
            const fail = (error) => {
                clearTimeout(timer);
                ws.onopen = ws.onerror = ws.onclose = null;
                try {
                    ws.close();
                }
                catch {
                    // already closed
                }
                reject(error);
            };
            const timer = setTimeout(() => {
                fail(new SessionError("timeout", `no connection to ${this.url} within ${timeoutMs} ms`));
            }, timeoutMs);
            ws.onopen = () => {
                clearTimeout(timer);
                this.ws = ws;
                ws.onmessage = (ev) => this.#onFrame(ws, ev.data);
                ws.onerror = null;
                ws.onclose = (ev) => this.#onClose(ws, ev.code, ev.reason);
                resolve(ws);
            };
            ws.onerror = () => fail(new SessionError("connection_failed", `cannot connect to ${this.url}`));
            ws.onclose = (ev) => {
                fail(new SessionError("connection_failed", `cannot connect to ${this.url} (close ${ev.code} ${ev.reason})`));
            };
        });
    }
    get #timeoutMs() {
        return this.#opts.openTimeoutMs ?? 60000;
    }
    #await(kind, ws, timeoutMs = this.#timeoutMs) {
        return new Promise((resolve, reject) => {
            const timer = setTimeout(() => {
                this.#pending = null;
                ws.close();
                reject(new SessionError("timeout", `no ${kind} message within ${timeoutMs} ms`));
            }, timeoutMs);
            const done = (f) => {
                clearTimeout(timer);
                this.#pending = null;
                f();
            };
            this.#pending = {
                kind,
                resolve: (m) => done(() => resolve(m)),
                reject: (e) => done(() => reject(e)),
            };
        });
    }
    #onFrame(ws, data) {
        if (ws !== this.ws || this.#queue.ended)
            return;
        let msg;
        try {
            msg = typeof data === "string" ? parseServerMessage(data) : decodeServerBinary(data);
        }
        catch (e) {
            this.#abort(e instanceof ProtocolError ? new SessionError("protocol", e.message) : e);
            return;
        }
        const pending = this.#pending;
        if (pending) {
            if (msg.type === "error") {
                ws.close();
                pending.reject(new SessionError(msg.code, msg.message, msg.retry_after_s ?? null));
                return;
            }
            if (msg.type === pending.kind) {
                // Resumed: resend at once, before any later frame of this connection is handled (a WebSocket may hand over
                // several in one task, ahead of the awaiting code).
                if (msg.type === "resumed")
                    this.#onResumed(msg);
                pending.resolve(msg);
                if (msg.type === "ready")
                    return; // connect() returns it; the iterator starts after it
            }
        }
        try {
            this.#check(msg);
        }
        catch (e) {
            this.#abort(e);
            return;
        }
        this.#queue.push(msg);
        if (msg.type === "end") {
            this.endMessage = msg;
            const fatal = this.#fatal;
            this.#queue.finish(fatal && fatal.code === ErrorCode.INTERNAL_ERROR ? new SessionError(fatal.code, fatal.message) : null);
        }
    }
    /** The protocol's promises: units as seq 0, 1, 2, ... and audio chunks contiguous, across reconnections too. */
    #check(msg) {
        switch (msg.type) {
            case "unit":
                if (this.joinAnySeq) {
                    this.nextSeq = msg.seq;
                    this.joinAnySeq = false;
                }
                if (msg.seq !== this.nextSeq)
                    throw new SessionError("protocol", `unit seq ${msg.seq} arrived, expected ${this.nextSeq}`);
                this.nextSeq += 1;
                break;
            case "audio":
                if ((this.#nextAudioSeq !== null && msg.seq !== this.#nextAudioSeq) || msg.start_sample !== this.audioSamples) {
                    throw new SessionError("protocol", `audio chunk ${msg.seq} at sample ${msg.start_sample} arrived, expected ` +
                        `${this.#nextAudioSeq ?? "any"} at ${this.audioSamples}`);
                }
                this.#nextAudioSeq = msg.seq + 1;
                this.audioSamples += msg.pcm.length;
                break;
            case "ack":
                this.onAck(msg.samples);
                break;
            case "error":
                if (msg.fatal)
                    this.#fatal = msg;
                break;
        }
    }
    #abort(error) {
        this.#queue.finish(error);
        this.#closedByUser = true; // no reconnection after a broken promise
        this.ws?.close();
    }
    #onClose(ws, code, reason) {
        if (ws !== this.ws)
            return;
        const lost = new SessionError("connection_lost", `the connection closed (${code} ${reason || "no reason"}) ` +
            "before the session ended");
        if (this.#pending) {
            this.#pending.reject(lost);
            return;
        }
        if (this.#queue.ended || this.#closedByUser || this.#reconnecting)
            return;
        const fatal = this.#fatal;
        if (fatal) {
            this.#queue.finish(new SessionError(fatal.code, fatal.message, fatal.retry_after_s ?? null));
        }
        else if (this.reconnect.enabled && this.canResume()) {
            void this.#resume(`close ${code} ${reason}`.trim());
        }
        else {
            this.#queue.finish(lost);
        }
    }
    #onResumed(msg) {
        this.#reconnecting = false;
        this.#nextAudioSeq = null;
        this.resumes += 1;
        try {
            if (msg.next_seq !== this.nextSeq) {
                throw new SessionError("protocol", `resumed at unit ${msg.next_seq}, the client lacks ${this.nextSeq} on`);
            }
            this.afterResume(msg);
        }
        catch (e) {
            this.#abort(e);
        }
    }
    /** Reconnect with backoff within the server's grace period and resume the session (the resume contract). */
    async #resume(reason) {
        this.#reconnecting = true;
        const graceMs = 1000 * (this.ready?.resume_grace_s ?? 30);
        const deadline = Date.now() + graceMs;
        let error = new SessionError("connection_lost", `the connection dropped (${reason}) and the session ` +
            "could not be resumed in time");
        for (let attempt = 1; attempt <= this.reconnect.maxAttempts; attempt++) {
            const delayMs = Math.min(this.reconnect.initialDelayMs * 2 ** (attempt - 1), this.reconnect.maxDelayMs);
            if (Date.now() + delayMs > deadline)
                break;
            this.#opts.onReconnect?.({ attempt, delayMs, reason });
            await sleep(delayMs);
            if (this.#closedByUser || this.#queue.ended)
                return;
            let ws;
            try {
                ws = await this.#open(Math.min(this.#timeoutMs, this.reconnect.attemptTimeoutMs));
            }
            catch (e) {
                error = e;
                continue;
            }
            const resumed = this.#await("resumed", ws, Math.min(this.#timeoutMs, this.reconnect.attemptTimeoutMs));
            const resume = { type: "resume", version: PROTOCOL_VERSION, token: this.ready.resume_token,
                next_seq: this.nextSeq, audio_samples: this.audioSamples };
            ws.send(JSON.stringify(resume));
            try {
                await resumed; // #onResumed has run, synchronously with the message
                return;
            }
            catch (e) {
                error = e;
                if (e instanceof SessionError && e.code === ErrorCode.RESUME_FAILED)
                    break; // the server no longer has the session
            }
        }
        this.#reconnecting = false;
        this.#queue.finish(error);
    }
}
/** A sender session: start, audio up, units (and audio, bitstream) back. */
export class UnitsClient extends Session {
    sampleRate;
    format;
    /** input samples handed to send() */
    sentSamples = 0;
    #frameSamples;
    #retained = null;
    #endRequested = false;
    constructor(url, opts) {
        const format = opts.format ?? "pcm16";
        const start = {
            type: "start", version: PROTOCOL_VERSION, sample_rate: opts.sampleRate, format,
            preset: opts.preset ?? "low-latency", score: opts.score ?? false, options: { ...(opts.options ?? {}) },
        };
        if (opts.k !== undefined || opts.lmbda !== undefined)
            Object.assign(start, { k: opts.k, lmbda: opts.lmbda });
        if (opts.container !== undefined)
            start.container = opts.container;
        if (opts.resynth != null)
            start.resynth = { ...opts.resynth };
        if (opts.transmit != null)
            start.transmit = { ...opts.transmit };
        super(url, opts, start);
        this.sampleRate = opts.sampleRate;
        this.format = format;
        this.#frameSamples = Math.max(1, Math.floor((opts.sampleRate * (opts.frameMs ?? 100)) / 1000));
    }
    async connect() {
        const ready = await super.connect();
        const width = BYTES_PER_SAMPLE[this.format];
        if (ready.resume_token && width !== undefined && this.reconnect.enabled) {
            this.#retained = new RetainedAudio(width, this.reconnect.maxRetainedSeconds * this.sampleRate);
        }
        return ready;
    }
    /** Send samples (mono, at sampleRate) in frames of frameMs. While reconnecting they are kept and sent on resume. */
    send(samples) {
        if (!this.ready)
            throw new SessionError("not_started", "send() before connect() returned ready");
        if (this.#endRequested)
            throw new SessionError("after_end", "send() after end()");
        for (let i = 0; i < samples.length; i += this.#frameSamples) {
            const frame = samples.subarray(i, i + this.#frameSamples);
            const bytes = encodeAudio(frame, this.format);
            this.#retained?.add(this.sentSamples, bytes);
            this.sentSamples += frame.length;
            this.sendBinary(bytes);
        }
    }
    /** Send already encoded audio (format "opus": Ogg/WebM bytes or raw packets) as one binary frame. Not resumable. */
    sendEncoded(bytes) {
        if (!this.ready)
            throw new SessionError("not_started", "sendEncoded() before connect() returned ready");
        this.sendBinary(bytes);
    }
    /** End of audio: the server sends the remaining units (and audio), then the end message. */
    end() {
        this.#endRequested = true;
        this.sendText({ type: "end" });
    }
    /** Wait until the socket has sent all but `maxBytes` of what was queued (flow control for non-realtime senders). */
    async drain(maxBytes = 1 << 20, pollMs = 5) {
        while (this.bufferedAmount > maxBytes)
            await sleep(pollMs);
    }
    /** Send `chunks` (paced at the audio's rate with realtime, else as fast as the socket takes them), then end, while
     * yielding the server's messages until its end message. */
    async *stream(chunks, { realtime = false } = {}) {
        let stop = false;
        const feed = async () => {
            const t0 = Date.now();
            let sent = 0;
            for await (const chunk of chunks) {
                if (stop)
                    return;
                if (realtime)
                    await sleep(Math.max(0, t0 + (1000 * sent) / this.sampleRate - Date.now()));
                else
                    await this.drain();
                this.send(chunk);
                sent += chunk.length;
            }
            this.end();
        };
        const feeder = feed().catch((e) => e);
        try {
            for await (const msg of this)
                yield msg;
        }
        finally {
            stop = true;
            const e = await feeder;
            if (e instanceof Error && !this.endMessage)
                throw e;
        }
    }
    canResume() {
        return this.#retained !== null && !this.#retained.overflowed && !!this.ready?.resume_token;
    }
    onAck(samples) {
        this.#retained?.ack(samples);
    }
    afterResume(msg) {
        const frames = this.#retained?.from(msg.samples);
        if (!frames)
            throw new SessionError("protocol", `resumed at sample ${msg.samples}: that audio is no longer kept`);
        for (const bytes of frames)
            this.sendBinary(bytes);
        if (this.#endRequested)
            this.sendText({ type: "end" });
    }
}
/** The receiving side of a link: the sender's units and audio resynthesized from them alone. end() leaves. */
export class ListenerClient extends Session {
    constructor(url, opts) {
        const format = opts.format ?? "units";
        const audio = (opts.audio ?? true) && format !== "bitstream";
        super(url, { ...opts, reconnect: false }, {
            type: "subscribe", version: PROTOCOL_VERSION, session: opts.session, token: opts.listenToken, format,
            resynth: audio ? { ...(opts.resynth ?? {}) } : null,
        });
        this.joinAnySeq = true;
    }
    end() {
        this.sendText({ type: "end" });
    }
}
