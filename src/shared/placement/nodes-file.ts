import { z } from 'zod';
import { lookupChip } from '../chips.ts';
import { UsageError } from '../errors.ts';
// Pure budget arithmetic shared with the node agent's probe (no I/O in that module).
import { usableBudget, wiredLimitBytes } from '../budget.ts';
import { type EngineFamily, defaultPrefillFlops, effectiveBandwidth } from './cost.ts';
import type { PlacementNode } from './types.ts';

/**
 * NODES.json: an array of node profiles for planning without a live cluster. Validated once,
 * here, at the edge. `budgetBytes` wins when given; otherwise the budget is computed the way the
 * node agent computes it (min(wired limit, RAM − OS reserve) − margin), with the macOS default
 * wired limit modelled when `wiredLimitBytes` is absent. `chip` fills the bandwidth from the chip
 * table when `bandwidthBytesPerSecond` is absent (slowest configuration of that chip unless
 * `gpuCores` says which one). Both are spec (peak) figures: the planner gets them × the engine's
 * decode efficiency (cost.ts) unless `effectiveBandwidthBytesPerSecond` gives a measurement.
 */
const byteCount = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
export const NodeFileEntry = z
  .object({
    name: z.string().min(1),
    memoryBytes: byteCount.positive(),
    bandwidthBytesPerSecond: z.number().positive().finite().optional(),
    chip: z.string().min(1).optional(),
    gpuCores: z.number().int().positive().optional(),
    wiredLimitBytes: byteCount.optional(),
    budgetBytes: byteCount.optional(),
    hopSeconds: z.number().nonnegative().finite().optional(),
    /** Decode bandwidth the node measured with the engine (`orchard node --calibrate`); wins over the estimate. */
    effectiveBandwidthBytesPerSecond: z.number().positive().finite().optional(),
    prefillFlopsPerSecond: z.number().positive().finite().optional(),
    /** Seconds per token the node's engine pays as the head whatever it reads (the calibration's fit); else headOverheadSeconds. */
    decodeFixedSecondsPerToken: z.number().nonnegative().finite().optional(),
    /** Seconds per round trip a boundary with this node as the worker costs beyond the link's (the calibration's tunnel); else boundaryOverheadSeconds (0). */
    boundaryOverheadSeconds: z.number().nonnegative().finite().optional(),
    /** FLOP/s of attention in decode (the calibration's); else a token's attention costs its KV bytes alone. */
    decodeAttentionFlopsPerSecond: z.number().positive().finite().optional(),
    linkBytesPerSecond: z.number().positive().finite().optional(),
  })
  .strict();
export const NodesFile = z.array(NodeFileEntry).min(1, 'the nodes file lists no nodes');
export type NodeFileEntry = z.infer<typeof NodeFileEntry>;

export function resolveNode(e: NodeFileEntry, engine: EngineFamily = 'llama.cpp'): PlacementNode {
  let bandwidth = e.bandwidthBytesPerSecond;
  if (bandwidth === undefined) {
    if (e.chip === undefined) throw new UsageError(`node ${e.name}: give bandwidthBytesPerSecond or a chip name`);
    const chip = lookupChip(e.chip, e.gpuCores === undefined ? {} : { gpuCores: e.gpuCores });
    if (!chip) throw new UsageError(`node ${e.name}: unknown chip "${e.chip}"; give bandwidthBytesPerSecond`);
    bandwidth = chip.bandwidthBytesPerSecond;
  }
  const budget =
    e.budgetBytes ?? usableBudget({ memoryBytes: e.memoryBytes, wiredLimitBytes: wiredLimitBytes(e.memoryBytes, e.wiredLimitBytes) }).budgetBytes;
  if (budget > e.memoryBytes) throw new UsageError(`node ${e.name}: budgetBytes exceeds memoryBytes`);
  const effective = effectiveBandwidth(bandwidth, engine, e.effectiveBandwidthBytesPerSecond);
  return {
    name: e.name,
    budgetBytes: budget,
    bandwidthBytesPerSecond: effective,
    prefillFlopsPerSecond: e.prefillFlopsPerSecond ?? defaultPrefillFlops(effective, e.gpuCores),
    ...(e.hopSeconds === undefined ? {} : { hopSeconds: e.hopSeconds }),
    ...(e.decodeFixedSecondsPerToken === undefined ? {} : { decodeFixedSecondsPerToken: e.decodeFixedSecondsPerToken }),
    ...(e.boundaryOverheadSeconds === undefined ? {} : { boundaryOverheadSeconds: e.boundaryOverheadSeconds }),
    ...(e.decodeAttentionFlopsPerSecond === undefined ? {} : { decodeAttentionFlopsPerSecond: e.decodeAttentionFlopsPerSecond }),
    ...(e.linkBytesPerSecond === undefined ? {} : { linkBytesPerSecond: e.linkBytesPerSecond }),
  };
}

/** Parse and validate the text of a NODES.json file; errors name the file and the field. */
export function parseNodesFile(text: string, source: string, engine: EngineFamily = 'llama.cpp'): PlacementNode[] {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`${source}: not valid JSON (${(err as Error).message})`);
  }
  const r = NodesFile.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    const where = issue.path.length ? ` at ${issue.path.join('.')}` : '';
    throw new UsageError(`${source}: invalid nodes file${where}: ${issue.message}`);
  }
  const names = new Set<string>();
  for (const n of r.data) {
    if (names.has(n.name)) throw new UsageError(`${source}: node name "${n.name}" appears twice`);
    names.add(n.name);
  }
  return r.data.map((e) => resolveNode(e, engine));
}
