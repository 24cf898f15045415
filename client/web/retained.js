// The audio a sender keeps for a reconnection: every frame from the server's last acknowledged sample on, so that
// after `resumed` (samples N) it can resend exactly the samples from N. Bounded: beyond `maxSamples` the oldest
// frames go and the session can no longer be resumed (`overflowed`), rather than growing without end when a server
// does not acknowledge.
export class RetainedAudio {
    bytesPerSample;
    maxSamples;
    #frames = [];
    #retained = 0;
    #overflowed = false;
    constructor(bytesPerSample, maxSamples) {
        this.bytesPerSample = bytesPerSample;
        this.maxSamples = maxSamples;
    }
    /** Samples kept now. */
    get samples() {
        return this.#retained;
    }
    /** Whether frames were dropped before the server acknowledged them (a resume would lose audio). */
    get overflowed() {
        return this.#overflowed;
    }
    /** Keep one frame that starts at input sample `start`. */
    add(start, bytes) {
        const samples = bytes.length / this.bytesPerSample;
        this.#frames.push({ start, samples, bytes });
        this.#retained += samples;
        while (this.#retained > this.maxSamples && this.#frames.length) {
            this.#retained -= this.#frames.shift().samples;
            this.#overflowed = true;
        }
    }
    /** The server has accepted the samples below `acked`: drop the frames that end there. */
    ack(acked) {
        while (this.#frames.length && this.#frames[0].start + this.#frames[0].samples <= acked) {
            this.#retained -= this.#frames.shift().samples;
        }
    }
    /** The bytes to resend from input sample `from` on (the first frame cut at `from`); null when they are gone. */
    from(from) {
        this.ack(from);
        const first = this.#frames[0];
        if (first && first.start > from)
            return null; // dropped by the bound before the server had them
        return this.#frames.map((f) => (f.start < from ? f.bytes.subarray((from - f.start) * this.bytesPerSample) : f.bytes));
    }
}
