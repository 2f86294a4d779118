import { z } from 'zod';

/**
 * The cluster's events on NATS: every schema and every subject, in one place (docs/events.md
 * describes them for people; this file is what the code and the tests hold to).
 *
 * Subjects are `orchard.<cluster>.<area>.<id>.<what>`:
 *   orchard.<c>.node.<node id>.up | suspect | down | removed
 *   orchard.<c>.heartbeat.<node id>                 (live only: not kept by the stream)
 *   orchard.<c>.engine.<node id>.started | exited
 *   orchard.<c>.instance.<model>.progress | state | recovered
 *   orchard.<c>.request.<model>.outcome             (sampled: see RequestOutcomeEvent)
 *   orchard.<c>.agent.<node id>.<kind>              what an agent publishes itself (agentSubject)
 * `<model>` is the model name with every character a subject token cannot hold (anything outside
 * [A-Za-z0-9_-]) as '_'; the payload carries the real name. The stream `orchard_<c>_events`
 * keeps every subject but heartbeats for a bounded time (EVENT_STREAM_DEFAULTS); heartbeats come
 * at ~1 Hz per node and would crowd out everything else.
 *
 * Every payload is JSON with `v` (schema version), `kind`, `cluster`, `atMs` (the publisher's
 * clock) and `source` (who published it: a coordinator or an agent, by id).
 */

export const EVENT_SCHEMA_VERSION = 1;

/**
 * NATS server URLs as the coordinator sends them to agents (NodeAgent.SetEventBus): a few
 * `nats://` or `tls://` host:port addresses, nothing else (no credentials in a URL).
 */
export const EventBusUrls = z
  .array(z.string().regex(/^(nats|tls):\/\/[A-Za-z0-9.:[\]_-]{1,255}$/, 'a nats:// or tls:// host:port'))
  .min(1)
  .max(16);

const Source = z.object({ role: z.enum(['coordinator', 'agent']), id: z.string().min(1) });

const base = { v: z.literal(EVENT_SCHEMA_VERSION), cluster: z.string().min(1), atMs: z.number(), source: Source };
const nodeFields = { ...base, nodeId: z.string().min(1), name: z.string(), address: z.string() };

export const NodeStateEvent = z.object({
  ...nodeFields,
  kind: z.enum(['node.up', 'node.suspect', 'node.down', 'node.removed']),
  /** Why: "joined", "reconnected", "agent restarted", "no events for 3012 ms", … */
  reason: z.string(),
});

export const HeartbeatEvent = z.object({ ...nodeFields, kind: z.literal('node.heartbeat') });

export const EngineStartedEvent = z.object({
  ...base,
  kind: z.literal('engine.started'),
  nodeId: z.string().min(1),
  engineId: z.string().min(1),
  engineKind: z.string(),
  pid: z.number().int(),
  port: z.number().int(),
});

export const EngineExitedEvent = z.object({
  ...base,
  kind: z.literal('engine.exited'),
  nodeId: z.string().min(1),
  engineId: z.string().min(1),
  engineKind: z.string(),
  exitCode: z.number().int(),
  signal: z.string(),
  /** Stopped on request (unload, recovery) rather than lost. */
  expected: z.boolean(),
});

/**
 * What an agent says about itself on the bus every few seconds (published by the agent with its
 * own node certificate, never relayed): its engines and memory as it sees them.
 */
export const NodeHealthEvent = z.object({
  ...base,
  kind: z.literal('node.health'),
  nodeId: z.string().min(1),
  /** Engines the agent supervises now. */
  engines: z.number().int().nonnegative(),
  availableBytes: z.number().nonnegative(),
  /** As the hardware probe reads them: normal | warn | critical | unknown, nominal | … */
  memoryPressure: z.string(),
  thermalState: z.string(),
});

export const LoadProgressEvent = z.object({
  ...base,
  kind: z.literal('instance.progress'),
  model: z.string().min(1),
  phase: z.string(),
  message: z.string(),
  bytesDone: z.number(),
  bytesTotal: z.number(),
  elapsedSeconds: z.number(),
});

export const InstanceStateEvent = z.object({
  ...base,
  kind: z.literal('instance.state'),
  model: z.string().min(1),
  /** loading | ready | recovering | failed | unloading */
  state: z.string(),
  engine: z.string(),
  /** The nodes holding its stages, head last. */
  nodes: z.array(z.string()),
  error: z.string(),
  recoveries: z.number().int(),
});

export const RecoveredEvent = z.object({
  ...base,
  kind: z.literal('instance.recovered'),
  model: z.string().min(1),
  /** What was lost: engine-exited, node-down, agent-restarted, … */
  cause: z.string(),
  seconds: z.number(),
});

/**
 * Request outcomes, sampled: every request that did not end `ok` is published; of those that did,
 * at most one per model per second, `represents` saying how many ok requests it stands for.
 */
export const RequestOutcomeEvent = z.object({
  ...base,
  kind: z.literal('request.outcome'),
  model: z.string(),
  outcome: z.string(),
  durationSeconds: z.number(),
  represents: z.number().int().positive(),
});

export const OrchardEvent = z.discriminatedUnion('kind', [
  NodeStateEvent,
  HeartbeatEvent,
  EngineStartedEvent,
  EngineExitedEvent,
  NodeHealthEvent,
  LoadProgressEvent,
  InstanceStateEvent,
  RecoveredEvent,
  RequestOutcomeEvent,
]);
export type OrchardEvent = z.infer<typeof OrchardEvent>;
export type EventKind = OrchardEvent['kind'];
/** An event before the publisher stamps it (version, cluster, source, time). */
export type EventBody = OrchardEvent extends infer E ? (E extends OrchardEvent ? Omit<E, 'v' | 'cluster' | 'atMs' | 'source'> : never) : never;

/** A subject token from a free-form name: subjects split on '.', and '*', '>', spaces are syntax. */
export function subjectToken(name: string): string {
  return name.replace(/[^A-Za-z0-9_-]/g, '_') || '_';
}

export function eventsPrefix(cluster: string): string {
  return `orchard.${subjectToken(cluster)}`;
}

/**
 * Everything an agent publishes itself lives under one subject per node, so the NATS server can
 * let each node's certificate publish there and nowhere else (coordinator/nats/auth.ts). The
 * coordinator's own news about a node (`node.<id>.up|down`) stays outside it: a node cannot
 * announce its own liveness.
 */
export function agentSubjects(cluster: string, nodeId: string): string {
  return `${eventsPrefix(cluster)}.agent.${subjectToken(nodeId)}.>`;
}

/** Every agent's own events (what the coordinator subscribes to). */
export function allAgentSubjects(cluster: string): string {
  return `${eventsPrefix(cluster)}.agent.*.>`;
}

export type AgentEventBody = Extract<EventBody, { kind: 'engine.started' | 'engine.exited' | 'node.health' }>;

/** The subject an agent publishes one of its own events on: `orchard.<c>.agent.<node id>.<kind>`. */
export function agentEventSubject(cluster: string, e: AgentEventBody): string {
  return `${eventsPrefix(cluster)}.agent.${subjectToken(e.nodeId)}.${e.kind}`;
}

/** The node an agent subject belongs to (the token after `agent`), or undefined. */
export function agentOfSubject(cluster: string, subject: string): string | undefined {
  const p = `${eventsPrefix(cluster)}.agent.`;
  if (!subject.startsWith(p)) return undefined;
  return subject.slice(p.length).split('.')[0] || undefined;
}

/** The subject an event is published on (see the layout above). */
export function eventSubject(e: EventBody & { readonly cluster: string; readonly source?: { readonly role: string } }): string {
  const p = eventsPrefix(e.cluster);
  if (e.source?.role === 'agent' && (e.kind === 'engine.started' || e.kind === 'engine.exited' || e.kind === 'node.health')) return agentEventSubject(e.cluster, e);
  const [area, what] = e.kind.split('.') as [string, string];
  switch (e.kind) {
    case 'node.heartbeat':
      return `${p}.heartbeat.${subjectToken(e.nodeId)}`;
    case 'node.up':
    case 'node.suspect':
    case 'node.down':
    case 'node.removed':
      return `${p}.node.${subjectToken(e.nodeId)}.${what}`;
    case 'node.health':
      return agentEventSubject(e.cluster, e);
    case 'engine.started':
    case 'engine.exited':
      return `${p}.engine.${subjectToken(e.nodeId)}.${what}`;
    case 'request.outcome':
      return `${p}.request.${subjectToken(e.model)}.${what}`;
    default:
      return `${p}.${area}.${subjectToken(e.model)}.${what}`;
  }
}

/** The JetStream stream of a cluster's events (stream names take no '.'). */
export function eventStreamName(cluster: string): string {
  return `orchard_${subjectToken(cluster)}_events`;
}

/** What the stream captures: everything of the cluster except heartbeats and agents' health (live only). */
export function eventStreamSubjects(cluster: string): string[] {
  const p = eventsPrefix(cluster);
  return [...['node', 'engine', 'instance', 'request'].map((area) => `${p}.${area}.>`), `${p}.agent.*.engine.>`];
}

export const EVENT_STREAM_DEFAULTS = {
  /** How long events are kept. */
  maxAgeMs: 24 * 3600_000,
  /** And at most this much of them (oldest dropped first). */
  maxBytes: 64 * 2 ** 20,
} as const;

/** Parse one message payload; undefined when it is not an Orchard event of this version. */
export function parseEvent(data: string): OrchardEvent | undefined {
  try {
    const r = OrchardEvent.safeParse(JSON.parse(data));
    return r.success ? r.data : undefined;
  } catch {
    return undefined;
  }
}

/** A one-line human summary (`orchard events` without --json). */
export function describeEvent(e: OrchardEvent): string {
  switch (e.kind) {
    case 'node.up':
    case 'node.suspect':
    case 'node.down':
    case 'node.removed':
      return `${e.name} ${e.kind.slice(5)} (${e.reason})`;
    case 'node.heartbeat':
      return `${e.name} heartbeat`;
    case 'node.health':
      return `${e.nodeId} health: ${e.engines} engines, ${(e.availableBytes / 2 ** 30).toFixed(1)} GiB available, memory ${e.memoryPressure}, thermal ${e.thermalState}`;
    case 'engine.started':
      return `${e.engineKind} ${e.engineId} started on ${e.nodeId} (pid ${e.pid}, port ${e.port})`;
    case 'engine.exited':
      return `${e.engineKind} ${e.engineId} exited on ${e.nodeId}: ${e.signal || `code ${e.exitCode}`}${e.expected ? ' (stopped)' : ''}`;
    case 'instance.progress':
      return `${e.model} ${e.phase}: ${e.message}`;
    case 'instance.state':
      return `${e.model} ${e.state}${e.nodes.length ? ` on ${e.nodes.join(', ')}` : ''}${e.error ? ` — ${e.error}` : ''}`;
    case 'instance.recovered':
      return `${e.model} recovered from ${e.cause} in ${e.seconds.toFixed(1)} s`;
    case 'request.outcome':
      return `${e.model || '(no model)'} request ${e.outcome} in ${e.durationSeconds.toFixed(3)} s${e.represents > 1 ? ` (1 of ${e.represents})` : ''}`;
  }
}
