/**
 * The metric names a PromQL expression reads — enough PromQL lexing to check dashboards
 * against the catalogue (a panel that queries an undeclared metric is a bug that only shows
 * as an empty graph). Not a full parser: it removes what cannot be a metric name (strings,
 * label matchers, grouping clauses, durations, Grafana variables, numbers), then every
 * remaining identifier that is not a function call or a keyword is a metric name.
 */

const KEYWORDS = new Set(['and', 'or', 'unless', 'bool', 'offset', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'inf', 'nan', 'atan2', 'start', 'end']);

export function metricNamesInExpr(expr: string): string[] {
  let s = expr;
  s = s.replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, ' '); // string literals
  s = s.replace(/\{[^{}]*\}/g, ' '); // label matchers
  s = s.replace(/\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/gi, ' '); // grouping label lists
  s = s.replace(/\[[^\]]*\]/g, ' '); // range selectors and subqueries (may hold $__rate_interval)
  s = s.replace(/\$\{[^}]*\}|\$\w+|\[\[\w+\]\]/g, ' '); // Grafana variables outside matchers
  const names = new Set<string>();
  for (const m of s.matchAll(/(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?/g)) {
    const name = m[1]!;
    if (m[2]) continue; // function or aggregation call
    if (KEYWORDS.has(name.toLowerCase())) continue;
    names.add(name);
  }
  return [...names].sort();
}
