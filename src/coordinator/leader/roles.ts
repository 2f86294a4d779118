import type { NatsConnection } from '@nats-io/transport-node';
import { errorMessage } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import { KvLeaderLease } from './kv-lease.ts';
import type { LeaseHolder } from './lease.ts';

/**
 * Which coordinator drives the cluster (membership, healing, re-adoption, every engine start and
 * stop). With the file store there is one coordinator and it always does (`single`). With NATS
 * the leader lease decides: the `leader` drives, a `standby` serves the API by forwarding to the
 * leader and never dials an agent.
 *
 * A leader that loses the lease while it runs (cut off from NATS longer than its term) may
 * already have been replaced, so it must stop driving agents at once; the coordinator does that
 * by stopping itself (`onDemoted`, fail-stop) — the new leader re-adopts the engines, and the
 * restarted process comes back as a standby.
 */
export type Role = 'single' | 'leader' | 'standby';

export interface RoleView {
  readonly role: Role;
  /** Who leads: this coordinator when leading, the lease holder a standby last read, null when unknown or single. */
  readonly leader: LeaseHolder | null;
}

export interface Leadership {
  view(): RoleView;
  /** Whether this coordinator may drive agents and write the instance store now. */
  isLeading(): boolean;
  stop(): Promise<void>;
}

/** The only coordinator (file store, or a nats-server of its own): it leads from the start. */
export async function singleCoordinator(onLead: () => Promise<void>): Promise<Leadership> {
  await onLead();
  return { view: () => ({ role: 'single', leader: null }), isLeading: () => true, stop: async () => {} };
}

export interface ContendOptions {
  readonly nc: NatsConnection;
  readonly clusterId: string;
  readonly self: LeaseHolder;
  readonly ttlMs: number;
  readonly replicas?: number | undefined;
  readonly log: Logger;
  /** Start leading: re-adopt from the store, dial every known agent. Runs once, on the first win. */
  readonly onLead: () => Promise<void>;
  /** The lease was lost after it was held: stop driving agents now. */
  readonly onDemoted: () => void;
}

/**
 * Contend for the lease, and lead whenever it is won. `decided` resolves once the first election
 * is decided — this coordinator leads (and has claimed the stored instances), or a standby
 * learned who leads — or after 1.5 TTL without either, so a lone coordinator leads before it
 * says ready.
 */
export async function contendForLeadership(o: ContendOptions): Promise<{ leadership: Leadership; decided: Promise<void> }> {
  const log = o.log.child({ part: 'leader' });
  let led = false;
  let ready = false;
  let demoted = false;
  let decided: () => void = () => {};
  const firstDecision = new Promise<void>((resolve) => {
    decided = resolve;
    setTimeout(resolve, o.ttlMs * 1.5).unref();
  });
  const lease = await KvLeaderLease.start(o.nc, {
    clusterId: o.clusterId,
    self: o.self,
    ttlMs: o.ttlMs,
    replicas: o.replicas,
    onError: (err) => log.warn({ err: errorMessage(err) }, 'leader lease: the store did not answer'),
    onChange: (v) => {
      if (v.role === 'leader' && !led) {
        led = true;
        log.info({ coordinatorId: o.self.coordinatorId }, 'this coordinator leads: re-adopting stored instances and dialling every known agent');
        o.onLead().then(
          () => {
            ready = true;
            decided();
          },
          (err: unknown) => log.error({ err: errorMessage(err) }, 'taking over as leader failed'),
        );
      } else if (v.role === 'standby' && led && !demoted) {
        demoted = true;
        log.error('this coordinator lost the leader lease while leading: stopping (another coordinator may lead already)');
        o.onDemoted();
      } else if (v.role === 'standby') {
        if (v.leader) decided();
        log.info({ leader: v.leader }, v.leader ? 'standby: forwarding to the leader' : 'standby: no leader known yet');
      }
    },
  });
  const leadership: Leadership = {
    view: () => {
      const v = lease.view();
      if (v.role === 'standby') return { role: 'standby', leader: v.leader };
      // Until the stored instances are claimed, a request here could not find its model: while
      // taking over, this coordinator answers like a standby that knows no leader (retry).
      return ready ? { role: 'leader', leader: o.self } : { role: 'standby', leader: null };
    },
    isLeading: () => lease.isLeader(),
    stop: () => lease.stop(),
  };
  return { leadership, decided: firstDecision };
}
