import { describe, expect, it } from 'vitest';
import { AdoptionWaits } from '../../src/coordinator/instances/adoption-waits.ts';

describe('AdoptionWaits: requests for a model being re-adopted wait for the outcome', () => {
  it('a model nobody re-adopts does not wait', async () => {
    const w = new AdoptionWaits();
    const t0 = performance.now();
    await w.wait('m', undefined, 10_000);
    expect(performance.now() - t0).toBeLessThan(50);
    expect(w.pending('m')).toBe(false);
  });

  it('waits until the model is settled (adopted or given up), then every waiter goes on', async () => {
    const w = new AdoptionWaits();
    w.expect('m');
    w.expect('m'); // idempotent: one wait per model
    let done = 0;
    const waiters = [w.wait('m', undefined, 10_000), w.wait('m', undefined, 10_000)].map((p) => p.then(() => done++));
    await new Promise((r) => setTimeout(r, 30));
    expect(done).toBe(0);
    expect(w.pending('m')).toBe(true);
    w.settle('m');
    await Promise.all(waiters);
    expect(done).toBe(2);
    expect(w.pending('m')).toBe(false);
  });

  it('the wait is bounded: after timeoutMs the request goes on (and meets whatever the runtime has)', async () => {
    const w = new AdoptionWaits();
    w.expect('m');
    const t0 = performance.now();
    await w.wait('m', undefined, 40);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(35);
    expect(w.pending('m')).toBe(true);
  });

  it("the caller's signal cancels the wait with CANCELLED", async () => {
    const w = new AdoptionWaits();
    w.expect('m');
    const ac = new AbortController();
    const p = w.wait('m', ac.signal, 10_000);
    ac.abort();
    await expect(p).rejects.toMatchObject({ code: 'CANCELLED' });
    const pre = new AbortController();
    pre.abort();
    await expect(w.wait('m', pre.signal, 10_000)).rejects.toMatchObject({ code: 'CANCELLED' });
  });
});
