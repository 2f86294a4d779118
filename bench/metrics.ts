/**
 * `npm run bench:metrics`: how long a coordinator's `/metrics` takes to answer with 64
 * registered nodes and 8 loaded models (goal from issue 8: < 20 ms), over real HTTP on
 * 127.0.0.1, printing JSON.
 *
 * Two placements: `spread8` (each model over 8 nodes: 64 stages, a realistic big cluster) and
 * `all64` (each model over all 64 nodes: 512 stages, a worst case no planner would choose).
 * Placement gauges either set when the placement changes (`static`, what the coordinator should
 * do: placement changes on load/unload, not per scrape) or recomputed at every scrape in collect
 * hooks (`collect`). Request histograms hold observations for every model; process metrics are
 * included. Round trips use node:http with keep-alive (Prometheus keeps its connection too); the
 * server-side time is measured from request arrival to the end of the response. The load
 * average is printed because the machine may be shared: read the numbers relative to it.
 */
import { Agent, get } from 'node:http';
import { loadavg, cpus } from 'node:os';
import { performance } from 'node:perf_hooks';
import { Registry } from 'prom-client';
import { NODE_STATES, REQUEST_OUTCOMES, STAGE_MEMORY_KINDS } from '../src/shared/metrics/catalogue.ts';
import { createCoordinatorMetrics, nodeStateCounts, replaceGaugeSeries } from '../src/shared/metrics/factories.ts';
import { serveMetrics } from '../src/shared/metrics/http.ts';

const NODES = 64;
const MODELS = 8;
const WARMUP = 30;
const SAMPLES = 300;

interface Stage {
  model: string;
  node: string;
  layers: number;
  bytes: Record<string, number>;
}

function placement(nodesPerModel: number): Stage[] {
  const stages: Stage[] = [];
  for (let m = 0; m < MODELS; m++) {
    for (let k = 0; k < nodesPerModel; k++) {
      const node = `node-${String((m * nodesPerModel + k) % NODES).padStart(2, '0')}`;
      stages.push({ model: `model-${m}`, node, layers: 80 / nodesPerModel, bytes: { weights: 4e9 + k, kv_cache: 5e8, compute: 3e8, overhead: 2e8 } });
    }
  }
  return stages;
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}

async function scenario(name: string, nodesPerModel: number, atScrape: boolean) {
  const registry = new Registry();
  const stages = placement(nodesPerModel);
  const nodeStates = Array.from({ length: NODES }, (_, i) => NODE_STATES[i % 17 === 0 ? 1 : 0]!);
  const stageSeries = () => ({
    layers: stages.map((s) => ({ labels: { model: s.model, node: s.node }, value: s.layers })),
    predicted: stages.flatMap((s) => STAGE_MEMORY_KINDS.map((kind) => ({ labels: { model: s.model, node: s.node, kind }, value: s.bytes[kind]! }))),
    actual: stages.flatMap((s) => STAGE_MEMORY_KINDS.map((kind) => ({ labels: { model: s.model, node: s.node, kind }, value: s.bytes[kind]! * 1.02 }))),
  });
  const m = createCoordinatorMetrics(registry, '0.1.0', {
    collect: !atScrape ? {} : {
      nodes() {
        replaceGaugeSeries(this, nodeStateCounts(nodeStates));
      },
      stageLayers() {
        replaceGaugeSeries(
          this,
          stages.map((s) => ({ labels: { model: s.model, node: s.node }, value: s.layers })),
        );
      },
      stagePredictedBytes() {
        replaceGaugeSeries(
          this,
          stages.flatMap((s) => STAGE_MEMORY_KINDS.map((kind) => ({ labels: { model: s.model, node: s.node, kind }, value: s.bytes[kind]! }))),
        );
      },
      stageActualBytes() {
        replaceGaugeSeries(
          this,
          stages.flatMap((s) => STAGE_MEMORY_KINDS.map((kind) => ({ labels: { model: s.model, node: s.node, kind }, value: s.bytes[kind]! * 1.02 }))),
        );
      },
    },
  });
  if (!atScrape) {
    const ss = stageSeries();
    replaceGaugeSeries(m.nodes, nodeStateCounts(nodeStates));
    replaceGaugeSeries(m.stageLayers, ss.layers);
    replaceGaugeSeries(m.stagePredictedBytes, ss.predicted);
    replaceGaugeSeries(m.stageActualBytes, ss.actual);
  }
  for (let i = 0; i < MODELS; i++) {
    const model = `model-${i}`;
    m.modelLoaded.set({ model, engine: 'llama.cpp' }, 1);
    m.modelPredictedTokensPerSecond.set({ model }, 20);
    m.queueDepth.set({ model }, 1);
    m.requestsInFlight.set({ model }, 2);
    for (const outcome of REQUEST_OUTCOMES) m.requestsTotal.inc({ model, outcome }, 10);
    m.promptTokensTotal.inc({ model }, 1000);
    m.generatedTokensTotal.inc({ model }, 5000);
    for (let r = 0; r < 200; r++) {
      m.timeToFirstTokenSeconds.observe({ model }, 0.05 + (r % 40) * 0.05);
      m.requestDurationSeconds.observe({ model }, 1 + (r % 30));
      for (let t = 0; t < 20; t++) m.interTokenLatencySeconds.observe({ model }, 0.01 + ((r + t) % 25) * 0.008);
    }
  }
  for (const kind of ['added', 'state', 'replaced', 'removed']) m.discoveryEventsTotal.inc({ kind });

  const server = await serveMetrics({ registry, host: '127.0.0.1', port: 0 });
  const serverSide: number[] = [];
  server.server.prependListener('request', (_req, res) => {
    const t0 = performance.now();
    res.once('finish', () => serverSide.push(performance.now() - t0));
  });
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  const scrape = () =>
    new Promise<{ status: number; text: string }>((ok, fail) => {
      get(`${server.url}/metrics`, { agent }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => ok({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', fail);
      }).on('error', fail);
    });
  try {
    let bytes = 0;
    let series = 0;
    for (let i = 0; i < WARMUP; i++) await scrape();
    serverSide.length = 0;
    const http: number[] = [];
    for (let i = 0; i < SAMPLES; i++) {
      const t0 = performance.now();
      const res = await scrape();
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
    const cpuMsPerRender = (cpu.user + cpu.system) / 1000 / SAMPLES;
    http.sort((a, b) => a - b);
    collect.sort((a, b) => a - b);
    serverSide.sort((a, b) => a - b);
    const r = (x: number) => Math.round(x * 1000) / 1000;
    return {
      scenario: name,
      nodes: NODES,
      models: MODELS,
      stages: stages.length,
      series,
      bytes,
      samples: SAMPLES,
      placementSetAt: atScrape ? 'every scrape (collect hooks)' : 'on change',
      roundTripMs: { p50: r(quantile(http, 0.5)), p95: r(quantile(http, 0.95)), p99: r(quantile(http, 0.99)), max: r(http.at(-1)!) },
      serverMs: { p50: r(quantile(serverSide, 0.5)), p95: r(quantile(serverSide, 0.95)) },
      registryMetricsMs: { p50: r(quantile(collect, 0.5)), p95: r(quantile(collect, 0.95)), cpuPerRender: r(cpuMsPerRender) },
      goalMs: 20,
      meetsGoalAtP95: quantile(http, 0.95) < 20,
    };
  } finally {
    agent.destroy();
    await server.close();
  }
}

const loadBefore = loadavg()[0];
const results = [await scenario('spread8', 8, false), await scenario('spread8-collect', 8, true), await scenario('all64', 64, false)];
process.stdout.write(
  `${JSON.stringify({ bench: 'metrics', node: process.version, cpus: cpus().length, loadAverage1m: { before: loadBefore, after: loadavg()[0] }, results }, null, 2)}\n`,
);
