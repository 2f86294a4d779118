/**
 * bench:memory's MLX section: Orchard's MLX memory model (src/shared/memory/mlx.ts over the
 * profile mlx-profile.ts reads) against MLX's own allocator counters, reported by every rank of
 * a real MLX group through the worker protocol (`ready.memory` after the load, a `memory` line
 * after each request). On Linux MLX runs its CPU backend, which keeps active/peak memory as Metal
 * does; what it cannot show is Metal's own wired/residency overhead.
 *
 * Per rank: weights (active after the load) and the request's peak, for a dense llama and a
 * qwen3_moe test model, one rank, a 2-rank pipeline (uneven split) and 2-rank tensor parallel,
 * at a short and a long prompt. Goal as for llama.cpp: within 5 % or 32 MiB.
 */
import { join } from 'node:path';
import { type MlxEnv, ensureMlxEnv } from '../../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../../src/node/mlx/group.ts';
import { localRingEndpoints } from '../../src/node/mlx/ports.ts';
import { writeMlxTestModel, type MlxTestModelOptions } from '../../src/node/mlx/testmodel.ts';
import { type MlxMode, type MlxRankLayout, mlxRankBytes } from '../../src/shared/memory/mlx.ts';
import { type MlxModelProfile, readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';

const MiB = 2 ** 20;

export interface MlxMemoryCase {
  model: string;
  mode: MlxMode;
  ranks: number;
  rank: number;
  layers: string;
  promptTokens: number;
  kind: 'weights' | 'peak';
  predicted: number;
  reported: number;
  errorBytes: number;
  relativeError: number;
  withinGoal: boolean;
}

const MODELS: { name: string; opts: Omit<MlxTestModelOptions, 'out'> }[] = [
  { name: 'llama-8L-768d-f32', opts: { arch: 'llama', layers: 8, hidden: 768, heads: 8, kvHeads: 4, intermediate: 2048 } },
  { name: 'qwen3moe-6L-512d-8x2-f32', opts: { arch: 'qwen3_moe', layers: 6, hidden: 512, heads: 8, kvHeads: 4, intermediate: 512, experts: 8, activeExperts: 2 } },
];

const LAYOUTS: { mode: MlxMode; ranks: number }[] = [
  { mode: 'single', ranks: 1 },
  { mode: 'pipeline', ranks: 2 },
  { mode: 'tensor', ranks: 2 },
];

function compare(base: Omit<MlxMemoryCase, 'predicted' | 'reported' | 'errorBytes' | 'relativeError' | 'withinGoal' | 'kind'>, kind: MlxMemoryCase['kind'], predicted: number, reported: number): MlxMemoryCase {
  const errorBytes = Math.abs(predicted - reported);
  const relativeError = reported > 0 ? errorBytes / reported : 1;
  return { ...base, kind, predicted, reported, errorBytes, relativeError, withinGoal: relativeError <= 0.05 || errorBytes <= 32 * MiB };
}

/** Layer range of rank r: stage s = rank N-1-s holds split[s] layers, first layers first (mlx_worker.py). */
function rankLayout(profile: MlxModelProfile, mode: MlxMode, ranks: number, split: number[], rank: number): MlxRankLayout {
  if (mode !== 'pipeline') return { mode, ranks, firstLayer: 0, lastLayer: profile.layerCount - 1 };
  const stage = ranks - 1 - rank;
  const first = split.slice(0, stage).reduce((a, b) => a + b, 0);
  return { mode, ranks, firstLayer: first, lastLayer: first + split[stage]! - 1 };
}

async function runLayout(env: MlxEnv, dir: string, name: string, profile: MlxModelProfile, mode: MlxMode, ranks: number, prompts: number[]): Promise<MlxMemoryCase[]> {
  // Uneven on purpose (the first stage larger), as bench:memory's llama.cpp splits.
  const split = mode === 'pipeline' ? [Math.ceil(profile.layerCount / 2) + 1, profile.layerCount - Math.ceil(profile.layerCount / 2) - 1] : [];
  const launch = ranks > 1 ? { backend: 'ring' as const, endpoints: await localRingEndpoints(ranks) } : undefined;
  const group = await MlxGroup.start({ python: env.python, model: dir, mode, split: split.length ? split : undefined, launch, startupTimeoutMs: 300_000, stallTimeoutMs: 600_000 });
  const out: MlxMemoryCase[] = [];
  try {
    const layouts = Array.from({ length: ranks }, (_, r) => rankLayout(profile, mode, ranks, split, r));
    for (const ready of group.ready) {
      const l = layouts[ready.rank]!;
      const base = { model: name, mode, ranks, rank: ready.rank, layers: `${l.firstLayer}-${l.lastLayer}`, promptTokens: 0 };
      out.push(compare(base, 'weights', mlxRankBytes(profile, l, { promptTokens: 1, generatedTokens: 0 }).weights, ready.memory.active_bytes));
    }
    for (const promptTokens of prompts) {
      const id = `${mode}-${promptTokens}`;
      const generatedTokens = 8;
      const tokens = Array.from({ length: promptTokens }, (_, i) => (i * 7) % 256);
      await collect(group.generate({ id, tokens, maxTokens: generatedTokens, ignoreEos: true }));
      for (const m of await group.memoryAfter(id)) {
        const l = layouts[m.rank]!;
        const base = { model: name, mode, ranks, rank: m.rank, layers: `${l.firstLayer}-${l.lastLayer}`, promptTokens };
        out.push(compare(base, 'peak', mlxRankBytes(profile, l, { promptTokens, generatedTokens }).peak, m.peak_bytes));
      }
    }
  } finally {
    await group.close();
  }
  return out;
}

/** Every MLX case; `report` sees each layout's cases as they come (progress on stderr). */
export async function mlxMemoryCases(workDir: string, quick: boolean, report: (c: MlxMemoryCase[]) => void): Promise<MlxMemoryCase[]> {
  const env = await ensureMlxEnv();
  const prompts = quick ? [512] : [16, 512];
  const cases: MlxMemoryCase[] = [];
  for (const m of quick ? MODELS.slice(0, 1) : MODELS) {
    const dir = join(workDir, m.name);
    await writeMlxTestModel(env.python, { ...m.opts, out: dir });
    const profile = await readMlxModelProfile(dir);
    for (const { mode, ranks } of LAYOUTS) {
      const c = await runLayout(env, dir, m.name, profile, mode, ranks, prompts);
      report(c);
      cases.push(...c);
    }
  }
  return cases;
}

/** The `mlx` section of bench:memory's JSON. */
export function mlxSummary(cases: readonly MlxMemoryCase[]) {
  const worst = (xs: readonly MlxMemoryCase[]) => (xs.length ? Math.max(...xs.map((c) => c.relativeError)) : null);
  return {
    ranks: cases.filter((c) => c.kind === 'weights').length,
    requests: cases.filter((c) => c.kind === 'peak').length,
    maxRelativeError: worst(cases),
    maxErrorBytes: Math.max(0, ...cases.map((c) => c.errorBytes)),
    maxRelativeErrorByKind: { weights: worst(cases.filter((c) => c.kind === 'weights')), peak: worst(cases.filter((c) => c.kind === 'peak')) },
    reportedBy: 'mx.get_active_memory() after the load, mx.get_peak_memory() per request (MLX CPU backend here)',
    goal: 'every rank within 5 % or 32 MiB',
    goalMet: cases.every((c) => c.withinGoal),
    cases,
  };
}
