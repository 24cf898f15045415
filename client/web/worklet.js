// AudioWorklet processor: the microphone's float samples, at the AudioContext's (the device's native) rate, turned
// into little-endian PCM16 blocks of about 20 ms and posted to the page, which sends each one as a binary frame.
// Runs on the audio rendering thread: no allocation per render quantum beyond the block buffer it hands over.

class PCM16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.blockSize = Math.max(128, Math.round(sampleRate / 50)); // 20 ms at the context's rate
    this.block = new Int16Array(this.blockSize);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // no input connected yet
    for (let i = 0; i < channel.length; i++) {
      // Same quantisation as the Python client (float_to_pcm16): scale by 32768, round, clip.
      const v = Math.round(channel[i] * 32768);
      this.block[this.filled++] = v > 32767 ? 32767 : v < -32768 ? -32768 : v;
      if (this.filled === this.blockSize) {
        this.port.postMessage(this.block.buffer, [this.block.buffer]);
        this.block = new Int16Array(this.blockSize);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm16-capture", PCM16Capture);
