import type { IncomingMessage, ServerResponse } from 'node:http';
import { hostPort } from '../../shared/metrics/http.ts';
import type { NodeEntry } from '../membership/registry.ts';

/**
 * Prometheus HTTP service discovery: the coordinator answers `GET /v1/prometheus/targets` with
 * every metrics endpoint of the cluster, so Prometheus needs one `http_sd_configs` line to find
 * all nodes (format: https://prometheus.io/docs/prometheus/latest/http_sd/ — a JSON array of
 * `{targets: ["host:port"], labels: {...}}`).
 *
 * Labels become target labels on every scraped series:
 *   nodes:       node (name), node_id, chip, role="node"
 *   coordinator: role="coordinator" and no `node` label, on purpose — the coordinator's own
 *                series carry a `node` label (placement per node), which a target label of the
 *                same name would rename to `exported_node`.
 * Liveness is not a label: a label that changes with state would start new series at every
 * transition. Down nodes stay listed so their `up` series reads 0 instead of vanishing; nodes
 * leave the answer when the registry forgets them.
 */

export interface SdNode {
  readonly nodeId: string;
  readonly name: string;
  readonly chip: string;
  /** host:port of the node agent's `/metrics`; undefined when the node does not export metrics. */
  readonly metricsAddress: string | undefined;
}

export interface SdInput {
  /** host:port of the coordinator's own `/metrics` (its HTTP port). */
  readonly coordinatorAddress: string;
  readonly nodes: readonly SdNode[];
}

export interface SdTargetGroup {
  readonly targets: string[];
  readonly labels: Record<string, string>;
}

/** Prometheus label values may be any UTF-8, but control characters make dashboards unreadable. */
function labelValue(v: string): string {
  return v.replace(/[\u0000-\u001f\u007f]/g, ' ').trim();
}

/** The HTTP-SD answer: coordinator first, then nodes sorted by name (stable output, stable diffs). */
export function prometheusTargets(input: SdInput): SdTargetGroup[] {
  const groups: SdTargetGroup[] = [{ targets: [input.coordinatorAddress], labels: { role: 'coordinator' } }];
  const seen = new Set<string>([input.coordinatorAddress]);
  const nodes = [...input.nodes].sort((a, b) => a.name.localeCompare(b.name) || a.nodeId.localeCompare(b.nodeId));
  for (const n of nodes) {
    if (!n.metricsAddress) continue;
    // Two entries for one endpoint would scrape it twice under different labels; the registry
    // guarantees one entry per address, this keeps the answer sane even if it did not.
    if (seen.has(n.metricsAddress)) continue;
    seen.add(n.metricsAddress);
    groups.push({
      targets: [n.metricsAddress],
      labels: { node: labelValue(n.name), node_id: labelValue(n.nodeId), chip: labelValue(n.chip), role: 'node' },
    });
  }
  return groups;
}

/**
 * A registry entry as an SD node: the metrics endpoint is on the agent's host (the host part of
 * its gRPC address) at the port the agent reports for `/metrics`. `metricsPort` returns
 * undefined for agents that serve no metrics.
 */
export function sdNodeFromEntry(entry: NodeEntry, metricsPort: (entry: NodeEntry) => number | undefined): SdNode {
  const port = metricsPort(entry);
  const host = agentHost(entry.address);
  return {
    nodeId: entry.nodeId,
    name: entry.profile.name,
    chip: entry.profile.chip,
    metricsAddress: port && host ? hostPort(host, port) : undefined,
  };
}

/** "10.0.0.2:7070" → "10.0.0.2", "[fe80::1]:7070" → "fe80::1". */
export function agentHost(address: string): string | undefined {
  const m = /^\[([^\]]+)\]:\d+$/.exec(address) ?? /^([^:]+):\d+$/.exec(address);
  return m?.[1];
}

/**
 * node:http handler for `GET /v1/prometheus/targets`. Mount it with one line:
 *   if (path === '/v1/prometheus/targets') return prometheusTargetsHandler(() => sdInput())(req, res);
 * or build it once and call it per request.
 */
export function prometheusTargetsHandler(source: () => SdInput | Promise<SdInput>): (req: IncomingMessage, res: ServerResponse) => void {
  return (req, res) => {
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    Promise.resolve()
      .then(source)
      .then(
        (input) => {
          const body = JSON.stringify(prometheusTargets(input));
          res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
          res.end(req.method === 'HEAD' ? undefined : body);
        },
        (err: unknown) => {
          // Prometheus keeps the last good target list when SD fails, which is what we want.
          res.writeHead(500, { 'content-type': 'text/plain' }).end(`service discovery failed: ${err instanceof Error ? err.message : String(err)}\n`);
        },
      );
  };
}
