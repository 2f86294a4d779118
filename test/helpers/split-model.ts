import { expect } from 'vitest';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { mlxTensorFit } from '../../src/shared/placement/stage-memory.ts';
import { mlxPlacementOptions } from '../../src/shared/placement/types.ts';
import { testGguf } from './test-models.ts';

/**
 * The run's test GGUF for `orchard testmodel gguf …args` (testGguf: shared, do not modify) and the
 * per-node budget that forces a split: a hair (2 MiB) below what one node needs for the whole
 * model at `ctx`. `dir`: where testGguf keeps it outside a test run.
 */
export async function modelThatMustSplit(args: readonly string[], ctx: number, dir?: string): Promise<{ model: string; budget: number }> {
  const model = await testGguf(args, undefined, dir);
  const profile = modelProfile(await readGgufHeader(model));
  const single = planPlacement(profile, [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx });
  return { model, budget: Math.floor(single.stages[0]!.bytes.total) - 2 * 2 ** 20 };
}

/**
 * Budgets for agents alpha and bravo under which the coordinator's own planner must split each of
 * these MLX models over both (64 KiB steps): alpha one layer short of the smallest whole model,
 * bravo the least that lets both together hold the largest.
 */
export async function mlxSplittingBudgets(models: readonly string[], ctx: number): Promise<Record<'alpha' | 'bravo', number>> {
  const profiles = await Promise.all(models.map((m) => readMlxModelProfile(m)));
  const plan = (profile: (typeof profiles)[number], b: Record<string, number>) =>
    planPlacement(profile, Object.entries(b).map(([name, budgetBytes]) => ({ name, budgetBytes, bandwidthBytesPerSecond: 100e9 })), { ctx, ...mlxPlacementOptions() });
  const least = (fits: (b: number) => boolean): number => {
    let lo = 1;
    let hi = 2 ** 32;
    expect(fits(hi)).toBe(true);
    while (hi - lo > 65_536) {
      const mid = Math.floor((lo + hi) / 2);
      if (fits(mid)) hi = mid;
      else lo = mid;
    }
    return hi;
  };
  const alpha = Math.min(...profiles.map((p) => least((b) => plan(p, { alpha: b }).fits) - Math.max(...p.layers.map((l) => l.weightBytes))));
  const bravo = Math.max(...profiles.map((p) => least((b) => plan(p, { alpha, bravo: b }).fits)));
  for (const p of profiles) {
    const two = plan(p, { alpha, bravo });
    expect(two.fits && two.stages.length, 'the planner cannot split the model over 2 nodes').toBe(2);
  }
  return { alpha, bravo };
}

/**
 * Equal budgets for alpha and bravo under which the planner must split this MLX model over both
 * and each node also holds a tensor-parallel rank (the coordinator refuses tensor parallel on a
 * node whose budget cannot hold its share): the larger of the two needs, below one node's whole model.
 */
export async function mlxTensorBudgets(model: string, ctx: number): Promise<Record<'alpha' | 'bravo', number>> {
  const profile = await readMlxModelProfile(model);
  const nodes = (b: number, names: string[]) => names.map((name) => ({ name, budgetBytes: b, bandwidthBytesPerSecond: 100e9 }));
  const alone = planPlacement(profile, nodes(2 ** 40, ['x']), { ctx, ...mlxPlacementOptions() }).stages[0]!.bytes.total;
  const share = mlxTensorFit(profile, nodes(0, ['alpha', 'bravo']).map((n) => ({ node: n.name, budgetBytes: n.budgetBytes })), ctx).bytes.total;
  let b = share;
  while (b < alone && planPlacement(profile, nodes(b, ['alpha', 'bravo']), { ctx, ...mlxPlacementOptions() }).stages.length !== 2) b += 65_536;
  expect(b, 'a budget that holds a tensor rank also holds the whole model').toBeLessThan(alone);
  return { alpha: b, bravo: b };
}
