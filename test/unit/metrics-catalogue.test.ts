import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { resolve } from 'node:path';
import { Registry } from 'prom-client';
import { afterEach, describe, expect, it } from 'vitest';
import { agentHost, prometheusTargets, prometheusTargetsHandler, sdNodeFromEntry } from '../../src/coordinator/api/prometheus-sd.ts';
import type { NodeEntry } from '../../src/coordinator/membership/registry.ts';
import { idleMetrics, type MetricSample } from '../../src/shared/metrics/activity.ts';
import { CATALOGUE, COORDINATOR_METRICS, findMetric, NODE_METRICS, TARGET_LABELS, TARGET_LABELS_ALLOWED } from '../../src/shared/metrics/catalogue.ts';
import {
  createCoordinatorMetrics,
  createNodeMetrics,
  enumeratedLabelSets,
  initModelSeries,
  nodeStateCounts,
  recordNodeProfile,
  removeModelSeries,
  replaceGaugeSeries,
} from '../../src/shared/metrics/factories.ts';
import { hostPort, metricsRoutes, serveMetrics } from '../../src/shared/metrics/http.ts';
import { metricNamesInExpr } from '../../src/shared/metrics/promql.ts';
import { exerciseCoordinatorMetrics, exerciseNodeMetrics, PROFILE } from '../helpers/metrics-exercise.ts';

const UNIT_SUFFIX: Record<string, RegExp> = {
  bytes: /_bytes(_total)?$/,
  seconds: /_seconds(_total)?$/,
  'bytes/s': /_bytes_per_second$/,
};
/** Labels that would make cardinality unbounded (one series per request or prompt). */
const FORBIDDEN_LABELS = /^(request_?id|id|prompt|text|user|session|trace_?id|engine_id|port|pid)$/;

describe('metric catalogue', () => {
  it('declares every metric the issue requires', () => {
    const names = new Set(CATALOGUE.map((d) => d.name));
    for (const n of [
      'orchard_node_info',
      'orchard_node_memory_bytes',
      'orchard_node_budget_bytes',
      'orchard_node_available_memory_bytes',
      'orchard_node_bandwidth_bytes_per_second',
      'orchard_node_effective_bandwidth_bytes_per_second',
      'orchard_node_prefill_flops_per_second',
      'orchard_node_wired_limit_bytes',
      'orchard_engine_up',
      'orchard_engine_starts_total',
      'orchard_engine_exits_total',
      'orchard_stage_predicted_bytes',
      'orchard_stage_actual_bytes',
      'orchard_requests_total',
      'orchard_generated_tokens_total',
      'orchard_prompt_tokens_total',
      'orchard_time_to_first_token_seconds',
      'orchard_inter_token_latency_seconds',
      'orchard_queue_depth',
      'orchard_discovery_events_total',
      'orchard_nodes',
      'orchard_coordinator_build_info',
    ]) {
      expect(names, n).toContain(n);
    }
    expect(COORDINATOR_METRICS.stagePredictedBytes.labelNames).toEqual(['model', 'node', 'kind']);
    expect(COORDINATOR_METRICS.requestsTotal.labelNames).toEqual(['model', 'outcome']);
  });

  it('follows the Prometheus naming conventions', () => {
    const seen = new Set<string>();
    for (const d of CATALOGUE) {
      expect(seen.has(d.name), `duplicate ${d.name}`).toBe(false);
      seen.add(d.name);
      expect(d.name).toMatch(/^orchard_[a-z0-9_]+$/);
      expect(d.help.length, d.name).toBeGreaterThan(10);
      if (d.type === 'counter') expect(d.name, 'counters end in _total').toMatch(/_total$/);
      else expect(d.name, 'only counters end in _total').not.toMatch(/_total$/);
      if (d.name.endsWith('_info')) expect(d.unit).toBe('1');
      const suffix = UNIT_SUFFIX[d.unit];
      if (suffix) expect(d.name, `${d.name} in ${d.unit}`).toMatch(suffix);
      if (/_bytes(_|$)/.test(d.name) && !d.name.endsWith('_per_second')) expect(d.unit).toBe('bytes');
      if (/_seconds(_|$)/.test(d.name)) expect(d.unit).toBe('seconds');
      // Base units only: no _milliseconds, _kb, _gb, _percent.
      expect(d.name).not.toMatch(/_(milliseconds|ms|kb|mb|gb|kib|mib|gib|percent)(_|$)/);
    }
  });

  it('keeps labels bounded and clear of the target labels on node-exported metrics', () => {
    for (const d of CATALOGUE) {
      for (const l of d.labelNames) {
        expect(l).toMatch(/^[a-z][a-z0-9_]*$/);
        // orchard_node_info{id}: the node's stable id, one value per node (bounded by the cluster).
        if (!(d.name === 'orchard_node_info' && l === 'id')) expect(l, `${d.name}{${l}} is unbounded`).not.toMatch(FORBIDDEN_LABELS);
        expect(l).not.toMatch(/^(le|quantile|job|instance|__.*)$/);
        // Node series get node/node_id/chip/role from HTTP-SD; the same label on the metric would become exported_*.
        // Exception: orchard_node_info's chip (same value as the target label, honor_labels in deploy/prometheus.yml).
        if (d.exportedBy === 'node') {
          if (!TARGET_LABELS_ALLOWED[d.name]?.includes(l)) expect(TARGET_LABELS as readonly string[], `${d.name}{${l}}`).not.toContain(l);
        } else expect(['node_id', 'chip', 'role'], `${d.name}{${l}}`).not.toContain(l);
      }
      for (const [label, values] of Object.entries(d.labelValues ?? {})) {
        expect(d.labelNames, `${d.name}: labelValues for an undeclared label`).toContain(label);
        expect((values as readonly string[]).length).toBeGreaterThan(0);
      }
    }
    for (const d of Object.values(NODE_METRICS)) expect(d.exportedBy).toBe('node');
    for (const d of Object.values(COORDINATOR_METRICS)) expect(d.exportedBy).toBe('coordinator');
  });

  it('has strictly ascending, positive histogram buckets covering the ranges that matter', () => {
    const hist = CATALOGUE.filter((d) => d.type === 'histogram');
    expect(hist.length).toBeGreaterThanOrEqual(2);
    for (const d of hist) {
      const b = d.buckets!;
      expect(b.length).toBeGreaterThanOrEqual(8);
      for (let i = 0; i < b.length; i++) {
        expect(b[i]!).toBeGreaterThan(i === 0 ? 0 : b[i - 1]!);
      }
    }
    const ttft = COORDINATOR_METRICS.timeToFirstTokenSeconds.buckets;
    expect(ttft[0]).toBeLessThanOrEqual(0.05);
    expect(ttft.at(-1)).toBeGreaterThanOrEqual(30);
    const itl = COORDINATOR_METRICS.interTokenLatencySeconds.buckets;
    // Decode on Apple Silicon: 7-200 ms per token must be resolved by several buckets.
    expect(itl.filter((x) => x >= 0.007 && x <= 0.2).length).toBeGreaterThanOrEqual(6);
  });

  it('docs/metrics.md documents every metric with its type and labels', () => {
    const doc = readFileSync(resolve(import.meta.dirname, '..', '..', 'docs', 'metrics.md'), 'utf8');
    for (const d of CATALOGUE) {
      const row = doc.split('\n').find((l) => l.startsWith(`| \`${d.name}\` |`));
      expect(row, `${d.name} missing from docs/metrics.md`).toBeDefined();
      expect(row).toContain(`| ${d.type} |`);
      for (const l of d.labelNames) expect(row, `${d.name} label ${l}`).toContain(`\`${l}\``);
    }
  });

  it('maps series names (including histogram series) back to declarations', () => {
    expect(findMetric('orchard_time_to_first_token_seconds_bucket')?.name).toBe('orchard_time_to_first_token_seconds');
    expect(findMetric('orchard_time_to_first_token_seconds_count')?.type).toBe('histogram');
    expect(findMetric('orchard_requests_total')?.type).toBe('counter');
    expect(findMetric('orchard_requests_total_bucket')).toBeUndefined();
    expect(findMetric('orchard_not_a_metric')).toBeUndefined();
  });
});

const profile = PROFILE;

describe('every catalogue metric is set by code', () => {
  it('the node agent and the coordinator, driven as a cluster drives them, move every metric they export', async () => {
    const node = await exerciseNodeMetrics();
    const coordinator = await exerciseCoordinatorMetrics();
    expect(idleMetrics(node, Object.values(NODE_METRICS))).toEqual([]);
    expect(idleMetrics(coordinator, Object.values(COORDINATOR_METRICS))).toEqual([]);
    // The engine counters moved for the right reasons: two starts + the one running, one stop, one crash.
    const value = (name: string, labels: Record<string, string>) =>
      node.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value;
    expect(value('orchard_engine_starts_total', { engine: 'rpc-server' })).toBe(3);
    expect(value('orchard_engine_exits_total', { engine: 'rpc-server', expected: 'true' })).toBe(1);
    expect(value('orchard_engine_exits_total', { engine: 'rpc-server', expected: 'false' })).toBe(1);
    expect(value('orchard_engine_up', { engine: 'rpc-server', model: 'm8' })).toBe(1);
  }, 30_000);

  it('idleMetrics flags a metric with no sample, a counter or histogram that never moved; a gauge at 0 is fine', () => {
    const [counter, histogram, gauge] = [COORDINATOR_METRICS.requestsTotal, COORDINATOR_METRICS.timeToFirstTokenSeconds, COORDINATOR_METRICS.queueDepth];
    const zeroCounter = { name: counter.name, labels: { model: 'm', outcome: 'ok' }, value: 0 };
    const zeroHistogram: MetricSample[] = [
      { name: `${histogram.name}_bucket`, labels: { model: 'm', le: '+Inf' }, value: 0 },
      { name: `${histogram.name}_count`, labels: { model: 'm' }, value: 0 },
    ];
    const zeroGauge = { name: gauge.name, labels: { model: 'm' }, value: 0 };
    expect(idleMetrics([], [counter])).toEqual([{ name: counter.name, reason: 'no sample' }]);
    expect(idleMetrics([zeroCounter, ...zeroHistogram, zeroGauge], [counter, histogram, gauge])).toEqual([
      { name: counter.name, reason: 'never moved' },
      { name: histogram.name, reason: 'never moved' },
    ]);
    expect(idleMetrics([{ ...zeroCounter, value: 1 }, { ...zeroHistogram[1]!, value: 1 }], [counter, histogram])).toEqual([]);
  });
});

describe('metric factories', () => {
  it('registers every node metric on the given registry, none on the global one', async () => {
    const r = new Registry();
    const m = createNodeMetrics(r, { processMetrics: false });
    recordNodeProfile(m, profile, { availableBytes: 100 * 2 ** 30, memoryPressure: 'warn', thermalState: 'nominal', timestampSeconds: 1 });
    const text = await r.metrics();
    for (const d of Object.values(NODE_METRICS)) expect(text).toContain(`# TYPE ${d.name} ${d.type}`);
    expect(text).toContain(`orchard_node_memory_bytes ${192 * 2 ** 30}`);
    expect(text).toContain('orchard_node_memory_pressure{level="warn"} 1');
    expect(text).toContain('orchard_node_memory_pressure{level="normal"} 0');
    expect(text).toContain('orchard_node_info{id="n-1",name="studio",chip="Apple M2 Ultra",os="macos",version="0.1.0",os_version="15.1",protocol_version="1"} 1');
    expect(text).not.toContain('process_cpu');
    const { register } = await import('prom-client');
    expect(await register.getSingleMetric('orchard_node_memory_bytes')).toBeUndefined();
  });

  it('two registries do not share series (two agents in one process)', async () => {
    const a = createNodeMetrics(new Registry(), { processMetrics: false });
    const rb = new Registry();
    createNodeMetrics(rb, { processMetrics: false });
    a.memoryBytes.set(1);
    expect(await rb.metrics()).not.toMatch(/^orchard_node_memory_bytes 1$/m);
  });

  it('coordinator metrics start with build info and every node state at 0', async () => {
    const r = new Registry();
    const m = createCoordinatorMetrics(r, '1.2.3', { processMetrics: false });
    const text = await r.metrics();
    expect(text).toMatch(/orchard_coordinator_build_info\{version="1\.2\.3",nodejs_version="[\d.]+"\} 1/);
    for (const s of ['up', 'suspect', 'down']) expect(text).toContain(`orchard_nodes{state="${s}"} 0`);
    m.timeToFirstTokenSeconds.observe({ model: 'llama' }, 0.3);
    const after = await r.metrics();
    expect(after).toContain('orchard_time_to_first_token_seconds_bucket{le="0.25",model="llama"} 0');
    expect(after).toContain('orchard_time_to_first_token_seconds_bucket{le="0.5",model="llama"} 1');
  });

  it('collect hooks read live state at scrape time', async () => {
    const r = new Registry();
    let queued = 3;
    createCoordinatorMetrics(r, '0', {
      processMetrics: false,
      collect: {
        queueDepth() {
          this.set({ model: 'm' }, queued);
        },
      },
    });
    expect(await r.metrics()).toContain('orchard_queue_depth{model="m"} 3');
    queued = 0;
    expect(await r.metrics()).toContain('orchard_queue_depth{model="m"} 0');
  });

  it('replaceGaugeSeries drops series that are gone (an unloaded model leaves no stale stage)', async () => {
    const r = new Registry();
    const m = createCoordinatorMetrics(r, '0', { processMetrics: false });
    replaceGaugeSeries(m.stageLayers, [
      { labels: { model: 'a', node: 'n1' }, value: 20 },
      { labels: { model: 'b', node: 'n2' }, value: 12 },
    ]);
    replaceGaugeSeries(m.stageLayers, [{ labels: { model: 'b', node: 'n2' }, value: 12 }]);
    const text = await r.metrics();
    expect(text).not.toContain('model="a"');
    expect(text).toContain('orchard_stage_layers{model="b",node="n2"} 12');
  });

  it('enumerated counters start at 0 for every label combination; open-ended ones do not', async () => {
    const r = new Registry();
    createNodeMetrics(r, { processMetrics: false });
    const text = await r.metrics();
    for (const engine of ['llama-server', 'rpc-server', 'mlx-rank']) {
      expect(text).toContain(`orchard_engine_starts_total{engine="${engine}"} 0`);
      for (const expected of ['true', 'false']) expect(text).toContain(`orchard_engine_exits_total{engine="${engine}",expected="${expected}"} 0`);
    }
    expect(enumeratedLabelSets(COORDINATOR_METRICS.requestsTotal)).toEqual([]);
    expect(enumeratedLabelSets(COORDINATOR_METRICS.discoveryEventsTotal)).toHaveLength(4);
    expect(enumeratedLabelSets(COORDINATOR_METRICS.generatedTokensTotal)).toEqual([]);
  });

  it('initModelSeries gives a new model zeroed series; removeModelSeries drops them', async () => {
    const r = new Registry();
    const c = createCoordinatorMetrics(r, '0', { processMetrics: false });
    initModelSeries(c, 'm1');
    initModelSeries(c, 'm2');
    c.modelLoaded.set({ model: 'm1', engine: 'llama.cpp' }, 1);
    let text = await r.metrics();
    for (const o of ['ok', 'error', 'cancelled', 'rejected']) expect(text).toContain(`orchard_requests_total{model="m1",outcome="${o}"} 0`);
    expect(text).toContain('orchard_time_to_first_token_seconds_count{model="m1"} 0');
    expect(text).toContain('orchard_queue_depth{model="m1"} 0');
    removeModelSeries(c, 'm1');
    text = await r.metrics();
    expect(text).not.toContain('model="m1"');
    expect(text).toContain('orchard_generated_tokens_total{model="m2"} 0');
  });

  it('nodeStateCounts always reports every state', () => {
    expect(nodeStateCounts([])).toEqual([
      { labels: { state: 'up' }, value: 0 },
      { labels: { state: 'suspect' }, value: 0 },
      { labels: { state: 'down' }, value: 0 },
    ]);
    expect(nodeStateCounts(['up', 'up', 'down']).map((c) => c.value)).toEqual([2, 0, 1]);
  });
});

describe('/metrics and /healthz', () => {
  const closers: (() => Promise<void>)[] = [];
  afterEach(async () => {
    for (const c of closers.splice(0)) await c();
  });

  it('serves the registry, health, 404 and 405 on 127.0.0.1', async () => {
    const r = new Registry();
    createNodeMetrics(r, { processMetrics: false }).memoryBytes.set(42);
    let ok = true;
    const s = await serveMetrics({ registry: r, host: '127.0.0.1', port: 0, health: () => (ok ? { ok } : { ok, detail: 'shutting down' }) });
    closers.push(s.close);
    expect(s.port).toBeGreaterThan(0);
    const res = await fetch(`${s.url}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toContain('text/plain; version=0.0.4');
    expect(await res.text()).toContain('orchard_node_memory_bytes 42');
    expect((await fetch(`${s.url}/healthz`)).status).toBe(200);
    ok = false;
    const h = await fetch(`${s.url}/healthz`);
    expect(h.status).toBe(503);
    expect(h.headers.get('content-type')).toBe('application/json');
    expect(await h.json()).toEqual({ ok: false, detail: 'shutting down' });
    expect((await fetch(`${s.url}/nope`)).status).toBe(404);
    expect((await fetch(`${s.url}/metrics`, { method: 'POST' })).status).toBe(405);
  });

  it('a failing collect hook gives a 500, not a crash', async () => {
    const r = new Registry();
    createCoordinatorMetrics(r, '0', {
      processMetrics: false,
      collect: {
        queueDepth() {
          throw new Error('boom');
        },
      },
    });
    const s = await serveMetrics({ registry: r, host: '127.0.0.1', port: 0 });
    closers.push(s.close);
    const res = await fetch(`${s.url}/metrics`);
    expect(res.status).toBe(500);
    expect(await res.text()).toContain('boom');
    expect((await fetch(`${s.url}/healthz`)).status).toBe(200);
  });

  it('metricsRoutes leaves other paths to the caller', async () => {
    const routes = metricsRoutes({ registry: new Registry() });
    const server = createServer((req, res) => {
      if (!routes(req, res)) res.writeHead(299).end('mine');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    closers.push(() => new Promise((r) => server.close(() => r())));
    const port = (server.address() as AddressInfo).port;
    expect((await fetch(`http://127.0.0.1:${port}/v1/models`)).status).toBe(299);
    expect((await fetch(`http://127.0.0.1:${port}/metrics?x=1`)).status).toBe(200);
  });

  it('hostPort brackets IPv6', () => {
    expect(hostPort('10.0.0.2', 9151)).toBe('10.0.0.2:9151');
    expect(hostPort('fe80::1', 9151)).toBe('[fe80::1]:9151');
    expect(hostPort('[::1]', 1)).toBe('[::1]:1');
  });
});

function entry(over: Partial<NodeEntry> & { name: string; nodeId: string }): NodeEntry {
  return {
    nodeId: over.nodeId,
    profile: { ...profile, nodeId: over.nodeId, name: over.name },
    live: undefined,
    address: over.address ?? '10.0.0.2:50151',
    discoveredBy: 'mdns',
    state: over.state ?? 'up',
    session: 's',
    runId: '',
    lastSeenMs: 0,
    stateSinceMs: 0,
    joinedAtMs: 0,
  };
}

describe('Prometheus HTTP-SD', () => {
  it('lists the coordinator without a node label and every node with node, node_id, chip, role', () => {
    const groups = prometheusTargets({
      coordinatorAddress: '10.0.0.1:9150',
      nodes: [
        { nodeId: 'id-b', name: 'mini', chip: 'Apple M4 Pro', metricsAddress: '10.0.0.3:9151' },
        { nodeId: 'id-a', name: 'studio', chip: 'Apple M2 Ultra', metricsAddress: '10.0.0.2:9151' },
        { nodeId: 'id-c', name: 'no-metrics', chip: 'Apple M1', metricsAddress: undefined },
      ],
    });
    expect(groups).toEqual([
      { targets: ['10.0.0.1:9150'], labels: { role: 'coordinator' } },
      { targets: ['10.0.0.3:9151'], labels: { node: 'mini', node_id: 'id-b', chip: 'Apple M4 Pro', role: 'node' } },
      { targets: ['10.0.0.2:9151'], labels: { node: 'studio', node_id: 'id-a', chip: 'Apple M2 Ultra', role: 'node' } },
    ]);
  });

  it('never lists one endpoint twice and strips control characters from label values', () => {
    const groups = prometheusTargets({
      coordinatorAddress: '10.0.0.1:9150',
      nodes: [
        { nodeId: 'a', name: 'x\ny', chip: 'c\u0000', metricsAddress: '10.0.0.2:9151' },
        { nodeId: 'b', name: 'z', chip: 'c', metricsAddress: '10.0.0.2:9151' },
        { nodeId: 'c', name: 'self', chip: 'c', metricsAddress: '10.0.0.1:9150' },
      ],
    });
    expect(groups).toHaveLength(2);
    expect(groups[1]!.labels).toMatchObject({ node: 'x y', chip: 'c' });
  });

  it('maps registry entries to metrics endpoints on the agent host', () => {
    expect(sdNodeFromEntry(entry({ nodeId: 'a', name: 's' }), () => 9151)).toEqual({ nodeId: 'a', name: 's', chip: 'Apple M2 Ultra', metricsAddress: '10.0.0.2:9151' });
    expect(sdNodeFromEntry(entry({ nodeId: 'a', name: 's', address: '[fe80::2]:50151' }), () => 9151).metricsAddress).toBe('[fe80::2]:9151');
    expect(sdNodeFromEntry(entry({ nodeId: 'a', name: 's' }), () => undefined).metricsAddress).toBeUndefined();
    expect(agentHost('garbage')).toBeUndefined();
  });

  it('the handler answers JSON, and 500 when the source fails', async () => {
    let fail = false;
    const handler = prometheusTargetsHandler(async () => {
      if (fail) throw new Error('registry unavailable');
      return { coordinatorAddress: '127.0.0.1:1', nodes: [] };
    });
    const server = createServer(handler);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/prometheus/targets`;
      const res = await fetch(url);
      expect(res.headers.get('content-type')).toBe('application/json');
      expect(await res.json()).toEqual([{ targets: ['127.0.0.1:1'], labels: { role: 'coordinator' } }]);
      fail = true;
      expect((await fetch(url)).status).toBe(500);
      expect((await fetch(url, { method: 'DELETE' })).status).toBe(405);
    } finally {
      await new Promise((r) => server.close(r));
    }
  });
});

describe('metric names in PromQL', () => {
  it.each([
    ['up', ['up']],
    ['sum(orchard_nodes{state="up"})', ['orchard_nodes']],
    [
      'histogram_quantile(0.95, sum by (le, model) (rate(orchard_time_to_first_token_seconds_bucket{model=~"$model"}[$__rate_interval])))',
      ['orchard_time_to_first_token_seconds_bucket'],
    ],
    ['sum by (node) (a_metric{node=~"$node"}) / on (node) group_left max by (node) (b_metric) > bool 1e9', ['a_metric', 'b_metric']],
    ['(x or y * 0) unless z offset 5m', ['x', 'y', 'z']],
    ['label_replace(m, "dst", "$1", "src", "(.*)")', ['m']],
    ['rate(m[5m:1m]) and ignoring(job) n', ['m', 'n']],
  ])('%s', (expr, names) => {
    expect(metricNamesInExpr(expr)).toEqual(names);
  });
});
