import { type Gauge, Registry } from 'prom-client';
import { UsageError } from '../../shared/errors.ts';
import type { REQUEST_OUTCOMES, STAGE_MEMORY_KINDS } from '../../shared/metrics/catalogue.ts';
import type { RecoveryCause } from '../instances/healing.ts';
import {
  type CoordinatorMetricSet,
  createCoordinatorMetrics,
  initModelSeries,
  nodeStateCounts,
  removeModelSeries,
  replaceGaugeSeries,
} from '../../shared/metrics/factories.ts';
import { CoordinatorError } from '../errors.ts';
import type { Membership } from '../membership/membership.ts';
import type { NodeEntry } from '../membership/registry.ts';
import { type GenerateEvent, type GenerateRequest, type ModelStatus, Runtime, type RuntimeOptions } from '../instances/runtime.ts';

/**
 * The coordinator's Prometheus metrics (catalogue: COORDINATOR_METRICS), on its own Registry and
 * served at `GET /metrics` on its HTTP port. Three sources:
 *   · scrape time (collect hooks): nodes by state (registry), placement per model/node/kind and
 *     models loaded (runtime.models(): the plan's predicted bytes, the engine's verified bytes),
 *     queue depth and requests in flight (runtime.slotUsage()) — never stale, nothing to update;
 *   · events: membership changes → orchard_discovery_events_total; a model becoming ready/leaving
 *     → its request series start at 0 / disappear;
 *   · requests: MeteredRuntime wraps Runtime.generate and times every request (TTFT, inter-token
 *     latency, duration, tokens, outcome).
 * Engine up/restarts are exported by each node agent (the process that watches them); the
 * coordinator does not repeat them under the same names, which would double every sum().
 */

type StageKind = (typeof STAGE_MEMORY_KINDS)[number];
type RequestOutcome = (typeof REQUEST_OUTCOMES)[number];
interface Series<L extends string> {
  readonly labels: Record<L, string>;
  value: number;
}

export interface PlacementSeries {
  readonly loaded: Series<'model' | 'engine'>[];
  readonly layers: Series<'model' | 'node'>[];
  readonly predicted: Series<'model' | 'node' | 'kind'>[];
  readonly actual: Series<'model' | 'node' | 'kind'>[];
  readonly predictedTokensPerSecond: Series<'model'>[];
}

/** Accumulates values per label set (several stages of one model on one node add up). */
function summing<L extends string>(): { add(labels: Record<L, string>, v: number): void; list: Series<L>[] } {
  const byKey = new Map<string, Series<L>>();
  const list: Series<L>[] = [];
  return {
    list,
    add(labels, v) {
      const key = JSON.stringify(labels);
      const s = byKey.get(key);
      if (s) s.value += v;
      else {
        const n = { labels, value: v };
        byKey.set(key, n);
        list.push(n);
      }
    },
  };
}

/**
 * Placement gauges of the models the runtime holds. Loading models show their plan (loaded=0,
 * predicted bytes) so a slow load is visible; actual bytes exist once the head's log was verified
 * (llama.cpp: model/KV/compute buffers per device, summed per node, plus its host buffers on the
 * head's node — the engine reports no "overhead", so that kind is predicted only). Failed and unloading models have no series.
 */
export function placementSeries(models: readonly ModelStatus[]): PlacementSeries {
  const loaded = summing<'model' | 'engine'>();
  const layers = summing<'model' | 'node'>();
  const predicted = summing<'model' | 'node' | 'kind'>();
  const actual = summing<'model' | 'node' | 'kind'>();
  const tps = summing<'model'>();
  for (const m of models) {
    if (m.state !== 'ready' && m.state !== 'loading') continue;
    const model = m.name;
    loaded.add({ model, engine: m.engine === 'mlx' ? 'mlx' : 'llama.cpp' }, m.state === 'ready' ? 1 : 0);
    if (m.predictedTokensPerSecond > 0) tps.add({ model }, m.predictedTokensPerSecond);
    for (const s of m.stages) {
      const node = s.nodeName;
      layers.add({ model, node }, s.lastLayer - s.firstLayer + 1);
      const kinds: [StageKind, number][] = [
        ['weights', s.bytes.weights],
        ['kv', s.bytes.kv],
        ['compute', s.bytes.compute],
        ['overhead', s.bytes.overhead],
      ];
      for (const [kind, v] of kinds) predicted.add({ model, node, kind }, v);
    }
    const v = m.verification;
    for (const d of v?.devices ?? []) {
      const node = d.nodeName;
      actual.add({ model, node, kind: 'weights' }, d.actual.model);
      actual.add({ model, node, kind: 'kv' }, d.actual.kv);
      actual.add({ model, node, kind: 'compute' }, d.actual.compute);
    }
    // Host buffers of llama-server (token embeddings, CPU compute) live on the head's node — the
    // last stage — where the planner counts the embeddings too.
    const head = m.stages.at(-1);
    if (v?.host && head && v.devices.length > 0) {
      const node = head.nodeName;
      actual.add({ model, node, kind: 'weights' }, v.host.model);
      actual.add({ model, node, kind: 'kv' }, v.host.kv);
      actual.add({ model, node, kind: 'compute' }, v.host.compute);
    }
  }
  return { loaded: loaded.list, layers: layers.list, predicted: predicted.list, actual: actual.list, predictedTokensPerSecond: tps.list };
}

/**
 * What placementSeries depends on, as a string: a model's placement is fixed by its plan when it
 * starts loading and its verification when it becomes ready, so name, state, load time, the
 * stages (node and layer range) and whether it was verified identify every change.
 */
export function placementSignature(models: readonly ModelStatus[]): string {
  return models
    .map((m) => {
      const stages = m.stages.map((s) => `${s.nodeId}:${s.firstLayer}-${s.lastLayer}`).join(',');
      return `${m.name}\u0000${m.state}\u0000${m.loadedAtMs ?? ''}\u0000${stages}\u0000${m.verification ? 'v' : ''}\u0000${m.predictedTokensPerSecond}`;
    })
    .join('\u0001');
}

/**
 * How a request that threw ended. Refusals before the first token (bad input, unknown or
 * not-ready model, busy) are "rejected"; a client that went away is "cancelled"; anything else —
 * a stage failing, an engine error, a failure after tokens were already sent — is "error".
 */
export function requestOutcome(err: unknown, tokensSent: boolean): RequestOutcome {
  if (err instanceof CoordinatorError && err.code === 'CANCELLED') return 'cancelled';
  if (tokensSent) return 'error';
  if (err instanceof UsageError) return 'rejected';
  if (err instanceof CoordinatorError && ['INVALID_ARGUMENT', 'NOT_FOUND', 'FAILED_PRECONDITION', 'RESOURCE_EXHAUSTED', 'ALREADY_EXISTS', 'PERMISSION_DENIED'].includes(err.code)) return 'rejected';
  return 'error';
}

/**
 * The outcome of a generation request the HTTP API refused (by status) before it reached the
 * runtime. A model that is not ready (503) or a busy answer (429) is what the runtime itself
 * counts as "rejected", so the edge uses the same value; any other client error is "invalid".
 */
export function refusalOutcome(status: number): RequestOutcome {
  if (status === 401 || status === 403) return 'unauthorized';
  if (status === 404) return 'not_found';
  if (status === 413) return 'too_large';
  if (status === 429 || status === 503) return 'rejected';
  return status >= 500 ? 'error' : 'invalid';
}

/**
 * The `model` label of a request: the model it names when that model exists, the only ready
 * model when it names none (what the runtime picks), otherwise "" — never the client's string
 * for an unknown model, which would let any caller mint new series.
 */
export function requestModelLabel(requested: string | undefined, models: readonly Pick<ModelStatus, 'name' | 'state'>[]): string {
  if (requested) return models.some((m) => m.name === requested) ? requested : '';
  const ready = models.filter((m) => m.state === 'ready');
  return ready.length === 1 ? ready[0]!.name : '';
}

/**
 * One request's timing. `now` is milliseconds on a monotonic clock (performance.now in
 * production; tests pass their own). TTFT = arrival → first token event (queue + prefill);
 * inter-token latency = gap between consecutive token events (llama-server streams one token
 * per event); duration = arrival → end, for every outcome but "rejected" (nothing ran).
 */
export class RequestObservation {
  readonly #m: CoordinatorMetricSet;
  readonly #model: string;
  readonly #now: () => number;
  readonly #start: number;
  #last: number | undefined;
  #streamedTokens = 0;
  #done: Extract<GenerateEvent, { kind: 'done' }> | undefined;
  #finished = false;

  readonly #onFinish: ((outcome: RequestOutcome, seconds: number) => void) | undefined;

  constructor(m: CoordinatorMetricSet, model: string, now: () => number, onFinish?: (outcome: RequestOutcome, seconds: number) => void) {
    this.#m = m;
    this.#model = model;
    this.#now = now;
    this.#onFinish = onFinish;
    this.#start = now();
  }

  get tokensSent(): boolean {
    return this.#last !== undefined;
  }

  /** The engine said the request is complete (a consumer may stop reading right after). */
  get completed(): boolean {
    return this.#done !== undefined;
  }

  event(ev: GenerateEvent): void {
    if (ev.kind === 'done') {
      this.#done = ev;
      return;
    }
    const t = this.#now();
    const labels = { model: this.#model };
    if (this.#last === undefined) this.#m.timeToFirstTokenSeconds.observe(labels, (t - this.#start) / 1000);
    else this.#m.interTokenLatencySeconds.observe(labels, (t - this.#last) / 1000);
    this.#last = t;
    this.#streamedTokens += Math.max(1, ev.tokenIds.length);
  }

  /** Record the end once; later calls are ignored (finally blocks may run after a catch). */
  finish(outcome: RequestOutcome): void {
    if (this.#finished) return;
    this.#finished = true;
    const model = this.#model;
    this.#m.requestsTotal.inc({ model, outcome });
    this.#onFinish?.(outcome, (this.#now() - this.#start) / 1000);
    if (outcome === 'rejected') return;
    this.#m.requestDurationSeconds.observe({ model }, (this.#now() - this.#start) / 1000);
    // The engine's own counts when it said them; else what reached the client before the end.
    if (this.#done) this.#m.promptTokensTotal.inc({ model }, this.#done.promptTokens);
    const generated = this.#done ? this.#done.completionTokens : this.#streamedTokens;
    if (generated > 0) this.#m.generatedTokensTotal.inc({ model }, generated);
  }
}

/** Wrap a generation stream so it is observed; the stream itself passes through unchanged. */
export async function* observeGeneration(
  m: CoordinatorMetricSet,
  model: string,
  stream: AsyncIterable<GenerateEvent>,
  now: () => number = () => performance.now(),
  onFinish?: (outcome: RequestOutcome, seconds: number) => void,
): AsyncGenerator<GenerateEvent> {
  const obs = new RequestObservation(m, model, now, onFinish);
  let ended = false;
  try {
    for await (const ev of stream) {
      obs.event(ev);
      yield ev;
    }
    ended = true;
    obs.finish('ok');
  } catch (err) {
    ended = true;
    obs.finish(requestOutcome(err, obs.tokensSent));
    throw err;
  } finally {
    // The consumer stopped reading (`return()` on the generator): after the engine's "done" that
    // is a finished request (callers may stop at "done"), before it the client went away.
    if (!ended) obs.finish(obs.completed ? 'ok' : 'cancelled');
  }
}

export interface CoordinatorMetricsSource {
  readonly version: string;
  readonly membership: Membership;
  /** The runtime, once it exists (the runtime is built with these metrics, so it comes later). */
  readonly runtime: () => Pick<Runtime, 'models' | 'slotUsage'> | undefined;
  /** Export process_* and nodejs_* too (default true; the bench turns them off to time ours). */
  readonly processMetrics?: boolean | undefined;
}

/** The coordinator's registry and metric set, fed by the registry, the runtime and requests. */
export class CoordinatorMetrics {
  readonly registry = new Registry();
  readonly metrics: CoordinatorMetricSet;
  readonly #src: CoordinatorMetricsSource;

  constructor(src: CoordinatorMetricsSource) {
    this.#src = src;
    // All placement gauges come from one pure computation per scrape. prom-client runs every
    // collect hook synchronously in one pass when a scrape starts (each metric's get() calls its
    // hook before its first await), so a result cached until the next microtask is shared by the
    // five hooks of one scrape and can never leak into the next one. Placement only changes when
    // a model's state or verification changes, so each gauge is rebuilt only when the placement
    // signature differs from the one it last applied (per gauge: a gauge read alone still
    // catches up); with 512 stages that saves thousands of label-set writes per scrape.
    let cached: { signature: string; models: ModelStatus[]; series?: PlacementSeries } | undefined;
    const current = () => {
      if (!cached) {
        const models = src.runtime()?.models() ?? [];
        cached = { signature: placementSignature(models), models };
        queueMicrotask(() => {
          cached = undefined;
        });
      }
      return cached;
    };
    const applied = new Map<string, string>();
    const apply = <L extends string>(key: string, gauge: Gauge<L>, pick: (p: PlacementSeries) => readonly { labels: Partial<Record<L, string>>; value: number }[]) => {
      const c = current();
      if (applied.get(key) === c.signature) return;
      c.series ??= placementSeries(c.models);
      replaceGaugeSeries(gauge, pick(c.series));
      applied.set(key, c.signature);
    };
    this.metrics = createCoordinatorMetrics(this.registry, src.version, {
      processMetrics: src.processMetrics ?? true,
      collect: {
        nodes() {
          replaceGaugeSeries(this, nodeStateCounts(src.membership.registry.nodes().map((n: NodeEntry) => n.state)));
        },
        modelLoaded() {
          apply('loaded', this, (p) => p.loaded);
        },
        stageLayers() {
          apply('layers', this, (p) => p.layers);
        },
        stagePredictedBytes() {
          apply('predicted', this, (p) => p.predicted);
        },
        stageActualBytes() {
          apply('actual', this, (p) => p.actual);
        },
        modelPredictedTokensPerSecond() {
          apply('tps', this, (p) => p.predictedTokensPerSecond);
        },
        queueDepth() {
          replaceGaugeSeries(this, (src.runtime()?.slotUsage() ?? []).map((u) => ({ labels: { model: u.model }, value: u.queued })));
        },
        requestsInFlight() {
          replaceGaugeSeries(this, (src.runtime()?.slotUsage() ?? []).map((u) => ({ labels: { model: u.model }, value: u.running })));
        },
      },
    });
    src.membership.on('change', (c) => this.metrics.discoveryEventsTotal.inc({ kind: c.kind }));
  }

  /**
   * Count a generation request the HTTP API refused before it reached the runtime (which would
   * have counted it in MeteredRuntime). `requestedModel`: the body's `model` ("" when the body
   * names none: the runtime would pick the only ready model), undefined when no body was read
   * (401, 413, not JSON) — then the model is unknown and the label is "". A named model becomes
   * a label only when it exists (bounded label set).
   */
  refused(requestedModel: string | undefined, status: number): void {
    const model = requestedModel === undefined ? '' : requestModelLabel(requestedModel, this.#src.runtime()?.models() ?? []);
    this.metrics.requestsTotal.inc({ model, outcome: refusalOutcome(status) });
  }

  /** A model instance serves again after losing an engine. */
  recovered(model: string, cause: RecoveryCause, seconds: number): void {
    this.metrics.instanceRecoveriesTotal.inc({ model, cause });
    this.metrics.instanceRecoverySeconds.observe({ model }, seconds);
  }

  /** An in-flight stream continued on a healed instance. */
  streamResumed(model: string): void {
    this.metrics.streamsResumedTotal.inc({ model });
  }

  /** Follow a runtime's models: request series start at 0 when a model is ready, go when it leaves. */
  follow(runtime: Runtime): void {
    runtime.on('recovered', (model, cause, seconds) => this.recovered(model, cause, seconds));
    runtime.on('stream-resumed', (model) => this.streamResumed(model));
    // A model turns ready again after every recovery: its series start at 0 only the first time,
    // or the recovery just observed (and every latency histogram) would be zeroed with it.
    const seeded = new Set<string>();
    runtime.on('model', (s) => {
      if (s.state === 'ready' && !seeded.has(s.name)) {
        seeded.add(s.name);
        initModelSeries(this.metrics, s.name);
      }
      // "unloading" is emitted once the instance is gone; a failed instance keeps its series
      // (its errors stay visible) until it is unloaded or replaced by a new load.
      else if (s.state === 'unloading' && !runtime.model(s.name)) {
        seeded.delete(s.name);
        removeModelSeries(this.metrics, s.name);
      }
    });
  }
}

/**
 * The runtime with every generation observed. A subclass rather than a hook inside
 * Runtime.generate so the request path there stays as it is; everything that calls
 * `runtime.generate` (OpenAI HTTP API, gRPC Coordinator.Generate, the CLI) is measured alike.
 */
export class MeteredRuntime extends Runtime {
  readonly #metrics: CoordinatorMetricSet;

  constructor(o: RuntimeOptions, metrics: CoordinatorMetrics) {
    super(o);
    this.#metrics = metrics.metrics;
    metrics.follow(this);
  }

  override async *generate(req: GenerateRequest, signal?: AbortSignal): AsyncGenerator<GenerateEvent> {
    const model = requestModelLabel(req.model, this.models());
    yield* observeGeneration(this.#metrics, model, super.generate(req, signal), undefined, (outcome, seconds) => this.emit('request', model, outcome, seconds));
  }
}
