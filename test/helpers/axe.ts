import { readFile } from 'node:fs/promises';
import type { Page } from 'playwright-core';

const AXE = new URL('../../node_modules/axe-core/axe.min.js', import.meta.url).pathname;

/**
 * axe-core's serious and critical violations on the page as it is now (the console tests).
 * axe is injected as a script, so the page's context must bypass its CSP.
 */
export async function axeViolations(p: Page): Promise<{ id: string; impact: string; targets: string[] }[]> {
  if (!(await p.evaluate(() => 'axe' in window))) await p.addScriptTag({ content: await readFile(AXE, 'utf8') });
  const found = await p.evaluate(async () => {
    const axe = (window as unknown as { axe: { run(ctx: Document): Promise<{ violations: { id: string; impact: string; nodes: { target: string[] }[] }[] }> } }).axe;
    const r = await axe.run(document);
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, targets: v.nodes.map((n) => n.target.join(' ')) }));
  });
  return found.filter((v) => v.impact === 'serious' || v.impact === 'critical');
}
