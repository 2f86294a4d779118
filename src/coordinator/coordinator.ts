import { createServer, type RequestListener, type Server } from 'node:http';
import { hostname } from 'node:os';
import type * as grpc from '@grpc/grpc-js';
import type { Logger } from '../shared/log.ts';
import { startCoordinatorGrpc } from './api/grpc-server.ts';
import { AccessControl } from './api/access.ts';
import { accessGuard } from './api/guard.ts';
import { CoordinatorMetrics, MeteredRuntime } from './api/metrics.ts';
import { createConsole } from './api/console/routes.ts';
import { installApi } from './api/openai/api.ts';
import { installOperatorRoutes } from './api/operator-routes.ts';
import { HttpRouter, type RouteInfo } from './api/router.ts';
import type { HealOptions } from './instances/healing.ts';
import type { RebalanceMode } from './instances/rebalance.ts';
import { createPlanner } from './instances/planner-adapter.ts';
import type { Readoption } from './instances/readoption.ts';
import { GrpcRelay, HttpRelay } from './api/forwarding.ts';
import { LeaderWork } from './leader/leading.ts';
import { contendForLeadership, type Leadership, type RoleView, singleCoordinator } from './leader/roles.ts';
import type { Planner, Runtime } from './instances/runtime.ts';
import { certificateFingerprint } from '../shared/pki/certificates.ts';
import { CoordinatorAdvertiser } from './membership/discovery.ts';
import { enroll } from './membership/enroll.ts';
import { CoordinatorError } from './errors.ts';
import { IdentityId } from '../shared/pki/identity.ts';
import type { RevocationList } from './state/revocations.ts';
import { Membership } from './membership/membership.ts';
import { LinkProber, type LinkProberOptions } from './membership/link-prober.ts';
import type { LinkMatrix } from '../shared/placement/links.ts';
import { DEFAULT_REGISTRY_OPTIONS, type RegistryOptions } from './membership/registry.ts';
import { type NatsSetting, openClusterState, type StateStoreInfo } from './nats/cluster-state.ts';
import type { InstanceStore } from './state/instance-store.ts';
import { type ClusterState, StateDir } from './state/state-dir.ts';

export interface CoordinatorOptions {
  readonly stateDir: string;
  /** Address the gRPC server binds (default 0.0.0.0: agents join from other machines). */
  readonly host?: string | undefined;
  readonly grpcPort: number;
  /** HTTP port of the OpenAI API, /healthz, /status, /metrics and Prometheus SD; undefined = no HTTP. */
  readonly httpPort?: number | undefined;
  readonly httpHost?: string | undefined;
  readonly mdns: boolean;
  /** IPv4 of the interface to browse Bonjour on (binds 0.0.0.0; see notes/bonjour.md). */
  readonly mdnsInterface?: string | undefined;
  readonly registry?: Partial<RegistryOptions> | undefined;
  readonly maxQueue?: number | undefined;
  /** Self-healing of model instances (default auto; a load may override the mode). */
  readonly heal?: Partial<HealOptions> | undefined;
  /** --rebalance auto|off (default off): re-place a model when a node joins or returns and the gain is ≥ 20 %. */
  readonly rebalance?: RebalanceMode | undefined;
  readonly extraHeadArgs?: readonly string[] | undefined;
  readonly rpcThreads?: number | undefined;
  /** MLX engine watchdogs: start-up (every rank ready) and per-request stall. */
  readonly mlxReadyTimeoutMs?: number | undefined;
  readonly mlxStallTimeoutSeconds?: number | undefined;
  readonly planner?: Planner | undefined;
  readonly version?: string | undefined;
  /**
   * Where the instances and nodes the coordinator resumes from live (nats/cluster-state.ts):
   * `{ url }` a NATS server (JetStream KV), `{ local: true }` a local nats-server when installed,
   * default `instances.json` in the state dir.
   */
  readonly nats?: NatsSetting | undefined;
  /**
   * Several coordinators on NATS: the leader lease's TTL (default 5 s; a standby takes over within
   * about TTL + TTL/3 of the leader's last renewal), the host other machines reach this one's APIs
   * by (default --host / --http-host, or the host name when those are 0.0.0.0), and what to do when
   * the lease is lost while leading (default: exit, fail-stop — see leader/roles.ts).
   */
  readonly leaseTtlMs?: number | undefined;
  readonly advertiseHost?: string | undefined;
  readonly onDemoted?: (() => void) | undefined;
  /** How long a stored instance waits for its nodes after a restart before it is given up (default 30 s). */
  readonly adoptGraceMs?: number | undefined;
  /**
   * HTTP and gRPC access: an optional admin API key (locks the API: 401/UNAUTHENTICATED without a
   * key), /metrics without a key (`metricsPublic`), and the HTTP request body limit. Keys made with
   * `orchard coordinator keys create` lock it too (api/access.ts).
   */
  readonly api?: { readonly apiKey?: string | undefined; readonly maxBodyBytes?: number | undefined; readonly metricsPublic?: boolean | undefined } | undefined;
  readonly log: Logger;
  /** How often links are measured (defaults: renewed every 10 min, a failure retried after 30 s). */
  readonly links?: LinkProberOptions | undefined;
}

export interface CoordinatorHandle {
  readonly clusterId: string;
  readonly grpcPort: number;
  readonly httpPort: number | undefined;
  /** sha256 of the cluster CA certificate: what join tokens and CLI pins carry. */
  readonly caFingerprint: string;
  /** A new join token (printed once by the caller; only its hash is stored). */
  createJoinToken(o?: { ttlMs?: number | undefined; uses?: number | undefined }): Promise<string>;
  readonly runtime: Runtime;
  readonly membership: Membership;
  /** The link matrix and the probes that fill it (`orchard status --links`). */
  readonly links: LinkProber;
  /** Prometheus registry and metrics (served at GET /metrics on the HTTP port). */
  readonly metrics: CoordinatorMetrics;
  /** The HTTP router: add routes with `router.add(method, path, scope, handler)`; the API-key guard covers them. */
  readonly router: HttpRouter;
  /** The instance store (file or NATS KV, `storeInfo` says which) and the re-adoption of stored instances. */
  readonly store: InstanceStore;
  readonly storeInfo: StateStoreInfo;
  /** Undefined until this coordinator leads (a standby re-adopts nothing). */
  readonly readoption: Readoption | undefined;
  /** Single (file store), leader or standby, and who leads (leader/roles.ts). */
  roles(): RoleView;
  /** Every HTTP route (method, path, scope), so tests can check each one's guard. */
  routes(): RouteInfo[];
  close(): Promise<void>;
}

/**
 * Start a coordinator: state dir (cluster id, CA, join tokens, statically joined agents), membership
 * (Watch streams), Bonjour browsing, the runtime and the gRPC and HTTP servers. `close()` unloads
 * every model (stopping the engines on the agents) before the servers go down.
 */
export async function startCoordinator(o: CoordinatorOptions): Promise<CoordinatorHandle> {
  const log = o.log;
  const state = await openState(o.stateDir);
  const stateDir = new StateDir(o.stateDir);
  const pki = await openPki(stateDir);
  const membership = new Membership({ ...DEFAULT_REGISTRY_OPTIONS, ...o.registry }, log, pki.tls, () => pki.revocations.ids());
  const prober = new LinkProber(membership, log.child({ part: 'links' }), o.links);
  const clusterId = state.cluster().clusterId;
  const { runtime, metrics } = buildRuntime(o, membership, clusterId, prober.matrix);
  const coordinatorId = `${hostname()}:${process.pid}`;
  const clusterState = await openClusterState({ stateDir: o.stateDir, clusterId, nats: o.nats, log, sourceId: coordinatorId, pki: { ca: pki.enrollContext.ca, tls: pki.tls } });
  // A NATS server of its own (the local one it started) makes a coordinator the only one.
  const shared = clusterState.nats && !clusterState.info.localServer ? clusterState.nats : undefined;
  const store = clusterState.store;
  clusterState.events?.follow(membership, runtime, store);
  clusterState.agentBus?.follow(membership);
  let leadership: Leadership | undefined;
  const roles = (): RoleView => leadership?.view() ?? { role: shared ? 'standby' : 'single', leader: null };
  const work = new LeaderWork({
    ...{ runtime, membership, store, clusterId, log, graceMs: o.adoptGraceMs, remembered: () => state.cluster().agents },
    ...{ mdns: o.mdns ? { interface: o.mdnsInterface } : undefined, dialStoredNodes: !!shared, mayWrite: () => leadership?.isLeading() ?? !shared },
  });
  const access = new AccessControl({ adminKeys: [o.api?.apiKey, await stateDir.localAdminKey()], locked: !!o.api?.apiKey, store: stateDir.apiKeys() });
  const forwarding = { roles, adminTls: () => stateDir.relayCredentials(), log };
  const relays = shared ? { grpc: new GrpcRelay(forwarding), http: new HttpRelay(forwarding) } : undefined;
  const servers = await startServers(o, { ...pki, membership, runtime, metrics, access, clusterId, state, prober, stateStore: clusterState.info, roles, relays });
  const self = { coordinatorId, addresses: advertised(o, servers.grpcPort, servers.httpPort) };
  // Contend only once both servers listen: the lease names the addresses standbys forward to.
  if (shared) {
    const c = await contendForLeadership({ nc: shared, clusterId, self, ttlMs: o.leaseTtlMs ?? 5000, replicas: o.nats?.replicas, log, onLead: () => work.start(), onDemoted: o.onDemoted ?? (() => process.exit(75)) });
    leadership = c.leadership;
    await c.decided;
  } else leadership = await singleCoordinator(() => work.start());
  log.info({ grpcPort: servers.grpcPort, httpPort: servers.httpPort, clusterId, mdns: o.mdns, stateDir: o.stateDir, role: roles().role }, 'coordinator ready');

  let closed = false;
  return {
    ...{ clusterId, grpcPort: servers.grpcPort, httpPort: servers.httpPort, caFingerprint: pki.caFingerprint },
    createJoinToken: async (t = {}) => (await pki.tokens.create({ ttlMs: t.ttlMs, uses: t.uses })).token,
    ...{ runtime, membership, links: prober, metrics, router: servers.router, store, storeInfo: clusterState.info, roles },
    get readoption() {
      return work.readoption;
    },
    routes: () => servers.router.routes(),
    async close() {
      if (closed) return;
      closed = true;
      servers.closing();
      // With an external NATS other coordinators may take over: the engines keep running for them.
      const handover = !!shared && leadership?.isLeading() === true;
      await leadership?.stop();
      await runtime.close({ keepEngines: handover });
      await work.close();
      await clusterState.close();
      prober.close();
      membership.close();
      relays?.grpc.close();
      relays?.http.close();
      await servers.close();
      await state.saved();
    },
  };
}

/** host:port of this coordinator's APIs as other machines dial them (what the lease tells standbys). */
function advertised(o: CoordinatorOptions, grpcPort: number, httpPort: number | undefined): { grpc: string; http: string } {
  const wildcard = (h: string | undefined) => h === undefined || h === '0.0.0.0' || h === '::';
  const grpcHost = o.advertiseHost ?? (wildcard(o.host) ? hostname() : o.host!);
  const httpHost = o.advertiseHost ?? (wildcard(o.httpHost ?? '127.0.0.1') ? hostname() : (o.httpHost ?? '127.0.0.1'));
  return { grpc: `${grpcHost}:${grpcPort}`, http: `${httpHost}:${httpPort ?? 0}` };
}

/** The gRPC and HTTP servers (relaying to the leader while this coordinator is a standby). */
async function startServers(
  o: CoordinatorOptions,
  d: Awaited<ReturnType<typeof openPki>> & {
    membership: Membership;
    runtime: MeteredRuntime;
    metrics: CoordinatorMetrics;
    access: AccessControl;
    clusterId: string;
    state: Awaited<ReturnType<typeof openState>>;
    prober: LinkProber;
    stateStore: StateStoreInfo;
    roles: () => RoleView;
    relays: { grpc: GrpcRelay; http: HttpRelay } | undefined;
  },
) {
  const { membership, runtime, clusterId, log } = { ...d, log: o.log };
  const { server: grpcServer, port: grpcPort } = await startCoordinatorGrpc(
    {
      ...{ membership, runtime, tls: d.tls, clusterId, version: o.version ?? '0.1.0', log, stateStore: d.stateStore, roles: d.roles, relay: d.relays?.grpc },
      enroll: (req) => enroll(d.enrollContext, req),
      isRevoked: (id) => d.revocations.isRevoked(id),
      revoke: (node) => revokeNode(node, membership, d.revocations, log),
      rememberAgent: d.state.rememberAgent,
      links: () => d.prober.matrix.list(),
    },
    d.access,
    o.host ?? '0.0.0.0',
    o.grpcPort,
  );
  const advertiser = o.mdns ? new CoordinatorAdvertiser({ port: grpcPort, clusterId, caFingerprint: d.caFingerprint, interface: o.mdnsInterface }, log) : undefined;
  let serving = true;
  let httpPort: number | undefined;
  const { router, webConsole } = buildRouter(o, { ...d, relay: d.relays?.http }, () => serving, () => `${o.httpHost ?? '127.0.0.1'}:${httpPort ?? 0}`);
  const relay = d.relays?.http;
  const http = o.httpPort === undefined ? undefined : await listenHttp((req, res) => relay?.handle(req, res) || router.handle(req, res), o.httpPort, o.httpHost ?? '127.0.0.1');
  httpPort = http?.port;
  return {
    ...{ grpcPort, httpPort, router },
    closing() {
      serving = false;
      webConsole.close();
    },
    async close() {
      await advertiser?.close();
      await new Promise<void>((resolve) => grpcServer.tryShutdown(() => resolve()));
      grpcServer.forceShutdown();
      if (http) {
        http.server.closeAllConnections();
        await new Promise<void>((resolve) => http.server.close(() => resolve()));
      }
    },
  };
}

/** One router for every HTTP route (OpenAI API, operator routes, console), behind one access guard. */
function buildRouter(
  o: CoordinatorOptions,
  d: { runtime: MeteredRuntime; membership: Membership; clusterId: string; metrics: CoordinatorMetrics; access: AccessControl; roles: () => RoleView; relay: HttpRelay | undefined; prober: LinkProber },
  serving: () => boolean,
  ownAddress: () => string,
) {
  const { runtime, membership, clusterId, metrics, access } = d;
  const log = o.log;
  const router = new HttpRouter(accessGuard(access), log.child({ part: 'http' }), { metricsPublic: o.api?.metricsPublic });
  installApi(router, { runtime, membership, clusterId, log, links: () => d.prober.matrix.list(), onRefused: (model, status) => metrics.refused(model, status) }, { maxBodyBytes: o.api?.maxBodyBytes });
  installOperatorRoutes(router, { membership, runtime, clusterId, registry: metrics.registry, serving, ownAddress, roles: d.roles, leaderStatus: d.relay && ((req) => d.relay!.leaderStatus(req)) });
  const webConsole = createConsole({ runtime, membership, clusterId, metrics: metrics.metrics, log, maxBodyBytes: o.api?.maxBodyBytes });
  for (const r of webConsole.routes) router.add(r.method, r.path, r.scope, r.handler);
  return { router, webConsole };
}

/** The cluster CA, the coordinator's own certificate (what agents and joining nodes check it by), join tokens, revocations. */
async function openPki(stateDir: StateDir) {
  const { ca } = await stateDir.clusterCa();
  const tls = await stateDir.coordinatorCredentials();
  const tokens = await stateDir.joinTokens();
  const revocations = await stateDir.revocations();
  const enrollContext = { ca, redeem: (t: string) => tokens.redeem(t), isRevoked: (id: string) => revocations.isRevoked(id) };
  return { caFingerprint: certificateFingerprint(ca.certPem), tls, tokens, revocations, enrollContext };
}

/**
 * `orchard cluster revoke NODE` (by id or name): recorded first (so a Join racing it is refused),
 * then the node's channels close and every agent hears the new list.
 */
async function revokeNode(node: string, membership: Membership, revocations: RevocationList, log: CoordinatorOptions['log']): Promise<{ nodeId: string; revoked: boolean }> {
  const known = membership.registry.nodes().find((n) => n.nodeId === node || n.profile.name === node);
  const id = IdentityId.safeParse(known?.nodeId ?? node);
  if (!id.success) throw new CoordinatorError('NOT_FOUND', `no node named ${node} (give its name as \`orchard status\` shows it, or its id)`);
  const revoked = await revocations.revoke(id.data);
  membership.revoked(id.data);
  log.warn({ nodeId: id.data, name: known?.profile.name }, 'node revoked');
  return { nodeId: id.data, revoked };
}

/** The state dir's cluster id and remembered agents; `rememberAgent` persists one more. */
async function openState(dir: string) {
  const state = new StateDir(dir);
  // The cluster CA exists from the first start, so every join token made later pins the same one.
  await state.clusterCa();
  let cluster: ClusterState = await state.cluster();
  let saving = Promise.resolve();
  const rememberAgent = (address: string): Promise<void> => {
    saving = saving.then(async () => {
      if (cluster.agents.includes(address)) return;
      cluster = { ...cluster, agents: [...cluster.agents, address] };
      await state.saveCluster(cluster);
    });
    return saving;
  };
  return { cluster: () => cluster, rememberAgent, saved: () => saving };
}

/** Metrics first (the runtime reports into them), then the metered runtime they read back. */
function buildRuntime(o: CoordinatorOptions, membership: Membership, clusterId: string, links: LinkMatrix) {
  let runtimeRef: Runtime | undefined;
  // Budgets for a second model subtract what loaded models already hold on each node.
  const reserved = (nodeId: string, ignoring?: string) =>
    // A recovering model's old stages hold nothing (its engines are stopped): it is being re-planned.
    (runtimeRef?.models() ?? []).filter((m) => m.state !== 'failed' && m.state !== 'recovering' && m.name !== ignoring).flatMap((m) => m.stages).filter((s) => s.nodeId === nodeId).reduce((t, s) => t + s.bytes.total, 0);
  const metrics = new CoordinatorMetrics({ version: o.version ?? '0.1.0', membership, runtime: () => runtimeRef });
  const runtime = new MeteredRuntime({
    membership,
    planner: o.planner ?? createPlanner(reserved, links),
    clusterId,
    log: o.log,
    maxQueue: o.maxQueue,
    heal: o.heal,
    rebalance: o.rebalance,
    extraHeadArgs: o.extraHeadArgs,
    rpcThreads: o.rpcThreads,
    mlxReadyTimeoutMs: o.mlxReadyTimeoutMs,
    mlxStallTimeoutSeconds: o.mlxStallTimeoutSeconds,
  }, metrics);
  runtimeRef = runtime;
  return { runtime, metrics };
}

async function listenHttp(handle: RequestListener, port: number, host: string): Promise<{ server: Server; port: number }> {
  const server = createServer(handle);
  const bound = await new Promise<number>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      const a = server.address();
      resolve(typeof a === 'object' && a ? a.port : 0);
    });
  });
  return { server, port: bound };
}

export type { grpc };
