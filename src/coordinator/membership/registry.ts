import type { HardwareProfile, LiveStats } from '../../shared/hardware.ts';

/**
 * The coordinator's view of cluster membership: a pure state machine keyed by the node's
 * stable id. No timers and no I/O here — the caller feeds it what the agents' Watch streams
 * say (connected / seen / disconnected) and the clock (`tick`), and acts on the changes it
 * returns. That keeps every transition testable with plain numbers.
 *
 *   up ──(no event for suspectAfterMs, or the stream broke)──► suspect
 *   suspect ──(no event for downAfterMs since last seen, or re-dialling it was refused)──► down
 *   suspect/down ──(an event from the same session, or the same agent run reconnected)──► up
 *   any ──(a new run of the same node id = the agent restarted)──► replaced, up
 *   down ──(forgetAfterMs since last seen, when set)──► removed
 *
 * Suspect is a blip, not a verdict: the runtime keeps a suspect node's instances and acts only on
 * down (downAfterMs is the grace period), replaced and removed. Liveness rides on the agent's
 * heartbeats, so a stats sample that is late never counts against a node.
 *
 * No ghosts: a node id has exactly one entry, and an agent address has exactly one entry (a
 * node that comes back at the same address under a new id — e.g. its state dir was wiped —
 * evicts the old entry instead of sitting next to it).
 */
export type NodeState = 'up' | 'suspect' | 'down';
export type DiscoveredBy = 'mdns' | 'join';

export interface RegistryOptions {
  /** Silence (no Watch event) after which an up node becomes suspect. */
  readonly suspectAfterMs: number;
  /** Silence after which a node is down (measured from the last event, like suspectAfterMs). */
  readonly downAfterMs: number;
  /** Down nodes are dropped from the registry after this long; undefined keeps them. */
  readonly forgetAfterMs?: number | undefined;
}

export const DEFAULT_REGISTRY_OPTIONS: RegistryOptions = {
  suspectAfterMs: 3000,
  downAfterMs: 10_000,
  forgetAfterMs: 10 * 60_000,
};

export interface NodeEntry {
  readonly nodeId: string;
  readonly profile: HardwareProfile;
  readonly live: LiveStats | undefined;
  /** host:port of the node's agent gRPC server. */
  readonly address: string;
  readonly discoveredBy: DiscoveredBy;
  readonly state: NodeState;
  /** Identifies one connection (Watch stream) to one agent process. */
  readonly session: string;
  /** The agent process's incarnation; a new one of the same id = the agent restarted ('' = an agent that does not say). */
  readonly runId: string;
  readonly lastSeenMs: number;
  readonly stateSinceMs: number;
  readonly joinedAtMs: number;
}

export type RegistryChange =
  | { readonly kind: 'added'; readonly node: NodeEntry }
  | { readonly kind: 'replaced'; readonly previous: NodeEntry; readonly node: NodeEntry }
  | { readonly kind: 'state'; readonly node: NodeEntry; readonly from: NodeState; readonly to: NodeState; readonly reason: string }
  | { readonly kind: 'removed'; readonly node: NodeEntry; readonly reason: string };

export interface ConnectedNode {
  readonly profile: HardwareProfile;
  readonly live?: LiveStats | undefined;
  readonly address: string;
  readonly discoveredBy: DiscoveredBy;
  readonly session: string;
  readonly runId?: string | undefined;
}

/**
 * A new connection is a restarted agent when its run id differs (its engines died with the old
 * process); the same run re-dialled after a cut link is the same agent. Agents that send no run
 * id are judged by the connection, as before run ids existed.
 */
function restarted(previous: NodeEntry, c: ConnectedNode): boolean {
  if (previous.runId && c.runId) return previous.runId !== c.runId;
  return previous.session !== c.session;
}

export function validateRegistryOptions(o: RegistryOptions): RegistryOptions {
  if (!(o.suspectAfterMs > 0)) throw new RangeError('suspectAfterMs must be > 0');
  if (!(o.downAfterMs > o.suspectAfterMs)) throw new RangeError('downAfterMs must be greater than suspectAfterMs');
  if (o.forgetAfterMs !== undefined && !(o.forgetAfterMs > o.downAfterMs)) {
    throw new RangeError('forgetAfterMs must be greater than downAfterMs');
  }
  return o;
}

export class Registry {
  readonly #options: RegistryOptions;
  readonly #nodes = new Map<string, NodeEntry>();

  constructor(options: RegistryOptions = DEFAULT_REGISTRY_OPTIONS) {
    this.#options = validateRegistryOptions(options);
  }

  get options(): RegistryOptions {
    return this.#options;
  }

  /** All entries, stable order (by name, then id) for display. */
  nodes(): NodeEntry[] {
    return [...this.#nodes.values()].sort((a, b) => a.profile.name.localeCompare(b.profile.name) || a.nodeId.localeCompare(b.nodeId));
  }

  /** Nodes the planner may use right now. */
  upNodes(): NodeEntry[] {
    return this.nodes().filter((n) => n.state === 'up');
  }

  get(nodeId: string): NodeEntry | undefined {
    return this.#nodes.get(nodeId);
  }

  byAddress(address: string): NodeEntry | undefined {
    for (const n of this.#nodes.values()) if (n.address === address) return n;
    return undefined;
  }

  /** An agent answered Describe on a fresh Watch stream. */
  connected(c: ConnectedNode, nowMs: number): RegistryChange[] {
    const changes: RegistryChange[] = [];
    const id = c.profile.nodeId;
    if (!id) throw new RangeError('a node without an id cannot join');
    // Another id at the same address is a ghost of this agent (identity reset): evict it.
    for (const other of [...this.#nodes.values()]) {
      if (other.nodeId !== id && other.address === c.address) {
        this.#nodes.delete(other.nodeId);
        changes.push({ kind: 'removed', node: other, reason: `node ${c.profile.name} (${id}) now answers at ${c.address}` });
      }
    }
    const previous = this.#nodes.get(id);
    const node: NodeEntry = {
      nodeId: id,
      profile: c.profile,
      live: c.live ?? previous?.live,
      address: c.address,
      // A node first joined explicitly stays "join" even if mDNS also finds it.
      discoveredBy: previous?.discoveredBy === 'join' ? 'join' : c.discoveredBy,
      state: 'up',
      session: c.session,
      runId: c.runId ?? '',
      lastSeenMs: nowMs,
      stateSinceMs: previous && previous.state === 'up' && !restarted(previous, c) ? previous.stateSinceMs : nowMs,
      joinedAtMs: previous?.joinedAtMs ?? nowMs,
    };
    this.#nodes.set(id, node);
    if (!previous) changes.push({ kind: 'added', node });
    else if (restarted(previous, c)) changes.push({ kind: 'replaced', previous, node });
    else if (previous.state !== 'up') {
      changes.push({ kind: 'state', node, from: previous.state, to: 'up', reason: 'reconnected' });
    }
    return changes;
  }

  /** Any Watch event (stats, engine event) from a session is proof of life. */
  seen(nodeId: string, session: string, nowMs: number, live?: LiveStats): RegistryChange[] {
    const prev = this.#nodes.get(nodeId);
    // Events from an old connection of a restarted agent must not revive or refresh the new one.
    if (!prev || prev.session !== session) return [];
    const node: NodeEntry = {
      ...prev,
      live: live ?? prev.live,
      lastSeenMs: Math.max(prev.lastSeenMs, nowMs),
      state: 'up',
      stateSinceMs: prev.state === 'up' ? prev.stateSinceMs : nowMs,
    };
    this.#nodes.set(nodeId, node);
    return prev.state === 'up' ? [] : [{ kind: 'state', node, from: prev.state, to: 'up', reason: 'events resumed' }];
  }

  /**
   * The node published on the event bus with its own certificate (its agent is alive): a second
   * sign of life that keeps an `up` node from turning suspect for silence while its Watch events
   * are late. It never revives a suspect or down node — the coordinator drives nodes over Watch,
   * and only Watch can say that link works again.
   */
  busSeen(nodeId: string, nowMs: number): void {
    const prev = this.#nodes.get(nodeId);
    if (prev?.state !== 'up') return;
    this.#nodes.set(nodeId, { ...prev, lastSeenMs: Math.max(prev.lastSeenMs, nowMs) });
  }

  /**
   * The Watch stream of a session ended or failed. A broken stream is a stronger signal than
   * silence, so the node is suspect at once; it turns down on the usual clock unless it comes
   * back. Stale sessions are ignored.
   */
  disconnected(nodeId: string, session: string, nowMs: number, reason = 'watch stream ended'): RegistryChange[] {
    const prev = this.#nodes.get(nodeId);
    if (!prev || prev.session !== session || prev.state !== 'up') return [];
    const node: NodeEntry = { ...prev, state: 'suspect', stateSinceMs: nowMs };
    this.#nodes.set(nodeId, node);
    return [{ kind: 'state', node, from: 'up', to: 'suspect', reason }];
  }

  /**
   * Re-dialling a suspect node's agent was refused: the host answered but nothing listens on the
   * agent's port, so the agent process (and every engine it supervised) is gone. That is a death,
   * not a blip, and need not wait out the silence clock. A stalled agent or a cut link times out
   * instead of refusing, and keeps the usual clock.
   */
  refused(nodeId: string, nowMs: number, reason: string): RegistryChange[] {
    const prev = this.#nodes.get(nodeId);
    if (prev?.state !== 'suspect') return [];
    const node: NodeEntry = { ...prev, state: 'down', stateSinceMs: nowMs };
    this.#nodes.set(nodeId, node);
    return [{ kind: 'state', node, from: 'suspect', to: 'down', reason }];
  }

  /** Advance the clock: silence turns up → suspect → down, and old down entries are forgotten. */
  tick(nowMs: number): RegistryChange[] {
    const changes: RegistryChange[] = [];
    const { suspectAfterMs, downAfterMs, forgetAfterMs } = this.#options;
    for (const prev of [...this.#nodes.values()]) {
      const silent = nowMs - prev.lastSeenMs;
      if (prev.state === 'down') {
        if (forgetAfterMs !== undefined && silent >= forgetAfterMs) {
          this.#nodes.delete(prev.nodeId);
          changes.push({ kind: 'removed', node: prev, reason: `down for ${Math.round(silent / 1000)} s` });
        }
        continue;
      }
      let to: NodeState = prev.state;
      if (silent >= downAfterMs) to = 'down';
      else if (silent >= suspectAfterMs) to = 'suspect';
      if (to === prev.state || (prev.state === 'suspect' && to === 'up')) continue;
      const node: NodeEntry = { ...prev, state: to, stateSinceMs: nowMs };
      this.#nodes.set(prev.nodeId, node);
      changes.push({ kind: 'state', node, from: prev.state, to, reason: `no events for ${silent} ms` });
    }
    return changes;
  }

  /** Explicit removal (e.g. an operator forgets a node). */
  remove(nodeId: string, reason = 'removed'): RegistryChange[] {
    const prev = this.#nodes.get(nodeId);
    if (!prev) return [];
    this.#nodes.delete(nodeId);
    return [{ kind: 'removed', node: prev, reason }];
  }
}
