import { expect } from 'vitest';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { orchard } from './processes.ts';

/**
 * Generate a test GGUF (`orchard testmodel gguf --out path …args`) and the per-node budget that
 * forces a split: a hair (2 MiB) below what one node needs for the whole model at `ctx`.
 */
export async function modelThatMustSplit(path: string, args: readonly string[], env: NodeJS.ProcessEnv, ctx: number): Promise<number> {
  const made = await orchard(['testmodel', 'gguf', '--out', path, ...args], env);
  expect(made.code, made.stderr).toBe(0);
  const profile = modelProfile(await readGgufHeader(path));
  const single = planPlacement(profile, [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx });
  return Math.floor(single.stages[0]!.bytes.total) - 2 * 2 ** 20;
}
