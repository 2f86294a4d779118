import { spawn } from 'node:child_process';
import { mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { z } from 'zod';
import { OrchardError, errorMessage } from '../shared/errors.ts';
import { readGgufHeader } from '../shared/gguf/reader.ts';
import { writeGguf } from '../shared/gguf/writer.ts';
import type { HardwareProfile } from '../shared/hardware.ts';
import { memoryModel } from '../shared/memory/stage.ts';
import { modelProfile } from '../shared/model/profile.ts';
import { type Calibration, calibrationRates } from '../shared/placement/cost.ts';
import { llamaMemoryArgs } from '../shared/placement/llama-args.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../shared/placement/types.ts';
import { type LlamaTestShape, llamaTestModelSpec } from '../shared/testmodel/llama.ts';
import { uniformSource } from '../shared/testmodel/prng.ts';
import { loadVocab } from '../shared/testmodel/vocab.ts';
import { findLlamaBinaries } from './llama/binaries.ts';
import { llamaCacheDir } from './llama/cache.ts';
import { pickFreePort } from './ports.ts';

/**
 * The node measures its own engine: llama-server on a generated f16 model (12 layers × 1024,
 * ~0.4 GB: each decoded token reads ~0.33 GB, more than the last-level caches of the machines
 * Orchard runs on, so the figure is DRAM bandwidth, not cache), one warm-up request, then
 * SAMPLES measured requests of a fixed prompt and a fixed number of decoded tokens, of which the
 * median rates count: one 32-token sample on a shared machine caught a passing load spike and
 * the demo's prediction missed by 19 % where its other runs stayed within 15 %. llama-server's own
 * timings (prompt and decode rates) become the cost model's two node numbers with the planner's
 * own accounting (cost.ts `calibrationRates`).
 *
 * Cached per machine, engine build and thread count in the Orchard cache
 * (`<cache>/calibration/<build>-t<threads>.json`): every agent on this machine that runs engines
 * with that many threads shares it (a restarted agent, a local cluster). Measured on
 * `orchard node --calibrate`; the agent never measures on its own at start-up, because a
 * measurement competes with whatever else runs (another agent's engines, a test suite).
 * `ORCHARD_CALIBRATION_FILE` points an agent at another measurement instead: `orchard demo`
 * measures its own model under the machine's current load and hands that to its agents
 * (demo.ts), without replacing the machine's cached figure.
 */
export const CALIBRATION_SHAPE: LlamaTestShape = { layers: 12, dim: 1024, ffn: 2816, heads: 16, kvHeads: 4, ctx: 1024, type: 'f16', seed: 11 };
const CTX = 1024;
const PROMPT_TOKENS = 128;
const DECODE_TOKENS = 32;
const SAMPLES = 3;

const calibrationSchema = z.object({
  engine: z.enum(['llama.cpp', 'mlx']),
  effectiveBandwidthBytesPerSecond: z.number().positive().finite(),
  prefillFlopsPerSecond: z.number().positive().finite(),
  threads: z.number().int().positive(),
  engineBuild: z.string().min(1),
  measuredAtSeconds: z.number(),
  decodeTokensPerSecond: z.number().positive(),
  promptTokensPerSecond: z.number().positive(),
  modelBytes: z.number().positive(),
});

function calibrationDir(env: NodeJS.ProcessEnv): string {
  return join(dirname(llamaCacheDir(env)), 'calibration');
}

/** Bumped when the measurement changes (v2: the agents' engine flags), so an older figure is measured again. */
const METHOD = 'v2';

function calibrationFile(env: NodeJS.ProcessEnv, engineBuild: string, threads: number): string {
  return join(calibrationDir(env), `${engineBuild.replace(/[^\w.+-]/g, '_')}-t${threads}-${METHOD}.json`);
}

/**
 * The measurement for this engine build and thread count, if any (a corrupt file counts as none):
 * `ORCHARD_CALIBRATION_FILE` when set (if it was measured with `threads`), else the cached one.
 */
export async function loadCalibration(threads: number, env: NodeJS.ProcessEnv = process.env): Promise<Calibration | undefined> {
  if (env.ORCHARD_CALIBRATION_FILE) {
    const c = await readCalibrationFile(env.ORCHARD_CALIBRATION_FILE);
    return c?.threads === threads ? c : undefined;
  }
  const bins = await findLlamaBinaries(env).catch(() => undefined);
  if (!bins) return undefined;
  return readCalibrationFile(calibrationFile(env, bins.llamaCppVersion, threads));
}

async function readCalibrationFile(path: string): Promise<Calibration | undefined> {
  try {
    const parsed = calibrationSchema.safeParse(JSON.parse(await readFile(path, 'utf8')));
    return parsed.success ? parsed.data : undefined;
  } catch {
    return undefined;
  }
}

async function ensureCalibrationModel(env: NodeJS.ProcessEnv): Promise<string> {
  const s = CALIBRATION_SHAPE;
  const path = join(calibrationDir(env), `calibration-l${s.layers}-d${s.dim}-f${s.ffn}-${s.type}-s${s.seed}.gguf`);
  try {
    if ((await stat(path)).size > 0) return path;
  } catch {}
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.${process.pid}.tmp`;
  await writeGguf(tmp, llamaTestModelSpec(s, await loadVocab(env)));
  await rename(tmp, path);
  return path;
}

const timingsSchema = z.object({ timings: z.object({ prompt_per_second: z.number().positive(), predicted_per_second: z.number().positive() }).loose() }).loose();

async function waitHealthy(url: string, exited: () => boolean, timeoutMs: number): Promise<void> {
  const t0 = Date.now();
  for (;;) {
    if (exited()) throw new OrchardError('llama-server exited while loading the calibration model');
    const ok = await fetch(`${url}/health`).then((r) => r.ok, () => false);
    if (ok) return;
    if (Date.now() - t0 > timeoutMs) throw new OrchardError(`llama-server did not become healthy within ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** One request of PROMPT_TOKENS token ids and DECODE_TOKENS decoded tokens; llama-server's rates. */
async function timedRequest(url: string, seed: number): Promise<{ prompt: number; decode: number }> {
  const r = uniformSource(seed);
  // Ordinary token ids (past the control tokens); no prompt cache, so every run prefills in full.
  const prompt = Array.from({ length: PROMPT_TOKENS }, () => 300 + Math.floor(r() * 30000));
  const res = await fetch(`${url}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt, n_predict: DECODE_TOKENS, temperature: 0, ignore_eos: true, cache_prompt: false }),
  });
  if (!res.ok) throw new OrchardError(`calibration request failed: HTTP ${res.status}`);
  const t = timingsSchema.parse(await res.json()).timings;
  return { prompt: t.prompt_per_second, decode: t.predicted_per_second };
}

/** The middle sample (SAMPLES is odd). */
function median(xs: readonly number[]): number {
  return [...xs].sort((a, b) => a - b)[xs.length >> 1]!;
}

/**
 * Measure this machine's llama.cpp engine with `threads` threads and cache the result. `model`
 * measures on another GGUF (the demo's own) and `file` writes the result there instead of the cache.
 */
export async function measureCalibration(
  threads: number,
  env: NodeJS.ProcessEnv = process.env,
  on: { readonly model?: string; readonly file?: string } = {},
): Promise<Calibration> {
  const bins = await findLlamaBinaries(env);
  const model = on.model ?? (await ensureCalibrationModel(env));
  const port = await pickFreePort('127.0.0.1');
  // The engine exactly as the agents run it (llamaMemoryArgs: flash attention, f16 KV, no CPU
  // repack …): without --no-repack this machine's f16 weights went to AMX kernels the stages never
  // use, and the measurement described another engine.
  const memory = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: CTX, parallel: 1 };
  const argv = ['-m', model, ...llamaMemoryArgs(memory), '--host', '127.0.0.1', '--port', String(port), '-t', String(threads), '-ngl', '0'];
  const child = spawn(bins.llamaServer, argv, { detached: true, stdio: 'ignore', env: { PATH: env.PATH ?? '' } });
  let exited = false;
  child.once('exit', () => {
    exited = true;
  });
  const url = `http://127.0.0.1:${port}`;
  const samples: { prompt: number; decode: number }[] = [];
  try {
    await waitHealthy(url, () => exited, 120_000);
    await timedRequest(url, 1); // warm-up: first-touch page faults, thread pool start
    for (let i = 0; i < SAMPLES; i++) samples.push(await timedRequest(url, 2 + i));
  } catch (err) {
    throw new OrchardError(`engine calibration failed: ${errorMessage(err)}`);
  } finally {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
    } catch {}
  }
  const rates = { prompt: median(samples.map((x) => x.prompt)), decode: median(samples.map((x) => x.decode)) };
  const profile = modelProfile(await readGgufHeader(model));
  const o = DEFAULT_PLACEMENT_OPTIONS;
  const mm = memoryModel(profile, { ...o, ctx: CTX, parallel: 1 }, o.kvFill);
  const readBytesPerToken =
    mm.layerRead.reduce((a, b) => a + b, 0) + profile.outputBytes + profile.outputNormBytes + profile.otherBytes + profile.tokenEmbdRowBytes;
  const c: Calibration = {
    engine: 'llama.cpp',
    ...calibrationRates(profile, { decodeTokensPerSecond: rates.decode, promptTokensPerSecond: rates.prompt, promptTokens: PROMPT_TOKENS, readBytesPerToken }, o.headOverheadSeconds),
    threads,
    engineBuild: bins.llamaCppVersion,
    measuredAtSeconds: Math.floor(Date.now() / 1000),
    decodeTokensPerSecond: rates.decode,
    promptTokensPerSecond: rates.prompt,
    modelBytes: profile.fileTensorBytes,
  };
  const file = on.file ?? calibrationFile(env, bins.llamaCppVersion, threads);
  await mkdir(dirname(file), { recursive: true });
  await writeFile(`${file}.tmp`, `${JSON.stringify(c, null, 2)}\n`);
  await rename(`${file}.tmp`, file);
  return c;
}

/** The profile with the measurement's node numbers (the spec bandwidth stays as probed). */
export function withCalibration(p: HardwareProfile, c: Calibration | undefined): HardwareProfile {
  return c ? { ...p, effectiveBandwidthBytesPerSecond: c.effectiveBandwidthBytesPerSecond, prefillFlopsPerSecond: c.prefillFlopsPerSecond } : p;
}
