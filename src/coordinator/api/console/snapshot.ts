import type { DiscoveredAgent } from '../../membership/discovered.ts';
import type { NodeEntry } from '../../membership/registry.ts';
import type { LoadProgress, ModelStatus } from '../../instances/runtime.ts';

/**
 * What the console draws, as plain JSON: one snapshot of the cluster (nodes with their memory
 * figures, models with placement, progress and request stats). Pure: the feed gathers the inputs,
 * these functions shape them, so the page's contract is tested without a browser.
 *
 * Memory figures are the node profile's, the same numbers `orchard status --json` prints;
 * "used by engines" is what Orchard placed there: the planned bytes of every stage of a model
 * that is not failed (the planner subtracts the same sum from a node's budget for the next load).
 */

export interface ConsoleNode {
  readonly id: string;
  readonly name: string;
  readonly chip: string;
  readonly os: string;
  readonly state: NodeEntry['state'];
  readonly stateSinceMs: number;
  readonly address: string;
  readonly memoryBytes: number;
  readonly budgetBytes: number;
  readonly wiredLimitBytes: number;
  readonly bandwidthBytesPerSecond: number;
  readonly usedByEnginesBytes: number;
  readonly availableBytes: number | null;
  readonly memoryPressure: string | null;
}

/**
 * An agent announced on Bonjour that is not a member (no certificate of this cluster): what its
 * record claims, unproven, and why it could not be dialled. Never planned on.
 */
export interface ConsoleDiscovered {
  readonly address: string;
  readonly claimedId: string;
  readonly name: string;
  readonly chip: string;
  readonly memoryBytes: number;
  readonly firstSeenMs: number;
  readonly reason: string;
}

export interface ConsoleStage {
  readonly nodeId: string;
  readonly nodeName: string;
  readonly firstLayer: number;
  readonly lastLayer: number;
  readonly totalBytes: number;
  readonly budgetBytes: number;
}

/** Per-model request figures, read from the coordinator's own metrics. */
export interface ModelStats {
  readonly measuredTokensPerSecond: number | null;
  readonly ttftP50Seconds: number | null;
  readonly running: number;
  readonly queued: number;
}

export interface ConsoleModel extends ModelStats {
  readonly name: string;
  readonly path: string;
  readonly engine: string;
  readonly state: ModelStatus['state'];
  readonly error: string;
  readonly progress: Pick<LoadProgress, 'phase' | 'message' | 'bytesDone' | 'bytesTotal' | 'elapsedSeconds'> | null;
  readonly stages: readonly ConsoleStage[];
  readonly layerCount: number;
  readonly predictedTokensPerSecond: number;
  readonly ctx: number;
  readonly cacheType: string;
  readonly parallel: number;
}

export interface ConsoleSnapshot {
  readonly clusterId: string;
  readonly nodes: readonly ConsoleNode[];
  readonly discovered: readonly ConsoleDiscovered[];
  readonly models: readonly ConsoleModel[];
}

// lastSeenMs is left out: it moves with every Bonjour refresh, and each change would push a snapshot to every page.
export function consoleDiscovered(d: DiscoveredAgent): ConsoleDiscovered {
  return { address: d.address, claimedId: d.nodeId, name: d.name, chip: d.chip, memoryBytes: d.memoryBytes, firstSeenMs: d.firstSeenMs, reason: d.reason };
}

/** Bytes Orchard's engines hold on each node: planned stage totals of models that are not failed. */
export function usedByEngines(models: readonly ModelStatus[]): Map<string, number> {
  const used = new Map<string, number>();
  for (const m of models) {
    if (m.state === 'failed' || m.state === 'recovering') continue;
    for (const s of m.stages) used.set(s.nodeId, (used.get(s.nodeId) ?? 0) + s.bytes.total);
  }
  return used;
}

const AVAILABLE_QUANTUM = 64 * 2 ** 20;

export function consoleNode(n: NodeEntry, usedBytes: number): ConsoleNode {
  const p = n.profile;
  return {
    id: n.nodeId,
    name: p.name,
    chip: p.chip,
    os: `${p.os} ${p.osVersion}`,
    state: n.state,
    stateSinceMs: n.stateSinceMs,
    address: n.address,
    memoryBytes: p.memoryBytes,
    budgetBytes: p.budgetBytes,
    wiredLimitBytes: p.wiredLimitBytes,
    bandwidthBytesPerSecond: p.bandwidthBytesPerSecond,
    usedByEnginesBytes: usedBytes,
    // Quantized: the OS figure moves by kilobytes with every stats message, and each change would
    // push a new snapshot to every open page; the page shows it to 0.1 GiB.
    availableBytes: n.live ? Math.round(n.live.availableBytes / AVAILABLE_QUANTUM) * AVAILABLE_QUANTUM : null,
    memoryPressure: n.live ? n.live.memoryPressure : null,
  };
}

export function consoleModel(m: ModelStatus, stats: ModelStats, progress: LoadProgress | undefined): ConsoleModel {
  return {
    name: m.name,
    path: m.path,
    engine: m.engine,
    state: m.state,
    error: m.error,
    // Progress belongs to a load in flight (or a recovery's reload); a ready or failed model shows its state instead.
    progress: progress && (m.state === 'loading' || m.state === 'recovering') ? { phase: progress.phase, message: progress.message, bytesDone: progress.bytesDone, bytesTotal: progress.bytesTotal, elapsedSeconds: progress.elapsedSeconds } : null,
    stages: m.stages.map((s) => ({ nodeId: s.nodeId, nodeName: s.nodeName, firstLayer: s.firstLayer, lastLayer: s.lastLayer, totalBytes: s.bytes.total, budgetBytes: s.budgetBytes })),
    layerCount: m.stages.reduce((n, s) => Math.max(n, s.lastLayer + 1), 0),
    predictedTokensPerSecond: m.predictedTokensPerSecond,
    ctx: m.options.ctx,
    cacheType: m.options.cacheType,
    parallel: m.options.parallel,
    ...stats,
  };
}

export interface Bucket {
  /** Upper bound (Infinity for +Inf). */
  readonly le: number;
  /** Cumulative count of observations ≤ le. */
  readonly count: number;
}

/**
 * The q-quantile of a cumulative histogram, interpolated linearly inside the bucket that holds
 * it (Prometheus' histogram_quantile). Null without observations; the highest finite bound when
 * the quantile falls in +Inf.
 */
export function histogramQuantile(q: number, buckets: readonly Bucket[]): number | null {
  const sorted = [...buckets].sort((a, b) => a.le - b.le);
  const total = sorted.at(-1)?.count ?? 0;
  if (total <= 0) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const b of sorted) {
    if (b.count >= rank) {
      if (!Number.isFinite(b.le)) return prevLe;
      const inBucket = b.count - prevCount;
      return inBucket > 0 ? prevLe + ((b.le - prevLe) * (rank - prevCount)) / inBucket : b.le;
    }
    prevLe = b.le;
    prevCount = b.count;
  }
  return prevLe;
}

/** Mean decode speed from the inter-token latency histogram's sum and count. */
export function tokensPerSecondFromItl(sumSeconds: number, count: number): number | null {
  return count > 0 && sumSeconds > 0 ? count / sumSeconds : null;
}
