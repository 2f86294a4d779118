import { isAbsolute } from 'node:path';
import type { CacheType } from '../../shared/memory/kv.ts';
import { deviceBytes, memoryModel, type MemoryOptions } from '../../shared/memory/stage.ts';
import { FileMemo } from '../../shared/file-memo.ts';
import { readGgufProfile } from '../../shared/model/read-profile.ts';
import { isMlxModelDir, isMlxProfile, readMlxModelProfile } from '../../shared/model/mlx-profile.ts';
import { effectiveBandwidth } from '../../shared/placement/cost.ts';
import { type LinkMatrix, linksByName } from '../../shared/placement/links.ts';
import { planPlacement } from '../../shared/placement/planner.ts';
import { asTensorPlan, mlxTensorFit } from '../../shared/placement/stage-memory.ts';
import { DEFAULT_PLACEMENT_OPTIONS, type PlacementNode, mlxPlacementOptions } from '../../shared/placement/types.ts';
import { UsageError } from '../../shared/errors.ts';
import { CoordinatorError } from '../errors.ts';
import type { NodeEntry } from '../membership/registry.ts';
import { mlxParallelism } from './mlx/parallelism.ts';
import type { LoadOptions, PlacementResult, Planner } from './types.ts';

/**
 * The runtime's planner: read the GGUF header (never the weights), build the model profile,
 * and run the shared placement planner over the live nodes. Node budgets are each node's
 * usable bytes minus what instances already loaded on it hold (`reservedBytes`).
 */
export function memoryOptionsOf(o: LoadOptions): MemoryOptions {
  return {
    ctx: o.ctx,
    cacheType: o.cacheType as CacheType,
    parallel: o.parallel,
    unified: DEFAULT_PLACEMENT_OPTIONS.unified,
    ubatch: DEFAULT_PLACEMENT_OPTIONS.ubatch,
    flashAttention: DEFAULT_PLACEMENT_OPTIONS.flashAttention,
  };
}

/** Planner names must be unique; node names usually are, ids always are. */
export function plannerNames(nodes: readonly NodeEntry[]): Map<string, NodeEntry> {
  const count = new Map<string, number>();
  for (const n of nodes) count.set(n.profile.name, (count.get(n.profile.name) ?? 0) + 1);
  const out = new Map<string, NodeEntry>();
  for (const n of nodes) out.set(count.get(n.profile.name) === 1 && n.profile.name ? n.profile.name : `${n.profile.name || 'node'}#${n.nodeId.slice(0, 8)}`, n);
  return out;
}

// In src/shared so `orchard plan` plans MLX directories offline with the same rule.
export { mlxPlacementOptions };

/**
 * The model does not fit the live nodes. Load fails with the message; the Plan RPC answers with
 * the planner's full "does not fit" result (`plan`: shortfall per kind, remedies) instead.
 */
export class PlanDoesNotFitError extends CoordinatorError {
  override readonly name: string = 'PlanDoesNotFitError';
  constructor(
    message: string,
    readonly plan: unknown,
  ) {
    super('FAILED_PRECONDITION', message);
  }
}

/**
 * @param links measured links between nodes: a stage boundary is charged on the worker's link
 *   to the head where it was measured (cost.ts boundarySeconds), else the assumed figures.
 * @param place the placement rule over the nodes as the planner sees them (bench:lan hands in
 *   the baselines' rules to run their layouts through the same coordinator).
 */
export function createPlanner(reservedBytes: (nodeId: string, ignoring?: string) => number = () => 0, links?: LinkMatrix, place: typeof planPlacement = planPlacement): Planner {
  // Every load and plan of a file would parse its header again (the vocabulary alone is megabytes).
  const ggufProfiles = new FileMemo(readGgufProfile);
  return async (modelPath, nodes, options, ignoring): Promise<PlacementResult> => {
    if (!isAbsolute(modelPath)) throw new UsageError(`model path must be absolute (it is opened on the head node): ${modelPath}`);
    // An MLX model directory (config.json + safetensors) gets the same profile shape as a GGUF.
    const mlx = await isMlxModelDir(modelPath);
    const profile = mlx ? await readMlxModelProfile(modelPath) : await ggufProfiles.get(modelPath);
    if (nodes.length === 0) throw new CoordinatorError('FAILED_PRECONDITION', 'no live nodes: start `orchard node` on each machine (or check `orchard status`)');
    const byName = plannerNames(nodes);
    const measured = links ? linksByName(links, new Map([...byName].map(([name, n]) => [name, n.nodeId]))) : undefined;
    const placementNodes: PlacementNode[] = [...byName].map(([name, n]) => ({
      name,
      budgetBytes: Math.max(0, n.profile.budgetBytes - reservedBytes(n.nodeId, ignoring)),
      // The node's measurement of its llama.cpp engine when it has one, else the spec figure ×
      // the engine's decode efficiency (cost.ts). The measurement is of llama.cpp, not MLX.
      bandwidthBytesPerSecond: effectiveBandwidth(n.profile.bandwidthBytesPerSecond || 100e9, mlx ? 'mlx' : 'llama.cpp', mlx ? undefined : n.profile.effectiveBandwidthBytesPerSecond),
      ...(!mlx && n.profile.prefillFlopsPerSecond ? { prefillFlopsPerSecond: n.profile.prefillFlopsPerSecond } : {}),
      ...(!mlx && n.profile.decodeFixedSecondsPerToken !== undefined ? { decodeFixedSecondsPerToken: n.profile.decodeFixedSecondsPerToken } : {}),
      ...(!mlx && n.profile.boundaryOverheadSeconds !== undefined ? { boundaryOverheadSeconds: n.profile.boundaryOverheadSeconds } : {}),
      ...(!mlx && n.profile.decodeAttentionFlopsPerSecond !== undefined ? { decodeAttentionFlopsPerSecond: n.profile.decodeAttentionFlopsPerSecond } : {}),
      // MLX plans keep the driver's assumed ring/JACCL figures (a JACCL link is not the tunnel probed)
      ...(!mlx && measured?.get(name) ? { links: measured.get(name)! } : {}),
    }));
    const mo = memoryOptionsOf(options);
    const predict = { ...(options.promptTokens ? { promptTokens: options.promptTokens } : {}), ...(options.objective ? { objective: options.objective } : {}) };
    const planned = place(profile, placementNodes, { ctx: mo.ctx, cacheType: mo.cacheType, parallel: mo.parallel, ...predict, ...(mlx ? mlxPlacementOptions() : {}) });
    if (!planned.fits) {
      const parts = [`${modelPath} does not fit on ${nodes.length} live node(s)`, ...planned.reasons];
      if (planned.remedies?.length) parts.push(`try: ${planned.remedies.join('; ')}`);
      throw new PlanDoesNotFitError(parts.join('; '), planned);
    }
    const mm = memoryModel(profile, mo);
    const last = planned.stages.length - 1;
    // MLX: pipeline or tensor is part of the plan (shown by Plan, refused here when impossible),
    // and a tensor plan's stages hold what a tensor rank holds, checked against the same budgets.
    const tensor = isMlxProfile(profile) && planned.stages.length > 1 ? mlxTensorFit(profile, planned.stages, mo.ctx) : undefined;
    const parallelism = tensor ? mlxParallelism(profile, planned, byName, options, links, tensor.overBudget) : undefined;
    const plan = tensor && parallelism?.mode === 'tensor' ? asTensorPlan(planned, tensor.bytes) : planned;
    return {
      nLayer: profile.layerCount,
      predictedTokensPerSecond: plan.predicted.tokensPerSecond,
      layerKvBytes: mm.layerKv,
      raw: parallelism ? { ...plan, parallelism: { mode: parallelism.mode, reason: parallelism.reason } } : plan,
      ...(parallelism ? { parallelism } : {}),
      stages: plan.stages.map((s, i) => {
        const n = byName.get(s.node)!;
        return {
          nodeId: n.nodeId,
          nodeName: n.profile.name,
          firstLayer: s.firstLayer,
          lastLayer: s.lastLayer,
          bytes: s.bytes,
          budgetBytes: s.budgetBytes,
          device: deviceBytes(mm, s.firstLayer, s.lastLayer, i === last, plan.stages.length > 1),
        };
      }),
    };
  };
}
