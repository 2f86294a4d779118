/**
 * bench:placement — Orchard's planner vs exo's real rule (smallest node set whose free RAM covers
 * the weights, the one with the most RAM, layers ∝ RAM — src/shared/placement/baselines.ts cites
 * exo's code) and llama.cpp's default split (every device ∝ free device memory), all evaluated
 * with the same cost model and memory math, over clusters of real Apple SKUs × header-only model
 * presets: 24 random clusters plus 6 heterogeneous ones built so that bandwidth matters (a
 * big-RAM slow node next to smaller fast ones). Also: planner speed on 64 nodes × 126 layers.
 *
 * Honest comparison: a baseline plan that overflows a node's real budget (wired limit, RAM, with
 * KV cache and compute buffers) would not load, so its speed ratio is not counted; it is counted
 * as a budget violation instead. Speed ratios are Orchard ÷ baseline predicted tok/s.
 *
 * Usage: node --import tsx bench/placement.ts [--json]
 * Everything is pure computation; the numbers are predictions of the cost model (chip table ×
 * llama.cpp decode efficiency, 1 ms + activations per hop), not measurements on Macs.
 */
import { lookupChip } from '../src/shared/chips.ts';
import { osReserveBytes, usableBudget, wiredLimitBytes } from '../src/shared/budget.ts';
import type { CacheType } from '../src/shared/memory/kv.ts';
import { type ModelProfile, modelProfile } from '../src/shared/model/profile.ts';
import { presetHeader } from '../src/shared/model/shapes.ts';
import type { PresetQuant } from '../src/shared/testmodel/quant-mix.ts';
import { exoPlan, freeMemoryProportionalPlan } from '../src/shared/placement/baselines.ts';
import { effectiveBandwidth } from '../src/shared/placement/cost.ts';
import { planPlacement } from '../src/shared/placement/planner.ts';
import type { PlacementNode } from '../src/shared/placement/types.ts';
import { uniformSource } from '../src/shared/testmodel/prng.ts';

const GiB = 2 ** 30;

interface Sku {
  label: string;
  chip: string;
  gpuCores?: number;
  ramGiB: number;
}
/** Real configurations Apple sells (chip table rows). */
const SKUS: Sku[] = [
  { label: 'Air-M2-24', chip: 'Apple M2', ramGiB: 24 },
  { label: 'Air-M3-16', chip: 'Apple M3', ramGiB: 16 },
  { label: 'Air-M3-24', chip: 'Apple M3', ramGiB: 24 },
  { label: 'mini-M4-32', chip: 'Apple M4', ramGiB: 32 },
  { label: 'mini-M4Pro-64', chip: 'Apple M4 Pro', gpuCores: 20, ramGiB: 64 },
  { label: 'MBP-M3Pro-36', chip: 'Apple M3 Pro', gpuCores: 18, ramGiB: 36 },
  { label: 'MBP-M3Max-128', chip: 'Apple M3 Max', gpuCores: 40, ramGiB: 128 },
  { label: 'MBP-M4Max-36', chip: 'Apple M4 Max', gpuCores: 32, ramGiB: 36 },
  { label: 'MBP-M4Max-128', chip: 'Apple M4 Max', gpuCores: 40, ramGiB: 128 },
  { label: 'Studio-M1Max-64', chip: 'Apple M1 Max', gpuCores: 32, ramGiB: 64 },
  { label: 'Studio-M1Ultra-128', chip: 'Apple M1 Ultra', gpuCores: 64, ramGiB: 128 },
  { label: 'Studio-M2Ultra-192', chip: 'Apple M2 Ultra', gpuCores: 76, ramGiB: 192 },
  { label: 'Studio-M3Ultra-256', chip: 'Apple M3 Ultra', gpuCores: 80, ramGiB: 256 },
  { label: 'Studio-M3Ultra-96', chip: 'Apple M3 Ultra', gpuCores: 60, ramGiB: 96 },
];

const sku = (label: string, chip: string, gpuCores: number | undefined, ramGiB: number): Sku => ({ label, chip, ramGiB, ...(gpuCores ? { gpuCores } : {}) });
/** Big-RAM slow nodes next to smaller fast ones: exo's "most RAM" choice lands on the slow one. */
const HETEROGENEOUS: Sku[][] = [
  [sku('MBP-M3Max30-96', 'Apple M3 Max', 30, 96), sku('MBP-M4Max-64', 'Apple M4 Max', 40, 64), sku('MBP-M4Max-64', 'Apple M4 Max', 40, 64)],
  [sku('mini-M4Pro-64', 'Apple M4 Pro', 20, 64), sku('MBP-M4Max-48', 'Apple M4 Max', 40, 48), sku('Studio-M2Ultra-64', 'Apple M2 Ultra', 76, 64)],
  [sku('MBP-M3Max30-96', 'Apple M3 Max', 30, 96), sku('Studio-M2Ultra-64', 'Apple M2 Ultra', 76, 64)],
  [sku('mini-M4Pro-64', 'Apple M4 Pro', 20, 64), sku('MBP-M4Max-36', 'Apple M4 Max', 32, 36), sku('MBP-M4Max-36', 'Apple M4 Max', 32, 36)],
  [sku('Studio-M1Max-64', 'Apple M1 Max', 32, 64), sku('MBP-M3Pro-36', 'Apple M3 Pro', 18, 36), sku('MBP-M4Max-48', 'Apple M4 Max', 40, 48), sku('MBP-M4Max-48', 'Apple M4 Max', 40, 48)],
  [sku('MBP-M3Max30-96', 'Apple M3 Max', 30, 96), sku('mini-M4Pro-64', 'Apple M4 Pro', 20, 64), sku('Studio-M1Ultra-64', 'Apple M1 Ultra', 48, 64), sku('Studio-M1Ultra-64', 'Apple M1 Ultra', 48, 64)],
];

interface ClusterNode extends PlacementNode {
  readonly memoryBytes: number;
  readonly wiredBytes: number;
}

function node(sku: Sku, i: number): ClusterNode {
  const chip = lookupChip(sku.chip, sku.gpuCores === undefined ? {} : { gpuCores: sku.gpuCores });
  if (!chip) throw new Error(`chip ${sku.chip} missing from the chip table`);
  const memoryBytes = sku.ramGiB * GiB;
  const wired = wiredLimitBytes(memoryBytes, undefined);
  return {
    name: `${sku.label}#${i}`,
    budgetBytes: usableBudget({ memoryBytes, wiredLimitBytes: wired }).budgetBytes,
    bandwidthBytesPerSecond: effectiveBandwidth(chip.bandwidthBytesPerSecond, 'llama.cpp'),
    memoryBytes,
    wiredBytes: wired,
  };
}

/** 24 clusters of 2–8 nodes, deterministic, in "discovery" order (not sorted by speed); then the heterogeneous ones. */
function clusters(): { nodes: ClusterNode[]; heterogeneous: boolean }[] {
  const r = uniformSource(2026);
  const out: { nodes: ClusterNode[]; heterogeneous: boolean }[] = [];
  for (let c = 0; c < 24; c++) {
    const n = 2 + (c % 7);
    out.push({ nodes: Array.from({ length: n }, (_, i) => node(SKUS[Math.floor(r() * SKUS.length)]!, i)), heterogeneous: false });
  }
  for (const h of HETEROGENEOUS) out.push({ nodes: h.map((s, i) => node(s, i)), heterogeneous: true });
  return out;
}

const MODELS: { shape: string; quant: PresetQuant; ctx: number; cache: CacheType }[] = [
  { shape: 'llama-3-8b', quant: 'f16', ctx: 8192, cache: 'f16' },
  { shape: 'qwen2.5-32b', quant: 'q8_0', ctx: 32768, cache: 'f16' },
  { shape: 'mixtral-8x7b', quant: 'q4_k_m', ctx: 32768, cache: 'q8_0' },
  { shape: 'gemma-2-27b', quant: 'q8_0', ctx: 8192, cache: 'f16' },
  { shape: 'llama-3-70b', quant: 'q4_k_m', ctx: 8192, cache: 'f16' },
  { shape: 'llama-3-70b', quant: 'q8_0', ctx: 32768, cache: 'q8_0' },
  { shape: 'llama-3.1-405b', quant: 'q4_k_m', ctx: 4096, cache: 'f16' },
];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/**
 * Median planning time for 64 nodes × the 126-layer 405B. `distinct`: every node differs (no
 * two interchangeable, the planner's worst case); otherwise real SKUs repeat as in a real fleet.
 */
function plannerSpeed(profile: ModelProfile, distinct: boolean): { medianMs: number; runs: number; nodes: number; layers: number } {
  const r = uniformSource(64);
  const nodes: PlacementNode[] = Array.from({ length: 64 }, (_, i) => {
    const n = node(SKUS[Math.floor(r() * SKUS.length)]!, i);
    return distinct ? { ...n, budgetBytes: n.budgetBytes - i * 2 ** 20, bandwidthBytesPerSecond: n.bandwidthBytesPerSecond + i * 1e6 } : n;
  });
  const times: number[] = [];
  for (let i = 0; i < 31; i++) {
    const t = performance.now();
    planPlacement(profile, nodes, { ctx: 4096 });
    times.push(performance.now() - t);
  }
  return { medianMs: median(times), runs: times.length, nodes: nodes.length, layers: profile.layerCount };
}

interface Tally {
  readonly exo: number[];
  readonly exoHeterogeneous: number[];
  readonly llama: number[];
  readonly violations: { orchard: number; exo: number; llamaDefault: number };
  exoRefused: number;
}

/** One cluster × model: Orchard's plan, both baselines, ratios only where the baseline fits. */
function scenario(cluster: { nodes: ClusterNode[]; heterogeneous: boolean }, profile: ModelProfile, m: (typeof MODELS)[number], t: Tally) {
  const options = { ctx: m.ctx, cacheType: m.cache };
  const plan = planPlacement(profile, cluster.nodes, options);
  if (!plan.fits) return undefined;
  // exo: ram_available = RAM − OS reserve (idle machine); llama.cpp: device free memory = wired limit.
  const exo = exoPlan(profile, cluster.nodes, cluster.nodes.map((n) => n.memoryBytes - osReserveBytes(n.memoryBytes)), options);
  const llama = freeMemoryProportionalPlan(profile, cluster.nodes, cluster.nodes.map((n) => n.wiredBytes), options);
  if (plan.stages.some((s) => s.bytes.total > s.budgetBytes)) t.violations.orchard++;
  if (!exo) t.exoRefused++;
  else if (exo.budgetViolations > 0) t.violations.exo++;
  if (llama.budgetViolations > 0) t.violations.llamaDefault++;
  // Ratios rounded to 1e-9: equal plans summed in another order differ in the last float bit.
  const ratio = (x: number) => Number((plan.predicted.tokensPerSecond / x).toFixed(9));
  const vsExo = exo && exo.budgetViolations === 0 ? ratio(exo.tokensPerSecond) : undefined;
  const vsLlama = llama.budgetViolations === 0 ? ratio(llama.tokensPerSecond) : undefined;
  if (vsExo !== undefined) (cluster.heterogeneous ? t.exoHeterogeneous : t.exo).push(vsExo);
  if (vsLlama !== undefined) t.llama.push(vsLlama);
  const stages = (st: readonly { node: string; firstLayer: number; lastLayer: number }[]) => st.map((s) => `${s.node}:${s.firstLayer}-${s.lastLayer}`);
  return {
    nodes: cluster.nodes.map((n) => n.name),
    heterogeneous: cluster.heterogeneous,
    model: `${m.shape} ${m.quant} ctx ${m.ctx} kv ${m.cache}`,
    orchard: { tokensPerSecond: plan.predicted.tokensPerSecond, stages: stages(plan.stages) },
    exo: exo ? { tokensPerSecond: exo.tokensPerSecond, budgetViolations: exo.budgetViolations, stages: stages(exo.stages) } : null,
    llamaDefault: { tokensPerSecond: llama.tokensPerSecond, budgetViolations: llama.budgetViolations, stages: stages(llama.stages) },
    speedupVsExo: vsExo ?? null,
    speedupVsLlamaDefault: vsLlama ?? null,
  };
}

const summary = (xs: number[]) => ({ median: xs.length ? median(xs) : null, min: xs.length ? Math.min(...xs) : null, fitting: xs.length });

function main(): void {
  const json = process.argv.includes('--json');
  const profiles = new Map<string, ModelProfile>();
  const profileOf = (shape: string, quant: PresetQuant) => {
    const key = `${shape}/${quant}`;
    let p = profiles.get(key);
    if (!p) {
      p = modelProfile(presetHeader(shape, quant));
      profiles.set(key, p);
    }
    return p;
  };
  const t: Tally = { exo: [], exoHeterogeneous: [], llama: [], violations: { orchard: 0, exo: 0, llamaDefault: 0 }, exoRefused: 0 };
  const details: Record<string, unknown>[] = [];
  let noFit = 0;
  const all = clusters();
  for (const cluster of all) {
    for (const m of MODELS) {
      const s = scenario(cluster, profileOf(m.shape, m.quant), m, t);
      if (s) details.push(s);
      else noFit++;
    }
  }
  const speed = plannerSpeed(profileOf('llama-3.1-405b', 'q4_k_m'), false);
  const speedDistinct = plannerSpeed(profileOf('llama-3.1-405b', 'q4_k_m'), true);
  const out = {
    scenarios: details.length,
    vsExo: { ...summary([...t.exo, ...t.exoHeterogeneous]), heterogeneousMedian: t.exoHeterogeneous.length ? median(t.exoHeterogeneous) : null, heterogeneousFitting: t.exoHeterogeneous.length },
    vsLlamaDefault: summary(t.llama),
    budgetViolations: t.violations,
    clusters: all.length,
    heterogeneousClusters: HETEROGENEOUS.length,
    scenariosNotFitting: noFit,
    exoRefused: t.exoRefused,
    plannerSpeed: speed,
    plannerSpeedAllNodesDistinct: speedDistinct,
    note: 'predicted by the cost model (chip bandwidth × llama.cpp decode efficiency, 1 ms + activations per hop); ratios count only baseline plans that fit their nodes\' real budgets (KV cache, compute buffers, wired limit); the others are budget violations: they would fail to load',
    ...(json ? { details } : {}),
  };
  process.stdout.write(`${JSON.stringify(out, null, json ? 0 : 2)}\n`);
}

main();
