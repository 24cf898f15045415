// Browser microphone capture for a UnitsClient: Pcm16Capture (an AudioWorklet at the device's native rate, PCM16
// frames of 20 ms: send them with client.send) and OpusCapture (MediaRecorder, audio/webm;codecs=opus at a chosen
// bitrate: send its bytes with client.sendEncoded on a session started with format "opus").
//
//   const mic = await Pcm16Capture.open();
//   const client = new UnitsClient(url, { sampleRate: mic.sampleRate });
//   await client.connect();
//   mic.ondata = (pcm) => client.send(pcm);
//   ... await mic.stop(); client.end();

/** Microphone constraints: one channel, none of the browser's processing (the models want the raw signal). */
export const RAW_MICROPHONE: MediaTrackConstraints = {
  channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false,
};

export interface CaptureOptions {
  /** an existing stream (default: getUserMedia with `constraints`) */
  stream?: MediaStream;
  constraints?: MediaTrackConstraints;
}

async function microphone(opts: CaptureOptions): Promise<MediaStream> {
  return opts.stream ?? navigator.mediaDevices.getUserMedia({ audio: opts.constraints ?? RAW_MICROPHONE });
}

/** The microphone as PCM16 frames at the AudioContext's (the device's) rate: the server resamples. */
export class Pcm16Capture {
  /** called with each 20 ms frame; frames before it is set are dropped */
  ondata: ((pcm: Int16Array) => void) | null = null;

  private constructor(
    readonly stream: MediaStream,
    readonly context: AudioContext,
    readonly node: AudioWorkletNode,
  ) {
    node.port.onmessage = (e: MessageEvent<ArrayBuffer>) => this.ondata?.(new Int16Array(e.data));
  }

  /** `workletUrl`: where worklet.js is served (default: next to this module). */
  static async open(opts: CaptureOptions & { workletUrl?: string | URL } = {}): Promise<Pcm16Capture> {
    const stream = await microphone(opts);
    try {
      const context = new AudioContext(); // no sampleRate: capture at the device's native rate
      await context.audioWorklet.addModule(opts.workletUrl ?? new URL("./worklet.js", import.meta.url));
      const node = new AudioWorkletNode(context, "pcm16-capture");
      context.createMediaStreamSource(stream).connect(node);
      // Keep the graph pulled without playing the microphone back: a muted gain to the destination.
      const mute = context.createGain();
      mute.gain.value = 0;
      node.connect(mute).connect(context.destination);
      if (context.state === "suspended") await context.resume();
      return new Pcm16Capture(stream, context, node);
    } catch (e) {
      stream.getTracks().forEach((t) => t.stop());
      throw e;
    }
  }

  get sampleRate(): number {
    return this.context.sampleRate;
  }

  /** Stop the microphone; no frame comes after this. */
  async stop(): Promise<void> {
    this.ondata = null;
    this.node.port.onmessage = null;
    this.stream.getTracks().forEach((t) => t.stop());
    if (this.context.state !== "closed") await this.context.close();
  }
}

/** Container types MediaRecorder may produce with Opus, in order of preference (the server detects either). */
export const OPUS_MIME_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus"] as const;

export interface OpusCaptureOptions extends CaptureOptions {
  /** Opus bitrate, bit/s. Default 24000 */
  bitsPerSecond?: number;
  /** a chunk of the container every this many ms. Default 100 */
  timesliceMs?: number;
  /** default: the first of OPUS_MIME_TYPES this browser records */
  mimeType?: string;
}

/** The microphone as an Opus stream (MediaRecorder): container bytes in order, from the header on. */
export class OpusCapture {
  /** called with each piece of the container, in order; set it before start() (the first piece holds the header) */
  ondata: ((bytes: Uint8Array) => void) | null = null;
  /** Opus decodes at 48 kHz whatever the device's rate: what start.sample_rate says for an Opus session */
  readonly sampleRate = 48000;
  readonly recorder: MediaRecorder;
  #delivered: Promise<void> = Promise.resolve();
  #startedAt = 0;

  private constructor(readonly stream: MediaStream, readonly mimeType: string, readonly opts: OpusCaptureOptions) {
    this.recorder = new MediaRecorder(stream, { mimeType, audioBitsPerSecond: opts.bitsPerSecond ?? 24000 });
    this.recorder.ondataavailable = (e: BlobEvent) => {
      // Blob.arrayBuffer is asynchronous: chain the pieces so they are delivered in recording order.
      this.#delivered = this.#delivered.then(async () => {
        const bytes = new Uint8Array(await e.data.arrayBuffer());
        if (bytes.length) this.ondata?.(bytes);
      });
    };
  }

  /** Whether this browser can record Opus (in any of OPUS_MIME_TYPES). */
  static supportedMimeType(): string | null {
    if (typeof MediaRecorder === "undefined") return null;
    return OPUS_MIME_TYPES.find((t) => MediaRecorder.isTypeSupported(t)) ?? null;
  }

  static async open(opts: OpusCaptureOptions = {}): Promise<OpusCapture> {
    const mimeType = opts.mimeType ?? OpusCapture.supportedMimeType();
    if (!mimeType || !MediaRecorder.isTypeSupported(mimeType)) {
      throw new Error(`this browser cannot record Opus (${opts.mimeType ?? OPUS_MIME_TYPES.join(", ")})`);
    }
    const stream = await microphone(opts);
    try {
      return new OpusCapture(stream, mimeType, opts);
    } catch (e) {
      stream.getTracks().forEach((t) => t.stop());
      throw e;
    }
  }

  /** Start recording (after the session is ready: the first piece carries the container header). */
  start(): void {
    this.#startedAt = performance.now();
    this.recorder.start(this.opts.timesliceMs ?? 100);
  }

  /** Seconds recorded so far. */
  get seconds(): number {
    return this.#startedAt ? (performance.now() - this.#startedAt) / 1000 : 0;
  }

  /** Stop recording; resolves once the last piece has been delivered to ondata. */
  async stop(): Promise<void> {
    if (this.recorder.state !== "inactive") {
      const stopped = new Promise((resolve) => this.recorder.addEventListener("stop", resolve, { once: true }));
      this.recorder.stop();
      await stopped;
    }
    this.stream.getTracks().forEach((t) => t.stop());
    await this.#delivered;
    this.ondata = null;
  }
}
