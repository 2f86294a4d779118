import { Counter, Gauge, Histogram, type Registry, collectDefaultMetrics } from 'prom-client';
import type { HardwareProfile, LiveStats } from '../hardware.ts';
import {
  type AnyMetricDef,
  COORDINATOR_METRICS,
  type CounterDef,
  type GaugeDef,
  type HistogramDef,
  MEMORY_PRESSURE_LEVELS,
  NODE_METRICS,
  RECOVERY_CAUSES,
  REQUEST_OUTCOMES,
} from './catalogue.ts';

/**
 * prom-client metrics built from catalogue declarations, on a Registry the caller owns (never
 * prom-client's global one: several agents in one test process must not mix series).
 */
export type MetricOf<D> = D extends HistogramDef<infer L>
  ? Histogram<L>
  : D extends CounterDef<infer L>
    ? Counter<L>
    : D extends GaugeDef<infer L>
      ? Gauge<L>
      : never;

export type MetricSet<C> = { readonly [K in keyof C]: MetricOf<C[K]> };

/**
 * Scrape-time hooks: a gauge whose value lives elsewhere (the hardware profile, the registry)
 * reads it in `collect`, so it is never stale. `this` is the metric being collected.
 */
export type CollectHooks<C> = { readonly [K in keyof C]?: (this: MetricOf<C[K]>) => void | Promise<void> };

export function createMetric<D extends AnyMetricDef>(registry: Registry, def: D, collect?: (this: MetricOf<D>) => void | Promise<void>): MetricOf<D> {
  const base = { name: def.name, help: def.help, labelNames: [...def.labelNames], registers: [registry] };
  switch (def.type) {
    case 'gauge':
      return new Gauge({ ...base, ...(collect ? { collect: collect as never } : {}) }) as MetricOf<D>;
    case 'counter':
      return new Counter({ ...base, ...(collect ? { collect: collect as never } : {}) }) as MetricOf<D>;
    case 'histogram':
      return new Histogram({ ...base, buckets: [...def.buckets], ...(collect ? { collect: collect as never } : {}) }) as MetricOf<D>;
  }
}

export function createMetrics<C extends Record<string, AnyMetricDef>>(registry: Registry, defs: C, hooks: CollectHooks<C> = {}): MetricSet<C> {
  const out: Record<string, unknown> = {};
  for (const [key, def] of Object.entries(defs)) {
    const metric = createMetric(registry, def, hooks[key] as never);
    if (def.type === 'counter') for (const labels of enumeratedLabelSets(def)) (metric as Counter<string>).inc(labels, 0);
    out[key] = metric;
  }
  return out as MetricSet<C>;
}

/**
 * Every label combination of a metric whose labels are all enumerated in the catalogue (e.g.
 * orchard_engine_exits_total{engine,expected}). Counters start at 0 for each, so a restart or a crash
 * shows up as an increase from 0 instead of a series that appears out of nothing (which
 * rate()/increase() miss), and dashboards have data before the first event. Returns nothing when
 * a label is open-ended (model, node): those series start when the model or node appears.
 */
export function enumeratedLabelSets(def: AnyMetricDef): Record<string, string>[] {
  let sets: Record<string, string>[] = [{}];
  for (const label of def.labelNames) {
    const values = (def.labelValues as Record<string, readonly string[] | undefined> | undefined)?.[label];
    if (!values) return [];
    sets = sets.flatMap((s) => values.map((v) => ({ ...s, [label]: v })));
  }
  return def.labelNames.length === 0 ? [] : sets;
}

/**
 * Start every per-model series at zero when a model is loaded: request outcomes, token
 * counters, histograms, queue. Same reason as above — the first request is then an increase
 * that rate() sees, and the model's panels have data from the moment it serves.
 */
export function initModelSeries(c: CoordinatorMetricSet, model: string): void {
  for (const outcome of REQUEST_OUTCOMES) c.requestsTotal.inc({ model, outcome }, 0);
  c.promptTokensTotal.inc({ model }, 0);
  c.generatedTokensTotal.inc({ model }, 0);
  c.timeToFirstTokenSeconds.zero({ model });
  c.interTokenLatencySeconds.zero({ model });
  c.requestDurationSeconds.zero({ model });
  c.queueDepth.set({ model }, 0);
  c.requestsInFlight.set({ model }, 0);
  for (const cause of RECOVERY_CAUSES) c.instanceRecoveriesTotal.inc({ model, cause }, 0);
  c.instanceRecoverySeconds.zero({ model });
  c.streamsResumedTotal.inc({ model }, 0);
}

/** Drop a model's request series when it is unloaded (placement series go with replaceGaugeSeries). */
export function removeModelSeries(c: CoordinatorMetricSet, model: string): void {
  for (const outcome of REQUEST_OUTCOMES) c.requestsTotal.remove({ model, outcome });
  for (const cause of RECOVERY_CAUSES) c.instanceRecoveriesTotal.remove({ model, cause });
  c.instanceRecoverySeconds.remove({ model });
  c.streamsResumedTotal.remove({ model });
  for (const metric of [c.promptTokensTotal, c.generatedTokensTotal, c.timeToFirstTokenSeconds, c.interTokenLatencySeconds, c.requestDurationSeconds, c.queueDepth, c.requestsInFlight, c.modelPredictedTokensPerSecond]) {
    metric.remove({ model });
  }
  for (const engine of ['llama.cpp', 'mlx']) c.modelLoaded.remove({ model, engine });
}

export interface CreateOptions<C> {
  /** Also export prom-client's process_* and nodejs_* metrics (default true). */
  readonly processMetrics?: boolean;
  readonly collect?: CollectHooks<C>;
}

export type NodeMetricSet = MetricSet<typeof NODE_METRICS>;
export type CoordinatorMetricSet = MetricSet<typeof COORDINATOR_METRICS>;

/**
 * prom-client's process_* and nodejs_* metrics, minus the three gauges it names `*_total`
 * (nodejs_active_{handles,requests,resources}_total), which break the Prometheus naming rule
 * promtool lints for (only counters end in _total). The per-type gauges without the suffix stay,
 * so `sum(nodejs_active_handles)` gives the same number.
 */
export function collectProcessMetrics(registry: Registry): void {
  collectDefaultMetrics({ register: registry });
  for (const name of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) registry.removeSingleMetric(name);
}

/** Every metric a node agent exports, registered on `registry`. */
export function createNodeMetrics(registry: Registry, options: CreateOptions<typeof NODE_METRICS> = {}): NodeMetricSet {
  if (options.processMetrics ?? true) collectProcessMetrics(registry);
  return createMetrics(registry, NODE_METRICS, options.collect);
}

/** Every metric the coordinator exports, registered on `registry`; sets build info at once. */
export function createCoordinatorMetrics(
  registry: Registry,
  version: string,
  options: CreateOptions<typeof COORDINATOR_METRICS> = {},
): CoordinatorMetricSet {
  if (options.processMetrics ?? true) collectProcessMetrics(registry);
  const m = createMetrics(registry, COORDINATOR_METRICS, options.collect);
  m.buildInfo.set({ version, nodejs_version: process.versions.node }, 1);
  for (const state of ['up', 'suspect', 'down'] as const) m.nodes.set({ state }, 0);
  return m;
}

/** Set the node gauges from the probe's profile and live stats (call from a collect hook or on change). */
export function recordNodeProfile(m: NodeMetricSet, profile: HardwareProfile, live: LiveStats | undefined): void {
  m.info.reset();
  m.info.set(
    { id: profile.nodeId, name: profile.name, chip: profile.chip, os: profile.os, version: profile.agentVersion, os_version: profile.osVersion, protocol_version: profile.protocolVersion },
    1,
  );
  m.memoryBytes.set(profile.memoryBytes);
  m.budgetBytes.set(profile.budgetBytes);
  m.bandwidthBytesPerSecond.set(profile.bandwidthBytesPerSecond);
  // No series until measured: a 0 would read as "measured zero".
  if (profile.effectiveBandwidthBytesPerSecond) m.effectiveBandwidthBytesPerSecond.set(profile.effectiveBandwidthBytesPerSecond);
  if (profile.prefillFlopsPerSecond) m.prefillFlopsPerSecond.set(profile.prefillFlopsPerSecond);
  if (profile.decodeFixedSecondsPerToken !== undefined) m.decodeFixedSecondsPerToken.set(profile.decodeFixedSecondsPerToken);
  if (profile.boundaryOverheadSeconds !== undefined) m.boundaryOverheadSeconds.set(profile.boundaryOverheadSeconds);
  if (profile.decodeAttentionFlopsPerSecond !== undefined) m.decodeAttentionFlopsPerSecond.set(profile.decodeAttentionFlopsPerSecond);
  m.wiredLimitBytes.set(profile.wiredLimitBytes);
  if (live) {
    m.availableMemoryBytes.set(live.availableBytes);
    for (const level of MEMORY_PRESSURE_LEVELS) m.memoryPressure.set({ level }, level === live.memoryPressure ? 1 : 0);
  }
}

/**
 * Replace every series of a gauge with `series` in one step. For state that is recomputed as a
 * whole (placement per model and node, node counts): series that are no longer in the list
 * disappear instead of lingering with their last value.
 */
export function replaceGaugeSeries<L extends string>(g: Gauge<L>, series: readonly { labels: Partial<Record<L, string>>; value: number }[]): void {
  g.reset();
  for (const s of series) g.set(s.labels, s.value);
}

/** Count nodes per liveness state, with every state present (0 when none) so panels never go blank. */
export function nodeStateCounts(states: readonly string[]): { labels: { state: string }; value: number }[] {
  const counts = new Map<string, number>([
    ['up', 0],
    ['suspect', 0],
    ['down', 0],
  ]);
  for (const s of states) counts.set(s, (counts.get(s) ?? 0) + 1);
  return [...counts].map(([state, value]) => ({ labels: { state }, value }));
}
