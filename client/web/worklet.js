// AudioWorklet processor "pcm16-capture": the microphone's float samples, at the AudioContext's (the device's native)
// rate, turned into PCM16 blocks of about 20 ms and posted to the page (Pcm16Capture), which sends each one as a
// binary frame. Runs on the audio rendering thread: no allocation per render quantum beyond the block it hands over.
// Loaded by URL (audioWorklet.addModule), so it imports nothing.
class PCM16Capture extends AudioWorkletProcessor {
    blockSize = Math.max(128, Math.round(sampleRate / 50)); // 20 ms at the context's rate
    block = new Int16Array(this.blockSize);
    filled = 0;
    process(inputs) {
        const channel = inputs[0] && inputs[0][0];
        if (!channel)
            return true; // no input connected yet
        for (let i = 0; i < channel.length; i++) {
            // Same quantisation as the Python client (float_to_pcm16, wire.ts floatToPcm16): scale by 32768, round to
            // nearest with ties to even, clip.
            const x = channel[i] * 32768;
            let v = Math.round(x);
            if (v - x === 0.5 && v % 2 !== 0)
                v -= 1;
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
export {};
