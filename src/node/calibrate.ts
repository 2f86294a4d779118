import { mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { availableParallelism, loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { z } from 'zod';
import { OrchardError, errorMessage } from '../shared/errors.ts';
import { readGgufHeader } from '../shared/gguf/reader.ts';
import { writeGguf } from '../shared/gguf/writer.ts';
import type { HardwareProfile } from '../shared/hardware.ts';
import { memoryModel } from '../shared/memory/stage.ts';
import { modelProfile } from '../shared/model/profile.ts';
import { anotherWindow, CALIBRATION_WINDOWS, competingCores, median, relativeSpread, uncontendedRate, waitedFraction, windowTokens } from '../shared/placement/calibration.ts';
import { attentionFlopsPerToken, type Calibration, calibrationRates } from '../shared/placement/cost.ts';
import { boundaryOverhead, decodeAttentionRate, fitDecodeCost, windowContextTokens } from '../shared/placement/decode-fit.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../shared/placement/types.ts';
import { type LlamaTestShape, llamaTestModelSpec } from '../shared/testmodel/llama.ts';
import { uniformSource } from '../shared/testmodel/prng.ts';
import { loadVocab } from '../shared/testmodel/vocab.ts';
import { CALIBRATION_CTX, type CalibrationEngine, type CalibrationEngineOptions, type EngineRates, startEngineOn } from './calibration-engine.ts';
import { findLlamaBinaries } from './llama/binaries.ts';
import { llamaCacheDir } from './llama/cache.ts';

/**
 * The node measures its own engine: llama-server on a generated f16 model (12 layers × 1024,
 * ~0.4 GB: each decoded token reads ~0.33 GB, more than a Mac's last-level cache), one warm-up
 * request that also sizes the windows, then windows of a fixed prompt and about a second of
 * decoding, of which the median rates count (shared/placement/calibration.ts: at least 3, more
 * while 12 s last, at most 7; back-to-back 32-token samples moved ±30–40 % under load). Each
 * window's rates are taken without the time the engine's threads waited for a core another
 * process held (Linux schedstat run_delay; calibration.ts `uncontendedRate`): the node's figure
 * is its engine's, not its neighbours' load (on macOS, without schedstat, the wall-clock one).
 * The CPU other processes used meanwhile is recorded with it (`competingCores`, `waitedFraction`).
 * llama-server's own timings become the cost model's node numbers with the planner's own
 * accounting (cost.ts `calibrationRates`).
 *
 * Two depths: a token costs a part that grows with the bytes read and a part that does not
 * (llama-server's sampling and HTTP, the graph's launch, the round trips to its rpc-server). One
 * depth folds the second into the bandwidth, and a deeper plan is priced too slow. So the windows
 * alternate between the 12-layer model and a SECOND_DEPTH_LAYERS one of the same layer shape, and
 * the line through their seconds per token (placement/decode-fit.ts) gives the bandwidth (its
 * slope) and `decodeFixedSecondsPerToken` (its intercept), which the planner charges at the head.
 * Measured (bench/README.md, bench:decode-depth; 1 thread): 24 layers over 1, 2 or 3 local
 * rpc-servers cost the same within ±3 ms, so the fixed part is paid once per token, not per stage.
 * Until v8 the second depth was 4 layers (158 MB): on this project's VM (480 MiB of L3) it read
 * 10–20 % faster per byte than 12, 24 and 36 layers, which lie on one line that larger models
 * continue, so the fit's intercept came out negative and 36-layer plans were priced ~10 % slow.
 *
 * Attention: a decoded token attends to every earlier position, on a CPU engine at ~13× its KV
 * bytes' cost (a 36-layer token at position 140 costs 13 % more than at 30 here). The 12-layer
 * windows at CALIBRATION_PROMPT_TOKENS and SHORT_PROMPT_TOKENS give its rate (`decodeAttentionFlopsPerSecond`);
 * the depths are fitted without the attention their windows paid, and plans price it at their own
 * context (cost.ts decodeContextTokens).
 *
 * A boundary: beside those (not on macOS, where the calibration engine runs no rpc-servers), a
 * BOUNDARY_LAYERS model whole and split in two with its first stage behind a loopback engine tunnel, built as
 * two agents build one (calibration-tunnel.ts). Its seconds per token over the whole model's, less
 * the agents' link probe over that tunnel (the round trip the planner charges as the link's), is
 * `boundaryOverheadSeconds`, which the planner adds to every round trip of a boundary whose worker
 * is this node. Both rates are taken as the windows ran, waits for a core left in: a boundary's cost
 * is mostly its extra processes (two rpc-servers, two relays) waking on cores the others hold, which
 * the uncontended rates take out (session 12: the tunnelled split 10 % faster than the whole model
 * uncontended, 1.4 ms per token slower as run). Measured alone here it is 0.1–0.7 ms; beside a running 3-node demo cluster on this
 * 2-vCPU VM 2–5 ms (bench/README.md, `orchard demo`), so the demo measures it again beside its cluster.
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
const CTX = CALIBRATION_CTX;
/** Layers of the fit's second model (CALIBRATION_SHAPE otherwise): see above and bench/README.md, bench:decode-depth. */
export const SECOND_DEPTH_LAYERS = 24;
/** Layers of the model the boundary overhead is measured on, whole and split (CALIBRATION_SHAPE otherwise). */
export const BOUNDARY_LAYERS = 4;
/** The prompt length of a calibration window (calibrationRequest's default; bench:lan prices its engine windows with it). */
export const CALIBRATION_PROMPT_TOKENS = 128;
/** The prompt of the 12-layer engine's short-context windows, whose rate beside its CALIBRATION_PROMPT_TOKENS ones prices attention (above). */
export const SHORT_PROMPT_TOKENS = 16;
/** Decode tokens of the warm-up request, whose rate sizes the windows. */
const WARMUP_DECODE_TOKENS = 32;

const calibrationSchema = z.object({
  engine: z.enum(['llama.cpp', 'mlx']),
  effectiveBandwidthBytesPerSecond: z.number().positive().finite(),
  decodeFixedSecondsPerToken: z.number().nonnegative().finite(),
  boundaryOverheadSeconds: z.number().nonnegative().finite().optional(),
  decodeAttentionFlopsPerSecond: z.number().positive().finite().optional(),
  shortContext: z.object({ promptTokens: z.number().int().positive(), decodeTokensPerSecond: z.number().positive(), decodeSpread: z.number().nonnegative() }).optional(),
  decodeContextTokens: z.number().positive().optional(),
  boundary: z
    .object({
      layers: z.number().int().positive(),
      decodeTokensPerSecond: z.number().positive(),
      waitedFraction: z.number().min(0).max(1),
      tunnelledDecodeTokensPerSecond: z.number().positive(),
      tunnelledWaitedFraction: z.number().min(0).max(1),
      tunnelledDecodeSpread: z.number().nonnegative(),
      probeRttSeconds: z.number().nonnegative(),
    })
    .optional(),
  depths: z
    .array(z.object({ layers: z.number().int().positive(), readBytesPerToken: z.number().positive(), decodeTokensPerSecond: z.number().positive(), decodeSpread: z.number().nonnegative(), decodeContextTokens: z.number().positive().optional() }))
    .min(1),
  prefillFlopsPerSecond: z.number().positive().finite(),
  threads: z.number().int().positive(),
  engineBuild: z.string().min(1),
  measuredAtSeconds: z.number(),
  decodeTokensPerSecond: z.number().positive(),
  promptTokensPerSecond: z.number().positive(),
  modelBytes: z.number().positive(),
  windows: z.number().int().positive(),
  decodeTokensPerWindow: z.number().int().positive(),
  decodeSpread: z.number().nonnegative(),
  competingCores: z.number().nonnegative(),
  waitedFraction: z.number().min(0).max(1),
  cores: z.number().int().positive(),
  loadAverage1m: z.number().nonnegative(),
});

function calibrationDir(env: NodeJS.ProcessEnv): string {
  return join(dirname(llamaCacheDir(env)), 'calibration');
}

/**
 * Bumped when the measurement changes, so an older figure is measured again (v2: the agents'
 * engine flags; v3: windows of about a second, their median, and the competing load recorded;
 * v4: each window's rates without the time the engine waited for its cores; v5: two depths, the
 * bandwidth the slope of their fit and its intercept the fixed seconds per token; v6: the
 * boundary overhead, beside them; v7: the boundary from the rates as the windows ran, waits for a
 * core included; v8: short-context windows beside the deep ones, decode attention's rate, and the
 * bandwidth fit without the attention the windows paid).
 */
const METHOD = 'v8';

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
  return readCalibrationFile(calibrationFile(env, bins.build, threads));
}

async function readCalibrationFile(path: string): Promise<Calibration | undefined> {
  try {
    const parsed = calibrationSchema.safeParse(JSON.parse(await readFile(path, 'utf8')));
    return parsed.success ? parsed.data : undefined;
  } catch {
    return undefined;
  }
}

/** The generated calibration model at `layers` layers (CALIBRATION_SHAPE otherwise), made once per machine. */
async function ensureCalibrationModel(env: NodeJS.ProcessEnv, layers = CALIBRATION_SHAPE.layers): Promise<string> {
  const s = { ...CALIBRATION_SHAPE, layers };
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

/** The calibration engine (calibration-engine.ts) on `model`, by default the generated calibration model. */
export async function startCalibrationEngine(threads: number, env: NodeJS.ProcessEnv = process.env, o: CalibrationEngineOptions & { readonly model?: string } = {}): Promise<CalibrationEngine> {
  return startEngineOn(o.model ?? (await ensureCalibrationModel(env)), threads, env, o);
}

/**
 * A calibration window: `promptTokens` (CALIBRATION_PROMPT_TOKENS) fresh token ids, then `decodeTokens`
 * decoded tokens. Also bench:lan's engine windows, taken between the cluster's through its run
 * (engineRates prices their rates with CALIBRATION_PROMPT_TOKENS, this prompt's length).
 */
export function calibrationRequest(seed: number, decodeTokens: number, promptTokens = CALIBRATION_PROMPT_TOKENS): Record<string, unknown> {
  const r = uniformSource(seed);
  // Ordinary token ids (past the control tokens); no prompt cache, so every run prefills in full.
  const prompt = Array.from({ length: promptTokens }, () => 300 + Math.floor(r() * 30000));
  return { prompt, n_predict: decodeTokens, temperature: 0, ignore_eos: true, cache_prompt: false };
}

/** One engine's decode and prompt rates (medians over its windows, each without its waits for a core) and how its windows went. */
interface WindowedRates {
  readonly decode: number;
  readonly prompt: number;
  readonly windows: number;
  readonly decodeTokensPerWindow: number;
  readonly decodeSpread: number;
  readonly competingCores: number;
  /** Median fraction of a window the engine waited for its cores. */
  readonly waitedFraction: number;
  /** Median decode rate as the windows ran (the waits for a core left in). */
  readonly wallDecode: number;
}

interface Window extends EngineRates {
  readonly waited: number;
  readonly wallSeconds: number;
  readonly competing: number;
}

/** An engine and the prompt length of its windows (one engine may appear with two). */
interface WindowSlot {
  readonly engine: CalibrationEngine;
  readonly promptTokens: number;
}

async function oneWindow(slot: WindowSlot, seed: number, tokens: number): Promise<Window> {
  const engine = slot.engine;
  const before = await engine.cpu();
  const rates = await engine.request(calibrationRequest(seed, tokens, slot.promptTokens));
  const after = await engine.cpu();
  return { ...rates, waited: waitedFraction(before, after), wallSeconds: after.wallSeconds - before.wallSeconds, competing: competingCores(before, after) };
}

/**
 * Windows on every engine in rounds, each round in the other order than the one before (ABBA),
 * so a drift of the machine weighs on every engine alike; the window policy counts rounds, its
 * time budget per engine.
 */
async function calibrationWindows(engines: readonly WindowSlot[]): Promise<WindowedRates[]> {
  // Warm-up (first-touch page faults, thread pool start), which also sizes each engine's windows.
  const tokens: number[] = [];
  for (const e of engines) tokens.push(windowTokens((await e.engine.request(calibrationRequest(1, WARMUP_DECODE_TOKENS, e.promptTokens))).decode, CTX - CALIBRATION_PROMPT_TOKENS));
  const samples: Window[][] = engines.map(() => []);
  const policy = { ...CALIBRATION_WINDOWS, budgetSeconds: CALIBRATION_WINDOWS.budgetSeconds * engines.length };
  const t0 = performance.now();
  for (let round = 0; anotherWindow(policy, round, (performance.now() - t0) / 1000); round++) {
    const order = engines.map((_, i) => i);
    if (round % 2 === 1) order.reverse();
    for (const i of order) samples[i]!.push(await oneWindow(engines[i]!, 2 + round, tokens[i]!));
  }
  return samples.map((w, i) => {
    const decode = w.map((x) => uncontendedRate(x.decode, x.waited));
    const wall = w.reduce((t, x) => t + x.wallSeconds, 0);
    return {
      decode: median(decode),
      prompt: median(w.map((x) => uncontendedRate(x.prompt, x.waited))),
      windows: w.length,
      decodeTokensPerWindow: tokens[i]!,
      decodeSpread: relativeSpread(decode),
      competingCores: wall > 0 ? w.reduce((t, x) => t + x.competing * x.wallSeconds, 0) / wall : 0,
      waitedFraction: median(w.map((x) => x.waited)),
      wallDecode: median(w.map((x) => x.decode)),
    };
  });
}

/** What measureCalibration is told beyond the engine options. */
export interface MeasureOptions extends CalibrationEngineOptions {
  /** Measure on another GGUF (the demo's own): one depth, so `decodeFixedSecondsPerToken` must be given. */
  readonly model?: string;
  /** Write the result here instead of the machine's cache. */
  readonly file?: string;
  /** Measure on this engine (the caller started it and stops it) instead of starting one. */
  readonly engine?: CalibrationEngine;
  /**
   * The engine's fixed seconds per token, known already (the machine's own two-depth calibration):
   * measure one depth only and take the bandwidth as bytes ÷ (seconds − this).
   */
  readonly decodeFixedSecondsPerToken?: number;
  /**
   * The boundary overhead, known already (the machine's own calibration, as the fixed part):
   * no tunnelled split is measured, the record carries this one.
   */
  readonly boundaryOverheadSeconds?: number;
  /** Decode attention's rate, known already (the machine's own calibration): no short-context windows are measured. */
  readonly decodeAttentionFlopsPerSecond?: number;
}

/**
 * Whether this machine's calibration engine can measure a tunnelled boundary: it splits layers
 * over local rpc-servers only where llama-server runs on the CPU (not macOS, calibration-engine.ts).
 */
const measuresBoundary = (): boolean => process.platform !== 'darwin';

/**
 * The engines one measurement alternates between: the record's, the second depth's, and the
 * boundary's pair — the BOUNDARY_LAYERS model whole and split with its first stage tunnelled
 * (the last three when measured).
 */
interface CalibrationEngines {
  readonly deep: CalibrationEngine;
  readonly second?: CalibrationEngine;
  readonly boundary?: { readonly whole: CalibrationEngine; readonly tunnelled: CalibrationEngine };
}

async function startCalibrationEngines(threads: number, env: NodeJS.ProcessEnv, on: MeasureOptions, deepModel: string, started: CalibrationEngine[]): Promise<CalibrationEngines> {
  const start = async (model: string, o: CalibrationEngineOptions) => started[started.push(await startEngineOn(model, threads, env, { ...on, ...o })) - 1]!;
  const deep = on.engine ?? (await start(deepModel, {}));
  const second = on.decodeFixedSecondsPerToken === undefined ? await start(await ensureCalibrationModel(env, SECOND_DEPTH_LAYERS), {}) : undefined;
  if (!measuresBoundary() || on.boundaryOverheadSeconds !== undefined) return { deep, ...(second ? { second } : {}) };
  // On a shallow model: a 1–2 ms step is a larger part of its seconds per token (on the 12-layer one
  // the split's windows scattered ±25 % and once decoded faster than the whole model).
  const boundaryModel = await ensureCalibrationModel(env, BOUNDARY_LAYERS);
  const boundary = { whole: await start(boundaryModel, {}), tunnelled: await start(boundaryModel, { rpcServers: 2, tunnelledStages: 1 }) };
  return { deep, ...(second ? { second } : {}), boundary };
}

/** Probe sessions whose median round trip the boundary overhead subtracts: one session on this VM once read 2.8 ms where the others read 0.2–0.4. */
const PROBE_SESSIONS = 5;

async function medianProbeRtt(probe: () => Promise<number>): Promise<number> {
  const rtts: number[] = [];
  for (let i = 0; i < PROBE_SESSIONS; i++) rtts.push(await probe());
  return median(rtts);
}

/**
 * The decode cost the windows measured: each depth (the deep model first) with the context its
 * windows attended to, decode attention's rate from the deep model's two prompt lengths (or the
 * caller's), and the fixed seconds per token of the depths' fit without the attention they paid
 * (or the caller's).
 */
async function decodeCostOf(models: readonly string[], rates: readonly WindowedRates[], on: MeasureOptions) {
  const profiles = await Promise.all(models.map(async (path) => modelProfile(await readGgufHeader(path))));
  const depths = profiles.map((profile, i) => ({
    layers: profile.layerCount,
    readBytesPerToken: readBytesPerToken(profile),
    decodeTokensPerSecond: rates[i]!.decode,
    decodeSpread: rates[i]!.decodeSpread,
    decodeContextTokens: windowContextTokens(CALIBRATION_PROMPT_TOKENS, rates[i]!.decodeTokensPerWindow),
  }));
  const shortRates = on.decodeAttentionFlopsPerSecond === undefined ? rates.at(-1)! : undefined;
  const shortContext = shortRates ? { promptTokens: SHORT_PROMPT_TOKENS, decodeTokensPerSecond: shortRates.decode, decodeSpread: shortRates.decodeSpread } : undefined;
  const flopsAt = (i: number, context: number) => attentionFlopsPerToken(profiles[i]!, context);
  const attentionRate =
    on.decodeAttentionFlopsPerSecond ??
    (shortRates
      ? decodeAttentionRate(
          { decodeTokensPerSecond: depths[0]!.decodeTokensPerSecond, attentionFlopsPerToken: flopsAt(0, depths[0]!.decodeContextTokens), decodeSpread: depths[0]!.decodeSpread },
          { decodeTokensPerSecond: shortRates.decode, attentionFlopsPerToken: flopsAt(0, windowContextTokens(SHORT_PROMPT_TOKENS, shortRates.decodeTokensPerWindow)), decodeSpread: shortRates.decodeSpread },
        )
      : undefined);
  // What each depth's tokens paid for attention is not reading: out of the fit, priced apart by the plan.
  const attentionSeconds = (i: number) => (attentionRate ? flopsAt(i, depths[i]!.decodeContextTokens) / attentionRate : 0);
  const fixed =
    on.decodeFixedSecondsPerToken ??
    fitDecodeCost(depths.map((d, i) => ({ bytesPerToken: d.readBytesPerToken, secondsPerToken: 1 / d.decodeTokensPerSecond - attentionSeconds(i) }))).fixedSecondsPerToken;
  return { depths, attentionRate, shortContext, fixed };
}

/**
 * Measure this machine's llama.cpp engine with `threads` threads and cache the result. On the
 * calibration model, at two depths: the 12-layer model (its rates and prompt rate are the
 * record's) and a SECOND_DEPTH_LAYERS one, windows alternating between them, and the line through
 * their seconds per token (without the attention their windows paid: short-context windows of the
 * 12-layer model beside them, unless `decodeAttentionFlopsPerSecond` is given) against the bytes
 * the planner counts (decode-fit.ts) splits what a token costs into the node's bandwidth and its
 * fixed seconds per token. With `decodeFixedSecondsPerToken` given, one depth on the engine's own
 * model. Beside them (not on macOS, and unless `boundaryOverheadSeconds` is given) a
 * BOUNDARY_LAYERS model whole and split in two, its first stage behind a loopback engine tunnel:
 * the boundary overhead (boundaryOverhead).
 */
export async function measureCalibration(threads: number, env: NodeJS.ProcessEnv = process.env, on: MeasureOptions = {}): Promise<Calibration> {
  const given = on.decodeFixedSecondsPerToken;
  const deepModel = on.engine?.model ?? on.model ?? (await ensureCalibrationModel(env));
  if (given === undefined && deepModel !== (await ensureCalibrationModel(env))) {
    throw new OrchardError(`a calibration on ${deepModel} measures one depth: it needs the fixed seconds per token of the machine's own calibration`);
  }
  const started: CalibrationEngine[] = [];
  const loadAverage1m = loadavg()[0] ?? 0;
  let rates: WindowedRates[];
  let engines: CalibrationEngines;
  let probeRttSeconds = 0;
  try {
    engines = await startCalibrationEngines(threads, env, on, deepModel, started);
    const long = [engines.deep, engines.second, engines.boundary?.whole, engines.boundary?.tunnelled].filter((e) => e !== undefined).map((engine) => ({ engine, promptTokens: CALIBRATION_PROMPT_TOKENS }));
    const short = on.decodeAttentionFlopsPerSecond === undefined ? [{ engine: engines.deep, promptTokens: SHORT_PROMPT_TOKENS }] : [];
    rates = await calibrationWindows([...long, ...short]);
    const probe = engines.boundary?.tunnelled.probeRttSeconds;
    if (probe) probeRttSeconds = await medianProbeRtt(probe);
  } catch (err) {
    throw new OrchardError(`engine calibration failed: ${errorMessage(err)}`);
  } finally {
    for (const e of started) e.stop();
  }
  const models = [deepModel, ...(engines.second ? [engines.second.model] : [])];
  const { depths, attentionRate, shortContext, fixed } = await decodeCostOf(models, rates, on);
  // The boundary's pair, both as the windows ran: what a boundary adds is mostly its stages' and
  // relays' wake-ups waiting for a core, which the uncontended rates take out (v6 read 0 here: the
  // split ~10 % faster than the whole model).
  const r = engines.boundary ? rates[models.length]! : undefined;
  const t = engines.boundary ? rates[models.length + 1]! : undefined;
  const boundary = r && t
    ? { layers: BOUNDARY_LAYERS, decodeTokensPerSecond: r.wallDecode, waitedFraction: r.waitedFraction, tunnelledDecodeTokensPerSecond: t.wallDecode, tunnelledWaitedFraction: t.waitedFraction, tunnelledDecodeSpread: t.decodeSpread, probeRttSeconds }
    : undefined;
  const overhead = boundary
    ? { boundaryOverheadSeconds: boundaryOverhead(boundary, { decodeTokensPerSecond: boundary.tunnelledDecodeTokensPerSecond }, boundary.probeRttSeconds), boundary }
    : on.boundaryOverheadSeconds !== undefined
      ? { boundaryOverheadSeconds: on.boundaryOverheadSeconds }
      : {};
  const attention = attentionRate ? { flopsPerSecond: attentionRate, contextTokens: depths[0]!.decodeContextTokens } : undefined;
  const c = {
    ...calibrationOf(await readGgufHeader(deepModel), rates[0]!, fixed, depths, { threads: engines.deep.threads, engineBuild: engines.deep.engineBuild, loadAverage1m }, attention),
    ...overhead,
    ...(attentionRate ? { decodeAttentionFlopsPerSecond: attentionRate, decodeContextTokens: depths[0]!.decodeContextTokens } : {}),
    ...(shortContext ? { shortContext } : {}),
  };
  const file = on.file ?? calibrationFile(env, engines.deep.engineBuild, engines.deep.threads);
  await mkdir(dirname(file), { recursive: true });
  await writeFile(`${file}.tmp`, `${JSON.stringify(c, null, 2)}\n`);
  await rename(`${file}.tmp`, file);
  return c;
}

/** Bytes the planner counts for one decoded token of the whole model at the calibration's context. */
export function readBytesPerToken(profile: ReturnType<typeof modelProfile>): number {
  const o = DEFAULT_PLACEMENT_OPTIONS;
  const mm = memoryModel(profile, { ...o, ctx: CTX, parallel: 1 }, o.kvFill);
  return mm.layerRead.reduce((a, b) => a + b, 0) + profile.outputBytes + profile.outputNormBytes + profile.otherBytes + profile.tokenEmbdRowBytes;
}

/**
 * The cost model's node numbers from rates measured on `header`'s model with the planner's own
 * accounting: the bandwidth is bytes ÷ (seconds per token − `decodeFixedSecondsPerToken`, the
 * machine's measured fixed part, else the planner's assumed head overhead); `promptTokens` is
 * the prompt length the prompt rate was measured on.
 */
export function engineRates(
  header: Parameters<typeof modelProfile>[0],
  decodeTokensPerSecond: number,
  promptTokensPerSecond: number,
  decodeFixedSecondsPerToken: number = DEFAULT_PLACEMENT_OPTIONS.headOverheadSeconds,
  promptTokens = CALIBRATION_PROMPT_TOKENS,
  attention?: { readonly flopsPerSecond: number; readonly contextTokens: number },
) {
  const profile = modelProfile(header);
  const attentionSeconds = attention ? attentionFlopsPerToken(profile, attention.contextTokens) / attention.flopsPerSecond : 0;
  return {
    profile,
    ...calibrationRates(profile, { decodeTokensPerSecond, promptTokensPerSecond, promptTokens, readBytesPerToken: readBytesPerToken(profile) }, decodeFixedSecondsPerToken + attentionSeconds),
  };
}

function calibrationOf(
  header: Parameters<typeof modelProfile>[0],
  rates: WindowedRates,
  decodeFixedSecondsPerToken: number,
  depths: Calibration['depths'],
  at: { threads: number; engineBuild: string; loadAverage1m: number },
  attention?: { readonly flopsPerSecond: number; readonly contextTokens: number },
): Calibration {
  const { profile, ...node } = engineRates(header, rates.decode, rates.prompt, decodeFixedSecondsPerToken, CALIBRATION_PROMPT_TOKENS, attention);
  return {
    engine: 'llama.cpp',
    ...node,
    decodeFixedSecondsPerToken,
    depths,
    threads: at.threads,
    engineBuild: at.engineBuild,
    measuredAtSeconds: Math.floor(Date.now() / 1000),
    decodeTokensPerSecond: rates.decode,
    promptTokensPerSecond: rates.prompt,
    modelBytes: profile.fileTensorBytes,
    windows: rates.windows,
    decodeTokensPerWindow: rates.decodeTokensPerWindow,
    decodeSpread: rates.decodeSpread,
    competingCores: rates.competingCores,
    waitedFraction: rates.waitedFraction,
    cores: availableParallelism(),
    loadAverage1m: at.loadAverage1m,
  };
}

/** The profile with the measurement's node numbers (the spec bandwidth stays as probed). */
export function withCalibration(p: HardwareProfile, c: Calibration | undefined): HardwareProfile {
  return c
    ? {
        ...p,
        effectiveBandwidthBytesPerSecond: c.effectiveBandwidthBytesPerSecond,
        prefillFlopsPerSecond: c.prefillFlopsPerSecond,
        decodeFixedSecondsPerToken: c.decodeFixedSecondsPerToken,
        ...(c.boundaryOverheadSeconds !== undefined ? { boundaryOverheadSeconds: c.boundaryOverheadSeconds } : {}),
        ...(c.decodeAttentionFlopsPerSecond !== undefined ? { decodeAttentionFlopsPerSecond: c.decodeAttentionFlopsPerSecond } : {}),
      }
    : p;
}
