import { z } from 'zod';

/**
 * Structural model of the Grafana dashboard JSON Orchard ships (dashboards/*.json), written
 * after Grafana's dashboard schema (schemaVersion 39: panels with gridPos and targets,
 * templating.list variables, datasource references by {type, uid}). Only what Grafana needs to
 * load the dashboard and what Orchard relies on is required; unknown keys pass through, as in
 * Grafana. Used by the unit test (structure, datasource consistency) and the Prometheus
 * integration test (every query evaluated).
 */

export const DATASOURCE_UID = 'orchard-prometheus';

const datasourceRef = z.object({ type: z.string(), uid: z.string() });

const gridPos = z
  .object({ h: z.number().int().positive(), w: z.number().int().min(1).max(24), x: z.number().int().min(0).max(23), y: z.number().int().min(0) })
  .refine((g) => g.x + g.w <= 24, 'panel overflows the 24-column grid');

const target = z.looseObject({
  refId: z.string().regex(/^[A-Z]+$/),
  expr: z.string().min(1),
  datasource: datasourceRef.optional(),
  legendFormat: z.string().optional(),
  format: z.enum(['time_series', 'table', 'heatmap']).optional(),
  instant: z.boolean().optional(),
  range: z.boolean().optional(),
});

export const PANEL_TYPES = ['timeseries', 'stat', 'gauge', 'bargauge', 'table', 'state-timeline', 'heatmap', 'text', 'row', 'piechart'] as const;

const panel = z.looseObject({
  id: z.number().int().positive(),
  type: z.enum(PANEL_TYPES),
  title: z.string().min(1),
  gridPos,
  datasource: datasourceRef.optional(),
  targets: z.array(target).optional(),
  fieldConfig: z.looseObject({ defaults: z.looseObject({}), overrides: z.array(z.unknown()) }).optional(),
  options: z.looseObject({}).optional(),
});

const variable = z.looseObject({
  name: z.string().regex(/^[a-zA-Z_][a-zA-Z0-9_]*$/),
  type: z.enum(['query', 'custom', 'constant', 'datasource', 'interval', 'textbox', 'adhoc']),
  label: z.string().optional(),
  datasource: datasourceRef.optional(),
  definition: z.string().optional(),
  query: z.union([z.string(), z.looseObject({ query: z.string() })]).optional(),
  multi: z.boolean().optional(),
  includeAll: z.boolean().optional(),
  allValue: z.string().optional(),
  refresh: z.union([z.literal(0), z.literal(1), z.literal(2)]).optional(),
});

export const dashboardSchema = z.looseObject({
  uid: z.string().regex(/^[a-zA-Z0-9_-]{1,40}$/),
  title: z.string().min(1),
  schemaVersion: z.number().int().min(36),
  version: z.number().int().optional(),
  tags: z.array(z.string()).optional(),
  time: z.object({ from: z.string(), to: z.string() }),
  refresh: z.string().optional(),
  editable: z.boolean().optional(),
  templating: z.object({ list: z.array(variable) }),
  annotations: z.looseObject({ list: z.array(z.looseObject({})) }).optional(),
  panels: z.array(panel).min(1),
});

export type Dashboard = z.infer<typeof dashboardSchema>;

export interface DashboardQuery {
  readonly dashboard: string;
  readonly panel: string;
  readonly refId: string;
  readonly expr: string;
  readonly instant: boolean;
}

export function dashboardQueries(d: Dashboard): DashboardQuery[] {
  return d.panels.flatMap((p) =>
    (p.targets ?? []).map((t) => ({ dashboard: d.uid, panel: p.title, refId: t.refId, expr: t.expr, instant: t.instant === true && t.range !== true })),
  );
}

/** The label_values(metric, label) of a query variable, as Grafana's Prometheus datasource reads it. */
export function labelValuesQuery(v: Dashboard['templating']['list'][number]): { metric: string; label: string } | undefined {
  const q = typeof v.query === 'string' ? v.query : (v.query?.query ?? v.definition ?? '');
  const m = /^\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$/.exec(q);
  return m ? { metric: m[1]!, label: m[2]! } : undefined;
}

/** Variables a PromQL expression references: $name, ${name}, ${name:fmt}, [[name]]. */
export function variablesIn(expr: string): string[] {
  const names = new Set<string>();
  for (const m of expr.matchAll(/\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]/g)) names.add((m[1] ?? m[2] ?? m[3])!);
  return [...names].sort();
}

/** Grafana's built-in variables, with the values the integration test evaluates them at. */
export const BUILTIN_VARIABLES: Readonly<Record<string, string>> = {
  __rate_interval: '1m',
  __interval: '15s',
  __range: '1h',
  __range_s: '3600',
};

/**
 * Substitute variables the way Grafana does for a multi-value variable inside a regex matcher:
 * values regex-escaped and joined with `|` (a single value is escaped alone).
 */
export function substituteVariables(expr: string, values: Readonly<Record<string, readonly string[] | string>>): string {
  const render = (name: string): string => {
    const v = values[name] ?? BUILTIN_VARIABLES[name];
    if (v === undefined) throw new Error(`variable $${name} has no value`);
    if (typeof v === 'string') return v;
    const escaped = v.map((x) => x.replace(/[\\^$.*+?()[\]{}|]/g, (c) => `\\\\${c}`));
    return escaped.length === 1 ? escaped[0]! : `(${escaped.join('|')})`;
  };
  return expr.replace(/\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]/g, (_m, a, b, c) => render((a ?? b ?? c) as string));
}
