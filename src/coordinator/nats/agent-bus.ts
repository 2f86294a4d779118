import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import { errorMessage } from '../../shared/errors.ts';
import { agentOfSubject, allAgentSubjects, type OrchardEvent, parseEvent, subjectToken } from '../../shared/events.ts';
import type { Logger } from '../../shared/log.ts';
import type { Membership } from '../membership/membership.ts';
import { natsAuthorization } from './auth.ts';
import type { LocalNats } from './server.ts';

/**
 * The agents' side of the bus, as the coordinator runs it: which nodes the NATS server lets in
 * (auth.ts), telling each admitted agent where the bus is, and hearing what agents publish.
 *
 * A node is admitted when it becomes a member (joined and dialled over mutual TLS) and expelled
 * when revoked: the local server's user list is rewritten and reloaded (a revoked node's
 * connection is closed by the server). An external server admits the node role as a whole and
 * needs no change (`orchard coordinator nats-config`, auth.ts). Only then is the agent told the
 * server URLs (NodeAgent.SetEventBus), so its first connection is already allowed.
 *
 * An agent's event counts only when the subject, the payload's node id and its source agree — the
 * server already guarantees the subject is the publisher's own — and then it is proof of life for
 * an `up` node (Registry.busSeen).
 */
export interface AgentBusOptions {
  readonly nc: NatsConnection;
  readonly clusterId: string;
  /** The server URLs agents are told (the coordinator's own). */
  readonly urls: readonly string[];
  /** The local server to reload; none for an external server (its user list names roles). */
  readonly server: LocalNats | undefined;
  readonly log: Logger;
}

export class AgentBus {
  readonly #o: AgentBusOptions;
  readonly #admitted = new Set<string>();
  #writing: Promise<void> = Promise.resolve();
  #sub: Subscription | undefined;
  readonly #listeners: ((e: OrchardEvent) => void)[] = [];

  constructor(o: AgentBusOptions) {
    this.#o = o;
  }

  /** Admit nodes (idempotent); resolves once the server enforces the new list. */
  admit(nodeIds: readonly string[]): Promise<void> {
    const fresh = nodeIds.filter((id) => !this.#admitted.has(id));
    for (const id of fresh) this.#admitted.add(id);
    return fresh.length > 0 ? this.#apply() : this.#writing;
  }

  expel(nodeId: string): Promise<void> {
    return this.#admitted.delete(nodeId) ? this.#apply() : this.#writing;
  }

  /** Serialised: each rewrite carries the whole list, the last one wins. */
  #apply(): Promise<void> {
    this.#writing = this.#writing.then(async () => {
      await this.#o.server?.reload(natsAuthorization(this.#o.clusterId, this.#admitted));
    });
    this.#writing = this.#writing.catch((err: unknown) => this.#o.log.error({ err: errorMessage(err) }, 'could not update the NATS user list'));
    return this.#writing;
  }

  /** Admit members, tell them the bus, expel the revoked; listen to what agents publish. */
  follow(membership: Membership): void {
    const tell = (nodeId: string) => {
      void this.admit([nodeId]).then(() =>
        membership
          .client(nodeId)
          ?.setEventBus(this.#o.urls)
          .catch((err: unknown) => this.#o.log.warn({ nodeId, err: errorMessage(err) }, 'could not tell the agent where the event bus is')),
      );
    };
    membership.on('change', (c) => {
      if (c.kind === 'added' || c.kind === 'replaced' || (c.kind === 'state' && c.to === 'up')) tell(c.node.nodeId);
      else if (c.kind === 'removed' && c.reason === 'revoked') void this.expel(c.node.nodeId);
    });
    for (const n of membership.registry.nodes()) if (n.state === 'up') tell(n.nodeId);
    this.#sub = this.#o.nc.subscribe(allAgentSubjects(this.#o.clusterId), {
      callback: (_err, m) => {
        const e = parseEvent(m.string());
        if (!e || !fromItsAgent(this.#o.clusterId, m.subject, e)) {
          this.#o.log.debug({ subject: m.subject }, 'agent event dropped: it does not parse or names another node');
          return;
        }
        if ('nodeId' in e) membership.registry.busSeen(e.nodeId, Date.now());
        for (const fn of this.#listeners) fn(e);
      },
    });
  }

  /** Every accepted agent event, after the coordinator has taken it into account. */
  onEvent(fn: (e: OrchardEvent) => void): void {
    this.#listeners.push(fn);
  }

  async close(): Promise<void> {
    this.#sub?.unsubscribe();
    await this.#writing;
  }
}

/** The subject's node, the payload's node and its source are one agent of this cluster. */
export function fromItsAgent(clusterId: string, subject: string, e: OrchardEvent): boolean {
  if (e.cluster !== clusterId || e.source.role !== 'agent' || !('nodeId' in e)) return false;
  return e.source.id === e.nodeId && agentOfSubject(clusterId, subject) === subjectToken(e.nodeId);
}
