// A one-consumer async queue: the WebSocket's callbacks push, `for await` pulls. It ends normally (finish) or with
// an error (fail), after the items already pushed have been taken.
export class AsyncQueue {
    #items = [];
    #waiter = null;
    #ended = false;
    #error = null;
    push(item) {
        if (this.#ended)
            return;
        if (this.#waiter) {
            const w = this.#waiter;
            this.#waiter = null;
            w.resolve({ value: item, done: false });
        }
        else {
            this.#items.push(item);
        }
    }
    /** No more items; `error` (if given) is thrown once the pushed items have been taken. */
    finish(error = null) {
        if (this.#ended)
            return;
        this.#ended = true;
        this.#error = error;
        if (this.#waiter) {
            const w = this.#waiter;
            this.#waiter = null;
            if (error !== null)
                w.reject(error);
            else
                w.resolve({ value: undefined, done: true });
        }
    }
    get ended() {
        return this.#ended;
    }
    next() {
        if (this.#items.length)
            return Promise.resolve({ value: this.#items.shift(), done: false });
        if (this.#ended) {
            const error = this.#error;
            this.#error = null; // thrown once; later calls see the end
            return error !== null ? Promise.reject(error) : Promise.resolve({ value: undefined, done: true });
        }
        if (this.#waiter)
            return Promise.reject(new Error("one consumer at a time"));
        return new Promise((resolve, reject) => {
            this.#waiter = { resolve, reject };
        });
    }
}
