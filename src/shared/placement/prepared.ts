import { UsageError } from '../errors.ts';
import { type MemoryModel, memoryModel } from '../memory/stage.ts';
import type { ModelProfile } from '../model/profile.ts';
import { boundarySeconds, decodeAttentionSecondsPerFlop, headFixedSeconds, headPrefillFlops, layerDecodeAttentionFlops, layerPrefillFlops, layerWire, linkOf, objectiveWeights, prefillFlopsOf } from './cost.ts';
import { type StageMemory, stageMemoryOf } from './stage-memory.ts';
import { DEFAULT_PLACEMENT_OPTIONS, type PlacementNode, type PlacementOptions } from './types.ts';

/**
 * What the planner's DP (planner.ts) and a fixed split's costing (fixed.ts) start from: the
 * options resolved and checked, every per-layer prefix sum and per-node rate of the cost model.
 */

const cmp = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** Whether a prompt's ubatches overlap on the last stage: llama.cpp's pipeline parallelism, never for MLX ranks. */
export function overlapsUbatches(o: PlacementOptions): boolean {
  return o.pipelinedPrefill && o.engine !== 'mlx';
}

export interface Assignment {
  /** In pipeline order; the last one is the head. */
  readonly stages: readonly { node: number; first: number; end: number }[];
  readonly seconds: number;
}

export interface Prepared {
  readonly mm: MemoryModel;
  /** The engine's memory rule: per-layer bytes, per-stage constants, exact stage bytes. */
  readonly memory: StageMemory;
  readonly nodes: readonly PlacementNode[];
  readonly order: readonly number[];
  readonly budgets: readonly number[];
  readonly memPrefix: Float64Array;
  readonly readPrefix: Float64Array;
  /** Σ attention FLOPs of one decoded token in layers [0, k) at the decode context (cost.ts decodeContextTokens). */
  readonly attnPrefix: Float64Array;
  /** Σ prompt FLOPs of layers [0, k) (P × per-token FLOPs; all zero without a prompt). */
  readonly flopPrefix: Float64Array;
  /** Objective weights of decode seconds and prefill seconds. */
  readonly wd: number;
  readonly wt: number;
  readonly invBw: readonly number[];
  /** Seconds per decode-attention FLOP on node i (0 when it has not measured it: cost.ts decodeAttentionSecondsPerFlop). */
  readonly invAttn: readonly number[];
  readonly invFlops: readonly number[];
  /** Weighted cost of the boundary after a stage on node i (decode and prefill parts). */
  readonly hopCost: readonly number[];
  /** With measured links: hopByHead[h][i] is that cost when node h is the head (i's link to h). */
  readonly hopByHead: readonly (readonly number[])[] | undefined;
  /** The prefill part of those boundaries, unweighted seconds (the chain of cost.ts pipelineSeconds). */
  readonly hopPrefill: readonly number[];
  readonly hopPrefillByHead: readonly (readonly number[])[] | undefined;
  /** Σ over layers [0, k) of cost.ts layerWire: graph bytes (chain), prompt-cache save bytes and round trips. */
  readonly chainWirePrefix: Float64Array;
  readonly saveWirePrefix: Float64Array;
  readonly saveTripsPrefix: Float64Array;
  /** Node i's link as a worker (cost.ts linkOf), and with head h (linksByHead[h][i]) when links are measured. */
  readonly links: readonly { rttSeconds: number; bytesPerSecond: number }[];
  readonly linksByHead: readonly (readonly { rttSeconds: number; bytesPerSecond: number }[])[] | undefined;
  /** ⌈P ÷ ubatch⌉ ubatches, and whether they overlap on the last stage (options.pipelinedPrefill). */
  readonly ubatches: number;
  readonly pipelined: boolean;
  /** Weighted cost of the head's own work on node i (output head read, last-position logits, its fixed cost per token). */
  readonly headCost: readonly number[];
  /** Seconds per token node i pays as the head whatever it reads (headFixedSeconds). */
  readonly headFixed: readonly number[];
  readonly workerConst: number;
  /** Head of a multi-stage plan (pipeline-parallel compute buffers). */
  readonly headConst: number;
  /** A single node holding everything (no pipeline copies). */
  readonly headConstSingle: number;
  readonly headRead: number;
  readonly pinned: ReadonlySet<number>;
  readonly o: PlacementOptions;
}

export function validate(profile: ModelProfile, nodes: readonly PlacementNode[], o: PlacementOptions): void {
  if (nodes.length === 0) throw new UsageError('no nodes to plan for');
  const seen = new Set<string>();
  for (const n of nodes) {
    if (seen.has(n.name)) throw new UsageError(`node name "${n.name}" appears twice`);
    seen.add(n.name);
    if (!(n.budgetBytes >= 0) || !Number.isFinite(n.budgetBytes)) throw new UsageError(`node ${n.name}: budget must be a non-negative number of bytes`);
    if (!(n.bandwidthBytesPerSecond > 0) || !Number.isFinite(n.bandwidthBytesPerSecond)) throw new UsageError(`node ${n.name}: bandwidth must be positive`);
    if (n.hopSeconds !== undefined && !(n.hopSeconds >= 0)) throw new UsageError(`node ${n.name}: hop cost must be ≥ 0`);
  }
  for (const p of o.pinned) if (!seen.has(p)) throw new UsageError(`pinned node "${p}" is not among the nodes`);
  if (!Number.isSafeInteger(o.ctx) || o.ctx < 1) throw new UsageError(`invalid context ${o.ctx}`);
  if (!Number.isSafeInteger(o.parallel) || o.parallel < 1) throw new UsageError(`invalid parallel ${o.parallel}`);
  if (profile.layerCount < 1) throw new UsageError('model has no layers');
}

/** Σ of the first k values at [k], k = 0 … n. */
function prefixSums(xs: readonly number[]): Float64Array {
  const out = new Float64Array(xs.length + 1);
  for (let i = 0; i < xs.length; i++) out[i + 1] = out[i]! + xs[i]!;
  return out;
}

/** @param maxStages the most stages a plan may have, for memory rules whose per-stage cost grows with them (MLX). */
export function prepare(profile: ModelProfile, nodes: readonly PlacementNode[], o: PlacementOptions, maxStages = nodes.length): Prepared {
  const mo = { ctx: o.ctx, cacheType: o.cacheType, parallel: o.parallel, unified: o.unified, ubatch: o.ubatch, flashAttention: o.flashAttention };
  // The KV bytes a token reads stay kvFill of the cache's (what the calibration's bytes count too);
  // attention's compute is priced at the plan's own context.
  const mm = memoryModel(profile, mo, o.kvFill);
  const memory = stageMemoryOf(mm, o, maxStages);
  const P = o.promptTokens;
  const flops = P > 0 ? layerPrefillFlops(profile, P) : [];
  const wire = layerWire(profile, o);
  const attention = layerDecodeAttentionFlops(profile, o);
  const memPrefix = prefixSums(memory.layerBytes);
  const readPrefix = prefixSums(memory.layerRead);
  const attnPrefix = prefixSums(attention);
  const flopPrefix = prefixSums(profile.layers.map((_, l) => P * (flops[l] ?? 0)));
  const chainWirePrefix = prefixSums(wire.chainBytes);
  const saveWirePrefix = prefixSums(wire.saveBytes);
  const saveTripsPrefix = prefixSums(wire.saveRoundTrips);
  const { wd, wt } = objectiveWeights(o);
  const invBw = nodes.map((n) => 1 / n.bandwidthBytesPerSecond);
  const invFlops = nodes.map((n) => 1 / prefillFlopsOf(n));
  const invAttn = nodes.map(decodeAttentionSecondsPerFlop);
  const headRead = profile.outputBytes + profile.outputNormBytes + profile.otherBytes + profile.tokenEmbdRowBytes;
  const hopOf = (n: PlacementNode, head?: string) => ((b) => wd * b.decode + wt * b.prefill)(boundarySeconds(profile, n, o, head));
  const hopCost = nodes.map((n) => hopOf(n));
  const linked = nodes.some((n) => n.links !== undefined && Object.keys(n.links).length > 0);
  const hopByHead = linked ? nodes.map((h) => nodes.map((n) => hopOf(n, h.name))) : undefined;
  const hopPrefill = nodes.map((n) => boundarySeconds(profile, n, o).prefill);
  const hopPrefillByHead = linked ? nodes.map((h) => nodes.map((n) => boundarySeconds(profile, n, o, h.name).prefill)) : undefined;
  const links = nodes.map((n) => linkOf(n, o));
  const linksByHead = linked ? nodes.map((h) => nodes.map((n) => linkOf(n, o, h.name))) : undefined;
  const ubatches = P > 0 ? Math.ceil(P / o.ubatch) : 1;
  const headFixed = nodes.map((n) => headFixedSeconds(n, o));
  // The head's fixed cost lands once on decode and once on TTFT (the first token is a token too).
  const headCost = nodes.map((_, i) => wd * headRead * invBw[i]! + wt * (P > 0 ? headPrefillFlops(profile) * invFlops[i]! : 0) + (wd + (P > 0 ? wt : 0)) * headFixed[i]!);
  const order = nodes
    .map((_, i) => i)
    .sort((a, b) => nodes[b]!.bandwidthBytesPerSecond - nodes[a]!.bandwidthBytesPerSecond || cmp(nodes[a]!.name, nodes[b]!.name));
  const pinnedNames = new Set(o.pinned);
  const pinned = new Set(nodes.flatMap((n, i) => (pinnedNames.has(n.name) ? [i] : [])));
  return {
    mm,
    memory,
    nodes,
    order,
    budgets: nodes.map((n) => n.budgetBytes - o.safetyMarginBytes),
    memPrefix,
    readPrefix,
    attnPrefix,
    flopPrefix,
    wd,
    wt,
    invBw,
    invAttn,
    invFlops,
    hopCost,
    hopByHead,
    hopPrefill,
    hopPrefillByHead,
    chainWirePrefix,
    saveWirePrefix,
    saveTripsPrefix,
    links,
    linksByHead,
    ubatches,
    pipelined: overlapsUbatches(o) && ubatches > 1 && wt > 0,
    headCost,
    headFixed,
    workerConst: memory.workerFixed.total,
    headConst: memory.headConst,
    headConstSingle: memory.headConstSingle,
    // The head reads the output head in full and one token_embd row per token.
    headRead,
    pinned,
    o,
  };
}

export function resolveOptions(options: Partial<PlacementOptions> | undefined): PlacementOptions {
  return { ...DEFAULT_PLACEMENT_OPTIONS, ...options };
}
