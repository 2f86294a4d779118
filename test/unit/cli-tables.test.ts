import { describe, expect, it } from 'vitest';
import { DEMO_SHAPE, demoBudgets } from '../../src/cli/demo-model.ts';
import { layerRange, renderPlacementTable, renderPlanTable } from '../../src/cli/tables.ts';
import { encodeGgufHeader } from '../../src/shared/gguf/writer.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { llamaTestModelSpec } from '../../src/shared/testmodel/llama.ts';
import { loadVocab } from '../../src/shared/testmodel/vocab.ts';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const MiB = 2 ** 20;
const bytes = (w: number) => ({ weights: w * MiB, kv: 4 * MiB, compute: 20 * MiB, overhead: 256 * MiB, total: (w + 280) * MiB });

describe('plan table', () => {
  const plan = {
    fits: true,
    stages: [
      { node: 'node-b', role: 'worker', firstLayer: 0, lastLayer: 3, bytes: bytes(24), budgetBytes: 305 * MiB, headroomBytes: MiB, bandwidthBytesPerSecond: 400e9 },
      { node: 'node-a', role: 'head', firstLayer: 4, lastLayer: 11, bytes: bytes(86.5), budgetBytes: 630 * MiB, headroomBytes: 1.5 * MiB, bandwidthBytesPerSecond: 819e9 },
    ],
    predicted: { tokensPerSecond: 121.49 },
    reasons: [],
  };
  const text = renderPlanTable(plan);
  const lines = text.trimEnd().split('\n');

  it('has one row per stage, aligned borders and human units', () => {
    const rows = lines.filter((l) => /^│\s+\d/.test(l));
    expect(rows).toHaveLength(2);
    expect(rows[0]).toMatch(/│\s+0 │ node-b │ worker │\s+0–3 │\s+24\.0 MiB │/);
    expect(rows[1]).toMatch(/│ head\s+│\s+4–11 │\s+86\.5 MiB │.*│\s+630\.0 MiB │.*│\s+819 GB\/s │$/);
    // Every table line has the same width (a broken column would shift the borders).
    const table = lines.filter((l) => /^[┌│├└]/.test(l));
    expect(new Set(table.map((l) => [...l].length)).size).toBe(1);
    expect(lines.at(-1)).toBe('predicted: 121.5 tok/s');
    expect(text.includes('\u001b[')).toBe(false);
  });

  it('shows an empty stage as a dash', () => {
    expect(layerRange(5, 4)).toBe('—');
    expect(layerRange(0, 0)).toBe('0–0');
  });
});

describe('placement table', () => {
  it('puts planned next to reported bytes, and dashes where the engine said nothing', () => {
    const text = renderPlacementTable({
      stages: [
        { stage: 0, role: 'worker', node: 'node-b', first_layer: 0, last_layer: 3, endpoint: '127.0.0.1:1', bytes: bytes(24) },
        { stage: 1, role: 'head', node: 'node-a', first_layer: 4, last_layer: 11, endpoint: null, bytes: bytes(86.5) },
      ],
      verification: { ok: true, devices: [{ device: 'RPC0[127.0.0.1:1]', node: 'node-b', actual_layers: '0-3', actual_bytes: { model: 24 * MiB, kv: 4 * MiB, compute: 20 * MiB } }] },
    });
    const rows = text.split('\n').filter((l) => /^│\s+\d/.test(l));
    expect(rows[0]).toMatch(/node-b │\s+0–3 │ RPC0\[127\.0\.0\.1:1\] │\s+24\.0 MiB │\s+24\.0 MiB │/);
    expect(rows[1]).toMatch(/node-a │\s+4–11 │ —\s+│\s+86\.5 MiB │\s+— │/);
  });
});

describe('demo memory limits', () => {
  it('force exactly N stages, each holding layers, and N − 1 nodes cannot hold the model', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'orchard-cli-tables-'));
    try {
      // Header only: the planner never reads weights.
      const spec = llamaTestModelSpec(DEMO_SHAPE, await loadVocab());
      const path = join(dir, 'demo.gguf');
      await writeFile(path, encodeGgufHeader(spec).headerBytes);
      const profile = modelProfile(await readGgufHeader(path));
      for (const n of [2, 3, 4]) {
        const budgets = demoBudgets(profile, n, { ctx: 1024, cacheType: 'f16' });
        const nodes = budgets.map((b) => ({ ...b, bandwidthBytesPerSecond: 100e9 }));
        const plan = planPlacement(profile, nodes, { ctx: 1024, cacheType: 'f16', parallel: 1 });
        expect(plan.fits).toBe(true);
        expect(plan.stages).toHaveLength(n);
        for (const s of plan.stages) expect(s.lastLayer).toBeGreaterThanOrEqual(s.firstLayer);
        for (let drop = 0; drop < n; drop++) {
          expect(planPlacement(profile, nodes.filter((_, i) => i !== drop), { ctx: 1024, cacheType: 'f16', parallel: 1 }).fits).toBe(false);
        }
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
