import { CoordinatorError } from '../errors.ts';

/**
 * Admission control for one model instance: `capacity` requests run at once (llama-server's
 * `--parallel` slots); up to `maxQueue` more wait in FIFO order; beyond that a request is
 * refused at once with RESOURCE_EXHAUSTED "busy" — never an unbounded pile-up. A waiting
 * request whose caller gives up leaves the queue.
 */
export class Slots {
  #running = 0;
  readonly #waiting: { grant: () => void; fail: (e: unknown) => void }[] = [];

  constructor(
    readonly capacity: number,
    readonly maxQueue: number,
  ) {
    if (!(capacity >= 1) || !(maxQueue >= 0)) throw new RangeError('capacity must be ≥ 1 and maxQueue ≥ 0');
  }

  get running(): number {
    return this.#running;
  }

  get queued(): number {
    return this.#waiting.length;
  }

  /** Resolves with a release function (call it exactly once; extra calls are ignored). */
  acquire(signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.#running < this.capacity) {
      this.#running++;
      return Promise.resolve(this.#releaser());
    }
    if (this.#waiting.length >= this.maxQueue) {
      return Promise.reject(
        new CoordinatorError('RESOURCE_EXHAUSTED', `busy: ${this.#running} requests running and ${this.#waiting.length} queued (limit ${this.maxQueue}); retry later`),
      );
    }
    return new Promise((resolve, reject) => {
      const entry = {
        grant: () => {
          signal?.removeEventListener('abort', onAbort);
          this.#running++;
          resolve(this.#releaser());
        },
        fail: (e: unknown) => {
          signal?.removeEventListener('abort', onAbort);
          reject(e);
        },
      };
      const onAbort = () => {
        const i = this.#waiting.indexOf(entry);
        if (i >= 0) this.#waiting.splice(i, 1);
        reject(signal!.reason);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiting.push(entry);
    });
  }

  /** Refuse everything waiting (the instance failed or is unloading). */
  failWaiting(err: unknown): void {
    for (const w of this.#waiting.splice(0)) w.fail(err);
  }

  #releaser(): () => void {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#running--;
      const next = this.#waiting.shift();
      if (next) next.grant();
    };
  }
}
