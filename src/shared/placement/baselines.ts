import { memoryModel, stageBytes } from '../memory/stage.ts';
import type { ModelProfile } from '../model/profile.ts';
import { boundarySeconds, decodeAttentionSecondsPerFlop, headFixedSeconds, layerDecodeAttentionFlops } from './cost.ts';
import { llamaLayerDevices } from './llama-args.ts';
import { DEFAULT_PLACEMENT_OPTIONS, type PlacementNode, type PlacementOptions } from './types.ts';

/**
 * The placements Orchard competes with, evaluated with Orchard's own cost model and memory math
 * so the comparison is like for like (bench/placement.ts).
 *
 * - exo (github.com/exo-explore/exo @ b5375f8, src/exo/master/placement.py `place_instance` and
 *   placement_utils.py): candidate node sets are the topology's cycles (every subset on a full
 *   mesh); `filter_cycles_by_memory` keeps those whose summed `ram_available` covers the model's
 *   `storage_size` (weights only: no KV cache, no compute buffers, no wired limit);
 *   `get_smallest_cycles` keeps the fewest nodes; the one with the most `ram_available` wins
 *   (after a download-progress score, equal here); `allocate_layers_proportionally` splits layers
 *   ∝ `ram_available` (largest remainder, ≥ 1 layer per node). Bandwidth plays no part.
 * - llama.cpp default (src/llama-model.cpp `load_tensors`: without --tensor-split the split is
 *   each device's free memory from `ggml_backend_dev_memory`; Metal reports the wired limit):
 *   every device gets a share of n_layer + 1 units ∝ that, mapped with llama.cpp's float32 rule.
 *
 * Pipeline order is the given node order with the last as head (llama.cpp: local device last).
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
  const attention = layerDecodeAttentionFlops(p, o);
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
    let attentionFlops = 0;
    for (let l = first; l < first + c; l++) {
      read += mm.layerRead[l]!;
      attentionFlops += attention[l]!;
    }
    if (isHead) read += p.outputBytes + p.outputNormBytes + p.otherBytes + p.tokenEmbdRowBytes;
    seconds += read / node.bandwidthBytesPerSecond + attentionFlops * decodeAttentionSecondsPerFlop(node);
    if (!isHead) seconds += boundarySeconds(p, node, o).decode;
    if (bytes.total > node.budgetBytes) violations++;
    stages.push({ node: node.name, firstLayer: first, lastLayer: first + c - 1, totalBytes: bytes.total, budgetBytes: node.budgetBytes });
    first += c;
  });
  seconds += headFixedSeconds(nodes[used.at(-1)!.i]!, o);
  return { stages, secondsPerToken: seconds, tokensPerSecond: 1 / seconds, budgetViolations: violations };
}

/**
 * exo's rule (see the top of the file): the smallest node sets whose free RAM covers the weights,
 * the one with the most free RAM, layers ∝ free RAM. Undefined when no set covers the weights
 * (exo refuses to place). Exhaustive over subsets, so for the ≤ 16-node clusters of the bench.
 */
export function exoPlan(
  profile: ModelProfile,
  nodes: readonly PlacementNode[],
  ramAvailableBytes: readonly number[],
  options?: Partial<PlacementOptions>,
): BaselinePlan | undefined {
  const n = nodes.length;
  if (n > 16) throw new Error('exoPlan enumerates node subsets; give it at most 16 nodes');
  const storage = profile.fileTensorBytes;
  let best: { members: number[]; ram: number } | undefined;
  for (let mask = 1; mask < 1 << n; mask++) {
    const members = [...Array(n).keys()].filter((i) => mask & (1 << i));
    const ram = members.reduce((t, i) => t + ramAvailableBytes[i]!, 0);
    if (ram < storage || members.length > profile.layerCount) continue;
    // Fewest nodes first, then most RAM; ties keep the earlier set (exo's max() keeps the first).
    if (!best || members.length < best.members.length || (members.length === best.members.length && ram > best.ram)) best = { members, ram };
  }
  if (!best) return undefined;
  const chosen = best.members;
  const counts = proportionalLayers(
    profile.layerCount,
    chosen.map((i) => ramAvailableBytes[i]!),
  );
  // allocate_layers_proportionally: every node of the cycle gets ≥ 1 layer, taken from the largest.
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] === 0) {
      const max = counts.indexOf(Math.max(...counts));
      counts[max]!--;
      counts[i] = 1;
    }
  }
  return evaluateCounts(
    profile,
    chosen.map((i) => nodes[i]!),
    counts,
    options,
  );
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
