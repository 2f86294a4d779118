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
 * Equal budgets for alpha and bravo under which the planner must split each of these MLX models
 * over both and each node also holds a tensor-parallel rank of each (the coordinator refuses
 * tensor parallel on a node whose budget cannot hold its share): the least such, below every
 * model's whole size on one node.
 */
export async function mlxTensorBudgets(models: readonly string[], ctx: number): Promise<Record<'alpha' | 'bravo', number>> {
  const profiles = await Promise.all(models.map((m) => readMlxModelProfile(m)));
  const nodes = (b: number, names: string[]) => names.map((name) => ({ name, budgetBytes: b, bandwidthBytesPerSecond: 100e9 }));
  const alone = Math.min(...profiles.map((p) => planPlacement(p, nodes(2 ** 40, ['x']), { ctx, ...mlxPlacementOptions() }).stages[0]!.bytes.total));
  let b = Math.max(...profiles.map((p) => mlxTensorFit(p, [{ node: 'alpha', budgetBytes: 0 }, { node: 'bravo', budgetBytes: 0 }], ctx).bytes.total));
  const splits = () => profiles.every((p) => planPlacement(p, nodes(b, ['alpha', 'bravo']), { ctx, ...mlxPlacementOptions() }).stages.length === 2);
  while (b < alone && !splits()) b += 65_536;
  expect(b, 'a budget that holds a tensor rank also holds a whole model').toBeLessThan(alone);
  return { alpha: b, bravo: b };
}
