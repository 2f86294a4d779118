import type { Registry } from 'prom-client';
import { type Health, sendHealth, sendMetrics } from '../../shared/metrics/http.ts';
import type { Runtime } from '../instances/runtime.ts';
import type { Membership } from '../membership/membership.ts';
import type { IncomingMessage } from 'node:http';
import type { RoleView } from '../leader/roles.ts';
import { modelStatusToWire, nodesToWire, roleToWire } from './grpc-server.ts';
import { sendJson } from './openai/edge.ts';
import { prometheusTargetsHandler, sdNodeFromEntry } from './prometheus-sd.ts';
import type { HttpRouter } from './router.ts';

/**
 * The coordinator's routes for operators and their tools, next to the OpenAI API on the same
 * router:
 *
 *   GET|HEAD /healthz                public  liveness, the body every Orchard process sends
 *   GET|HEAD /metrics                inference  Prometheus scrape of the coordinator's registry
 *                                            (public with --metrics-public)
 *   GET      /status                 admin   cluster id, role and leader, nodes and models as the gRPC
 *                                            Status has them (a standby: the leader's, with its own role)
 *   GET      /v1/prometheus/targets  inference  HTTP service discovery: the coordinator and every node
 *                                            agent's /metrics (Prometheus sends an inference key
 *                                            with `authorization: {credentials_file: …}`, so the
 *                                            scraper holds no key that can load or unload)
 */

export interface OperatorDeps {
  readonly membership: Membership;
  readonly runtime: Pick<Runtime, 'models' | 'moves'>;
  readonly clusterId: string;
  readonly registry: Registry;
  /** False once the coordinator is shutting down (/healthz turns 503). */
  readonly serving: () => boolean;
  /** host:port of this HTTP server, for SD when the request's Host header is unusable. */
  readonly ownAddress: () => string;
  /** This coordinator's role and who leads; undefined = single. */
  readonly roles?: (() => RoleView) | undefined;
  /** A standby's /status is the leader's, told from its side (undefined: answer here). */
  readonly leaderStatus?: ((req: IncomingMessage) => Promise<Record<string, unknown> | undefined>) | undefined;
}

export function installOperatorRoutes(router: HttpRouter, d: OperatorDeps): void {
  const health = (): Health => {
    if (!d.serving()) return { ok: false, detail: 'shutting down' };
    const up = d.membership.registry.upNodes().length;
    const ready = d.runtime.models().filter((m) => m.state === 'ready').length;
    return { ok: true, detail: `${up} node${up === 1 ? '' : 's'} up, ${ready} model${ready === 1 ? '' : 's'} ready` };
  };
  for (const method of ['GET', 'HEAD'] as const) {
    router.add(method, '/healthz', 'public', (req, res) => sendHealth(req, res, health()));
    router.add(method, '/metrics', router.scopeFor(method, '/metrics', 'inference'), (req, res) => sendMetrics(req, res, d.registry));
  }
  router.add('GET', '/status', 'admin', async (req, res) => {
    const fromLeader = await d.leaderStatus?.(req).catch(() => undefined);
    const role = roleToWire(d.roles?.() ?? { role: 'single', leader: null });
    sendJson(res, 200, fromLeader ?? { clusterId: d.clusterId, ...role, nodes: nodesToWire(d.membership, Date.now(), (id) => d.runtime.moves.isDrained(id)), models: d.runtime.models().map(modelStatusToWire) });
  });
  router.add('GET', '/v1/prometheus/targets', 'inference', (req, res) =>
    prometheusTargetsHandler(() => ({
      // The coordinator's own target is the address Prometheus just used to reach it (Host
      // header), which is right even when the HTTP server listens on 0.0.0.0.
      coordinatorAddress: scrapeAddress(req.headers.host) ?? d.ownAddress(),
      nodes: d.membership.registry.nodes().map((n) => sdNodeFromEntry(n, (e) => e.profile.metricsPort)),
    }))(req, res),
  );
}

/** A Host header usable as a Prometheus target ("host:port", "[v6]:port"), else undefined. */
export function scrapeAddress(host: string | undefined): string | undefined {
  return host && /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(host) ? host : undefined;
}
