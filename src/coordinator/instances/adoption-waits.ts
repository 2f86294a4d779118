import { CoordinatorError } from '../errors.ts';

/**
 * Models a restarted coordinator (or a new leader) is still re-adopting. A request that names
 * one arrives in the seconds between the coordinator listening and the agents confirming the
 * engines; it waits for the outcome instead of hearing "no model named …" — a coordinator
 * restart costs a pause, not an error. Readoption registers each stored instance and settles it
 * when it is adopted or given up; the wait is bounded by the caller's signal and `timeoutMs`.
 */
export class AdoptionWaits {
  readonly #waits = new Map<string, { readonly settled: Promise<void>; readonly settle: () => void }>();

  expect(name: string): void {
    if (this.#waits.has(name)) return;
    let settle = () => {};
    const settled = new Promise<void>((r) => {
      settle = r;
    });
    this.#waits.set(name, { settled, settle });
  }

  settle(name: string): void {
    this.#waits.get(name)?.settle();
    this.#waits.delete(name);
  }

  pending(name: string): boolean {
    return this.#waits.has(name);
  }

  /** Resolves once `name` is adopted or given up (at once when it is not awaited). */
  async wait(name: string, signal: AbortSignal | undefined, timeoutMs: number): Promise<void> {
    const w = this.#waits.get(name);
    if (!w) return;
    let timer: NodeJS.Timeout | undefined;
    let onAbort = () => {};
    try {
      await Promise.race([
        w.settled,
        new Promise<void>((r) => {
          timer = setTimeout(r, timeoutMs);
        }),
        new Promise<never>((_, reject) => {
          onAbort = () => reject(new CoordinatorError('CANCELLED', `request for "${name}" cancelled while the model was being re-adopted`));
          if (signal?.aborted) onAbort();
          signal?.addEventListener('abort', onAbort, { once: true });
        }),
      ]);
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    }
  }
}
