/**
 * bench:split-prefill — what a prompt costs when the model is split over 1, 2 and 3 llama.cpp RPC
 * stages, measured against the cost model's prediction for exactly those splits.
 *
 * Real engines on loopback, as the agents run them (one ggml-rpc-server per stage, one thread
 * each, llama-server with the plan's device and memory arguments: bench/llama-run.ts). All the
 * splits of a group run at once and the requests alternate between them, so a passing load on
 * this shared machine hits every split alike. Measured: llama-server's own prompt time (median of
 * `--runs`, each a fresh prompt of random token ids, no prompt cache).
 *
 * Predicted: planFixedSplit (src/shared/placement/fixed.ts) for the same split, with the node
 * numbers of an engine calibration taken at the start on one node (measureCalibration, as
 * bench:lan and `orchard demo` do) and loopback links assumed at 0.1 ms and 2 GB/s (a 960-token
 * prompt moves 3.9 MB per boundary crossing: ~2 ms). Nothing is fitted to these results.
 * `predictedSumMs` is the same model without the ubatch overlap (pipelinedPrefill false);
 * `measuredVsOneStage` / `predictedVsOneStage` compare each split with the one-stage run of the same
 * prompt, which cancels the drift of a shared machine since the calibration (needs 1 in --stages).
 *
 * Two groups: ubatch 512 with prompts of 64, 185 and 512 tokens (one ubatch: the split adds only
 * its boundaries), and ubatch 128 with 960 tokens (8 ubatches: llama.cpp overlaps them on the
 * last stage — on this 2-core machine only when the other load leaves a second core free).
 *
 *   npm run bench:split-prefill -- [--json] [--runs 3] [--stages 1,2,3]
 */
import { join } from 'node:path';
import { loadavg } from 'node:os';
import { measureCalibration } from '../src/node/calibrate.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import type { ModelProfile } from '../src/shared/model/profile.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import type { Calibration } from '../src/shared/placement/cost.ts';
import { planFixedSplit } from '../src/shared/placement/fixed.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../src/shared/placement/types.ts';
import { uniformSource } from '../src/shared/testmodel/prng.ts';
import { BenchProcesses, benchEnv, runBench, writeTestModel } from './lib/cluster.ts';
import { flag, median } from './lib/stats.ts';
import { type LlamaEngines, startLlama } from './llama-run.ts';

const argv = process.argv.slice(2);
const JSON_OUT = argv.includes('--json');
const RUNS = Number(flag(argv, '--runs', '3'));
const STAGES = flag(argv, '--stages', '1,2,3').split(',').map(Number);
const CTX = 1024;
/** bench:lan's model: the calibration's shape with other weights. */
const SHAPE = ['--layers', '12', '--dim', '1024', '--ffn', '2816', '--heads', '16', '--kv-heads', '4', '--type', 'f16', '--ctx', String(CTX), '--seed', '7'];
const GROUPS = [
  { ubatch: 512, prompts: [64, 185, 512] },
  { ubatch: 128, prompts: [960] },
];
const LOOPBACK = { hopSeconds: 1e-4, linkBytesPerSecond: 2e9 };

const t0 = performance.now();
const progress = (what: string) => process.stderr.write(`bench:split-prefill +${((performance.now() - t0) / 1000).toFixed(0)} s: ${what}\n`);

/** Layers split as evenly as possible, earlier stages taking the remainder. */
function evenSplit(layers: number, stages: number): [number, number][] {
  const out: [number, number][] = [];
  let first = 0;
  for (let i = 0; i < stages; i++) {
    const n = Math.floor(layers / stages) + (i < layers % stages ? 1 : 0);
    out.push([first, first + n - 1]);
    first += n;
  }
  return out;
}

let seed = 1;
/** llama-server's prompt time for a fresh prompt of `n` random ordinary token ids (no prompt cache). */
async function promptMs(url: string, n: number): Promise<number> {
  const r = uniformSource(seed++);
  const prompt = Array.from({ length: n }, () => 300 + Math.floor(r() * 30000));
  const res = await fetch(`${url}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt, n_predict: 1, temperature: 0, cache_prompt: false }),
  });
  if (!res.ok) throw new Error(`completion: HTTP ${res.status}`);
  const t = ((await res.json()) as { timings?: { prompt_ms?: number } }).timings;
  if (!(typeof t?.prompt_ms === 'number')) throw new Error('completion without timings.prompt_ms');
  return t.prompt_ms;
}

function predictMs(profile: ModelProfile, c: Calibration, split: [number, number][], promptTokens: number, ubatch: number, pipelinedPrefill: boolean): number {
  const nodes = split.map((_, i) => ({ name: `stage${i}`, budgetBytes: 2 ** 40, bandwidthBytesPerSecond: c.effectiveBandwidthBytesPerSecond, prefillFlopsPerSecond: c.prefillFlopsPerSecond, ...LOOPBACK }));
  const stages = split.map(([firstLayer, lastLayer], i) => ({ node: `stage${i}`, firstLayer, lastLayer }));
  const plan = planFixedSplit(profile, nodes, stages, { ctx: CTX, parallel: 1, ubatch, promptTokens, pipelinedPrefill });
  // llama-server's prompt time excludes the head's per-request overhead.
  return (plan.predicted.ttftSeconds - DEFAULT_PLACEMENT_OPTIONS.headOverheadSeconds) * 1000;
}

async function group(model: string, profile: ModelProfile, c: Calibration, g: (typeof GROUPS)[number]) {
  const bins = await findLlamaBinaries();
  const memory = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: CTX, parallel: 1, ubatch: g.ubatch };
  const running: { stages: number; split: [number, number][]; e: LlamaEngines }[] = [];
  try {
    for (const k of STAGES) {
      const split = evenSplit(profile.layerCount, k);
      running.push({ stages: k, split, e: await startLlama(bins, model, profile.layerCount, split, memory) });
    }
    // warm-up: first touch of every weight and compute buffer at the largest ubatch
    for (const r of running) for (const n of [8, Math.max(...g.prompts)]) await promptMs(r.e.url, n);
    const runs = new Map<string, number[]>();
    for (let i = 0; i < RUNS; i++) {
      for (const n of g.prompts) {
        for (const r of running) {
          const key = `${r.stages}/${n}`;
          runs.set(key, [...(runs.get(key) ?? []), await promptMs(r.e.url, n)]);
        }
      }
    }
    // Against the one-stage run of the same prompt: the machine's drift since the calibration cancels.
    const one = (n: number) => ({ measured: median(runs.get(`1/${n}`) ?? [Number.NaN]), predicted: predictMs(profile, c, evenSplit(profile.layerCount, 1), n, g.ubatch, true) });
    return g.prompts.flatMap((n) =>
      running.map((r) => {
        const measured = median(runs.get(`${r.stages}/${n}`)!);
        const predicted = predictMs(profile, c, r.split, n, g.ubatch, true);
        return {
          ubatch: g.ubatch,
          ubatches: Math.ceil(n / g.ubatch),
          promptTokens: n,
          stages: r.stages,
          predictedMs: predicted,
          predictedSumMs: predictMs(profile, c, r.split, n, g.ubatch, false),
          measuredMs: measured,
          error: Number(((measured - predicted) / predicted).toFixed(4)),
          measuredVsOneStage: Number((measured / one(n).measured).toFixed(4)),
          predictedVsOneStage: Number((predicted / one(n).predicted).toFixed(4)),
          runsMs: runs.get(`${r.stages}/${n}`)!,
        };
      }),
    );
  } finally {
    for (const r of running) await r.e.stop();
  }
}

async function splitPrefill(dir: string): Promise<object> {
  const bins = await findLlamaBinaries();
  const env = benchEnv(bins.binDir);
  const load = [loadavg()[0]!];
  progress('calibrating the engine (one node, no network)');
  const calibration = await measureCalibration(1, process.env, { file: join(dir, 'calibration.json') });
  const model = await writeTestModel(join(dir, 'm.gguf'), SHAPE, env);
  const profile = modelProfile(await readGgufHeader(model));
  const scenarios = [];
  for (const g of GROUPS) {
    progress(`ubatch ${g.ubatch}: prompts ${g.prompts.join(', ')} over ${STAGES.join(', ')} stage(s)`);
    scenarios.push(...(await group(model, profile, calibration, g)));
    load.push(loadavg()[0]!);
  }
  return {
    scenarios,
    calibration: { prefillFlopsPerSecond: calibration.prefillFlopsPerSecond, promptTokensPerSecond: calibration.promptTokensPerSecond },
    links: { assumed: 'loopback', ...LOOPBACK },
    runs: RUNS,
    seconds: (performance.now() - t0) / 1000,
    loadAverage: { min: Math.min(...load), max: Math.max(...load), samples: load },
  };
}

const procs = new BenchProcesses();
await runBench('split-prefill', procs, JSON_OUT, splitPrefill);
