import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { type AnyMetricDef, CATALOGUE, findMetric } from '../../src/shared/metrics/catalogue.ts';
import { idleMetrics, type MetricSample } from '../../src/shared/metrics/activity.ts';
import {
  BUILTIN_VARIABLES,
  DATASOURCE_UID,
  type Dashboard,
  dashboardQueries,
  dashboardSchema,
  labelValuesQuery,
  substituteVariables,
  variablesIn,
} from '../../src/shared/metrics/dashboards.ts';
import { metricNamesInExpr } from '../../src/shared/metrics/promql.ts';
import { exerciseCoordinatorMetrics, exerciseNodeMetrics } from '../helpers/metrics-exercise.ts';

/**
 * Structural check of dashboards/*.json (an equivalent of validating against Grafana's
 * dashboard schema, see src/shared/metrics/dashboards.ts for why not @grafana/schema), datasource
 * consistency with the provisioned datasource, variables, and every query against the catalogue.
 * Whether the queries return data is the Prometheus integration test's job; whether the metrics
 * they read ever move is checked here against the code that sets them (a panel on a counter no
 * code increments draws a flat 0 line that looks like "no crashes").
 */
const ROOT = resolve(import.meta.dirname, '..', '..');
const DIR = join(ROOT, 'dashboards');
const files = readdirSync(DIR).filter((f) => f.endsWith('.json'));
const dashboards = files.map((f) => ({ file: f, raw: JSON.parse(readFileSync(join(DIR, f), 'utf8')) as unknown }));

/** Series Prometheus itself creates for every target; dashboards may read them. */
const PROMETHEUS_SERIES = new Set(['up']);

describe('dashboards', () => {
  it('ships the cluster, node and model dashboards', () => {
    expect(files.sort()).toEqual(['cluster-overview.json', 'model-performance.json', 'node-detail.json']);
  });

  describe.each(dashboards)('$file', ({ raw }) => {
    const parsed = dashboardSchema.safeParse(raw);
    const d = parsed.data as Dashboard;

    it('matches the dashboard schema', () => {
      expect(parsed.success, parsed.error?.message).toBe(true);
    });

    it('has unique panel ids, refIds per panel, and no overlapping panels', () => {
      const ids = d.panels.map((p) => p.id);
      expect(new Set(ids).size).toBe(ids.length);
      for (const p of d.panels) {
        const refs = (p.targets ?? []).map((t) => t.refId);
        expect(new Set(refs).size, p.title).toBe(refs.length);
        if (p.type !== 'row' && p.type !== 'text') expect(refs.length, `${p.title} has no query`).toBeGreaterThan(0);
      }
      for (const [i, a] of d.panels.entries()) {
        for (const b of d.panels.slice(i + 1)) {
          const overlap =
            a.gridPos.x < b.gridPos.x + b.gridPos.w && b.gridPos.x < a.gridPos.x + a.gridPos.w && a.gridPos.y < b.gridPos.y + b.gridPos.h && b.gridPos.y < a.gridPos.y + a.gridPos.h;
          expect(overlap, `${a.title} overlaps ${b.title}`).toBe(false);
        }
      }
    });

    it('references only the provisioned Prometheus datasource', () => {
      const refs: { type: string; uid: string }[] = [];
      for (const p of d.panels) {
        if (p.datasource) refs.push(p.datasource);
        for (const t of p.targets ?? []) if (t.datasource) refs.push(t.datasource);
      }
      for (const v of d.templating.list) if (v.datasource) refs.push(v.datasource);
      expect(refs.length).toBeGreaterThan(0);
      for (const r of refs) expect(r).toEqual({ type: 'prometheus', uid: DATASOURCE_UID });
      // Every panel names it (none relies on "default datasource", which differs per Grafana).
      for (const p of d.panels) expect(p.datasource, p.title).toBeDefined();
    });

    it('defines every variable its queries use, with label_values queries over catalogue metrics', () => {
      const defined = new Set(d.templating.list.map((v) => v.name));
      for (const q of dashboardQueries(d)) {
        for (const name of variablesIn(q.expr)) expect(defined.has(name) || name in BUILTIN_VARIABLES, `${q.panel}: $${name}`).toBe(true);
      }
      for (const v of d.templating.list) {
        const lv = labelValuesQuery(v);
        expect(lv, `${v.name} is a label_values query`).toBeDefined();
        expect(findMetric(lv!.metric), lv!.metric).toBeDefined();
        expect(findMetric(lv!.metric)!.labelNames.includes(lv!.label) || ['node', 'node_id', 'chip'].includes(lv!.label)).toBe(true);
        expect(v.multi && v.includeAll && v.allValue === '.*', `${v.name}: multi + All as .*`).toBe(true);
      }
    });

    it('queries only metrics the catalogue declares', () => {
      for (const q of dashboardQueries(d)) {
        const names = metricNamesInExpr(q.expr);
        expect(names.length, `${q.panel}: ${q.expr}`).toBeGreaterThan(0);
        for (const n of names) expect(findMetric(n) !== undefined || PROMETHEUS_SERIES.has(n), `${q.panel} queries undeclared ${n}`).toBe(true);
      }
    });
  });

  it('uses the datasource uid the Grafana provisioning declares', () => {
    const ds = readFileSync(join(ROOT, 'deploy/grafana/provisioning/datasources/orchard.yaml'), 'utf8');
    expect(ds.match(/^\s*uid:\s*(\S+)\s*$/m)?.[1]).toBe(DATASOURCE_UID);
    expect(ds).toMatch(/^\s*type:\s*prometheus\s*$/m);
  });

  it('dashboard uids are unique and the cluster overview has node and model variables', () => {
    const all = dashboards.map((x) => dashboardSchema.parse(x.raw));
    expect(new Set(all.map((x) => x.uid)).size).toBe(all.length);
    const cluster = all.find((x) => x.uid === 'orchard-cluster')!;
    expect(cluster.templating.list.map((v) => v.name)).toEqual(['node', 'model']);
    expect(all.find((x) => x.uid === 'orchard-node')!.templating.list.map((v) => v.name)).toContain('node');
    expect(all.find((x) => x.uid === 'orchard-model')!.templating.list.map((v) => v.name)).toContain('model');
  });

  it('the structural check rejects broken dashboards (it can fail)', () => {
    const good = dashboards[0]!.raw as Dashboard;
    const clone = () => JSON.parse(JSON.stringify(good)) as Dashboard & Record<string, unknown>;
    const noUid = clone();
    delete (noUid as Partial<Dashboard>).uid;
    expect(dashboardSchema.safeParse(noUid).success).toBe(false);
    const wide = clone();
    wide.panels[0]!.gridPos.w = 30;
    expect(dashboardSchema.safeParse(wide).success).toBe(false);
    const noExpr = clone();
    noExpr.panels[0]!.targets![0]!.expr = '';
    expect(dashboardSchema.safeParse(noExpr).success).toBe(false);
    const badType = clone();
    (badType.panels[0] as { type: string }).type = 'graphh';
    expect(dashboardSchema.safeParse(badType).success).toBe(false);
  });
});

/** Catalogue metrics the panels of `ds` read (Prometheus's own `up` aside). */
function panelMetrics(ds: readonly Dashboard[]): AnyMetricDef[] {
  const names = new Set(ds.flatMap((d) => dashboardQueries(d).flatMap((q) => metricNamesInExpr(q.expr))));
  return CATALOGUE.filter((def) => [...names].some((n) => findMetric(n, [def])));
}

describe('dashboard panels read metrics that move', () => {
  it('every metric a panel reads is set by the code a cluster runs (none idle)', async () => {
    const samples: MetricSample[] = [...(await exerciseNodeMetrics()), ...(await exerciseCoordinatorMetrics())];
    const read = panelMetrics(dashboards.map((x) => dashboardSchema.parse(x.raw)));
    expect(read.length).toBeGreaterThanOrEqual(15);
    expect(idleMetrics(samples, read)).toEqual([]);
  }, 30_000);

  it('a panel on a counter that stays at 0 fails the check (it can fail)', () => {
    const d = JSON.parse(JSON.stringify(dashboards[0]!.raw)) as Dashboard;
    d.panels[0]!.targets![0]!.expr = 'sum(increase(orchard_engine_exits_total[$__rate_interval]))';
    const read = panelMetrics([d]);
    const zeros: MetricSample[] = [{ name: 'orchard_engine_exits_total', labels: { engine: 'rpc-server', expected: 'false' }, value: 0 }];
    expect(idleMetrics(zeros, read)).toContainEqual({ name: 'orchard_engine_exits_total', reason: 'never moved' });
  });
});

describe('variable substitution', () => {
  it('escapes regex metacharacters and joins multi values like Grafana', () => {
    expect(substituteVariables('m{node=~"$node"}[$__rate_interval]', { node: ['a.b', 'c'] })).toBe('m{node=~"(a\\\\.b|c)"}[1m]');
    const braced = 'm{model=~"$' + '{model}"}'; // Grafana's ${model} form
    expect(substituteVariables(braced, { model: ['q'] })).toBe('m{model=~"q"}');
    expect(substituteVariables('m{model=~"$model"}', { model: '.*' })).toBe('m{model=~".*"}');
    expect(() => substituteVariables('m{x=~"$nope"}', {})).toThrow(/nope/);
  });
});
