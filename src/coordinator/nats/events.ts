import { jetstreamManager, RetentionPolicy, StorageType } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import { errorMessage } from '../../shared/errors.ts';
import { EVENT_SCHEMA_VERSION, EVENT_STREAM_DEFAULTS, type EventBody, eventStreamName, eventStreamSubjects, eventSubject, type OrchardEvent } from '../../shared/events.ts';
import type { Logger } from '../../shared/log.ts';
import type { ModelStatus, Runtime } from '../instances/runtime.ts';
import type { Membership } from '../membership/membership.ts';
import type { NodeEntry, RegistryChange } from '../membership/registry.ts';
import type { InstanceStore } from '../state/instance-store.ts';

/**
 * The coordinator's side of the event bus (subjects and schemas: src/shared/events.ts). It
 * publishes what it observes — membership changes, the agents' heartbeats and engine events it
 * receives over Watch, load progress, instance states, recoveries, sampled request outcomes — on
 * core NATS from one connection, so a subscriber sees them in the order they happened; the
 * JetStream stream `orchard_<cluster>_events` captures all but heartbeats for a bounded time.
 * In the same mode it keeps each node's last-seen time in the nodes bucket (at most every 5 s).
 */
export interface ClusterEventsOptions {
  readonly nc: NatsConnection;
  readonly clusterId: string;
  /** Who publishes (several coordinators may share a cluster). */
  readonly sourceId: string;
  readonly log: Logger;
  readonly maxAgeMs?: number | undefined;
  readonly replicas?: number | undefined;
}

export class ClusterEvents {
  readonly #o: ClusterEventsOptions;
  #closed = false;

  private constructor(o: ClusterEventsOptions) {
    this.#o = o;
  }

  /** Make (or bring up to date) the cluster's event stream, then publish. */
  static async open(o: ClusterEventsOptions): Promise<ClusterEvents> {
    const jsm = await jetstreamManager(o.nc);
    const name = eventStreamName(o.clusterId);
    const config = {
      subjects: eventStreamSubjects(o.clusterId),
      retention: RetentionPolicy.Limits,
      storage: StorageType.File,
      max_age: (o.maxAgeMs ?? EVENT_STREAM_DEFAULTS.maxAgeMs) * 1_000_000,
      max_bytes: EVENT_STREAM_DEFAULTS.maxBytes,
      num_replicas: o.replicas ?? 1,
    };
    try {
      await jsm.streams.info(name);
      await jsm.streams.update(name, config);
    } catch {
      await jsm.streams.add({ name, ...config });
    }
    return new ClusterEvents(o);
  }

  /** Stamp and publish one event; a bus that is down costs an event, never the coordinator. */
  publish(body: EventBody): void {
    if (this.#closed) return;
    const e = { ...body, v: EVENT_SCHEMA_VERSION, cluster: this.#o.clusterId, atMs: Date.now(), source: { role: 'coordinator', id: this.#o.sourceId } } as OrchardEvent;
    try {
      this.#o.nc.publish(eventSubject(e), JSON.stringify(e));
    } catch (err) {
      this.#o.log.debug({ kind: e.kind, err: errorMessage(err) }, 'event not published');
    }
  }

  /** Publish what the membership and the runtime report from now on; refresh last-seen in the store. */
  follow(membership: Membership, runtime: Runtime, store: InstanceStore): void {
    const node = (n: NodeEntry) => ({ nodeId: n.nodeId, name: n.profile.name, address: n.address });
    // First in line for membership news: the runtime reacts to the same emit synchronously
    // (a lost engine fails its model), and the cause must be published before the effect.
    membership.prependListener('change', (c) => this.publish(nodeEvent(c, node(c.node))));
    const lastSeen = new LastSeenWriter(store, this.#o.log);
    membership.on('heartbeat', (id) => {
      const n = membership.registry.get(id);
      if (!n) return;
      this.publish({ kind: 'node.heartbeat', ...node(n) });
      lastSeen.seen(n);
    });
    membership.prependListener('agent-event', (nodeId, ev) => {
      if (ev.kind === 'engine-started') {
        this.publish({ kind: 'engine.started', nodeId, engineId: ev.engine.engineId, engineKind: ev.engine.kind, pid: ev.engine.pid, port: ev.engine.port });
      } else if (ev.kind === 'engine-exited') {
        this.publish({ kind: 'engine.exited', nodeId, engineId: ev.engineId, engineKind: ev.engineKind, exitCode: ev.exitCode, signal: ev.signal, expected: ev.expected });
      }
    });
    // State changes only, once each: the runtime announces a model when it settles (ready, failed,
    // …), and a load's first progress is where its `loading` (or `recovering`) state shows.
    const states = new Map<string, string>();
    const state = (m: ModelStatus) => {
      if (states.get(m.name) === m.state) return;
      states.set(m.name, m.state);
      this.publish({ kind: 'instance.state', model: m.name, state: m.state, engine: m.engine, nodes: m.stages.map((s) => s.nodeName), error: m.error, recoveries: m.recoveries ?? 0 });
    };
    runtime.on('progress', (model, p) => {
      if (p.model) state(p.model);
      this.publish({ kind: 'instance.progress', model, phase: p.phase, message: p.message, bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, elapsedSeconds: p.elapsedSeconds });
    });
    runtime.on('model', state);
    runtime.on('recovered', (model, cause, seconds) => this.publish({ kind: 'instance.recovered', model, cause, seconds }));
    const sampler = new RequestSampler();
    runtime.on('request', (model, outcome, seconds) => {
      const represents = sampler.take(model, outcome, Date.now());
      if (represents > 0) this.publish({ kind: 'request.outcome', model, outcome, durationSeconds: seconds, represents });
    });
  }

  /** Flush what was published (the connection itself belongs to the cluster state). */
  async close(): Promise<void> {
    if (this.#closed) return;
    await this.#o.nc.flush().catch(() => {});
    this.#closed = true;
  }
}

/** A registry change as the node event it is on the bus. */
export function nodeEvent(c: RegistryChange, n: { nodeId: string; name: string; address: string }): EventBody {
  switch (c.kind) {
    case 'added':
      return { kind: 'node.up', ...n, reason: 'joined' };
    case 'replaced':
      return { kind: 'node.up', ...n, reason: 'agent restarted' };
    case 'removed':
      return { kind: 'node.removed', ...n, reason: c.reason };
    case 'state':
      return { kind: `node.${c.to}`, ...n, reason: c.reason };
  }
}

/**
 * Which request outcomes are published: every one that is not `ok`; of the ok ones, at most one
 * per model per `intervalMs`. `take` returns how many requests the published event stands for
 * (0 = do not publish).
 */
export class RequestSampler {
  readonly #intervalMs: number;
  readonly #last = new Map<string, { atMs: number; skipped: number }>();

  constructor(intervalMs = 1000) {
    this.#intervalMs = intervalMs;
  }

  take(model: string, outcome: string, nowMs: number): number {
    if (outcome !== 'ok') return 1;
    const s = this.#last.get(model);
    if (s && nowMs - s.atMs < this.#intervalMs) {
      s.skipped++;
      return 0;
    }
    this.#last.set(model, { atMs: nowMs, skipped: 0 });
    return 1 + (s?.skipped ?? 0);
  }
}

/** Last-seen times in the nodes bucket, at most every 5 s per node (heartbeats come at ~1 Hz). */
class LastSeenWriter {
  readonly #written = new Map<string, number>();

  constructor(
    private readonly store: InstanceStore,
    private readonly log: Logger,
  ) {}

  seen(n: NodeEntry): void {
    const now = Date.now();
    if (now - (this.#written.get(n.nodeId) ?? 0) < 5000) return;
    this.#written.set(n.nodeId, now);
    this.store
      .putNode({ nodeId: n.nodeId, name: n.profile.name, address: n.address, profile: { ...n.profile }, lastSeenMs: n.lastSeenMs })
      .catch((err: unknown) => this.log.debug({ node: n.profile.name, err: errorMessage(err) }, 'could not store last-seen'));
  }
}
