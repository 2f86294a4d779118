import { type Server, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { HardwareProfile, LiveStats } from '../shared/hardware.ts';
import type { EngineExit, EngineInfo } from './supervisor.ts';

/**
 * The node agent's Prometheus metrics, on their own Registry (never prom-client's global one,
 * so several agents in one test process cannot mix their series). Gauges read the agent's
 * current state at scrape time through `collect`, so they are never stale.
 */
export interface NodeMetricsSource {
  profile(): HardwareProfile;
  live(): LiveStats | undefined;
  engines(): readonly EngineInfo[];
}

export class NodeMetrics {
  readonly registry = new Registry();
  private readonly starts: Counter<'engine'>;
  private readonly restarts: Counter<'engine'>;
  private readonly exits: Counter<'engine' | 'expected'>;

  constructor(source: NodeMetricsSource) {
    const r = this.registry;
    collectDefaultMetrics({ register: r });
    new Gauge({
      name: 'orchard_node_info',
      help: 'Node identity and platform; value is always 1',
      labelNames: ['id', 'name', 'chip', 'os', 'version'],
      registers: [r],
      collect() {
        const p = source.profile();
        this.reset();
        this.set({ id: p.nodeId, name: p.name, chip: p.chip, os: p.os, version: p.agentVersion }, 1);
      },
    });
    const fromProfile = (name: string, help: string, pick: (p: HardwareProfile) => number) =>
      new Gauge({
        name,
        help,
        registers: [r],
        collect() {
          this.set(pick(source.profile()));
        },
      });
    fromProfile('orchard_node_memory_bytes', 'Total RAM (or the --memory-limit override)', (p) => p.memoryBytes);
    fromProfile('orchard_node_usable_memory_bytes', 'Model-memory budget the planner may use on this node', (p) => p.usableBytes);
    fromProfile('orchard_node_bandwidth_bytes_per_second', 'Memory bandwidth used for placement', (p) => p.bandwidthBytesPerSecond);
    fromProfile('orchard_node_wired_limit_bytes', 'GPU wired-memory limit (modelled macOS default when unset)', (p) => p.wiredLimitBytes);
    new Gauge({
      name: 'orchard_node_available_memory_bytes',
      help: 'Memory available to new allocations now',
      registers: [r],
      collect() {
        const live = source.live();
        if (live) this.set(live.availableBytes);
      },
    });
    new Gauge({
      name: 'orchard_engine_up',
      help: 'Engines this agent runs (1 while ready); labels name the kind and the port it serves',
      labelNames: ['engine', 'port', 'engine_id'],
      registers: [r],
      collect() {
        this.reset();
        for (const e of source.engines()) this.set({ engine: e.kind, port: String(e.port), engine_id: e.engineId }, 1);
      },
    });
    new Gauge({
      name: 'orchard_engines_running',
      help: 'Number of engines this agent runs',
      registers: [r],
      collect() {
        this.set(source.engines().length);
      },
    });
    this.starts = new Counter({ name: 'orchard_engine_starts_total', help: 'Engines started and ready', labelNames: ['engine'], registers: [r] });
    this.restarts = new Counter({
      name: 'orchard_engine_restarts_total',
      help: 'Starts of an engine id that had run before (a stage restarted by the coordinator)',
      labelNames: ['engine'],
      registers: [r],
    });
    this.exits = new Counter({
      name: 'orchard_engine_exits_total',
      help: 'Engine exits; expected="false" are crashes or kills the agent did not ask for',
      labelNames: ['engine', 'expected'],
      registers: [r],
    });
  }

  engineStarted(info: EngineInfo, isRestart: boolean): void {
    this.starts.inc({ engine: info.kind });
    if (isRestart) this.restarts.inc({ engine: info.kind });
  }

  engineExited(exit: EngineExit): void {
    this.exits.inc({ engine: exit.kind, expected: String(exit.expected) });
  }
}

/** `/metrics` and `/healthz` on host:port (0 = pick); resolves with the bound port. */
export async function serveMetrics(metrics: NodeMetrics, host: string, port: number, healthy: () => boolean): Promise<{ server: Server; port: number }> {
  const server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (path === '/metrics') {
      metrics.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
        (err: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics collection failed: ${(err as Error).message}\n`),
      );
      return;
    }
    if (path === '/healthz') {
      const ok = healthy();
      res.writeHead(ok ? 200 : 503, { 'content-type': 'text/plain' }).end(ok ? 'ok\n' : 'shutting down\n');
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics or /healthz\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return { server, port: (server.address() as AddressInfo).port };
}
