import type { RegistryChange } from '../../membership/registry.ts';
import type { LoadProgress, ModelState } from '../../instances/runtime.ts';

/**
 * The console's event list: the last cluster events, kept in a bounded in-memory ring. There is
 * no event bus yet (the NATS work adds one); until then the feed derives events from what the
 * coordinator already publishes — membership changes and model state transitions — so nothing
 * in the runtime changes for the console. Pure: inputs in, events out.
 */

export type ConsoleEventKind =
  | 'node-joined'
  | 'node-restarted'
  | 'node-state'
  | 'node-removed'
  | 'load-started'
  | 'load-progress'
  | 'model-ready'
  | 'model-failed'
  | 'model-recovering'
  | 'load-ended'
  | 'model-unloaded';

export interface ConsoleEventInput {
  readonly kind: ConsoleEventKind;
  readonly level: 'info' | 'warn' | 'error';
  /** Node or model name the event is about. */
  readonly subject: string;
  readonly message: string;
}

export interface ConsoleEvent extends ConsoleEventInput {
  readonly seq: number;
  readonly atMs: number;
}

export const DEFAULT_EVENT_CAPACITY = 200;

/** Bounded ring: the oldest event goes when a new one would exceed the capacity. */
export class EventRing {
  readonly #capacity: number;
  readonly #events: ConsoleEvent[] = [];
  #seq = 0;

  constructor(capacity = DEFAULT_EVENT_CAPACITY) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new RangeError(`event ring capacity must be a positive integer, got ${capacity}`);
    this.#capacity = capacity;
  }

  push(e: ConsoleEventInput, atMs = Date.now()): ConsoleEvent {
    const event = { ...e, seq: ++this.#seq, atMs };
    this.#events.push(event);
    if (this.#events.length > this.#capacity) this.#events.shift();
    return event;
  }

  /** Events oldest first, optionally only those after `afterSeq`. */
  list(afterSeq = 0): ConsoleEvent[] {
    return this.#events.filter((e) => e.seq > afterSeq);
  }
}

/** A membership change as an event. */
export function membershipEvent(c: RegistryChange): ConsoleEventInput {
  const name = c.node.profile.name;
  switch (c.kind) {
    case 'added':
      return { kind: 'node-joined', level: 'info', subject: name, message: `${name} joined (${c.node.profile.chip}, ${c.node.address})` };
    case 'replaced':
      return { kind: 'node-restarted', level: 'warn', subject: name, message: `${name} restarted: its agent came back with a new session` };
    case 'state':
      return { kind: 'node-state', level: c.to === 'up' ? 'info' : c.to === 'down' ? 'error' : 'warn', subject: name, message: `${name} ${c.from} → ${c.to}${c.reason ? `: ${c.reason}` : ''}` };
    case 'removed':
      return { kind: 'node-removed', level: 'warn', subject: name, message: `${name} left the cluster${c.reason ? `: ${c.reason}` : ''}` };
  }
}

export interface ModelSighting {
  readonly name: string;
  readonly state: ModelState;
  readonly error: string;
}

/**
 * Events from two consecutive views of the models (name → state): a new loading model is a load
 * that started, a change of state is ready/failed/unloading, a model that vanished while loading
 * is a load that ended without becoming ready (the runtime leaves no entry for a failed load).
 */
export function modelTransitions(before: ReadonlyMap<string, ModelSighting>, after: ReadonlyMap<string, ModelSighting>): ConsoleEventInput[] {
  const out: ConsoleEventInput[] = [];
  for (const [name, m] of after) {
    const prev = before.get(name);
    if (prev?.state === m.state) continue;
    if (m.state === 'loading') out.push({ kind: 'load-started', level: 'info', subject: name, message: `loading ${name}` });
    else if (m.state === 'ready') out.push({ kind: 'model-ready', level: 'info', subject: name, message: `${name} is ready` });
    else if (m.state === 'recovering') out.push({ kind: 'model-recovering', level: 'warn', subject: name, message: `${name} lost an engine and is being re-placed${m.error ? `: ${m.error}` : ''}` });
    else if (m.state === 'failed') out.push({ kind: 'model-failed', level: 'error', subject: name, message: `${name} failed${m.error ? `: ${m.error}` : ''}` });
    else out.push({ kind: 'model-unloaded', level: 'info', subject: name, message: `unloading ${name}` });
  }
  for (const [name, prev] of before) {
    if (after.has(name)) continue;
    if (prev.state === 'loading') out.push({ kind: 'load-ended', level: 'warn', subject: name, message: `the load of ${name} ended without a ready model (failed or cancelled)` });
    else if (prev.state !== 'unloading') out.push({ kind: 'model-unloaded', level: 'info', subject: name, message: `${name} unloaded` });
  }
  return out;
}

/** A load phase as an event (only a change of phase is one; byte counts are not). */
export function progressEvent(model: string, p: LoadProgress): ConsoleEventInput {
  return { kind: 'load-progress', level: p.phase === 'failed' ? 'error' : 'info', subject: model, message: `${model}: ${p.phase} — ${p.message}` };
}
