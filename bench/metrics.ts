/**
 * `npm run bench:metrics`: how long the coordinator's `/metrics` takes to answer with 64
 * registered nodes and 8 loaded models (goal from issue 8: < 20 ms), over real HTTP on
 * 127.0.0.1, printing JSON.
 *
 * What runs is the coordinator's own metrics code: `CoordinatorMetrics` (src/coordinator/
 * metrics.ts) on a real `Membership` whose registry holds 64 connected nodes (3 of them
 * suspect), served by the same `metricsRoutes` handler the coordinator mounts. Placement, queue
 * and in-flight gauges are recomputed from the runtime's model list at every scrape, exactly as
 * in the coordinator. The one stand-in: the model list is `ModelStatus` objects shaped like
 * Runtime.models() returns for verified llama.cpp loads, because 8 real loads over 64 real agents
 * cannot run on this machine. Request histograms hold observations for every model (through the
 * same observeGeneration wrapper MeteredRuntime uses); process metrics are included.
 *
 * Two placements: `spread8` (each model over 8 nodes: 64 stages, a realistic big cluster) and
 * `all64` (each model over all 64 nodes: 512 stages, a worst case no planner would choose).
 * Round trips use node:http with keep-alive (Prometheus keeps its connection too); the
 * server-side time is measured from request arrival to the end of the response. The load
 * average is printed because the machine may be shared: read the numbers relative to it.
 */
import { createServer, Agent, get } from 'node:http';
import type { AddressInfo } from 'node:net';
import { loadavg, cpus } from 'node:os';
import { performance } from 'node:perf_hooks';
import { Membership } from '../src/coordinator/membership/membership.ts';
import { CoordinatorMetrics, observeGeneration } from '../src/coordinator/api/metrics.ts';
import type { GenerateEvent, ModelStatus } from '../src/coordinator/instances/runtime.ts';
import type { HardwareProfile } from '../src/shared/hardware.ts';
import { createLogger } from '../src/shared/log.ts';
import { initModelSeries } from '../src/shared/metrics/factories.ts';
import { studioProfile } from '../test/helpers/profiles.ts';
import { metricsRoutes } from '../src/shared/metrics/http.ts';
import { quantile } from './lib/stats.ts';

const NODES = 64;
const MODELS = 8;
const WARMUP = 30;
const SAMPLES = 300;
const MiB = 2 ** 20;

function profile(i: number): HardwareProfile {
  const name = `node-${String(i).padStart(2, '0')}`;
  // Three chips so the node_info series differ; the rest is the fixture's (sizes do not change
  // the cost of a scrape).
  return studioProfile({
    nodeId: `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`,
    name,
    hostname: `${name}.local`,
    chip: ['Apple M2 Ultra', 'Apple M4 Pro', 'Apple M3 Max'][i % 3]!,
    metricsPort: 9151,
  });
}

/** Verified llama.cpp models as Runtime.models() reports them: each over `nodesPerModel` nodes. */
function models(nodesPerModel: number): ModelStatus[] {
  const layersPer = 80 / nodesPerModel;
  return Array.from({ length: MODELS }, (_, m) => {
    const stages = Array.from({ length: nodesPerModel }, (_, k) => {
      const p = profile((m * nodesPerModel + k) % NODES);
      const weights = 4e9 / nodesPerModel + k;
      return {
        nodeId: p.nodeId,
        nodeName: p.name,
        firstLayer: Math.floor(k * layersPer),
        lastLayer: Math.floor((k + 1) * layersPer) - 1,
        bytes: { weights, kv: 5e8, compute: 3e8, overhead: 2e8, total: weights + 1e9 },
        budgetBytes: p.budgetBytes,
        endpoint: `10.0.0.${k}:50052`,
      };
    });
    return {
      name: `model-${m}`,
      path: `/models/model-${m}.gguf`,
      state: 'ready' as const,
      engine: 'llama' as const,
      stages,
      error: '',
      predictedTokensPerSecond: 20,
      options: { ctx: 8192, cacheType: 'f16', parallel: 4, pin: [], parallelism: 'auto' as const },
      verification: {
        ok: true,
        problems: [],
        devices: stages.map((s, k) => ({
          device: `RPC0[${s.endpoint}]`,
          nodeName: s.nodeName,
          plannedLayers: `${s.firstLayer}-${s.lastLayer}`,
          actualLayers: `${s.firstLayer}-${s.lastLayer}`,
          actual: { model: s.bytes.weights * 1.01, kv: s.bytes.kv, compute: s.bytes.compute + k * MiB },
        })),
      },
    };
  });
}

/** A coordinator's metrics over NODES registered nodes and MODELS placed models (some nodes down). */
function populatedMetrics(nodesPerModel: number) {
  const log = createLogger('bench', 'silent');
  const membership = new Membership({ suspectAfterMs: 60_000, downAfterMs: 120_000 }, log);
  for (let i = 0; i < NODES; i++) {
    membership.registry.connected({ profile: profile(i), address: `10.0.${i >> 8}.${i & 255}:7070`, discoveredBy: 'join', session: `s${i}` }, Date.now());
    if (i % 17 === 0) membership.registry.disconnected(profile(i).nodeId, `s${i}`, Date.now());
  }
  const list = models(nodesPerModel);
  const cm = new CoordinatorMetrics({
    version: '0.1.0',
    membership,
    runtime: () => ({ models: () => list, slotUsage: () => list.map((m, i) => ({ model: m.name, running: i % 4, queued: i % 3 })) }),
  });
  for (const kind of ['added', 'state', 'replaced', 'removed'] as const) cm.metrics.discoveryEventsTotal.inc({ kind });
  return { cm, membership, list, stages: list.reduce((t, m) => t + m.stages.length, 0) };
}

/**
 * Requests through the same wrapper MeteredRuntime uses, on a synthetic clock: 200 per model,
 * 20 tokens each, so every histogram bucket series exists.
 */
async function observeRequests(m: CoordinatorMetrics['metrics'], list: readonly { name: string }[]): Promise<void> {
  for (const model of list) {
    initModelSeries(m, model.name);
    for (let r = 0; r < 200; r++) {
      let t = 0;
      const events: GenerateEvent[] = Array.from({ length: 20 }, (_, k) => ({ kind: 'token', text: 'x', tokenIds: [k] }));
      const stream = (async function* () {
        t += 50 + (r % 40) * 50;
        for (const [k, ev] of events.entries()) {
          yield ev;
          t += 10 + ((r + k) % 25) * 8;
        }
        yield { kind: 'done', finishReason: 'length', promptTokens: 30, completionTokens: 20, timings: { promptMs: 0, predictedMs: 0, promptTokensPerSecond: 0, predictedTokensPerSecond: 0, firstTokenMs: 0 } } as GenerateEvent;
      })();
      for await (const _ of observeGeneration(m, model.name, stream, () => t)) {
        // drain
      }
    }
  }
}

/** The handler the coordinator mounts at GET /metrics, served alone; records server-side time per request. */
async function metricsServer(registry: CoordinatorMetrics['registry']) {
  const routes = metricsRoutes({ registry });
  const httpServer = createServer((req, res) => {
    if (!routes(req, res)) res.writeHead(404).end();
  });
  await new Promise<void>((r) => httpServer.listen(0, '127.0.0.1', r));
  const serverSide: number[] = [];
  httpServer.prependListener('request', (_req, res) => {
    const t0 = performance.now();
    res.once('finish', () => serverSide.push(performance.now() - t0));
  });
  const url = `http://127.0.0.1:${(httpServer.address() as AddressInfo).port}`;
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  const scrape = () =>
    new Promise<{ status: number; text: string }>((ok, fail) => {
      get(`${url}/metrics`, { agent }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => ok({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', fail);
      }).on('error', fail);
    });
  const close = () =>
    new Promise<void>((r) => {
      agent.destroy();
      httpServer.closeAllConnections();
      httpServer.close(() => r());
    });
  return { scrape, serverSide, close };
}

/** Scrape round trips over HTTP, then registry renders alone (wall clock and CPU). */
async function measureScrapes(server: Awaited<ReturnType<typeof metricsServer>>, registry: CoordinatorMetrics['registry']) {
  let bytes = 0;
  let series = 0;
  for (let i = 0; i < WARMUP; i++) await server.scrape();
  server.serverSide.length = 0;
  const http: number[] = [];
  for (let i = 0; i < SAMPLES; i++) {
    const t0 = performance.now();
    const res = await server.scrape();
    http.push(performance.now() - t0);
    if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
    bytes = res.text.length;
    series = res.text.split('\n').filter((l) => l && !l.startsWith('#')).length;
  }
  const collect: number[] = [];
  // CPU time is what the scrape costs this process regardless of how busy the machine is;
  // wall-clock latency also counts time spent waiting for a core.
  const cpu0 = process.cpuUsage();
  for (let i = 0; i < SAMPLES; i++) {
    const t0 = performance.now();
    await registry.metrics();
    collect.push(performance.now() - t0);
  }
  const cpu = process.cpuUsage(cpu0);
  const byValue = (a: number, b: number) => a - b;
  return { bytes, series, http: http.sort(byValue), collect: collect.sort(byValue), serverSide: [...server.serverSide].sort(byValue), cpuMsPerRender: (cpu.user + cpu.system) / 1000 / SAMPLES };
}

async function scenario(name: string, nodesPerModel: number) {
  const { cm, membership, list, stages } = populatedMetrics(nodesPerModel);
  await observeRequests(cm.metrics, list);
  const server = await metricsServer(cm.registry);
  try {
    const { bytes, series, http, collect, serverSide, cpuMsPerRender } = await measureScrapes(server, cm.registry);
    const r = (x: number) => Math.round(x * 1000) / 1000;
    return {
      scenario: name,
      nodes: NODES,
      models: MODELS,
      stages,
      series,
      bytes,
      samples: SAMPLES,
      placementSetAt: 'every scrape (collect hooks, as the coordinator does)',
      roundTripMs: { p50: r(quantile(http, 0.5)), p95: r(quantile(http, 0.95)), p99: r(quantile(http, 0.99)), max: r(http.at(-1)!) },
      serverMs: { p50: r(quantile(serverSide, 0.5)), p95: r(quantile(serverSide, 0.95)) },
      registryMetricsMs: { p50: r(quantile(collect, 0.5)), p95: r(quantile(collect, 0.95)), cpuPerRender: r(cpuMsPerRender) },
      goalMs: 20,
      meetsGoalAtP95: quantile(http, 0.95) < 20,
    };
  } finally {
    await server.close();
    membership.close();
  }
}

const loadBefore = loadavg()[0];
const results = [await scenario('spread8', 8), await scenario('all64', 64)];
process.stdout.write(
  `${JSON.stringify({ bench: 'metrics', node: process.version, cpus: cpus().length, loadAverage1m: { before: loadBefore, after: loadavg()[0] }, results }, null, 2)}\n`,
);
