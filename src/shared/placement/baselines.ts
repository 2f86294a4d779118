import { memoryModel, stageBytes } from '../memory/stage.ts';
import type { ModelProfile } from '../model/profile.ts';
import { llamaLayerDevices } from './llama-args.ts';
import { DEFAULT_PLACEMENT_OPTIONS, type PlacementNode, type PlacementOptions } from './types.ts';

/**
 * The placements Orchard competes with, evaluated with Orchard's own cost model and memory math
 * so the comparison is like for like (bench/placement.ts).
 *
 * - exo-style: every node gets layers in proportion to its free RAM, counting weights only
 *   (no KV cache, no compute buffers, no wired limit) — exo's `get_shard_assignments`.
 * - llama.cpp default: every device gets a share of n_layer + 1 units in proportion to the free
 *   memory it reports (Metal: the wired limit), mapped with llama.cpp's own float32 rule.
 *
 * Both use all nodes in the given order with the last as head (llama.cpp: local device last).
 */
export interface BaselineStage {
  readonly node: string;
  readonly firstLayer: number;
  readonly lastLayer: number;
  readonly totalBytes: number;
  readonly budgetBytes: number;
}

export interface BaselinePlan {
  readonly stages: readonly BaselineStage[];
  readonly secondsPerToken: number;
  readonly tokensPerSecond: number;
  /** Stages whose predicted bytes (KV and compute included) exceed the node's budget. */
  readonly budgetViolations: number;
}

/** Split L layers by weights ∝ `shares` with largest-remainder rounding (exo rounds similarly). */
export function proportionalLayers(layerCount: number, shares: readonly number[]): number[] {
  const sum = shares.reduce((a, b) => a + b, 0);
  const raw = shares.map((s) => (sum > 0 ? (s / sum) * layerCount : layerCount / shares.length));
  const counts = raw.map(Math.floor);
  let left = layerCount - counts.reduce((a, b) => a + b, 0);
  const order = raw.map((r, i) => [r - Math.floor(r), i] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  for (const [, i] of order) {
    if (left <= 0) break;
    counts[i]!++;
    left--;
  }
  return counts;
}

/** Evaluate contiguous per-node layer counts (in pipeline order, last = head) with Orchard's model. */
export function evaluateCounts(
  p: ModelProfile,
  nodes: readonly PlacementNode[],
  counts: readonly number[],
  options?: Partial<PlacementOptions>,
): BaselinePlan {
  const o = { ...DEFAULT_PLACEMENT_OPTIONS, ...options };
  const mm = memoryModel(p, o, o.kvFill);
  const used = counts.map((c, i) => ({ c, i })).filter(({ c, i }) => c > 0 || i === counts.length - 1);
  const pipeline = used.length > 1;
  const stages: BaselineStage[] = [];
  let first = 0;
  let seconds = 0;
  let violations = 0;
  used.forEach(({ c, i }, idx) => {
    const node = nodes[i]!;
    const isHead = idx === used.length - 1;
    const bytes = stageBytes(mm, first, first + c - 1, isHead, pipeline);
    let read = 0;
    for (let l = first; l < first + c; l++) read += mm.layerRead[l]!;
    if (isHead) read += p.outputBytes + p.outputNormBytes + p.otherBytes + p.tokenEmbdRowBytes;
    seconds += read / node.bandwidthBytesPerSecond;
    if (!isHead) seconds += node.hopSeconds ?? o.hopSeconds;
    if (bytes.total > node.budgetBytes) violations++;
    stages.push({ node: node.name, firstLayer: first, lastLayer: first + c - 1, totalBytes: bytes.total, budgetBytes: node.budgetBytes });
    first += c;
  });
  seconds += o.headOverheadSeconds;
  return { stages, secondsPerToken: seconds, tokensPerSecond: 1 / seconds, budgetViolations: violations };
}

/** exo-style: layers ∝ free RAM, weights only, all nodes. */
export function ramProportionalPlan(
  profile: ModelProfile,
  nodes: readonly PlacementNode[],
  freeRamBytes: readonly number[],
  options?: Partial<PlacementOptions>,
): BaselinePlan {
  return evaluateCounts(profile, nodes, proportionalLayers(profile.layerCount, freeRamBytes), options);
}

/** llama.cpp default: n_layer + 1 units ∝ reported free device memory, llama.cpp's own mapping. */
export function freeMemoryProportionalPlan(
  profile: ModelProfile,
  nodes: readonly PlacementNode[],
  freeDeviceBytes: readonly number[],
  options?: Partial<PlacementOptions>,
): BaselinePlan {
  const units = llamaLayerDevices(freeDeviceBytes, profile.layerCount);
  const counts = nodes.map(() => 0);
  for (let il = 0; il < profile.layerCount; il++) counts[units[il]!]!++;
  // The output layer (unit n_layer) lands on units[n_layer]; llama.cpp's head is that device.
  // With proportional shares it is always the last device with a non-zero share.
  return evaluateCounts(profile, nodes, counts, options);
}
