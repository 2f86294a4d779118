import { createServer, type Server } from 'node:http';
import type * as grpc from '@grpc/grpc-js';
import { errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { Discovery } from './membership/discovery.ts';
import { modelStatusToWire, nodeStatusToWire, startCoordinatorGrpc } from './api/grpc-server.ts';
import { Membership } from './membership/membership.ts';
import { metricsRoutes } from '../shared/metrics/http.ts';
import { CoordinatorMetrics, MeteredRuntime } from './api/metrics.ts';
import { installApi } from './api/openai/api.ts';
import { prometheusTargetsHandler, sdNodeFromEntry } from './api/prometheus-sd.ts';
import { createPlanner } from './instances/planner-adapter.ts';
import { DEFAULT_REGISTRY_OPTIONS, type RegistryOptions } from './membership/registry.ts';
import type { Planner, Runtime } from './instances/runtime.ts';
import { StateDir } from './state/state-dir.ts';

export interface CoordinatorOptions {
  readonly stateDir: string;
  /** Address the gRPC server binds (default 0.0.0.0: agents join from other machines). */
  readonly host?: string | undefined;
  readonly grpcPort: number;
  /** HTTP port for /health and /status (and, next, the OpenAI API); undefined = no HTTP. */
  readonly httpPort?: number | undefined;
  readonly httpHost?: string | undefined;
  readonly mdns: boolean;
  /** IPv4 of the interface to browse Bonjour on (binds 0.0.0.0; see notes/bonjour.md). */
  readonly mdnsInterface?: string | undefined;
  readonly joinToken?: string | undefined;
  readonly registry?: Partial<RegistryOptions> | undefined;
  readonly maxQueue?: number | undefined;
  readonly extraHeadArgs?: readonly string[] | undefined;
  readonly rpcThreads?: number | undefined;
  /** MLX engine watchdogs: start-up (every rank ready) and per-request stall. */
  readonly mlxReadyTimeoutMs?: number | undefined;
  readonly mlxStallTimeoutSeconds?: number | undefined;
  readonly planner?: Planner | undefined;
  readonly version?: string | undefined;
  /** OpenAI/management HTTP API: optional API key (401 without it) and request body limit. */
  readonly api?: { readonly apiKey?: string | undefined; readonly maxBodyBytes?: number | undefined } | undefined;
  readonly log: Logger;
}

export interface CoordinatorHandle {
  readonly clusterId: string;
  readonly grpcPort: number;
  readonly httpPort: number | undefined;
  readonly joinToken: string;
  readonly tokenCreated: boolean;
  readonly runtime: Runtime;
  readonly membership: Membership;
  /** Prometheus registry and metrics (served at GET /metrics on the HTTP port). */
  readonly metrics: CoordinatorMetrics;
  /** The HTTP server, so the OpenAI API can add its routes (`server.on('request', …)` is taken; use `httpRoutes`). */
  readonly httpRoutes: Map<string, (req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse) => void>;
  close(): Promise<void>;
}

/**
 * Start a coordinator: state dir (cluster id, join token, statically joined agents), membership
 * (Watch streams), Bonjour browsing, the runtime and the gRPC server. `close()` unloads every
 * model (stopping the engines on the agents) before the servers go down.
 */
export async function startCoordinator(o: CoordinatorOptions): Promise<CoordinatorHandle> {
  const log = o.log;
  const state = new StateDir(o.stateDir);
  const { token, created } = await state.joinToken(o.joinToken);
  let cluster = await state.cluster();
  // Agents started with --token (the same cluster token) require it as a bearer token.
  const membership = new Membership({ ...DEFAULT_REGISTRY_OPTIONS, ...o.registry }, log, token);
  // Budgets for a second model subtract what loaded models already hold on each node.
  let runtimeRef: Runtime | undefined;
  const reserved = (nodeId: string) =>
    (runtimeRef?.models() ?? []).filter((m) => m.state !== 'failed').flatMap((m) => m.stages).filter((s) => s.nodeId === nodeId).reduce((t, s) => t + s.bytes.total, 0);
  const metrics = new CoordinatorMetrics({ version: o.version ?? '0.1.0', membership, runtime: () => runtimeRef });
  const runtime = new MeteredRuntime({
    membership,
    planner: o.planner ?? createPlanner(reserved),
    clusterId: cluster.clusterId,
    log,
    maxQueue: o.maxQueue,
    extraHeadArgs: o.extraHeadArgs,
    rpcThreads: o.rpcThreads,
    mlxReadyTimeoutMs: o.mlxReadyTimeoutMs,
    mlxStallTimeoutSeconds: o.mlxStallTimeoutSeconds,
  }, metrics);
  runtimeRef = runtime;

  let saving = Promise.resolve();
  const rememberAgent = (address: string) => {
    saving = saving.then(async () => {
      if (cluster.agents.includes(address)) return;
      cluster = { ...cluster, agents: [...cluster.agents, address] };
      await state.saveCluster(cluster);
    });
    return saving;
  };

  const { server, port } = await startCoordinatorGrpc(
    { membership, runtime, joinToken: () => token, clusterId: cluster.clusterId, version: o.version ?? '0.1.0', log, rememberAgent },
    o.host ?? '0.0.0.0',
    o.grpcPort,
  );

  // Agents that joined statically before a restart: dial them again (they keep retrying).
  for (const a of cluster.agents) {
    membership.add(a, 'join', true).catch((err) => log.warn({ address: a, err: errorMessage(err) }, 'remembered agent not reachable yet; retrying'));
  }

  let discovery: Discovery | undefined;
  if (o.mdns) {
    discovery = new Discovery(
      (address) => {
        membership.add(address, 'mdns').catch((err) => log.debug({ address, err: errorMessage(err) }, 'mDNS sighting not reachable'));
      },
      log,
      { interface: o.mdnsInterface },
    );
  }

  let closed = false;
  const httpRoutes: CoordinatorHandle['httpRoutes'] = new Map();
  httpRoutes.set('GET /health', (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ ok: true, nodesUp: membership.registry.upNodes().length, models: runtime.models().map((m) => ({ name: m.name, state: m.state })) }));
  });
  httpRoutes.set('GET /status', (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ clusterId: cluster.clusterId, nodes: membership.registry.nodes().map((n) => nodeStatusToWire(n)), models: runtime.models().map(modelStatusToWire) }));
  });
  installApi(httpRoutes, { runtime, membership, clusterId: cluster.clusterId, log, onRefused: (model, status) => metrics.refused(model, status) }, o.api);
  // Prometheus: the coordinator's own /metrics, and HTTP-SD listing it and every node agent's
  // /metrics (agent host as the coordinator reaches it + the metrics port from its profile).
  const serveMetricsRoute = metricsRoutes({ registry: metrics.registry, health: () => (closed ? { ok: false, detail: 'shutting down' } : { ok: true }) });
  httpRoutes.set('GET /metrics', (req, res) => void serveMetricsRoute(req, res));
  httpRoutes.set('HEAD /metrics', (req, res) => void serveMetricsRoute(req, res));
  httpRoutes.set('GET /v1/prometheus/targets', (req, res) =>
    prometheusTargetsHandler(() => ({
      // The coordinator's own target is the address Prometheus just used to reach it (Host
      // header), which is right even when the HTTP server listens on 0.0.0.0.
      coordinatorAddress: scrapeAddress(req.headers.host) ?? `${o.httpHost ?? '127.0.0.1'}:${httpPort ?? 0}`,
      nodes: membership.registry.nodes().map((n) => sdNodeFromEntry(n, (e) => e.profile.metricsPort)),
    }))(req, res),
  );
  let http: Server | undefined;
  let httpPort: number | undefined;
  if (o.httpPort !== undefined) {
    http = createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0] ?? '/';
      // Exact "METHOD /path" first, then the longest "METHOD /prefix/*" (path parameters).
      let route = httpRoutes.get(`${req.method} ${path}`);
      if (!route) {
        let best = -1;
        for (const [key, r] of httpRoutes) {
          if (!key.endsWith('*') || !`${req.method} ${path}`.startsWith(key.slice(0, -1)) || key.length <= best) continue;
          best = key.length;
          route = r;
        }
      }
      if (route) return route(req, res);
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: `no route ${req.method} ${req.url}`, type: 'not_found' } }));
    });
    const h = http;
    httpPort = await new Promise<number>((resolve, reject) => {
      h.once('error', reject);
      h.listen(o.httpPort, o.httpHost ?? '127.0.0.1', () => {
        const a = h.address();
        resolve(typeof a === 'object' && a ? a.port : 0);
      });
    });
  }

  log.info({ grpcPort: port, httpPort, clusterId: cluster.clusterId, mdns: o.mdns, stateDir: o.stateDir }, 'coordinator ready');

  return {
    clusterId: cluster.clusterId,
    grpcPort: port,
    httpPort,
    joinToken: token,
    tokenCreated: created,
    runtime,
    membership,
    metrics,
    httpRoutes,
    async close() {
      if (closed) return;
      closed = true;
      await runtime.close();
      await discovery?.close();
      membership.close();
      await new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
      server.forceShutdown();
      if (http) {
        http.closeAllConnections();
        await new Promise<void>((resolve) => http.close(() => resolve()));
      }
      await saving;
    },
  };
}

/** A Host header usable as a Prometheus target ("host:port", "[v6]:port"), else undefined. */
export function scrapeAddress(host: string | undefined): string | undefined {
  return host && /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(host) ? host : undefined;
}

export type { grpc };
