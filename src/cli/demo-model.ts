import { dirname, join } from 'node:path';
import { mkdir, stat } from 'node:fs/promises';
import { llamaCacheDir } from '../node/llama/cache.ts';
import { OrchardError } from '../shared/errors.ts';
import { writeGguf } from '../shared/gguf/writer.ts';
import type { ModelProfile } from '../shared/model/profile.ts';
import { planPlacement } from '../shared/placement/planner.ts';
import type { CacheType } from '../shared/memory/kv.ts';
import { WORKER_OVERHEAD_BYTES } from '../shared/memory/stage.ts';
import { type LlamaTestShape, llamaTestModelSpec } from '../shared/testmodel/llama.ts';
import { loadVocab } from '../shared/testmodel/vocab.ts';

/**
 * The demo's model and memory limits. The model is a seeded random-weight llama GGUF with the
 * real SPM tokenizer (no network: the vocabulary ships inside node-llama-cpp's source bundle):
 * 12 layers × dim 512, f16, ~142 MB — small enough that loading and decoding are quick on two
 * CPU cores, big enough that its layers are worth splitting. Its text is gibberish by
 * construction (random weights); what the demo shows is the machinery, not the prose.
 *
 * Budgets are not hard-coded: `demoBudgets` searches, with the same planner the coordinator
 * uses, for the smallest per-node limits under which the model needs exactly `nodes` stages.
 */
export const DEMO_SHAPE: LlamaTestShape = { layers: 12, dim: 512, ffn: 1536, heads: 8, kvHeads: 4, ctx: 2048, type: 'f16', seed: 7 };
export const DEMO_CTX = 1024;

export function demoModelPath(env: NodeJS.ProcessEnv = process.env): string {
  const s = DEMO_SHAPE;
  // Next to the engine builds: llamaCacheDir is <orchard cache>/llama, the model goes to <orchard cache>/demo.
  return join(dirname(llamaCacheDir(env)), 'demo', `orchard-demo-l${s.layers}-d${s.dim}-f${s.ffn}-${s.type}-s${s.seed}.gguf`);
}

/** The cached demo GGUF, written on first use (atomically: a crash leaves no half file). */
export async function ensureDemoModel(env: NodeJS.ProcessEnv = process.env): Promise<{ path: string; created: boolean }> {
  const path = demoModelPath(env);
  try {
    if ((await stat(path)).size > 0) return { path, created: false };
  } catch {}
  const vocab = await loadVocab(env);
  await mkdir(dirname(path), { recursive: true });
  await writeGguf(path, llamaTestModelSpec(DEMO_SHAPE, vocab));
  return { path, created: true };
}

export interface DemoBudget {
  readonly name: string;
  readonly budgetBytes: number;
}

const MiB = 2 ** 20;

/**
 * Node budgets under which `profile` needs all `nodes` stages: a head a bit bigger than its
 * share (it carries llama-server's larger fixed overhead and the output head) and equal
 * workers. Scans the share from small to large and returns the first that the planner places on
 * exactly `nodes` stages and that `nodes − 1` of the same nodes cannot hold.
 */
export function demoBudgets(profile: ModelProfile, nodes: number, opts: { ctx: number; cacheType: CacheType }): DemoBudget[] {
  const big = planPlacement(profile, [{ name: 'all', budgetBytes: Number.MAX_SAFE_INTEGER / 4, bandwidthBytesPerSecond: 100e9 }], { ...opts, parallel: 1 });
  const single = big.stages[0];
  if (!big.fits || !single) throw new OrchardError('cannot plan the demo model on one unlimited node');
  const body = single.bytes.weights + single.bytes.kv + single.bytes.compute;
  const headFixed = single.bytes.overhead;
  const names = Array.from({ length: nodes }, (_, i) => `node-${String.fromCharCode(97 + i)}`);
  let best: { budgets: DemoBudget[]; minLayers: number; total: number } | undefined;
  const steps = 40;
  const place = (b: readonly DemoBudget[]) => planPlacement(profile, b.map((x) => ({ ...x, bandwidthBytesPerSecond: 100e9 })), { ...opts, parallel: 1 });
  for (let hs = 0; hs <= steps; hs++) {
    for (let ws = 1; ws <= steps; ws++) {
      const budgets = names.map((name, i) => ({
        name,
        budgetBytes: Math.ceil((i === 0 ? headFixed + (body * hs) / steps : WORKER_OVERHEAD_BYTES + (body * ws) / steps) / MiB) * MiB,
      }));
      const plan = place(budgets);
      if (!plan.fits || plan.stages.length !== nodes) continue;
      if (place(budgets.slice(0, nodes - 1)).fits) break; // bigger workers only make it easier
      // Prefer the most even split (every node holding layers is the point of the demo), then
      // the tightest limits.
      const minLayers = Math.min(...plan.stages.map((st) => st.lastLayer - st.firstLayer + 1));
      const total = budgets.reduce((t, b) => t + b.budgetBytes, 0);
      if (!best || minLayers > best.minLayers || (minLayers === best.minLayers && total < best.total)) best = { budgets, minLayers, total };
    }
  }
  if (best) return best.budgets;
  throw new OrchardError(`found no memory limits that put this model on exactly ${nodes} nodes`);
}
