import { type AnyMetricDef, CATALOGUE, findMetric } from './catalogue.ts';

/**
 * Does a metric carry information, or does it only exist? A declared metric that no code sets
 * looks fine on a scrape (counters start at 0 for every enumerated label) and on a dashboard
 * (the panel draws a flat line), so "the series exists" proves nothing. The rule here:
 *   · a counter must have moved: some sample > 0;
 *   · a histogram must have observed something: some `_count` sample > 0;
 *   · a gauge must have at least one sample (0 is a true value for a gauge: an empty queue).
 * Pure over samples, so the same rule judges a prom-client registry after a unit test drove the
 * real code (`samplesFromRegistry`) and a live Prometheus query result (name, labels, value).
 */

export interface MetricSample {
  /** Series name as exposed: histograms give `<name>_bucket`, `_sum` and `_count`. */
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

export interface IdleMetric {
  readonly name: string;
  readonly reason: 'no sample' | 'never moved';
}

/** The catalogue metrics in `defs` whose samples show no activity, by the rule above. */
export function idleMetrics(samples: readonly MetricSample[], defs: readonly AnyMetricDef[] = CATALOGUE): IdleMetric[] {
  const idle: IdleMetric[] = [];
  for (const def of defs) {
    const mine = samples.filter((s) => findMetric(s.name, [def]) !== undefined);
    if (mine.length === 0) {
      idle.push({ name: def.name, reason: 'no sample' });
      continue;
    }
    const moving = def.type === 'histogram' ? mine.filter((s) => s.name === `${def.name}_count`) : mine;
    if (def.type !== 'gauge' && !moving.some((s) => s.value > 0)) idle.push({ name: def.name, reason: 'never moved' });
  }
  return idle;
}

/** prom-client's `registry.getMetricsAsJSON()` as samples (histogram values carry their series name). */
export function samplesFromRegistry(
  json: readonly { name: string; values: readonly { value: number; labels: object; metricName?: string | undefined }[] }[],
): MetricSample[] {
  return json.flatMap((m) => m.values.map((v) => ({ name: v.metricName ?? m.name, labels: v.labels as Record<string, string>, value: v.value })));
}
