import { describe, expect, it } from 'vitest';
import { initialLease, type LeaseHolder, type LeaseOutcome, type LeaseState, leaseConfig, leaseOutcome, nextStep, termEnd } from '../../src/coordinator/leader/lease.ts';

/*
 * The leader lease state machine with a hand-driven clock and a simulated store that ages keys out
 * TTL after it stores them and refuses stale compare-and-set writes, as the JetStream KV bucket does.
 */

const TTL = 3000;
const c = leaseConfig(TTL);
const holder = (id: string): LeaseHolder => ({ coordinatorId: id, addresses: { http: `https://${id}:8080`, grpc: `${id}:50051` } });

class Store {
  value: { holder: LeaseHolder; revision: number; storedAt: number } | null = null;
  private seq = 0;
  constructor(private readonly clock: { t: number }) {}
  private live() {
    if (this.value && this.clock.t >= this.value.storedAt + TTL) this.value = null;
    return this.value;
  }
  read(): LeaseOutcome {
    const v = this.live();
    return { kind: 'read', entry: v && { holder: v.holder, revision: v.revision }, at: this.clock.t };
  }
  write(h: LeaseHolder, expected: number): LeaseOutcome {
    const sentAt = this.clock.t;
    const v = this.live();
    if ((v?.revision ?? 0) !== expected) return { kind: 'conflict', at: this.clock.t };
    this.value = { holder: h, revision: ++this.seq, storedAt: this.clock.t };
    return { kind: 'written', revision: this.seq, sentAt };
  }
}

/** One contender: runs its due step against the store (or does nothing when it is not due). */
function act(s: LeaseState, me: LeaseHolder, store: Store, now: number, up = true): LeaseState {
  const { state, step } = nextStep(s, c, now);
  if (step.kind === 'wait') return state;
  if (!up) return leaseOutcome(state, { kind: 'failed', at: now }, c);
  const out = step.kind === 'read' ? store.read() : store.write(me, step.kind === 'create' ? 0 : step.revision);
  return leaseOutcome(state, out, c);
}

function simulate(ms: number, clock: { t: number }, each: () => void): void {
  const end = clock.t + ms;
  for (; clock.t <= end; clock.t += 50) each();
}

describe('leader lease', () => {
  it('the first contender takes a vacant lease: read, create, then renews every TTL/3', () => {
    const clock = { t: 0 };
    const store = new Store(clock);
    let a = initialLease(0);
    expect(nextStep(a, c, 0).step).toEqual({ kind: 'read' });
    a = act(a, holder('a'), store, 0);
    expect(nextStep(a, c, 0).step).toEqual({ kind: 'create' });
    a = act(a, holder('a'), store, 0);
    expect(a).toMatchObject({ role: 'leader', revision: 1, sentAt: 0 });
    expect(nextStep(a, c, 999).step).toEqual({ kind: 'wait', untilMs: 1000 });
    expect(nextStep(a, c, 1000).step).toEqual({ kind: 'renew', revision: 1 });
  });

  it('two contenders: exactly one leads at every instant after the first step, the other knows who', () => {
    const clock = { t: 0 };
    const store = new Store(clock);
    let a = initialLease(0);
    let b = initialLease(0);
    simulate(20_000, clock, () => {
      a = act(a, holder('a'), store, clock.t);
      b = act(b, holder('b'), store, clock.t);
      // At most one ever; exactly one from the first contender's create on.
      expect([a.role, b.role].filter((r) => r === 'leader')).toHaveLength(clock.t === 0 ? 0 : 1);
    });
    const [leader, standby] = a.role === 'leader' ? [a, b] : [b, a];
    expect(leader.role).toBe('leader');
    expect(standby).toMatchObject({ role: 'standby', leader: holder(leader === a ? 'a' : 'b') });
  });

  it('a leader that stops renewing is replaced once its key ages out, and never overlaps its successor', () => {
    const clock = { t: 0 };
    const store = new Store(clock);
    let a = initialLease(0);
    let b = initialLease(0);
    simulate(2000, clock, () => {
      a = act(a, holder('a'), store, clock.t);
      b = act(b, holder('b'), store, clock.t);
    });
    expect(a.role).toBe('leader');
    // a is cut off from the store: its writes fail, b's go through.
    const cut = clock.t;
    let bLeadsAt: number | undefined;
    simulate(10_000, clock, () => {
      a = act(a, holder('a'), store, clock.t, false);
      b = act(b, holder('b'), store, clock.t);
      if (b.role === 'leader') bLeadsAt ??= clock.t;
      expect(a.role === 'leader' && b.role === 'leader').toBe(false);
    });
    expect(a).toMatchObject({ role: 'standby' });
    expect(b.role).toBe('leader');
    // b takes over within TTL plus one read interval of the cut.
    expect(bLeadsAt! - cut).toBeLessThanOrEqual(TTL + TTL / 3 + 100);
  });

  it('a leader steps down when its term ends without a renewal, before the store could hand the key on', () => {
    const a = leaseOutcome(initialLease(0), { kind: 'written', revision: 7, sentAt: 100 }, c);
    if (a.role !== 'leader') throw new Error('not leader');
    expect(termEnd(a, c)).toBe(100 + TTL - c.marginMs);
    expect(termEnd(a, c)).toBeLessThan(100 + TTL);
    expect(nextStep(a, c, termEnd(a, c) - 1).state.role).toBe('leader');
    expect(nextStep(a, c, termEnd(a, c)).state).toMatchObject({ role: 'standby', leader: null });
    // A failed renew keeps the role until the term ends, retrying meanwhile.
    const failed = leaseOutcome(a, { kind: 'failed', at: 1200 }, c);
    expect(failed).toMatchObject({ role: 'leader', revision: 7, nextAt: 1200 + c.retryMs });
  });

  it('a renew that finds another revision, or a lost create race, makes a standby that reads at once', () => {
    const a = leaseOutcome(initialLease(0), { kind: 'written', revision: 3, sentAt: 0 }, c);
    const lost = leaseOutcome(a, { kind: 'conflict', at: 1000 }, c);
    expect(lost).toEqual({ role: 'standby', leader: null, vacant: false, nextAt: 1000 });
    expect(nextStep(lost, c, 1000).step).toEqual({ kind: 'read' });
  });

  it('a standby that cannot reach the store keeps what it knew and retries', () => {
    const s = leaseOutcome(initialLease(0), { kind: 'read', entry: { holder: holder('x'), revision: 4 }, at: 0 }, c);
    expect(s).toEqual({ role: 'standby', leader: holder('x'), vacant: false, nextAt: 1000 });
    const f = leaseOutcome(s, { kind: 'failed', at: 1000 }, c);
    expect(f).toEqual({ role: 'standby', leader: holder('x'), vacant: false, nextAt: 1000 + c.retryMs });
  });

  it('refuses a TTL too short to renew', () => {
    expect(() => leaseConfig(100)).toThrow(/below 300/);
  });
});
