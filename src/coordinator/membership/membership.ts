import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type * as grpc from '@grpc/grpc-js';
import type { Logger } from '../../shared/log.ts';
import { errorMessage } from '../../shared/errors.ts';
import type { TlsCredentials } from '../../shared/pki/grpc-tls.ts';
import { AgentClient, type AgentEvent, agentEventFromWire } from './agent-client.ts';
import { type Announced, type DiscoveredAgent, DiscoveredList } from './discovered.ts';
import { type DiscoveredBy, type NodeEntry, Registry, type RegistryChange, type RegistryOptions } from './registry.ts';

export type { DiscoveredAgent } from './discovered.ts';

export interface MembershipEvents {
  change: [change: RegistryChange];
  'agent-event': [nodeId: string, event: AgentEvent];
  /** A heartbeat on the node's Watch stream (the event bus relays them; liveness already counted it). */
  heartbeat: [nodeId: string];
}

interface Link {
  readonly address: string;
  readonly client: AgentClient;
  discoveredBy: DiscoveredBy;
  session: string | undefined;
  nodeId: string | undefined;
  stream: grpc.ClientReadableStream<Record<string, unknown>> | undefined;
  retry: NodeJS.Timeout | undefined;
  attempt: number;
  closed: boolean;
}

export interface MembershipOptions {
  /** How long a discovered agent stays listed after its last Bonjour sighting (default DISCOVERED_TTL_MS). */
  readonly discoveredTtlMs?: number | undefined;
  /** The clock discovered entries age by (tests move it); liveness keeps the real one. */
  readonly now?: (() => number) | undefined;
}

/**
 * Keeps one Watch stream per known agent address and drives the pure Registry with what the
 * streams say. Addresses come from Bonjour, static joins and the state dir. A broken stream
 * is re-dialled with a capped backoff (200 ms → 2 s) for as long as the address is known, so a
 * restarted agent is found again within ~2 s and replaces its own entry.
 */
export class Membership extends EventEmitter<MembershipEvents> {
  readonly registry: Registry;
  readonly #links = new Map<string, Link>();
  readonly #log: Logger;
  readonly #timer: NodeJS.Timeout;
  readonly #statsIntervalSeconds: number;
  readonly #heartbeatIntervalSeconds: number;

  readonly #tls: TlsCredentials | undefined;

  readonly #revoked: () => readonly string[];

  readonly #discovered: DiscoveredList;
  readonly #now: () => number;

  /**
   * @param tls the coordinator's cluster credentials (mutual TLS); without them no agent can be added.
   * @param revoked the cluster's revoked node ids: such an agent is refused, and every agent is told the list.
   */
  constructor(options: RegistryOptions, log: Logger, tls?: TlsCredentials, revoked: () => readonly string[] = () => [], o: MembershipOptions = {}) {
    super();
    this.#tls = tls;
    this.#revoked = revoked;
    this.#discovered = new DiscoveredList(o.discoveredTtlMs);
    this.#now = o.now ?? Date.now;
    this.registry = new Registry(options);
    this.#log = log;
    // Heartbeats arrive at 4× the suspect rate so one lost message never makes a node suspect;
    // stats (a sample of the machine, slower under memory pressure) keep their own pace.
    this.#heartbeatIntervalSeconds = Math.max(0.1, options.suspectAfterMs / 4000);
    this.#statsIntervalSeconds = Math.max(this.#heartbeatIntervalSeconds, 1);
    this.#timer = setInterval(() => {
      this.#apply(this.registry.tick(Date.now()));
      this.#expireDiscovered();
    }, Math.min(250, options.suspectAfterMs / 4));
    this.#timer.unref();
  }

  /** The agent client for a node that is in the registry (any state). */
  client(nodeId: string): AgentClient | undefined {
    const n = this.registry.get(nodeId);
    return n ? this.#links.get(n.address)?.client : undefined;
  }

  /** Agents announced on Bonjour that are not members (yet): `discovered` in status. */
  discovered(): DiscoveredAgent[] {
    return this.#discovered.list();
  }

  /**
   * A Bonjour sighting: dial it (see add). An agent that announces a revoked node id is not
   * dialled at all; one that cannot be dialled over mutual TLS is listed as discovered.
   */
  sighted(address: string, announced: Announced): void {
    if (announced.nodeId && this.#revoked().includes(announced.nodeId)) {
      this.#log.debug({ address, nodeId: announced.nodeId }, 'mDNS sighting of a revoked node: not dialled');
      return;
    }
    const sightedMs = this.#now();
    const member = this.registry.byAddress(address);
    this.add(address, 'mdns').catch((err) => {
      const reason = errorMessage(err);
      this.#log.debug({ address, err: reason }, 'mDNS sighting not reachable');
      if (member || this.registry.byAddress(address) || !this.#links.has(address)) return;
      this.#discovered.record(address, announced, reason, sightedMs);
    });
  }

  /**
   * Its advertisement went away (a Bonjour goodbye): a discovered agent is forgotten and no
   * longer dialled. A member is not touched: its Watch stream says whether it is still there.
   */
  unsighted(address: string): void {
    if (this.#discovered.delete(address)) this.#forgetDiscovered(address);
  }

  #expireDiscovered(): void {
    for (const address of this.#discovered.expire(this.#now())) {
      this.#log.debug({ address }, 'discovered agent not sighted for a while: no longer dialled');
      this.#forgetDiscovered(address);
    }
  }

  /** Stop dialling a discovered address Bonjour found (never a static join, never a member). */
  #forgetDiscovered(address: string): void {
    const link = this.#links.get(address);
    if (link && link.discoveredBy === 'mdns' && !this.registry.byAddress(address)) this.#drop(link);
  }

  addresses(by?: DiscoveredBy): string[] {
    return [...this.#links.values()].filter((l) => !by || l.discoveredBy === by).map((l) => l.address);
  }

  /**
   * Add an agent address and return once it has been described (or failed). Idempotent: a known
   * address keeps its stream. `join` wins over `mdns` for how a node is labelled.
   */
  async add(address: string, by: DiscoveredBy, keepTrying = by === 'mdns'): Promise<NodeEntry> {
    let link = this.#links.get(address);
    if (!link) {
      if (!this.#tls) throw new Error('membership has no cluster credentials: agents are reached over mutual TLS only');
      link = { address, client: new AgentClient(address, this.#tls), discoveredBy: by, session: undefined, nodeId: undefined, stream: undefined, retry: undefined, attempt: 0, closed: false };
      this.#links.set(address, link);
      try {
        return await this.#connect(link);
      } catch (err) {
        // A static join must reach the agent now; a Bonjour sighting or a remembered agent
        // (coordinator restart) keeps retrying in the background.
        if (keepTrying) this.#scheduleReconnect(link);
        else this.#drop(link);
        throw err;
      }
    }
    if (by === 'join') link.discoveredBy = 'join';
    const known = link.nodeId ? this.registry.get(link.nodeId) : undefined;
    if (known && known.state === 'up') return known;
    return this.#connect(link);
  }

  #drop(link: Link): void {
    if (link.closed) return;
    link.closed = true;
    if (link.retry) clearTimeout(link.retry);
    link.stream?.cancel();
    link.client.close();
    if (this.#links.get(link.address) === link) this.#links.delete(link.address);
    this.#discovered.delete(link.address);
  }

  async #connect(link: Link): Promise<NodeEntry> {
    if (link.retry) {
      clearTimeout(link.retry);
      link.retry = undefined;
    }
    const d = await link.client.describe();
    if (link.closed) throw new Error('membership closed');
    // With mutual TLS the node is who its certificate says, whatever its profile claims.
    const proven = link.client.peer;
    if (proven && proven.id !== d.profile.nodeId) throw new Error(`agent at ${link.address} claims node ${d.profile.nodeId} but its certificate names ${proven.id}`);
    if (this.#revoked().includes(d.profile.nodeId)) {
      // A revoked node is never re-dialled (its certificate stays valid until it expires, so
      // only this check keeps it out): forget the address until Bonjour announces it again.
      this.#drop(link);
      throw new Error(`node ${d.profile.nodeId} at ${link.address} was revoked from this cluster`);
    }
    this.#discovered.delete(link.address);
    this.#tellRevocations(link);
    const session = randomUUID();
    const previousStream = link.stream;
    link.session = session;
    link.nodeId = d.profile.nodeId;
    link.attempt = 0;
    this.#apply(this.registry.connected({ profile: d.profile, live: d.live, address: link.address, discoveredBy: link.discoveredBy, session, runId: d.runId }, Date.now()));
    previousStream?.cancel();
    const nodeId = d.profile.nodeId;
    const stream = link.client.watch(this.#statsIntervalSeconds, this.#heartbeatIntervalSeconds);
    link.stream = stream;
    let ended = false;
    const end = (why: string) => {
      if (ended) return;
      ended = true;
      this.#apply(this.registry.disconnected(nodeId, session, Date.now(), why));
      if (link.session === session) this.#scheduleReconnect(link);
    };
    stream.on('data', (m: Record<string, unknown>) => {
      const ev = agentEventFromWire(m);
      this.#apply(this.registry.seen(nodeId, session, Date.now(), ev?.kind === 'stats' ? ev.live : undefined));
      if (ev?.kind === 'heartbeat') this.emit('heartbeat', nodeId);
      else if (ev) this.emit('agent-event', nodeId, ev);
    });
    stream.on('error', (err) => end(`watch stream failed: ${errorMessage(err)}`));
    stream.on('end', () => end('watch stream ended'));
    return this.registry.get(nodeId)!;
  }

  #tellRevocations(link: Link): void {
    link.client.setRevocations(this.#revoked()).catch((err) => this.#log.warn({ address: link.address, err: errorMessage(err) }, 'could not send the revocation list'));
  }

  /**
   * A node was revoked: close every channel to it, forget it, and send the new list to every
   * other agent (their tunnel listeners refuse it from then on).
   */
  revoked(nodeId: string): void {
    for (const link of [...this.#links.values()]) {
      if (link.nodeId === nodeId) this.#drop(link);
      else if (link.nodeId !== undefined) this.#tellRevocations(link);
    }
    this.#apply(this.registry.remove(nodeId, 'revoked'));
  }

  #scheduleReconnect(link: Link): void {
    if (link.closed || link.retry) return;
    const delay = Math.min(2000, 200 * 2 ** link.attempt);
    link.attempt++;
    link.retry = setTimeout(() => {
      link.retry = undefined;
      this.#connect(link).catch((err) => {
        const why = errorMessage(err);
        this.#log.debug({ address: link.address, err: why }, 'agent not reachable yet');
        if (link.nodeId && /ECONNREFUSED|connection refused/i.test(why)) {
          this.#apply(this.registry.refused(link.nodeId, Date.now(), `agent not running at ${link.address} (connection refused)`));
        }
        this.#scheduleReconnect(link);
      });
    }, delay);
    link.retry.unref();
  }

  #apply(changes: RegistryChange[]): void {
    for (const c of changes) {
      if (c.kind === 'removed') {
        // forget the link too when the registry forgets the node (unless the address now belongs to another node)
        const link = this.#links.get(c.node.address);
        if (link && link.nodeId === c.node.nodeId && link.discoveredBy === 'mdns') this.#drop(link);
      } else if (c.kind === 'replaced' && c.previous.address !== c.node.address) {
        // The node came back at a new address (e.g. a new port): stop dialling the old one.
        const old = this.#links.get(c.previous.address);
        if (old && old.discoveredBy === 'mdns') this.#drop(old);
      }
      const n = c.node;
      if (c.kind === 'state') this.#log.info({ node: n.profile.name, nodeId: n.nodeId, from: c.from, to: c.to, reason: c.reason }, 'node state');
      else this.#log.info({ node: n.profile.name, nodeId: n.nodeId, address: n.address, reason: c.kind === 'removed' ? c.reason : undefined }, `node ${c.kind}`);
      this.emit('change', c);
    }
  }

  close(): void {
    clearInterval(this.#timer);
    for (const link of [...this.#links.values()]) this.#drop(link);
  }
}
