/**
 * Apple Silicon chips: CPU/GPU core counts, memory bandwidth and RAM options per configuration.
 *
 * Why a table: decode at batch 1 is bandwidth-bound, so the planner needs each node's memory
 * bandwidth, and macOS exposes no sysctl for it. Bandwidth is a property of the chip
 * *configuration*, not just its name: Apple bins some dies with fewer GPU cores AND fewer memory
 * channels (M3 Max 14-core CPU / 30-core GPU = 300 GB/s vs 16C/40C = 400 GB/s; M4 Max 14C/32C =
 * 410 GB/s vs 16C/40C = 546 GB/s), so a row is one configuration and `lookupChip` picks the row
 * from the GPU core count (system_profiler) or the performance core count (sysctl).
 *
 * Sources: Apple's published tech specs / newsroom figures (bandwidth in decimal GB/s as Apple
 * quotes it), cross-checked with the project seeds (/work/shared/seeds, which round M3 Ultra to
 * 800 — Apple quotes 819 GB/s). Rows marked `approximate` are figures that could not be
 * cross-checked against Apple's spec pages here (M5 Pro/Max were announced March 2026; the binned
 * M5 Max figure is an estimate); treat them as such.
 *
 * Core counts: on macOS `hw.perflevel0.physicalcpu` is the fastest cluster and
 * `hw.perflevel1.physicalcpu` the second. For M1–M5 base/Pro/Max/Ultra up to M4 those are
 * performance and efficiency cores; on M5 Pro/Max Apple's tiers are "super" cores (perflevel0)
 * and "performance" cores (perflevel1) — we keep the perflevel order and call them perf/eff.
 */

export type ChipFamily = 'M1' | 'M2' | 'M3' | 'M4' | 'M5';
export type ChipTier = 'base' | 'Pro' | 'Max' | 'Ultra';

export interface ChipVariant {
  readonly family: ChipFamily;
  readonly tier: ChipTier;
  /** Marketing name as `machdep.cpu.brand_string` prints it, e.g. "Apple M3 Max". */
  readonly name: string;
  /** perflevel0 cores (performance; "super" on M5 Pro/Max). */
  readonly perfCores: number;
  /** perflevel1 cores (efficiency; "performance" on M5 Pro/Max). */
  readonly effCores: number;
  /** GPU core counts this CPU configuration ships with (all at the same bandwidth). */
  readonly gpuCores: readonly number[];
  readonly bandwidthBytesPerSecond: number;
  /** Unified memory options in GB as Apple sells them (binary: 16 GB = 16 GiB). */
  readonly ramGB: readonly number[];
  /** True when the figures could not be cross-checked against Apple's published specs. */
  readonly approximate: boolean;
}

const GBps = 1e9;

type Row = [ChipFamily, ChipTier, number, number, number[], number, number[], boolean?];

// family, tier, perf, eff, gpu cores, GB/s, RAM GB options, approximate?
const ROWS: readonly Row[] = [
  ['M1', 'base', 4, 4, [7, 8], 68.25, [8, 16]],
  ['M1', 'Pro', 6, 2, [14], 200, [16, 32]],
  ['M1', 'Pro', 8, 2, [14, 16], 200, [16, 32]],
  ['M1', 'Max', 8, 2, [24, 32], 400, [32, 64]],
  ['M1', 'Ultra', 16, 4, [48, 64], 800, [64, 128]],

  ['M2', 'base', 4, 4, [8, 10], 100, [8, 16, 24]],
  ['M2', 'Pro', 6, 4, [16], 200, [16, 32]],
  ['M2', 'Pro', 8, 4, [19], 200, [16, 32]],
  ['M2', 'Max', 8, 4, [30, 38], 400, [32, 64, 96]],
  ['M2', 'Ultra', 16, 8, [60, 76], 800, [64, 128, 192]],

  ['M3', 'base', 4, 4, [8, 10], 100, [8, 16, 24]],
  ['M3', 'Pro', 5, 6, [14], 150, [18, 36]],
  ['M3', 'Pro', 6, 6, [18], 150, [18, 36]],
  ['M3', 'Max', 10, 4, [30], 300, [36, 96]],
  ['M3', 'Max', 12, 4, [40], 400, [48, 64, 128]],
  ['M3', 'Ultra', 20, 8, [60], 819, [96, 256]],
  ['M3', 'Ultra', 24, 8, [80], 819, [96, 256, 512]],

  ['M4', 'base', 4, 4, [8], 120, [16, 24, 32]],
  ['M4', 'base', 4, 6, [8, 10], 120, [16, 24, 32]],
  ['M4', 'Pro', 8, 4, [16], 273, [24, 48, 64]],
  ['M4', 'Pro', 10, 4, [20], 273, [24, 48, 64]],
  ['M4', 'Max', 10, 4, [32], 410, [36]],
  ['M4', 'Max', 12, 4, [40], 546, [48, 64, 128]],

  ['M5', 'base', 4, 6, [8, 10], 153, [16, 24, 32]],
  ['M5', 'Pro', 6, 12, [16, 20], 307, [24, 48, 64], true],
  ['M5', 'Max', 6, 12, [32], 460, [36, 48], true],
  ['M5', 'Max', 6, 12, [40], 614, [48, 64, 128], true],
];

export const CHIPS: readonly ChipVariant[] = ROWS.map(([family, tier, perf, eff, gpu, gbps, ram, approx]) => ({
  family,
  tier,
  name: tier === 'base' ? `Apple ${family}` : `Apple ${family} ${tier}`,
  perfCores: perf,
  effCores: eff,
  gpuCores: gpu,
  bandwidthBytesPerSecond: Math.round(gbps * GBps),
  ramGB: ram,
  approximate: approx ?? false,
}));

/** Split a brand string ("Apple M3 Max", "m4 pro", "Apple M2") into family and tier. */
export function parseChipBrand(brand: string): { family: string; tier: ChipTier } | undefined {
  const m = /^\s*(?:apple\s+)?(m\d+)(?:\s+(pro|max|ultra))?\s*$/i.exec(brand);
  if (!m) return undefined;
  const tierText = m[2]?.toLowerCase();
  const tier: ChipTier = tierText === undefined ? 'base' : tierText === 'pro' ? 'Pro' : tierText === 'max' ? 'Max' : 'Ultra';
  return { family: m[1]!.toUpperCase(), tier };
}

/** Every configuration of the named chip, in table order (empty when unknown). */
export function chipVariants(brand: string): readonly ChipVariant[] {
  const parsed = parseChipBrand(brand);
  if (!parsed) return [];
  return CHIPS.filter((c) => c.family === parsed.family && c.tier === parsed.tier);
}

export interface ChipHints {
  readonly gpuCores?: number;
  readonly perfCores?: number;
}

/**
 * The configuration of `brand` that matches the hints: GPU core count first (it decides the
 * binned bandwidth on M3/M4 Max), then performance-core count. When the hints are absent or match
 * nothing, the slowest configuration is returned — under-promising bandwidth makes the planner
 * conservative, over-promising makes it place layers on a node that cannot serve them in time.
 * Returns undefined for chips not in the table (non-Apple CPUs, future chips).
 */
export function lookupChip(brand: string, hints: ChipHints = {}): ChipVariant | undefined {
  const variants = chipVariants(brand);
  if (variants.length === 0) return undefined;
  let candidates = variants;
  if (hints.gpuCores !== undefined) {
    const byGpu = candidates.filter((c) => c.gpuCores.includes(hints.gpuCores!));
    if (byGpu.length > 0) candidates = byGpu;
  }
  if (hints.perfCores !== undefined) {
    const byPerf = candidates.filter((c) => c.perfCores === hints.perfCores);
    if (byPerf.length > 0) candidates = byPerf;
  }
  return slowest(candidates);
}

function slowest(variants: readonly ChipVariant[]): ChipVariant {
  let best = variants[0]!;
  for (const v of variants) if (v.bandwidthBytesPerSecond < best.bandwidthBytesPerSecond) best = v;
  return best;
}

/**
 * Conservative bandwidth for an Apple chip the table does not know (e.g. a future "Apple M6 Max"):
 * the slowest configuration of the same tier in the newest family we know. Apple has not shipped
 * a generation slower than its predecessor in the same tier except M3 Pro (150 vs 200), so this is
 * an estimate, flagged by the caller as such. Undefined when the brand is not an Apple M chip.
 */
export function estimateUnknownChipBandwidth(brand: string): number | undefined {
  const parsed = parseChipBrand(brand);
  if (!parsed) return undefined;
  const sameTier = CHIPS.filter((c) => c.tier === parsed.tier);
  // ROWS is ordered oldest family first, so the last row of the tier is the newest family.
  const newest = sameTier[sameTier.length - 1]!.family;
  return slowest(sameTier.filter((c) => c.family === newest)).bandwidthBytesPerSecond;
}
