import { computeBufferBytes, hostComputeBufferBytes } from '../memory/compute.ts';
import { MLX_RANK_OVERHEAD_BYTES, type MlxRankLayout, budgetRequests, mlxRankBudget, mlxRankBytes } from '../memory/mlx.ts';
import { HEAD_OVERHEAD_BYTES, type MemoryModel, type StageBytes, WORKER_OVERHEAD_BYTES, stageBytes } from '../memory/stage.ts';
import { isMlxProfile, type MlxModelProfile } from '../model/mlx-profile.ts';
import { formatBytes } from '../units.ts';
import type { PlacementOptions, Plan, PlanStage } from './types.ts';

/**
 * What a stage holds, in the terms of the engine that runs it: llama.cpp's buffers
 * (memory/stage.ts, verified against its `-lv 4` buffer report) or an MLX rank's allocator peak
 * (memory/mlx.ts, verified against mx.get_peak_memory by bench:memory). The planner's dynamic
 * program needs memory as a per-layer sum plus a per-stage constant; `stage` is the exact
 * figure of one range, never above that sum (the DP's constants are bounds over any range).
 */
export interface StageMemory {
  /** Bytes each layer adds to the stage that holds it (weights + KV cache). */
  readonly layerBytes: readonly number[];
  /** Bytes a decoded token reads per layer: weights (routed experts only) + the KV it attends to. */
  readonly layerRead: readonly number[];
  /** Per-stage constants on top of the layers: a worker, the head of a split, a head alone. */
  readonly workerFixed: StageBytes;
  readonly headConst: number;
  readonly headConstSingle: number;
  /** The exact bytes of a stage holding layers [first, last] in a plan of `stages` stages. */
  stage(first: number, last: number, isHead: boolean, stages: number): StageBytes;
}

const fixed = (compute: number, overhead: number, weights = 0, kv = 0): StageBytes => ({ weights, kv, compute, overhead, total: weights + kv + compute + overhead });

/** llama.cpp: the layers' weights and KV, compute buffers at their widest layer, engine overhead. */
export function llamaStageMemory(mm: MemoryModel): StageMemory {
  const { profile } = mm;
  const headFixed = mm.outputWeights + mm.hostWeights + HEAD_OVERHEAD_BYTES;
  return {
    layerBytes: mm.layerWeights.map((w, l) => w + mm.layerKv[l]!),
    layerRead: mm.layerRead,
    // Per-stage constants use the widest layer's compute buffer: a bound for any range.
    workerFixed: fixed(computeBufferBytes(mm, profile.layers, false, true), WORKER_OVERHEAD_BYTES),
    headConst: computeBufferBytes(mm, profile.layers, true, true) + hostComputeBufferBytes(mm, true) + headFixed,
    headConstSingle: computeBufferBytes(mm, profile.layers, true, false) + hostComputeBufferBytes(mm, false) + headFixed,
    stage: (first, last, isHead, stages) => stageBytes(mm, first, last, isHead, stages > 1),
  };
}

/** An MLX rank's figures (memory/mlx.ts at the budgeted requests) plus the rank process. */
function rankStage(p: MlxModelProfile, l: MlxRankLayout, ctx: number): StageBytes {
  const b = mlxRankBudget(p, l, ctx);
  return fixed(b.transient, MLX_RANK_OVERHEAD_BYTES, b.weights, b.kv);
}

/**
 * MLX pipeline ranks: every rank holds the embedding, final norm and untied head (mlx-lm builds
 * the whole model; the worker drops only other ranks' layers), its layers' weights and KV, and
 * the transient peak of the widest step, the same on the head as on a worker. A pipeline rank's
 * all_gather grows with the rank count, unknown until the DP has chosen: the constants are taken
 * at `maxStages` (a bound) and `stage` gives the exact figure of the plan chosen.
 */
export function mlxStageMemory(p: MlxModelProfile, o: Pick<PlacementOptions, 'ctx' | 'kvFill'>, maxStages: number): StageMemory {
  const L = p.layerCount;
  const layout = (ranks: number, first: number, last: number): MlxRankLayout => ({ mode: ranks > 1 ? 'pipeline' : 'single', ranks, firstLayer: first, lastLayer: last });
  // Per budgeted request the KV is linear in the rank's layers and the rest does not depend on
  // them: the largest one-layer KV and the largest remainder bound every request's peak.
  const oneLayer = (ranks: number) => budgetRequests(o.ctx).map((req) => mlxRankBytes(p, layout(ranks, 0, 0), req));
  const kvPerLayer = Math.max(...oneLayer(1).map((b) => b.kv));
  const constOf = (ranks: number): StageBytes => {
    const rest = oneLayer(ranks).map((b) => ({ weights: b.weights - p.layers[0]!.weightBytes, transient: b.transient }));
    return fixed(Math.max(...rest.map((r) => r.transient)), MLX_RANK_OVERHEAD_BYTES, Math.max(...rest.map((r) => r.weights)));
  };
  const split = constOf(Math.max(2, Math.min(maxStages, L)));
  const seen = new Map<string, StageBytes>();
  const single = constOf(1);
  return {
    layerBytes: p.layers.map((l) => l.weightBytes + kvPerLayer),
    layerRead: p.layers.map((l) => l.readBytesPerToken + o.kvFill * kvPerLayer),
    workerFixed: split,
    headConst: split.total,
    headConstSingle: single.total,
    stage: (first, last, _isHead, stages) => {
      // The planner asks for the same ranges again and again while it rebalances boundaries.
      const key = `${stages}:${first}:${last}`;
      const known = seen.get(key);
      if (known) return known;
      const s = rankStage(p, layout(stages, first, last), o.ctx);
      seen.set(key, s);
      return s;
    },
  };
}

/** The memory rule of the engine family the options name (llama.cpp unless `engine: 'mlx'`). */
export function stageMemoryOf(mm: MemoryModel, o: PlacementOptions, maxStages: number): StageMemory {
  if (o.engine !== 'mlx') return llamaStageMemory(mm);
  if (!isMlxProfile(mm.profile)) throw new Error('MLX placement needs an MLX model profile');
  return mlxStageMemory(mm.profile, o, maxStages);
}

/** Each rank of MLX tensor parallel over `ranks` ranks: every layer, 1/ranks of what `shard()` splits. */
export function mlxTensorRankBytes(p: MlxModelProfile, ranks: number, ctx: number): StageBytes {
  return rankStage(p, { mode: 'tensor', ranks, firstLayer: 0, lastLayer: p.layerCount - 1 }, ctx);
}

/**
 * Tensor parallel over a plan's nodes (one rank per stage): what each rank holds, and for each
 * node whose budget cannot hold it, why — a tensor split the memory model refuses is as impossible
 * as one the head count refuses (parallelism.ts says both).
 */
export function mlxTensorFit(p: MlxModelProfile, stages: readonly Pick<PlanStage, 'node' | 'budgetBytes'>[], ctx: number): { bytes: StageBytes; overBudget: string[] } {
  const bytes = mlxTensorRankBytes(p, stages.length, ctx);
  const overBudget = stages
    .filter((s) => bytes.total > s.budgetBytes)
    .map((s) => `${s.node} cannot hold its tensor share (${formatBytes(bytes.total)} per rank, budget ${formatBytes(s.budgetBytes)})`);
  return { bytes, overBudget };
}

/** The plan as tensor parallel runs it: every rank holds `bytes` (the layer ranges stay the plan's). */
export function asTensorPlan(plan: Plan, bytes: StageBytes): Plan {
  return { ...plan, stages: plan.stages.map((s) => ({ ...s, bytes, headroomBytes: s.budgetBytes - bytes.total })) };
}
