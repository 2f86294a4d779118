import { execFile, spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { availableParallelism, cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { z } from 'zod';
import { OrchardError, errorMessage } from '../shared/errors.ts';
import { readGgufHeader } from '../shared/gguf/reader.ts';
import { writeGguf } from '../shared/gguf/writer.ts';
import type { HardwareProfile } from '../shared/hardware.ts';
import { memoryModel } from '../shared/memory/stage.ts';
import { modelProfile } from '../shared/model/profile.ts';
import { anotherWindow, CALIBRATION_WINDOWS, type CpuSnapshot, competingCores, median, relativeSpread, uncontendedRate, waitedFraction, windowTokens } from '../shared/placement/calibration.ts';
import { type Calibration, calibrationRates } from '../shared/placement/cost.ts';
import { llamaMemoryArgs } from '../shared/placement/llama-args.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../shared/placement/types.ts';
import { type LlamaTestShape, llamaTestModelSpec } from '../shared/testmodel/llama.ts';
import { uniformSource } from '../shared/testmodel/prng.ts';
import { loadVocab } from '../shared/testmodel/vocab.ts';
import { ssePayloads } from '../shared/sse.ts';
import { findLlamaBinaries, type LlamaBinaries } from './llama/binaries.ts';
import { llamaCacheDir } from './llama/cache.ts';
import { llamaServerArgs } from './engine-spec.ts';
import { waitEngineReady } from './engine-readiness.ts';
import { rpcServerSocket, unixEndpoint } from './engine-sockets.ts';
import { EnginePortAllocator, engineRangeOf, onceMoreIfPortTaken, portTakenOr } from './ports.ts';
import { EngineWatchdog } from './watchdog.ts';

/**
 * The node measures its own engine: llama-server on a generated f16 model (12 layers × 1024,
 * ~0.4 GB: each decoded token reads ~0.33 GB, more than the last-level caches of the machines
 * Orchard runs on, so the figure is DRAM bandwidth, not cache), one warm-up request that also
 * sizes the windows, then windows of a fixed prompt and about a second of decoding, of which the
 * median rates count (shared/placement/calibration.ts: at least 3, more while 12 s last, at
 * most 7). One 32-token sample on a shared machine caught a passing load spike and the demo's
 * prediction missed by 19 %; back-to-back 32-token samples moved ±30–40 % under load. Each
 * window's rates are taken without the time the engine's threads waited for a core another
 * process held (Linux schedstat run_delay; calibration.ts `uncontendedRate`): the node's figure
 * is its engine's, not its neighbours' load in the seconds it was measured (bench:lan: the figure
 * taken once at the start of a run under load 1.4–4 had priced 36-layer plans 26–70 % slower
 * than they then decoded). On macOS there is no schedstat and the figure is the wall-clock one.
 * The CPU time other processes used meanwhile is recorded with the figure (`competingCores`,
 * `waitedFraction`), so a figure taken on a busy machine can be told from one taken on a quiet one. llama-server's own
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
/** Decode tokens of the warm-up request, whose rate sizes the windows. */
const WARMUP_DECODE_TOKENS = 32;

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
 * v4: each window's rates without the time the engine waited for its cores).
 */
const METHOD = 'v4';

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

const ratesSchema = z.object({ timings: z.object({ prompt_per_second: z.number().optional(), predicted_per_second: z.number().positive(), predicted_n: z.number().optional() }).loose() }).loose();

/** llama-server's own rates for one request. */
export interface EngineRates {
  readonly prompt: number;
  readonly decode: number;
  readonly decodeTokens: number;
}

/**
 * A llama-server started as the agents start theirs, kept for several requests: the calibration's
 * windows, and `orchard demo`'s, which alternates its windows with the cluster's.
 */
export interface CalibrationEngine {
  /**
   * Its processes (llama-server and, on a CPU-only build, its rpc-server), each its own group; a
   * sentinel ends them if the process that started them dies, SIGKILL included.
   */
  readonly pids: readonly number[];
  /** Their ports, from the engine port range (127.0.0.1), in the order of `pids`. */
  readonly ports: readonly number[];
  readonly model: string;
  readonly threads: number;
  readonly engineBuild: string;
  /** One request (the body as given; streamed or not); the rates llama-server reports for it. */
  request(body: Record<string, unknown>, signal?: AbortSignal): Promise<EngineRates>;
  /** CPU counters now: the machine's busy time and this engine's. */
  cpu(): Promise<CpuSnapshot>;
  stop(): void;
}

/** The rates of a streamed response are in its last event carrying `timings`. */
async function ratesOf(res: Response, streamed: boolean): Promise<EngineRates> {
  let raw: unknown;
  if (streamed && res.body) {
    for await (const data of ssePayloads(res.body)) {
      const event = JSON.parse(data) as { timings?: unknown };
      if (event.timings) raw = event;
    }
  } else raw = await res.json();
  const t = ratesSchema.parse(raw).timings;
  return { prompt: t.prompt_per_second ?? 0, decode: t.predicted_per_second, decodeTokens: t.predicted_n ?? 0 };
}

const HOST = '127.0.0.1';

/**
 * Start `file` on `port` in its own process group (a Ctrl-C on the terminal reaches only the
 * caller, which stops it in order), registered with `watchdog` so it dies with the caller even
 * when that is SIGKILLed; `stop` kills the group.
 */
function startDetached(file: string, argv: readonly string[], port: number, env: NodeJS.ProcessEnv, watchdog: EngineWatchdog) {
  const child = spawn(file, argv, { detached: true, stdio: 'ignore', env: { PATH: env.PATH ?? '' } });
  const pid = child.pid;
  if (pid !== undefined) watchdog.add(pid);
  let exited = false;
  child.once('exit', () => {
    exited = true;
    if (pid !== undefined) watchdog.remove(pid);
  });
  return {
    pid: pid ?? 0,
    port,
    exited: () => exited,
    stop() {
      try {
        if (pid !== undefined && !exited) process.kill(-pid, 'SIGKILL');
      } catch {}
      // Killed: the sentinel must not signal the pid again (it could be recycled by then).
      if (pid !== undefined) watchdog.remove(pid);
    },
  };
}

export interface CalibrationEngineOptions {
  /** The GGUF it runs (default: the generated calibration model). */
  readonly model?: string;
  /**
   * Where its ports come from: the node's engine port range, as for the agent's engines (default:
   * this machine's, engine-port-range.ts) — a port 0 answer could be taken by any outgoing
   * connection before the engine binds it.
   */
  readonly ports?: EnginePortAllocator;
}

/**
 * Start the engine (default: on the generated calibration model) with `threads` threads, exactly
 * as a stage of a plan runs it: llama-server with the agents' flags (llamaServerArgs,
 * llamaMemoryArgs: flash attention, f16 KV, no CPU repack … — without --no-repack this machine's
 * f16 weights went to AMX kernels the stages never use) and, on a CPU-only build, every layer and
 * the output on a ggml-rpc-server (on a Unix-domain socket, as the agent's), as the coordinator places a CPU head's own layers
 * (instances/llama/layout.ts). Measured alternately on the demo model (1 thread, load average ~4):
 * llama-server's own CPU backend 10.5 ms per token, the same layers behind one local rpc-server
 * 13.8 ms, three rpc-servers (the demo's split, direct) 16.1 ms, the demo's cluster 17.0 ms; the
 * CPU-backend calibration left the ~3 ms every RPC-run stage pays out of every prediction.
 * On macOS the head's stage runs on Metal inside llama-server; this measures the CPU there (-ngl 0).
 * Like the agent's launches, it starts once more on fresh ports when another process took one.
 */
export async function startCalibrationEngine(threads: number, env: NodeJS.ProcessEnv = process.env, o: CalibrationEngineOptions = {}): Promise<CalibrationEngine> {
  const bins = await findLlamaBinaries(env);
  const path = o.model ?? (await ensureCalibrationModel(env));
  const ports = o.ports ?? new EnginePortAllocator(engineRangeOf(undefined, env));
  return onceMoreIfPortTaken(() => startCalibrationProcesses(bins, path, threads, env, ports));
}

async function startCalibrationProcesses(bins: LlamaBinaries, path: string, threads: number, env: NodeJS.ProcessEnv, ports: EnginePortAllocator): Promise<CalibrationEngine> {
  const memory = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: CTX, parallel: 1 };
  const procs: ReturnType<typeof startDetached>[] = [];
  const held: number[] = [];
  const take = async () => {
    held.push(await ports.take(HOST));
    return held.at(-1)!;
  };
  // The engines' own sentinel (watchdog.ts), as the agent's engines have: 20 calibration engines
  // of killed demos and agents were found still running after one session before it.
  const watchdog = new EngineWatchdog({ graceTicks: 5 });
  // The rpc-server listens on a Unix-domain socket in a private directory, as the agent's do.
  let socketDir: string | undefined;
  const stop = () => {
    for (const p of procs) p.stop();
    watchdog.close();
    for (const p of held.splice(0)) ports.release(p);
    if (socketDir !== undefined) rmSync(socketDir, { recursive: true, force: true });
  };
  const port = await take();
  const url = `http://${HOST}:${port}`;
  // As the agent waits for its engines (engine-readiness.ts): accepting, and the engine itself.
  const ready = (kind: 'rpc-server' | 'llama-server', p: ReturnType<typeof startDetached>, timeoutMs: number, gone = p.exited, socket?: string) =>
    waitEngineReady({
      kind,
      host: HOST,
      port: p.port,
      pid: p.pid,
      socket,
      deadlineMs: Date.now() + timeoutMs,
      output: null,
      gone: () => (gone() ? new OrchardError(`${kind} exited before it was ready`) : undefined),
      timedOut: () => new OrchardError(`${kind} did not accept connections within ${timeoutMs / 1000} s`),
    });
  try {
    let argv = ['-m', path, ...llamaMemoryArgs(memory), '-ngl', '0'];
    if (process.platform !== 'darwin') {
      const rpcPort = await take();
      socketDir = await mkdtemp(join(tmpdir(), 'orchard-sock-'));
      const socket = rpcServerSocket(socketDir, rpcPort);
      const rpc = startDetached(bins.rpcServer, ['-H', unixEndpoint(socket), '-t', String(threads)], rpcPort, env, watchdog);
      procs.push(rpc);
      await ready('rpc-server', rpc, 30_000, rpc.exited, socket);
      const layers = modelProfile(await readGgufHeader(path)).layerCount;
      const stage = { modelPath: path, memory, rpc: [{ nodeId: 'calibration', enginePort: rpcPort }], devices: ['RPC0'], tensorSplit: [layers + 1], gpuLayers: layers + 1, debugLog: false };
      argv = llamaServerArgs(stage, [unixEndpoint(socket)]);
    }
    const server = startDetached(bins.llamaServer, [...argv, '--threads', String(threads), '--host', HOST, '--port', String(port)], port, env, watchdog);
    procs.push(server);
    await ready('llama-server', server, 120_000, () => procs.some((p) => p.exited()));
  } catch (err) {
    const died = procs.filter((p) => p.exited());
    stop();
    // One that died before it was ready, its port bound by another process now: taken.
    for (const p of died) {
      const why = await portTakenOr(err, HOST, p.port);
      if (why !== err) throw why;
    }
    throw err;
  }
  return {
    pids: procs.map((p) => p.pid),
    ports: procs.map((p) => p.port),
    model: path,
    threads,
    engineBuild: bins.llamaCppVersion,
    async request(body, signal) {
      const res = await fetch(`${url}/completion`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), ...(signal ? { signal } : {}) });
      if (!res.ok) throw new OrchardError(`calibration request failed: HTTP ${res.status}`);
      return ratesOf(res, body.stream === true);
    },
    cpu: () => cpuSnapshot(procs.map((p) => p.pid)),
    stop,
  };
}

/** CPU seconds a process has used: /proc on Linux, ps elsewhere (macOS). */
async function processCpuSeconds(pid: number): Promise<number> {
  try {
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th, in USER_HZ (100 on Linux).
    const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {}
  const out = await new Promise<string>((res) => execFile('ps', ['-o', 'time=', '-p', String(pid)], (_, stdout) => res(String(stdout ?? ''))));
  // [[dd-]hh:]mm:ss[.xx]
  const [days, rest] = out.trim().includes('-') ? out.trim().split('-') : ['0', out.trim()];
  return (rest ?? '').split(':').reduce((t, part) => t * 60 + Number(part), 0) + Number(days) * 86400 || 0;
}

/**
 * Seconds a process's threads have waited, runnable, for a CPU (Linux /proc/<pid>/task/<tid>/schedstat,
 * second field, ns). 0 where there is no schedstat (macOS): the figure is then the plain wall-clock one.
 */
async function processWaitSeconds(pid: number): Promise<number> {
  try {
    const tids = await readdir(`/proc/${pid}/task`);
    const waits = await Promise.all(tids.map((t) => readFile(`/proc/${pid}/task/${t}/schedstat`, 'utf8').then((x) => Number(x.split(' ')[1]) / 1e9, () => 0)));
    return waits.reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
  } catch {
    return 0;
  }
}

async function cpuSnapshot(enginePids: readonly number[]): Promise<CpuSnapshot> {
  const busyMs = cpus().reduce((t, c) => t + c.times.user + c.times.nice + c.times.sys + c.times.irq, 0);
  const [engine, waits] = await Promise.all([Promise.all(enginePids.map(processCpuSeconds)), Promise.all(enginePids.map(processWaitSeconds))]);
  const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  return { wallSeconds: performance.now() / 1000, machineBusySeconds: busyMs / 1000, engineSeconds: sum(engine), engineWaitSeconds: sum(waits) };
}

/**
 * A calibration window: PROMPT_TOKENS fresh token ids, then `decodeTokens` decoded tokens. Also
 * bench:lan's engine windows, taken between the cluster's through its run (engineRates prices
 * their rates with PROMPT_TOKENS, this prompt's length).
 */
export function calibrationRequest(seed: number, decodeTokens: number): Record<string, unknown> {
  const r = uniformSource(seed);
  // Ordinary token ids (past the control tokens); no prompt cache, so every run prefills in full.
  const prompt = Array.from({ length: PROMPT_TOKENS }, () => 300 + Math.floor(r() * 30000));
  return { prompt, n_predict: decodeTokens, temperature: 0, ignore_eos: true, cache_prompt: false };
}

/** Decode and prompt rates (medians over the windows, each without its waits for a core) and how the windows went. */
interface WindowedRates {
  readonly decode: number;
  readonly prompt: number;
  readonly windows: number;
  readonly decodeTokensPerWindow: number;
  readonly decodeSpread: number;
  readonly competingCores: number;
  /** Median fraction of a window the engine waited for its cores. */
  readonly waitedFraction: number;
}

async function calibrationWindows(engine: CalibrationEngine): Promise<WindowedRates> {
  // Warm-up (first-touch page faults, thread pool start), which also sizes the windows.
  const warm = await engine.request(calibrationRequest(1, WARMUP_DECODE_TOKENS));
  const tokens = windowTokens(warm.decode, CTX - PROMPT_TOKENS);
  const samples: (EngineRates & { waited: number })[] = [];
  const before = await engine.cpu();
  for (let at = before; anotherWindow(CALIBRATION_WINDOWS, samples.length, at.wallSeconds - before.wallSeconds); ) {
    const rates = await engine.request(calibrationRequest(2 + samples.length, tokens));
    const end = await engine.cpu();
    samples.push({ ...rates, waited: waitedFraction(at, end) });
    at = end;
  }
  const after = await engine.cpu();
  const decode = samples.map((x) => uncontendedRate(x.decode, x.waited));
  return {
    decode: median(decode),
    prompt: median(samples.map((x) => uncontendedRate(x.prompt, x.waited))),
    windows: samples.length,
    decodeTokensPerWindow: tokens,
    decodeSpread: relativeSpread(decode),
    competingCores: competingCores(before, after),
    waitedFraction: median(samples.map((x) => x.waited)),
  };
}

/**
 * Measure this machine's llama.cpp engine with `threads` threads and cache the result. `model`
 * measures on another GGUF (the demo's own), `ports` is the node's engine port allocator, `file`
 * writes the result there instead of the cache, and `engine` measures on an engine the caller
 * started (and stops).
 */
export async function measureCalibration(
  threads: number,
  env: NodeJS.ProcessEnv = process.env,
  on: CalibrationEngineOptions & { readonly file?: string; readonly engine?: CalibrationEngine } = {},
): Promise<Calibration> {
  const engine = on.engine ?? (await startCalibrationEngine(threads, env, on));
  const loadAverage1m = loadavg()[0] ?? 0;
  let rates: WindowedRates;
  try {
    rates = await calibrationWindows(engine);
  } catch (err) {
    throw new OrchardError(`engine calibration failed: ${errorMessage(err)}`);
  } finally {
    if (!on.engine) engine.stop();
  }
  const c = calibrationOf(await readGgufHeader(engine.model), rates, { threads: engine.threads, engineBuild: engine.engineBuild, loadAverage1m });
  const file = on.file ?? calibrationFile(env, engine.engineBuild, engine.threads);
  await mkdir(dirname(file), { recursive: true });
  await writeFile(`${file}.tmp`, `${JSON.stringify(c, null, 2)}\n`);
  await rename(`${file}.tmp`, file);
  return c;
}

/** Bytes the planner counts for one decoded token of the whole model at the calibration's context. */
function readBytesPerToken(profile: ReturnType<typeof modelProfile>): number {
  const o = DEFAULT_PLACEMENT_OPTIONS;
  const mm = memoryModel(profile, { ...o, ctx: CTX, parallel: 1 }, o.kvFill);
  return mm.layerRead.reduce((a, b) => a + b, 0) + profile.outputBytes + profile.outputNormBytes + profile.otherBytes + profile.tokenEmbdRowBytes;
}

/**
 * The cost model's node numbers from rates measured on `header`'s model with the planner's own
 * accounting; `promptTokens` is the prompt length the prompt rate was measured on.
 */
export function engineRates(header: Parameters<typeof modelProfile>[0], decodeTokensPerSecond: number, promptTokensPerSecond: number, promptTokens = PROMPT_TOKENS) {
  const profile = modelProfile(header);
  return {
    profile,
    ...calibrationRates(profile, { decodeTokensPerSecond, promptTokensPerSecond, promptTokens, readBytesPerToken: readBytesPerToken(profile) }, DEFAULT_PLACEMENT_OPTIONS.headOverheadSeconds),
  };
}

function calibrationOf(header: Parameters<typeof modelProfile>[0], rates: WindowedRates, at: { threads: number; engineBuild: string; loadAverage1m: number }): Calibration {
  const { profile, ...node } = engineRates(header, rates.decode, rates.prompt);
  return {
    engine: 'llama.cpp',
    ...node,
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
  return c ? { ...p, effectiveBandwidthBytesPerSecond: c.effectiveBandwidthBytesPerSecond, prefillFlopsPerSecond: c.prefillFlopsPerSecond } : p;
}
