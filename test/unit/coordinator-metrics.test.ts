import { Registry } from 'prom-client';
import { afterEach, describe, expect, it } from 'vitest';
import { CoordinatorError } from '../../src/coordinator/errors.ts';
import { Membership } from '../../src/coordinator/membership/membership.ts';
import {
  CoordinatorMetrics,
  MeteredRuntime,
  observeGeneration,
  placementSeries,
  placementSignature,
  requestModelLabel,
  requestOutcome,
} from '../../src/coordinator/api/metrics.ts';
import type { GenerateEvent, ModelStatus, Planner } from '../../src/coordinator/instances/runtime.ts';
import { UsageError } from '../../src/shared/errors.ts';
import type { HardwareProfile } from '../../src/shared/hardware.ts';
import { createLogger } from '../../src/shared/log.ts';
import { createCoordinatorMetrics } from '../../src/shared/metrics/factories.ts';

const log = createLogger('test', 'silent');
const memberships: Membership[] = [];
afterEach(() => {
  for (const m of memberships.splice(0)) m.close();
});
function membership(): Membership {
  const m = new Membership({ suspectAfterMs: 2000, downAfterMs: 5000 }, log);
  memberships.push(m);
  return m;
}

const MiB = 2 ** 20;
function stage(nodeName: string, firstLayer: number, lastLayer: number, weights: number) {
  return {
    nodeId: `id-${nodeName}`,
    nodeName,
    firstLayer,
    lastLayer,
    bytes: { weights, kv: 2 * MiB, compute: 3 * MiB, overhead: 4 * MiB, total: weights + 9 * MiB },
    budgetBytes: 1e9,
    endpoint: '',
  };
}
function model(over: Partial<ModelStatus> & { name: string }): ModelStatus {
  return {
    path: `/m/${over.name}.gguf`,
    state: 'ready',
    engine: 'llama',
    stages: [],
    error: '',
    predictedTokensPerSecond: 0,
    options: { ctx: 2048, cacheType: 'f16', parallel: 1, pin: [], parallelism: 'auto' },
    ...over,
  };
}

describe('placementSeries', () => {
  it('turns a verified two-stage model into layers, predicted and actual bytes per node and kind', () => {
    const m = model({
      name: 'm8',
      predictedTokensPerSecond: 42.5,
      stages: [stage('mini', 0, 2, 100 * MiB), stage('studio', 3, 7, 200 * MiB)],
      verification: {
        ok: true,
        problems: [],
        devices: [
          { device: 'RPC0[127.0.0.1:1]', nodeName: 'mini', plannedLayers: '0-2', actualLayers: '0-2', actual: { model: 101 * MiB, kv: 2 * MiB, compute: 5 * MiB } },
          { device: 'RPC0[127.0.0.1:2]', nodeName: 'studio', plannedLayers: '3-7', actualLayers: '3-7', actual: { model: 202 * MiB, kv: 3 * MiB, compute: 6 * MiB } },
        ],
        // llama-server's own host buffers (token embeddings, CPU compute): on the head = last stage.
        host: { model: 15 * MiB, kv: 0, compute: 9 * MiB },
      },
    });
    const p = placementSeries([m]);
    expect(p.loaded).toEqual([{ labels: { model: 'm8', engine: 'llama.cpp' }, value: 1 }]);
    expect(p.predictedTokensPerSecond).toEqual([{ labels: { model: 'm8' }, value: 42.5 }]);
    expect(p.layers).toEqual([
      { labels: { model: 'm8', node: 'mini' }, value: 3 },
      { labels: { model: 'm8', node: 'studio' }, value: 5 },
    ]);
    expect(p.predicted).toContainEqual({ labels: { model: 'm8', node: 'studio', kind: 'weights' }, value: 200 * MiB });
    expect(p.predicted).toContainEqual({ labels: { model: 'm8', node: 'mini', kind: 'overhead' }, value: 4 * MiB });
    expect(p.predicted).toHaveLength(8);
    expect(p.actual).toContainEqual({ labels: { model: 'm8', node: 'mini', kind: 'weights' }, value: 101 * MiB });
    expect(p.actual).toContainEqual({ labels: { model: 'm8', node: 'studio', kind: 'compute' }, value: 15 * MiB });
    expect(p.actual).toContainEqual({ labels: { model: 'm8', node: 'studio', kind: 'weights' }, value: 217 * MiB });
    expect(p.actual).toContainEqual({ labels: { model: 'm8', node: 'mini', kind: 'compute' }, value: 5 * MiB });
    // The engine reports no overhead: that kind is predicted only.
    expect(p.actual.filter((s) => s.labels.kind === 'overhead')).toEqual([]);
    expect(p.actual).toHaveLength(6);
  });

  it('sums stages of one model on one node; loading shows the plan at loaded=0; failed and unloading models have no series', () => {
    const p = placementSeries([
      model({ name: 'a', state: 'loading', stages: [stage('n', 0, 1, 10), stage('n', 2, 3, 20)] }),
      model({ name: 'b', state: 'failed', stages: [stage('n', 0, 3, 10)] }),
      model({ name: 'c', state: 'unloading', engine: 'mlx', stages: [stage('n', 0, 3, 10)] }),
      model({ name: 'd', engine: 'mlx', stages: [stage('q', 0, 3, 10)] }),
    ]);
    expect(p.loaded).toEqual([
      { labels: { model: 'a', engine: 'llama.cpp' }, value: 0 },
      { labels: { model: 'd', engine: 'mlx' }, value: 1 },
    ]);
    expect(p.layers).toEqual([
      { labels: { model: 'a', node: 'n' }, value: 4 },
      { labels: { model: 'd', node: 'q' }, value: 4 },
    ]);
    expect(p.predicted.find((s) => s.labels.model === 'a' && s.labels.kind === 'weights')?.value).toBe(30);
    expect(p.actual).toEqual([]);
  });
});

describe('placementSignature', () => {
  it('changes with state, verification, stages and load time; not otherwise', () => {
    const base = model({ name: 'a', state: 'loading', stages: [stage('n', 0, 3, 10)] });
    const sig = placementSignature([base]);
    expect(placementSignature([{ ...base }])).toBe(sig);
    expect(placementSignature([{ ...base, state: 'ready', loadedAtMs: 5 }])).not.toBe(sig);
    expect(placementSignature([{ ...base, verification: { ok: true, problems: [], devices: [] } }])).not.toBe(sig);
    expect(placementSignature([{ ...base, stages: [stage('n', 0, 2, 10)] }])).not.toBe(sig);
    expect(placementSignature([{ ...base, stages: [stage('m', 0, 3, 10)] }])).not.toBe(sig);
    expect(placementSignature([])).not.toBe(sig);
  });
});

describe('request labels and outcomes', () => {
  it('labels a request with a model that exists, the only ready model, or "" (never the client string)', () => {
    const ms = [model({ name: 'a' }), model({ name: 'b', state: 'loading' })];
    expect(requestModelLabel('a', ms)).toBe('a');
    expect(requestModelLabel('b', ms)).toBe('b');
    expect(requestModelLabel('evil-{}-name', ms)).toBe('');
    expect(requestModelLabel(undefined, ms)).toBe('a');
    expect(requestModelLabel(undefined, [...ms, model({ name: 'c' })])).toBe('');
    expect(requestModelLabel(undefined, [])).toBe('');
  });

  it('maps errors to outcomes', () => {
    expect(requestOutcome(new CoordinatorError('NOT_FOUND', 'x'), false)).toBe('rejected');
    expect(requestOutcome(new CoordinatorError('RESOURCE_EXHAUSTED', 'busy'), false)).toBe('rejected');
    expect(requestOutcome(new CoordinatorError('INVALID_ARGUMENT', 'too long'), false)).toBe('rejected');
    expect(requestOutcome(new UsageError('prompt is empty'), false)).toBe('rejected');
    expect(requestOutcome(new CoordinatorError('CANCELLED', 'bye'), false)).toBe('cancelled');
    expect(requestOutcome(new CoordinatorError('CANCELLED', 'bye'), true)).toBe('cancelled');
    expect(requestOutcome(new CoordinatorError('UNAVAILABLE', 'node down'), false)).toBe('error');
    expect(requestOutcome(new CoordinatorError('INVALID_ARGUMENT', 'x'), true)).toBe('error');
    expect(requestOutcome(new Error('boom'), false)).toBe('error');
  });
});

const tok = (id: number): GenerateEvent => ({ kind: 'token', text: `t${id}`, tokenIds: [id] });
const done = (prompt: number, completion: number): GenerateEvent => ({
  kind: 'done',
  finishReason: 'length',
  promptTokens: prompt,
  completionTokens: completion,
  timings: { promptMs: 0, predictedMs: 0, promptTokensPerSecond: 0, predictedTokensPerSecond: 0, firstTokenMs: 0 },
});

/** A stream whose events arrive at given clock times (ms); `fail` ends it with an error. */
function scripted(clock: { t: number }, events: [number, GenerateEvent][], fail?: { at: number; err: unknown }): AsyncIterable<GenerateEvent> {
  return {
    async *[Symbol.asyncIterator]() {
      for (const [at, ev] of events) {
        clock.t = at;
        yield ev;
      }
      if (fail) {
        clock.t = fail.at;
        throw fail.err;
      }
    },
  };
}

async function drain(it: AsyncIterable<GenerateEvent>, max = Number.POSITIVE_INFINITY): Promise<GenerateEvent[]> {
  const out: GenerateEvent[] = [];
  for await (const ev of it) {
    out.push(ev);
    if (out.length >= max) break;
  }
  return out;
}

async function sample(r: Registry, name: string, labels: Record<string, string>): Promise<number | undefined> {
  const m = (await r.getMetricsAsJSON()).find((x) => x.name === name);
  return m?.values.find((x) => Object.entries(labels).every(([k, val]) => x.labels[k] === val))?.value;
}

describe('observeGeneration', () => {
  it('times TTFT from arrival and the gaps between tokens, counts tokens and the outcome', async () => {
    const r = new Registry();
    const m = createCoordinatorMetrics(r, '1.0.0', { processMetrics: false });
    const clock = { t: 1000 };
    const events = await drain(observeGeneration(m, 'm8', scripted(clock, [[1250, tok(1)], [1270, tok(2)], [1300, tok(3)], [1301, done(7, 3)]]), () => clock.t));
    expect(events).toHaveLength(4);
    const text = await r.metrics();
    expect(text).toContain('orchard_time_to_first_token_seconds_sum{model="m8"} 0.25');
    expect(text).toContain('orchard_time_to_first_token_seconds_count{model="m8"} 1');
    // Gaps of 20 and 30 ms: two observations, both within the 0.03 bucket, none within 0.015.
    expect(text).toContain('orchard_inter_token_latency_seconds_count{model="m8"} 2');
    expect(text).toContain('orchard_inter_token_latency_seconds_bucket{le="0.015",model="m8"} 0');
    expect(text).toContain('orchard_inter_token_latency_seconds_bucket{le="0.02",model="m8"} 1');
    expect(text).toContain('orchard_inter_token_latency_seconds_bucket{le="0.03",model="m8"} 2');
    expect(text).toContain('orchard_requests_total{model="m8",outcome="ok"} 1');
    expect(text).toContain('orchard_prompt_tokens_total{model="m8"} 7');
    expect(text).toContain('orchard_generated_tokens_total{model="m8"} 3');
    expect(text).toContain('orchard_request_duration_seconds_sum{model="m8"} 0.301');
  });

  it('a consumer that stops reading is "cancelled" and counts the tokens it got', async () => {
    const r = new Registry();
    const m = createCoordinatorMetrics(r, '1.0.0', { processMetrics: false });
    const clock = { t: 0 };
    await drain(observeGeneration(m, 'm8', scripted(clock, [[10, tok(1)], [20, tok(2)], [30, tok(3)], [31, done(1, 3)]]), () => clock.t), 2);
    const text = await r.metrics();
    expect(text).toContain('orchard_requests_total{model="m8",outcome="cancelled"} 1');
    expect(text).not.toContain('outcome="ok"} 1');
    expect(text).toContain('orchard_generated_tokens_total{model="m8"} 2');
  });

  it('a consumer that stops right after "done" finished the request: "ok"', async () => {
    const r = new Registry();
    const m = createCoordinatorMetrics(r, '1.0.0', { processMetrics: false });
    const clock = { t: 0 };
    const gen = observeGeneration(m, 'm8', scripted(clock, [[10, tok(1)], [11, done(4, 1)], [12, tok(2)]]), () => clock.t);
    for await (const ev of gen) if (ev.kind === 'done') break;
    const text = await r.metrics();
    expect(text).toContain('orchard_requests_total{model="m8",outcome="ok"} 1');
    expect(text).toContain('orchard_prompt_tokens_total{model="m8"} 4');
  });

  it('a refusal before the first token is "rejected" with no duration; a failure after tokens is "error"', async () => {
    const r = new Registry();
    const m = createCoordinatorMetrics(r, '1.0.0', { processMetrics: false });
    const clock = { t: 0 };
    await expect(drain(observeGeneration(m, '', scripted(clock, [], { at: 1, err: new CoordinatorError('NOT_FOUND', 'no model') }), () => clock.t))).rejects.toThrow('no model');
    await expect(drain(observeGeneration(m, 'm8', scripted(clock, [[5, tok(1)]], { at: 9, err: new CoordinatorError('UNAVAILABLE', 'node x down') }), () => clock.t))).rejects.toThrow('node x down');
    const text = await r.metrics();
    expect(text).toContain('orchard_requests_total{model="",outcome="rejected"} 1');
    expect(text).not.toContain('orchard_request_duration_seconds_count{model=""}');
    expect(text).toContain('orchard_requests_total{model="m8",outcome="error"} 1');
    expect(text).toContain('orchard_request_duration_seconds_count{model="m8"} 1');
    expect(text).toContain('orchard_generated_tokens_total{model="m8"} 1');
    expect(await sample(r, 'orchard_requests_total', { model: 'm8', outcome: 'ok' })).toBeUndefined();
  });
});

function profile(nodeId: string, name: string): HardwareProfile {
  return {
    nodeId,
    name,
    hostname: name,
    os: 'linux',
    osVersion: '6.1',
    chip: 'cpu',
    performanceCores: 2,
    efficiencyCores: 0,
    gpuCores: 0,
    memoryBytes: 8 * 2 ** 30,
    bandwidthBytesPerSecond: 20e9,
    wiredLimitBytes: 0,
    budgetBytes: 4 * 2 ** 30,
    engines: [],
    interfaces: [],
    protocolVersion: '1',
    agentVersion: '0.1.0',
  };
}

describe('CoordinatorMetrics', () => {
  it('reads nodes by state and placement at scrape time and counts membership changes', async () => {
    const ms = membership();
    let models: ModelStatus[] = [];
    const cm = new CoordinatorMetrics({ version: '9.9.9', membership: ms, processMetrics: false, runtime: () => ({ models: () => models, slotUsage: () => [{ model: 'm8', running: 1, queued: 2 }] }) });
    const reg = ms.registry;
    for (const c of reg.connected({ profile: profile('a', 'alpha'), address: '127.0.0.1:1', discoveredBy: 'join', session: 's1' }, 0)) ms.emit('change', c);
    for (const c of reg.connected({ profile: profile('b', 'bravo'), address: '127.0.0.1:2', discoveredBy: 'join', session: 's2' }, 0)) ms.emit('change', c);
    for (const c of reg.disconnected('b', 's2', 10)) ms.emit('change', c);
    models = [model({ name: 'm8', stages: [stage('alpha', 0, 7, 5 * MiB)] })];
    const text = await cm.registry.metrics();
    expect(text).toContain(`orchard_coordinator_build_info{version="9.9.9",nodejs_version="${process.versions.node}"} 1`);
    expect(text).toContain('orchard_nodes{state="up"} 1');
    expect(text).toContain('orchard_nodes{state="suspect"} 1');
    expect(text).toContain('orchard_nodes{state="down"} 0');
    expect(text).toContain('orchard_discovery_events_total{kind="added"} 2');
    expect(text).toContain('orchard_discovery_events_total{kind="state"} 1');
    expect(text).toContain('orchard_discovery_events_total{kind="removed"} 0');
    expect(text).toContain('orchard_model_loaded{model="m8",engine="llama.cpp"} 1');
    expect(text).toContain('orchard_stage_layers{model="m8",node="alpha"} 8');
    expect(text).toContain(`orchard_stage_predicted_bytes{model="m8",node="alpha",kind="weights"} ${5 * MiB}`);
    expect(text).toContain('orchard_queue_depth{model="m8"} 2');
    expect(text).toContain('orchard_requests_in_flight{model="m8"} 1');
    // A new placement (another plan under the same name) replaces the series at the next scrape.
    models = [model({ name: 'm8', stages: [stage('alpha', 0, 3, 5 * MiB), stage('bravo', 4, 7, 5 * MiB)] })];
    const moved = await cm.registry.metrics();
    expect(moved).toContain('orchard_stage_layers{model="m8",node="alpha"} 4');
    expect(moved).toContain('orchard_stage_layers{model="m8",node="bravo"} 4');
    // The model leaves: its placement series go at the next scrape.
    models = [];
    expect(await cm.registry.metrics()).not.toContain('orchard_stage_layers{');
  });

  it('MeteredRuntime counts a refused request under model="" and starts nothing', async () => {
    const ms = membership();
    let runtime: MeteredRuntime | undefined;
    const cm = new CoordinatorMetrics({ version: '1', membership: ms, processMetrics: false, runtime: () => runtime });
    const planner: Planner = () => Promise.reject(new Error('unused'));
    const rt = new MeteredRuntime({ membership: ms, planner, clusterId: 'c0ffee00-0000', log }, cm);
    runtime = rt;
    await expect(drain(rt.generate({ model: 'nope', prompt: 'x', maxTokens: 1, temperature: 0 }))).rejects.toThrow(/no model named "nope"/);
    await expect(drain(rt.generate({ prompt: 'x', maxTokens: 1, temperature: 0 }))).rejects.toThrow(/no model is loaded/);
    const text = await cm.registry.metrics();
    expect(text).toContain('orchard_requests_total{model="",outcome="rejected"} 2');
    expect(text).not.toContain('nope');
  });
});
