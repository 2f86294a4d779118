import { join } from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { errorMessage, OrchardError } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import type { ClusterCa } from '../../shared/pki/certificates.ts';
import type { TlsCredentials } from '../../shared/pki/grpc-tls.ts';
import { natsClientTls } from '../../shared/pki/nats-tls.ts';
import { FileInstanceStore, type InstanceStore } from '../state/instance-store.ts';
import { KvInstanceStore } from '../state/kv-instance-store.ts';
import { AgentBus } from './agent-bus.ts';
import { natsAuthorization, writeNatsServerTls } from './auth.ts';
import { ClusterEvents } from './events.ts';
import { findNatsServer, type LocalNats, startLocalNats } from './server.ts';

/**
 * Where the coordinator keeps the state it resumes from, decided once at start:
 *   `nats.url`    connect to that NATS (JetStream) server or cluster; unreachable = refuse to start
 *   `nats.local`  start a local `nats-server -js` on the state dir when one is installed
 *                 (`orchard up` / `orchard coordinator` without `--nats` or `--no-nats`)
 *   otherwise     the file store in the state dir: one coordinator, today's behaviour
 * The local server requires client certificates from the cluster CA (auth.ts); so does a
 * `tls://` URL, to which the coordinator presents its own. Only then are agents told the bus
 * (agent-bus.ts): on a plain `nats://` server nobody's identity is known.
 * The mode is reported by `orchard status` (StatusResponse.state_store).
 */
export interface NatsSetting {
  readonly url?: string | undefined;
  readonly local?: boolean | undefined;
  /** JetStream replicas of the buckets (3 on a three-server NATS cluster). */
  readonly replicas?: number | undefined;
}

export interface StateStoreInfo {
  readonly backend: 'file' | 'nats';
  /** The file's path or the NATS server URL. */
  readonly location: string;
  /** A nats-server this coordinator started (and stops). */
  readonly localServer: boolean;
}

export interface ClusterState {
  readonly store: InstanceStore;
  readonly info: StateStoreInfo;
  /** The NATS connection in `nats` mode (events ride on it too). */
  readonly nats: NatsConnection | undefined;
  /** The event bus publisher in `nats` mode (nats/events.ts); none with the file store. */
  readonly events: ClusterEvents | undefined;
  /** Agents on the bus (admission, their own events): only where clients prove who they are. */
  readonly agentBus: AgentBus | undefined;
  close(): Promise<void>;
}

export interface ClusterStateOptions {
  readonly stateDir: string;
  readonly clusterId: string;
  readonly nats?: NatsSetting | undefined;
  readonly log: Logger;
  readonly sourceId: string;
  /** The cluster CA (issues the local server's certificate) and the coordinator's own credentials. */
  readonly pki: { readonly ca: ClusterCa; readonly tls: TlsCredentials };
}

export async function openClusterState(o: ClusterStateOptions): Promise<ClusterState> {
  const onInvalid = (key: string, problem: string) => o.log.warn({ key, problem }, 'stored state skipped: it does not parse');
  let local: LocalNats | undefined;
  let url = o.nats?.url;
  if (!url && o.nats?.local) {
    const binary = findNatsServer();
    if (!binary) {
      o.log.info('nats-server is not installed: state is kept in the state dir (one coordinator); `orchard setup --nats` builds it');
    } else {
      const tls = await writeNatsServerTls(join(o.stateDir, 'nats', 'tls'), o.pki.ca);
      local = await startLocalNats({ stateDir: o.stateDir, binary, auth: { tls, authorization: natsAuthorization(o.clusterId, []) } });
      url = local.url;
      o.log.info({ url, binary }, 'started a local nats-server (JetStream store in the state dir)');
    }
  }
  if (!url) {
    const store = new FileInstanceStore(o.stateDir, onInvalid);
    return { store, info: { backend: 'file', location: store.path, localServer: false }, nats: undefined, events: undefined, agentBus: undefined, close: () => store.close() };
  }
  const secured = !!local || url.startsWith('tls://');
  let nc: NatsConnection;
  try {
    const tls = secured ? natsClientTls(o.pki.tls) : undefined;
    nc = await connect({ servers: url.split(','), name: `orchard-coordinator-${o.clusterId.slice(0, 8)}`, maxReconnectAttempts: -1, reconnectTimeWait: 500, ...(tls ? { tls } : {}) });
  } catch (err) {
    await local?.stop();
    throw new OrchardError(`cannot reach NATS at ${url}: ${errorMessage(err)}`);
  }
  try {
    const store = await KvInstanceStore.open(nc, { clusterId: o.clusterId, replicas: o.nats?.replicas, onInvalid });
    const events = await ClusterEvents.open({ nc, clusterId: o.clusterId, sourceId: o.sourceId, log: o.log, replicas: o.nats?.replicas });
    const agentBus = secured ? new AgentBus({ nc, clusterId: o.clusterId, urls: url.split(','), server: local, log: o.log }) : undefined;
    return {
      store,
      info: { backend: 'nats', location: url, localServer: !!local },
      nats: nc,
      events,
      agentBus,
      async close() {
        await agentBus?.close();
        await events.close();
        await store.close();
        await nc.drain().catch(() => nc.close());
        await local?.stop();
      },
    };
  } catch (err) {
    await nc.close();
    await local?.stop();
    throw new OrchardError(`NATS at ${url} has no usable JetStream (start nats-server with -js): ${errorMessage(err)}`);
  }
}
