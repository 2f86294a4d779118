import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { killAll } from '../../bench/lib/children.ts';
import { MiB, runLlama, writeModel } from '../../bench/llama-run.ts';
import { vocabPath } from '../../src/shared/testmodel/vocab.ts';
import { findLlamaBinaries, type LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { DEFAULT_MEMORY_OPTIONS, type MemoryOptions, deviceBytes, memoryModel, stageBytes } from '../../src/shared/memory/stage.ts';
import { type ModelProfile, modelProfile } from '../../src/shared/model/profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';

/**
 * Proves the plan → llama-server mapping on the real engine: for several layer splits, the
 * engine's own per-layer device assignment (`-lv 5`: "layer N assigned to device RPCk") equals
 * the plan, the output layer (unit n_layer) lands on the last stage, and each device's model and
 * KV buffers equal the memory math for exactly its planned range.
 */
const LAYERS = 7;
let bins: LlamaBinaries;
let dir: string;
let model: string;
let profile: ModelProfile;
const options: MemoryOptions = { ...DEFAULT_MEMORY_OPTIONS, ctx: 1024 };

beforeAll(async () => {
  bins = await findLlamaBinaries();
  dir = await mkdtemp(join(tmpdir(), 'orchard-llama-args-'));
  model = await writeModel(dir, { name: 'map-test', layers: LAYERS, embd: 256, ffn: 4096, heads: 4, kvHeads: 2, type: 'F16' }, await vocabPath());
  profile = modelProfile(await readGgufHeader(model));
});
afterAll(async () => {
  killAll();
  if (dir) await rm(dir, { recursive: true, force: true });
});

function assignment(log: string): Map<number, number> {
  const out = new Map<number, number>();
  for (const m of log.matchAll(/layer\s+(\d+) assigned to device RPC(\d+)/g)) out.set(Number(m[1]), Number(m[2]));
  return out;
}

async function check(ranges: [number, number][]): Promise<void> {
  const run = await runLlama(bins, model, LAYERS, ranges, options, ['-lv', '5']);
  const got = assignment(run.log);
  expect(got.size).toBe(LAYERS + 1);
  ranges.forEach(([a, b], stage) => {
    for (let l = a; l <= b; l++) expect(got.get(l), `layer ${l}`).toBe(stage);
  });
  expect(got.get(LAYERS), 'output layer').toBe(ranges.length - 1);
  const mm = memoryModel(profile, options);
  ranges.forEach(([a, b], stage) => {
    const rep = run.reported.get(run.endpoints[stage]!)!;
    const pred = deviceBytes(mm, a, b, stage === ranges.length - 1, ranges.length > 1);
    // llama.cpp prints MiB with two decimals: equal within that rounding.
    expect(Math.abs(rep.model - pred.model)).toBeLessThanOrEqual(0.006 * MiB);
    expect(Math.abs(rep.kv - pred.kv)).toBeLessThanOrEqual(0.006 * MiB);
  });
}

describe('llamaDeviceArgs pins planned ranges on the real engine', () => {
  it('uneven three-way split', async () => {
    await check([
      [0, 3],
      [4, 5],
      [6, 6],
    ]);
  });
  it('one layer first, the rest on the head', async () => {
    await check([
      [0, 0],
      [1, 6],
    ]);
  });
  it('everything on one device', async () => {
    await check([[0, 6]]);
  });
  it('a plan from planPlacement, end to end', async () => {
    const mm = memoryModel(profile, options);
    // Budgets that force three stages: a fits 3 layers, b 1, the head c 3.
    const half = (mm.layerWeights[0]! + mm.layerKv[0]!) / 2;
    const plan = planPlacement(
      profile,
      [
        { name: 'a', budgetBytes: stageBytes(mm, 0, 2, false, true).total + half, bandwidthBytesPerSecond: 800e9 },
        { name: 'b', budgetBytes: stageBytes(mm, 0, 0, false, true).total + half, bandwidthBytesPerSecond: 400e9 },
        { name: 'c', budgetBytes: stageBytes(mm, 4, 6, true, true).total + half, bandwidthBytesPerSecond: 200e9 },
      ],
      options,
    );
    expect(plan.fits).toBe(true);
    expect(plan.stages.map((s) => [s.node, s.firstLayer, s.lastLayer])).toEqual([
      ['a', 0, 2],
      ['b', 3, 3],
      ['c', 4, 6],
    ]);
    await check(plan.stages.map((s) => [s.firstLayer, s.lastLayer]));
  });
});
