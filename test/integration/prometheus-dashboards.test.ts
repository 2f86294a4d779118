import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { type AddressInfo, createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { prometheusTargets, prometheusTargetsHandler, type SdInput } from '../../src/coordinator/prometheus-sd.ts';
import type { HardwareProfile } from '../../src/shared/hardware.ts';
import { CATALOGUE, findMetric } from '../../src/shared/metrics/catalogue.ts';
import { dashboardQueries, dashboardSchema, labelValuesQuery, substituteVariables } from '../../src/shared/metrics/dashboards.ts';
import { createCoordinatorMetrics, createNodeMetrics, initModelSeries, nodeStateCounts, recordNodeProfile, replaceGaugeSeries } from '../../src/shared/metrics/factories.ts';
import { hostPort, metricsRoutes, serveMetrics } from '../../src/shared/metrics/http.ts';
import { metricNamesInExpr } from '../../src/shared/metrics/promql.ts';
import { NodeMetrics } from '../../src/node/metrics.ts';
import { EngineWatchdog } from '../../src/node/watchdog.ts';

/**
 * A REAL Prometheus (Debian's `prometheus` binary) on 127.0.0.1, configured only with an
 * HTTP-SD URL, discovers and scrapes an Orchard cluster; then every PromQL expression of every
 * dashboard panel is evaluated through Prometheus's HTTP API with the dashboard variables
 * substituted by the values Prometheus reports for them, and must return data.
 *
 * The cluster here is the metrics side of a cluster: a coordinator-shaped HTTP server (its
 * registry from the catalogue, `/metrics` and the real `/v1/prometheus/targets` handler) and two
 * node agents' `/metrics` (catalogue registries), with requests simulated into the coordinator's
 * histograms and counters while Prometheus scrapes. It stands in for a live cluster until the
 * coordinator wires these metrics; `startSampleCluster` is the only part to replace (see
 * `ScrapedCluster`): anything that returns an SD URL and a target count works, e.g. a real
 * coordinator + 2 node agents + a loaded model + a few requests. Running cluster already up?
 * `ORCHARD_PROMETHEUS_SD_URL=http://127.0.0.1:<http-port>/v1/prometheus/targets` makes this
 * test use it instead (`externalCluster`) with the same assertions.
 */

const ROOT = resolve(import.meta.dirname, '..', '..');

interface ScrapedCluster {
  /** URL of the coordinator's HTTP-SD endpoint. */
  readonly sdUrl: string;
  /** Targets Prometheus must discover (coordinator + nodes). */
  readonly targets: number;
  /** `/metrics` URLs to lint with promtool. */
  readonly metricsUrls: readonly string[];
  stop(): Promise<void>;
}

/** A cluster someone else runs: every target its SD endpoint lists must be discovered and scraped. */
async function externalCluster(sdUrl: string): Promise<ScrapedCluster> {
  const groups = (await (await fetch(sdUrl)).json()) as { targets: string[] }[];
  const targets = groups.flatMap((g) => g.targets);
  return { sdUrl, targets: targets.length, metricsUrls: targets.map((t) => `http://${t}/metrics`), stop: async () => {} };
}

async function freePort(): Promise<number> {
  const s = createNetServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

function profile(nodeId: string, name: string, chip: string, memGiB: number, bandwidthGBs: number): HardwareProfile {
  return {
    nodeId,
    name,
    hostname: `${name}.local`,
    os: 'macos',
    osVersion: '15.2',
    chip,
    performanceCores: 12,
    efficiencyCores: 4,
    gpuCores: 40,
    memoryBytes: memGiB * 2 ** 30,
    bandwidthBytesPerSecond: bandwidthGBs * 1e9,
    wiredLimitBytes: memGiB * 0.75 * 2 ** 30,
    usableBytes: memGiB * 0.7 * 2 ** 30,
    engines: ['llama.cpp'],
    interfaces: [],
    protocolVersion: '1',
    agentVersion: '0.1.0',
  };
}

/** Deterministic pseudo-random numbers so the simulated latencies do not depend on Math.random. */
function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

async function startSampleCluster(): Promise<ScrapedCluster> {
  const closers: (() => Promise<void>)[] = [];
  const timers: NodeJS.Timeout[] = [];
  const nodes = [profile('id-studio', 'studio', 'Apple M2 Ultra', 192, 800), profile('id-mini', 'mini', 'Apple M4 Pro', 64, 273)];
  const models = ['llama-3.1-70b-q4', 'qwen2.5-7b-q8'];
  // Placement: the 70B model across both nodes, the 7B model on the studio alone.
  const stages = [
    { model: models[0]!, node: 'studio', layers: 56, weights: 30e9, kv: 2.1e9 },
    { model: models[0]!, node: 'mini', layers: 24, weights: 12.9e9, kv: 0.9e9 },
    { model: models[1]!, node: 'studio', layers: 28, weights: 8.1e9, kv: 0.5e9 },
  ];
  try {
    const nodeServers: { profile: HardwareProfile; server: Awaited<ReturnType<typeof serveMetrics>> }[] = [];
    for (const [i, p] of nodes.entries()) {
      const registry = new Registry();
      const m = createNodeMetrics(registry);
      recordNodeProfile(m, p, { availableBytes: p.memoryBytes * 0.4, memoryPressure: 'normal', thermalState: 'nominal', timestampSeconds: Date.now() / 1000 });
      for (const s of stages.filter((x) => x.node === p.name)) {
        m.engineUp.set({ engine: s === stages[0] ? 'llama-server' : 'rpc-server', model: s.model }, 1);
        m.engineStartsTotal.inc({ engine: s === stages[0] ? 'llama-server' : 'rpc-server' });
      }
      if (i === 1) {
        // The mini's rpc-server crashed once and was restarted.
        m.engineExitsTotal.inc({ engine: 'rpc-server', expected: 'false' });
        m.engineRestartsTotal.inc({ engine: 'rpc-server' });
      }
      const s = await serveMetrics({ registry, host: '127.0.0.1', port: 0 });
      closers.push(s.close);
      nodeServers.push({ profile: p, server: s });
    }

    const registry = new Registry();
    const c = createCoordinatorMetrics(registry, '0.1.0-test');
    replaceGaugeSeries(c.nodes, nodeStateCounts(['up', 'up']));
    c.discoveryEventsTotal.inc({ kind: 'added' }, 2);
    for (const model of models) {
      initModelSeries(c, model);
      c.modelLoaded.set({ model, engine: 'llama.cpp' }, 1);
      c.modelPredictedTokensPerSecond.set({ model }, model === models[0] ? 9.5 : 60);
    }
    replaceGaugeSeries(
      c.stageLayers,
      stages.map((s) => ({ labels: { model: s.model, node: s.node }, value: s.layers })),
    );
    const kinds = (s: (typeof stages)[number], actual: boolean) => [
      { kind: 'weights', v: s.weights },
      { kind: 'kv_cache', v: s.kv },
      { kind: 'compute', v: actual ? 0.62e9 : 0.55e9 },
      { kind: 'overhead', v: 0.25e9 },
    ];
    replaceGaugeSeries(
      c.stagePredictedBytes,
      stages.flatMap((s) => kinds(s, false).map((k) => ({ labels: { model: s.model, node: s.node, kind: k.kind }, value: k.v }))),
    );
    replaceGaugeSeries(
      c.stageActualBytes,
      stages.flatMap((s) => kinds(s, true).map((k) => ({ labels: { model: s.model, node: s.node, kind: k.kind }, value: k.v * 1.01 }))),
    );
    // Simulated traffic: a request per model every 100 ms with TTFT, per-token latencies and
    // usage counts, so rate() and histogram_quantile() have changing data between scrapes.
    const rnd = lcg(42);
    timers.push(
      setInterval(() => {
        for (const model of models) {
          const big = model === models[0];
          const outcome = rnd() < 0.9 ? 'ok' : rnd() < 0.5 ? 'error' : 'cancelled';
          c.requestsTotal.inc({ model, outcome });
          c.promptTokensTotal.inc({ model }, 20 + Math.floor(rnd() * 200));
          const tokens = 8 + Math.floor(rnd() * 24);
          c.generatedTokensTotal.inc({ model }, tokens);
          const ttft = (big ? 0.4 : 0.08) * (0.5 + rnd());
          c.timeToFirstTokenSeconds.observe({ model }, ttft);
          let total = ttft;
          for (let t = 0; t < tokens; t++) {
            const itl = (big ? 0.105 : 0.017) * (0.8 + 0.4 * rnd());
            c.interTokenLatencySeconds.observe({ model }, itl);
            total += itl;
          }
          c.requestDurationSeconds.observe({ model }, total);
          c.queueDepth.set({ model }, Math.floor(rnd() * 3));
          c.requestsInFlight.set({ model }, 1 + Math.floor(rnd() * 2));
        }
      }, 100),
    );

    const sd = prometheusTargetsHandler(
      (): SdInput => ({
        coordinatorAddress: coordinatorAddress,
        nodes: nodeServers.map((n) => ({ nodeId: n.profile.nodeId, name: n.profile.name, chip: n.profile.chip, metricsAddress: hostPort('127.0.0.1', n.server.port) })),
      }),
    );
    const routes = metricsRoutes({ registry });
    // The coordinator's HTTP port: /metrics, /healthz and the SD route, as it mounts them.
    const server: Server = createServer((req, res) => {
      if (routes(req, res)) return;
      if ((req.url ?? '').split('?')[0] === '/v1/prometheus/targets') return sd(req, res);
      res.writeHead(404).end();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    closers.push(
      () =>
        new Promise((r) => {
          server.closeAllConnections();
          server.close(() => r());
        }),
    );
    const coordinatorAddress = hostPort('127.0.0.1', (server.address() as AddressInfo).port);
    return {
      sdUrl: `http://${coordinatorAddress}/v1/prometheus/targets`,
      targets: 1 + nodeServers.length,
      metricsUrls: [`http://${coordinatorAddress}/metrics`, ...nodeServers.map((n) => `${n.server.url}/metrics`)],
      async stop() {
        for (const t of timers) clearInterval(t);
        for (const close of closers.reverse()) await close();
      },
    };
  } catch (err) {
    for (const t of timers) clearInterval(t);
    for (const close of closers.reverse()) await close();
    throw err;
  }
}

interface PromResponse<T> {
  status: 'success' | 'error';
  data: T;
  error?: string;
}
type Sample = { metric: Record<string, string>; value: [number, string] };

let cluster: ScrapedCluster | undefined;
let prometheus: ChildProcess | undefined;
// The node agent's sentinel: if this test process is SIGKILLed, Prometheus is killed too.
let watchdog: EngineWatchdog | undefined;
let promUrl = '';
let promLog = '';
const workDir = mkdtempSync(join(tmpdir(), 'orchard-prometheus-'));

async function api<T>(path: string): Promise<T> {
  const res = await fetch(`${promUrl}${path}`);
  const body = (await res.json()) as PromResponse<T>;
  if (body.status !== 'success') throw new Error(`${path}: ${body.error ?? res.status}`);
  return body.data;
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}\nprometheus log:\n${promLog.slice(-3000)}`);
}

function stopPrometheus(): Promise<void> {
  const p = prometheus;
  prometheus = undefined;
  if (!p || p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolveStop) => {
    const kill = setTimeout(() => {
      try {
        process.kill(-p.pid!, 'SIGKILL');
      } catch {}
    }, 5000);
    p.once('exit', () => {
      clearTimeout(kill);
      watchdog?.remove(p.pid!); // never signal a recycled pid
      resolveStop();
    });
    try {
      process.kill(-p.pid!, 'SIGTERM'); // its own process group (detached)
    } catch {
      clearTimeout(kill);
      resolveStop();
    }
  });
}

beforeAll(async () => {
  try {
    const external = process.env.ORCHARD_PROMETHEUS_SD_URL;
    cluster = external ? await externalCluster(external) : await startSampleCluster();
    const port = await freePort();
    promUrl = `http://127.0.0.1:${port}`;
    const config = join(workDir, 'prometheus.yml');
    // Generated, not deploy/prometheus/prometheus.yml: same job shape (one http_sd_configs
    // entry), but 1 s intervals so the test needs seconds, not minutes.
    writeFileSync(
      config,
      [
        'global:',
        '  scrape_interval: 1s',
        '  evaluation_interval: 1s',
        'scrape_configs:',
        '  - job_name: orchard',
        '    scrape_timeout: 1s',
        '    http_sd_configs:',
        `      - url: ${cluster.sdUrl}`,
        '        refresh_interval: 1s',
        '',
      ].join('\n'),
    );
    prometheus = spawn(
      'prometheus',
      [`--config.file=${config}`, `--storage.tsdb.path=${join(workDir, 'data')}`, `--web.listen-address=127.0.0.1:${port}`, '--log.level=warn', '--web.enable-lifecycle'],
      { detached: true, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    prometheus.stdout!.on('data', (d: Buffer) => {
      promLog += d.toString();
    });
    prometheus.stderr!.on('data', (d: Buffer) => {
      promLog += d.toString();
    });
    const spawned = prometheus;
    await new Promise<void>((ok, fail) => {
      spawned.once('spawn', ok);
      spawned.once('error', fail);
    });
    watchdog = new EngineWatchdog();
    watchdog.add(spawned.pid!);
    await until('prometheus ready', 60_000, async () => ((await fetch(`${promUrl}/-/ready`)).ok ? true : undefined));
  } catch (err) {
    await stopPrometheus();
    watchdog?.close();
    watchdog = undefined;
    await cluster?.stop();
    throw err;
  }
});

afterAll(async () => {
  await stopPrometheus();
  watchdog?.close();
  await cluster?.stop();
  rmSync(workDir, { recursive: true, force: true });
});

describe('a real Prometheus scraping Orchard', () => {
  it('every /metrics passes promtool check metrics with no lint warnings', async () => {
    for (const url of cluster!.metricsUrls) {
      const text = await (await fetch(url)).text();
      const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
      expect(r.error).toBeUndefined();
      expect(`${r.stdout}${r.stderr}`.trim(), url).toBe('');
      expect(r.status, url).toBe(0);
    }
    // promtool does flag bad exposition (the check can fail).
    const bad = spawnSync('promtool', ['check', 'metrics'], { input: '# HELP x_count a\n# TYPE x_count counter\nx_count 1\n', encoding: 'utf8' });
    expect(bad.status).not.toBe(0);
  });

  it('discovers the coordinator and every node through HTTP-SD and scrapes them all', async () => {
    const targets = await until('all targets up', 60_000, async () => {
      const d = await api<{ activeTargets: { labels: Record<string, string>; health: string; scrapeUrl: string }[] }>('/api/v1/targets?state=active');
      return d.activeTargets.length === cluster!.targets && d.activeTargets.every((t) => t.health === 'up') ? d.activeTargets : undefined;
    });
    const roles = targets.map((t) => t.labels['role']).sort();
    expect(roles).toEqual(['coordinator', ...Array(cluster!.targets - 1).fill('node')]);
    for (const t of targets.filter((x) => x.labels['role'] === 'node')) {
      expect(t.labels['node']).toBeTruthy();
      expect(t.labels['chip']).toMatch(/^Apple /);
    }
    // No label collided with a target label (would show up as exported_*).
    const collided = await api<string[]>('/api/v1/labels');
    expect(collided.filter((l) => l.startsWith('exported_'))).toEqual([]);
  });

  it('evaluates every PromQL expression of every dashboard panel with data', async () => {
    // rate()/increase() need two samples of every series in the window (targets are scraped at
    // different offsets), histogram_quantile a non-zero rate.
    await until('three scrapes of every target and moving request counters', 60_000, async () => {
      const scrapes = await api<{ result: Sample[] }>(`/api/v1/query?query=${encodeURIComponent('count_over_time(up[1m]) >= 3')}`);
      const moving = await api<{ result: Sample[] }>(`/api/v1/query?query=${encodeURIComponent('sum(rate(orchard_requests_total[1m])) > 0')}`);
      return scrapes.result.length === cluster!.targets && moving.result.length > 0 ? true : undefined;
    });
    const files = readdirSync(join(ROOT, 'dashboards')).filter((f) => f.endsWith('.json'));
    expect(files.length).toBeGreaterThanOrEqual(3);
    const evaluated: string[] = [];
    const failures: string[] = [];
    for (const f of files) {
      const d = dashboardSchema.parse(JSON.parse(readFileSync(join(ROOT, 'dashboards', f), 'utf8')));
      // Variables get the values Prometheus knows for them (what Grafana's dropdown would show, all selected).
      const values: Record<string, string[]> = {};
      for (const v of d.templating.list) {
        const lv = labelValuesQuery(v)!;
        const vals = await api<string[]>(`/api/v1/label/${lv.label}/values?match[]=${encodeURIComponent(lv.metric)}`);
        if (vals.length === 0) failures.push(`${d.uid}: variable $${v.name} (label_values(${lv.metric}, ${lv.label})) has no values`);
        values[v.name] = vals;
      }
      for (const q of dashboardQueries(d)) {
        const where = `${d.uid} / ${q.panel} / ${q.refId}`;
        for (const name of metricNamesInExpr(q.expr)) {
          if (name !== 'up' && !findMetric(name)) failures.push(`${where}: queries ${name}, which the catalogue does not declare`);
        }
        const expr = substituteVariables(q.expr, values);
        try {
          const r = await api<{ resultType: string; result: Sample[] }>(`/api/v1/query?query=${encodeURIComponent(expr)}`);
          const finite = r.result.filter((s) => Number.isFinite(Number(s.value[1])));
          if (finite.length === 0) failures.push(`${where}: no data (${r.result.length} series, none finite) for ${expr}`);
          else evaluated.push(where);
        } catch (err) {
          failures.push(`${where}: ${String(err)} for ${expr}`);
        }
      }
    }
    expect(failures).toEqual([]);
    expect(evaluated.length).toBeGreaterThanOrEqual(30);
  });

  it('every catalogue metric the sample cluster exports reached Prometheus', async () => {
    // orchard_rpc_bytes_total is declared but not exported: no agent relays RPC traffic yet.
    const expected = CATALOGUE.filter((d) => d.name !== 'orchard_rpc_bytes_total');
    const names = new Set(await api<string[]>('/api/v1/label/__name__/values'));
    for (const d of expected) expect(names.has(d.type === 'histogram' ? `${d.name}_bucket` : d.name), d.name).toBe(true);
    // And Prometheus parsed the exposition types the catalogue declares.
    const meta = await api<Record<string, { type: string }[]>>('/api/v1/metadata');
    for (const d of expected) expect(meta[d.name]?.[0]?.type, d.name).toBe(d.type);
  });

  it('the SD answer Prometheus read is exactly prometheusTargets() of the cluster', async () => {
    const served = await (await fetch(cluster!.sdUrl)).json();
    expect(served).toEqual(
      prometheusTargets({
        coordinatorAddress: new URL(cluster!.sdUrl).host,
        nodes: (served as { targets: string[]; labels: Record<string, string> }[])
          .filter((g) => g.labels['role'] === 'node')
          .map((g) => ({ nodeId: g.labels['node_id']!, name: g.labels['node']!, chip: g.labels['chip']!, metricsAddress: g.targets[0] })),
      }),
    );
  });
});

/**
 * The node agent's real metrics class (src/node/metrics.ts), scraped as text: its orchard_*
 * families must be catalogue metrics of the declared type, and its exposition must lint clean.
 */
describe('the node agent\'s own /metrics', () => {
  async function agentExposition(): Promise<string> {
    const p = profileForAgent();
    const m = new NodeMetrics({
      profile: () => p,
      live: () => ({ availableBytes: p.memoryBytes / 2, memoryPressure: 'normal', thermalState: 'nominal', timestampSeconds: 0 }),
      engines: () => [{ engineId: 'e1', kind: 'rpc-server', host: '127.0.0.1', port: 50052, pid: 1, model: 'm', startedAtSeconds: 0, argv: [] }],
    });
    return m.registry.metrics();
  }
  function profileForAgent(): HardwareProfile {
    return profile('id-agent', 'agent', 'Apple M3 Max', 128, 400);
  }

  it('exports only catalogue metrics, with the declared types', async () => {
    const text = await agentExposition();
    const families = [...text.matchAll(/^# TYPE (orchard_\w+) (\w+)$/gm)].map((m) => ({ name: m[1]!, type: m[2]! }));
    expect(families.length).toBeGreaterThanOrEqual(8);
    for (const f of families) {
      const d = findMetric(f.name);
      expect(d, `${f.name} is not in the catalogue`).toBeDefined();
      expect(d!.type, f.name).toBe(f.type);
      expect(d!.exportedBy, f.name).toBe('node');
    }
  });

  // prom-client's own defaults would fail this (nodejs_active_*_total gauges); the agent uses
  // collectProcessMetrics from the catalogue's factories, which drops them.
  it('passes promtool check metrics with no lint warnings', async () => {
    const r = spawnSync('promtool', ['check', 'metrics'], { input: await agentExposition(), encoding: 'utf8' });
    expect(`${r.stdout}${r.stderr}`.trim()).toBe('');
    expect(r.status).toBe(0);
  });
});
