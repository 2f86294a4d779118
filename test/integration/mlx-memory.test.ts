import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureMlxEnv, type MlxEnv } from '../../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../../src/node/mlx/group.ts';
import { localRingEndpoints } from '../../src/node/mlx/ports.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { type MlxMode, mlxRankBytes } from '../../src/shared/memory/mlx.ts';
import { type MlxModelProfile, readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';

/**
 * Every MLX rank reports MLX's own allocator counters through the worker protocol, and Orchard's
 * MLX memory model predicts them: the weights exactly, a request's peak within 10 % (bench:memory
 * runs the larger models against the 5 % / 32 MiB goal; this model is small enough that the
 * 32 MiB floor would hide any error, so the test holds the relative bound alone).
 */

let env: MlxEnv;
let dir: string;
let model: string;
let profile: MlxModelProfile;

beforeAll(async () => {
  env = await ensureMlxEnv();
  dir = await mkdtemp(join(tmpdir(), 'orchard-mlx-memory-'));
  model = join(dir, 'llama');
  await writeMlxTestModel(env.python, { out: model, arch: 'llama', layers: 4, hidden: 256, heads: 8, kvHeads: 4, intermediate: 512 });
  profile = await readMlxModelProfile(model);
}, 300_000);

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

const LAYOUTS: { mode: MlxMode; split?: number[]; ranks: number }[] = [
  { mode: 'single', ranks: 1 },
  { mode: 'pipeline', split: [1, 3], ranks: 2 },
  { mode: 'tensor', ranks: 2 },
];

describe('MLX ranks report their memory and the model predicts it', () => {
  for (const { mode, split, ranks } of LAYOUTS) {
    it(`${mode} over ${ranks}`, async () => {
      const launch = ranks > 1 ? { backend: 'ring' as const, endpoints: await localRingEndpoints(ranks) } : undefined;
      const g = await MlxGroup.start({ python: env.python, model, mode, split, launch });
      try {
        const req = { promptTokens: 300, generatedTokens: 6 };
        const tokens = Array.from({ length: req.promptTokens }, (_, i) => (i * 13) % 256);
        await collect(g.generate({ id: 'm', tokens, maxTokens: req.generatedTokens, ignoreEos: true }));
        const memory = await g.memoryAfter('m');
        expect(memory.map((m) => m.rank)).toEqual(Array.from({ length: ranks }, (_, r) => r));
        for (const ready of g.ready) {
          // Stage s runs on rank N-1-s; ready.layers is [first, end) of that rank.
          const [first, end] = ready.layers as [number, number];
          const predicted = mlxRankBytes(profile, { mode, ranks, firstLayer: first, lastLayer: end - 1 }, req);
          // To the byte but for the few scalars MLX allocates itself (8 bytes here).
          expect(Math.abs(ready.memory.active_bytes - predicted.weights)).toBeLessThanOrEqual(1024);
          const peak = memory[ready.rank]!.peak_bytes;
          expect(peak).toBeGreaterThan(predicted.weights + predicted.kv);
          expect(Math.abs(predicted.peak - peak) / peak).toBeLessThan(0.1);
        }
      } finally {
        await g.close();
      }
    }, 300_000);
  }
});
