import { z } from 'zod';

/**
 * The leader lease of a multi-coordinator cluster, as a pure state machine. The store (a
 * JetStream KV bucket whose max age is the lease TTL, see kv-lease.ts) holds one key; whoever
 * wrote it last within the TTL leads. The leader rewrites it compare-and-set on its revision every
 * TTL/3; a standby reads it and, once the key has aged out, `create`s it (which fails if anyone
 * else got there first). Nothing here does I/O or reads a clock: the edge asks `nextStep` what to
 * do and when, does it, and feeds the outcome back through `leaseOutcome` with the time it was
 * sent.
 *
 * Safety: the server ages a key out no earlier than TTL after it stored it, which is after the
 * leader sent the write. So a leader that counts its term from the moment it *sent* the write and
 * steps down `margin` before TTL has passed never overlaps a successor (clock rates assumed equal
 * within the margin; wall clocks are never compared across machines).
 */

/** What the lease key holds: who leads and where to reach it (standbys forward there). */
export const LeaseHolder = z.object({
  coordinatorId: z.string().min(1),
  /** The leader's API addresses as clients and standbys dial them. */
  addresses: z.object({ http: z.string().min(1), grpc: z.string().min(1) }),
});
export type LeaseHolder = z.infer<typeof LeaseHolder>;

export interface LeaseConfig {
  readonly ttlMs: number;
  /** How long before the TTL runs out a leader stops calling itself leader. */
  readonly marginMs: number;
  /** How soon a failed write or read is retried. */
  readonly retryMs: number;
}

export function leaseConfig(ttlMs: number): LeaseConfig {
  if (!(ttlMs >= 300)) throw new RangeError(`lease TTL ${ttlMs} ms is below 300 ms`);
  return { ttlMs, marginMs: Math.round(ttlMs / 10), retryMs: Math.round(ttlMs / 10) };
}

export type LeaseState =
  | {
      readonly role: 'standby';
      /** Who held the lease at the last read (null: nobody, or not read yet). */
      readonly leader: LeaseHolder | null;
      /** The last read found no key: the next step is to take it. */
      readonly vacant: boolean;
      readonly nextAt: number;
    }
  | {
      readonly role: 'leader';
      readonly revision: number;
      /** When the write that the current term counts from was sent. */
      readonly sentAt: number;
      readonly nextAt: number;
    };

export type LeaseStep =
  | { readonly kind: 'read' }
  | { readonly kind: 'create' }
  | { readonly kind: 'renew'; readonly revision: number }
  | { readonly kind: 'wait'; readonly untilMs: number };

export type LeaseOutcome =
  /** A read: the key's holder and revision, or null when there is no key. */
  | { readonly kind: 'read'; readonly entry: { readonly holder: LeaseHolder | null; readonly revision: number } | null; readonly at: number }
  /** A create or renew was stored at `revision`; `sentAt` is when it was sent. */
  | { readonly kind: 'written'; readonly revision: number; readonly sentAt: number }
  /** A create found the key, or a renew found a newer revision: someone else holds it. */
  | { readonly kind: 'conflict'; readonly at: number }
  /** The store did not answer (network, timeout): nothing is known. */
  | { readonly kind: 'failed'; readonly at: number };

export function initialLease(now: number): LeaseState {
  return { role: 'standby', leader: null, vacant: false, nextAt: now };
}

/** When a leader must stop acting as one, whatever the store says afterwards. */
export function termEnd(s: Extract<LeaseState, { role: 'leader' }>, c: LeaseConfig): number {
  return s.sentAt + c.ttlMs - c.marginMs;
}

/** What to do at `now`: step down first if the term ran out, then the state's due step. */
export function nextStep(s: LeaseState, c: LeaseConfig, now: number): { state: LeaseState; step: LeaseStep } {
  const state = expire(s, c, now);
  if (now < state.nextAt) return { state, step: { kind: 'wait', untilMs: state.nextAt } };
  if (state.role === 'leader') return { state, step: { kind: 'renew', revision: state.revision } };
  return { state, step: state.vacant ? { kind: 'create' } : { kind: 'read' } };
}

/** A leader whose term ran out without a renewal becomes a standby that reads at once. */
export function expire(s: LeaseState, c: LeaseConfig, now: number): LeaseState {
  if (s.role !== 'leader' || now < termEnd(s, c)) return s;
  return { role: 'standby', leader: null, vacant: false, nextAt: now };
}

export function leaseOutcome(s: LeaseState, o: LeaseOutcome, c: LeaseConfig): LeaseState {
  const interval = Math.round(c.ttlMs / 3);
  switch (o.kind) {
    case 'written':
      return { role: 'leader', revision: o.revision, sentAt: o.sentAt, nextAt: o.sentAt + interval };
    case 'read':
      if (s.role === 'leader') return s; // a leader does not act on reads; only its own writes count
      if (o.entry === null) return { role: 'standby', leader: null, vacant: true, nextAt: o.at };
      return { role: 'standby', leader: o.entry.holder, vacant: false, nextAt: o.at + interval };
    case 'conflict':
      // Lost a race to create, or a renew found someone else's revision: learn who leads.
      return { role: 'standby', leader: null, vacant: false, nextAt: o.at };
    case 'failed':
      if (s.role === 'leader') return expire({ ...s, nextAt: o.at + c.retryMs }, c, o.at);
      return { ...s, vacant: false, nextAt: o.at + c.retryMs };
  }
}
