import { describe, expect, it } from 'vitest';
import { CoordinatorError } from '../../src/coordinator/errors.ts';
import { Slots } from '../../src/coordinator/instances/slots.ts';

const tick = () => new Promise((r) => setImmediate(r));

describe('Slots', () => {
  it('runs up to capacity at once, queues FIFO, then refuses with RESOURCE_EXHAUSTED', async () => {
    const s = new Slots(2, 2);
    const r1 = await s.acquire();
    const r2 = await s.acquire();
    expect(s.running).toBe(2);
    const order: number[] = [];
    const q1 = s.acquire().then((r) => {
      order.push(1);
      return r;
    });
    const q2 = s.acquire().then((r) => {
      order.push(2);
      return r;
    });
    expect(s.queued).toBe(2);
    const refused = await s.acquire().catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(CoordinatorError);
    expect((refused as CoordinatorError).code).toBe('RESOURCE_EXHAUSTED');
    expect((refused as Error).message).toMatch(/^busy/);
    r1();
    r1(); // double release is ignored
    await tick();
    expect(order).toEqual([1]);
    expect(s.running).toBe(2);
    r2();
    await tick();
    expect(order).toEqual([1, 2]);
    (await q1)();
    (await q2)();
    expect(s.running).toBe(0);
    expect(s.queued).toBe(0);
  });

  it('a waiter that gives up leaves the queue and frees its place', async () => {
    const s = new Slots(1, 1);
    const r = await s.acquire();
    const ac = new AbortController();
    const w = s.acquire(ac.signal);
    ac.abort(new Error('client went away'));
    await expect(w).rejects.toThrow('client went away');
    expect(s.queued).toBe(0);
    const next = s.acquire();
    r();
    (await next)();
    expect(s.running).toBe(0);
  });

  it('an already-aborted caller is refused without taking a slot', async () => {
    const s = new Slots(1, 0);
    const ac = new AbortController();
    ac.abort(new Error('gone'));
    await expect(s.acquire(ac.signal)).rejects.toThrow('gone');
    expect(s.running).toBe(0);
  });

  it('failWaiting refuses everything queued', async () => {
    const s = new Slots(1, 3);
    await s.acquire();
    const ws = [s.acquire(), s.acquire()];
    s.failWaiting(new CoordinatorError('UNAVAILABLE', 'model failed'));
    for (const w of ws) await expect(w).rejects.toThrow('model failed');
    expect(s.queued).toBe(0);
  });

  it('maxQueue 0 means no waiting at all', async () => {
    const s = new Slots(1, 0);
    await s.acquire();
    await expect(s.acquire()).rejects.toThrow(/busy/);
  });

  it('rejects nonsense sizes', () => {
    expect(() => new Slots(0, 1)).toThrow(RangeError);
    expect(() => new Slots(1, -1)).toThrow(RangeError);
  });
});
