/**
 * bench:decode-depth — what one decoded token costs on the calibration engine as the model gets
 * deeper, and where the part that does not grow with depth is paid.
 *
 * The engine is the calibration's (src/node/calibrate.ts startCalibrationEngine: llama-server with
 * the agents' flags and, on Linux, every layer and the output on local ggml-rpc-servers), on
 * generated models of the calibration's layer shape (CALIBRATION_SHAPE) at several depths, and
 * the same 24… layers split over 2 and 3 local rpc-servers (one per stage, as bench:lan's nodes
 * run them). Every configuration runs at once; in each round every one gets one decode window
 * (the calibration's request: a fresh 128-token prompt, then about `--window-seconds` of
 * decoding), in an order that alternates round by round, so a drift of this shared machine hits
 * every depth alike. A window's rate is llama-server's own decode rate without the time the
 * engine's threads waited for a core another process held (calibration.ts `uncontendedRate`).
 *
 * Fitted: seconds per token = fixed + bytes ÷ bandwidth over the one-rpc-server depths (bytes as
 * the planner counts them: calibrate.ts readBytesPerToken; shared/placement/decode-fit.ts), and for
 * every configuration the part of its seconds per token that the fitted bandwidth does not explain
 * (`fixedMs`): equal for 1, 2 and 3 rpc-servers means the fixed part is paid once per token; a
 * step per rpc-server means once per stage. `oneDepth` prices every depth from the 12-layer
 * window alone, as a one-depth calibration does (bandwidth = bytes ÷ (seconds − 0.5 ms)).
 *
 *   npm run bench:decode-depth -- [--json] [--threads 1] [--depths 4,12,24,36] [--splits 24:2,24:3] [--rounds 6] [--window-seconds 2]
 */
import { mkdir, rename, stat } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { CALIBRATION_SHAPE, calibrationRequest, readBytesPerToken, startCalibrationEngine } from '../src/node/calibrate.ts';
import type { CalibrationEngine } from '../src/node/calibration-engine.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { writeGguf } from '../src/shared/gguf/writer.ts';
import { llamaCacheDir } from '../src/node/llama/cache.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import { uncontendedRate, waitedFraction, windowTokens } from '../src/shared/placement/calibration.ts';
import { fitDecodeCost } from '../src/shared/placement/decode-fit.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../src/shared/placement/types.ts';
import { llamaTestModelSpec } from '../src/shared/testmodel/llama.ts';
import { loadVocab } from '../src/shared/testmodel/vocab.ts';
import { uniformSource } from '../src/shared/testmodel/prng.ts';
import { BenchProcesses, runBench } from './lib/cluster.ts';
import { flag, median } from './lib/stats.ts';
import { completionBody } from '../src/node/generate.ts';

const argv = process.argv.slice(2);
const JSON_OUT = argv.includes('--json');
const THREADS = Number(flag(argv, '--threads', '1'));
const DEPTHS = flag(argv, '--depths', '4,12,24,36').split(',').map(Number);
const SPLITS = flag(argv, '--splits', '24:2,24:3')
  .split(',')
  .filter(Boolean)
  .map((x) => x.split(':').map(Number) as [number, number]);
const ROUNDS = Number(flag(argv, '--rounds', '6'));
const AGENT_DEPTHS = flag(argv, '--agent-depths', '12,36').split(',').filter(Boolean).map(Number);
/** Engines per depth (separate processes: does an engine's speed depend on the process?). */
const REPLICAS = Number(flag(argv, '--replicas', '1'));
/** Other requests on those depths' engines: `agent`, `fresh:P`. */
const REQUESTS = flag(argv, '--requests', 'agent').split(',').filter(Boolean);
const WINDOW_SECONDS = Number(flag(argv, '--window-seconds', '2'));

const t0 = performance.now();
const progress = (what: string) => process.stderr.write(`bench:decode-depth +${((performance.now() - t0) / 1000).toFixed(0)} s: ${what}\n`);

/** The generated models are kept beside the calibration's own (generating 36 layers takes a while). */
async function model(layers: number): Promise<string> {
  const s = CALIBRATION_SHAPE;
  const path = join(dirname(llamaCacheDir()), 'calibration', `calibration-l${layers}-d${s.dim}-f${s.ffn}-${s.type}-s${s.seed}.gguf`);
  try {
    if ((await stat(path)).size > 0) return path;
  } catch {}
  await mkdir(dirname(path), { recursive: true });
  await writeGguf(`${path}.tmp`, llamaTestModelSpec({ ...CALIBRATION_SHAPE, layers }, await loadVocab()));
  await rename(`${path}.tmp`, path);
  return path;
}

interface Config {
  readonly layers: number;
  readonly rpcServers: number;
  /**
   * The calibration's request (128-token fresh prompt, not streamed), the agents' (a short cached
   * prompt, streamed, top_k 1: generate.ts completionBody), or `fresh:P`: the calibration's with a
   * fresh prompt of P tokens (how the context a token attends to weighs).
   */
  readonly request: string;
  readonly engine: CalibrationEngine;
  readonly bytesPerToken: number;
  readonly tokens: number;
  readonly windows: { readonly tokensPerSecond: number; readonly raw: number; readonly waited: number }[];
}

let seed = 5000;
async function window(c: Config): Promise<void> {
  const before = await c.engine.cpu();
  const fresh = /^fresh:(\d+)$/.exec(c.request);
  const body =
    c.request === 'agent'
      ? completionBody({ prompt: AGENT_PROMPT, maxTokens: c.tokens, temperature: 0, topP: 0, seed: 0, stop: [] })
      : fresh
        ? { ...calibrationRequest(seed++, c.tokens), prompt: freshIds(seed, Number(fresh[1])) }
        : calibrationRequest(seed++, c.tokens);
  const r = await c.engine.request(body);
  const waited = waitedFraction(before, await c.engine.cpu());
  c.windows.push({ tokensPerSecond: uncontendedRate(r.decode, waited), raw: r.decode, waited });
}

async function start(layers: number, rpcServers: number): Promise<Config> {
  const path = await model(layers);
  const engine = await startCalibrationEngine(THREADS, process.env, { model: path, rpcServers });
  const warm = await engine.request(calibrationRequest(1, 32));
  const bytesPerToken = readBytesPerToken(modelProfile(await readGgufHeader(path)));
  return { layers, rpcServers, request: 'calibration', engine, bytesPerToken, tokens: windowTokens(warm.decode * WINDOW_SECONDS, 1024 - 128), windows: [] };
}

/** `n` ordinary token ids drawn from `s` (as calibrationRequest draws its 128). */
function freshIds(s: number, n: number): number[] {
  const r = uniformSource(s);
  return Array.from({ length: n }, () => 300 + Math.floor(r() * 30000));
}

/** bench:lan's decode requests (a short prompt, then --tokens): what its clusters decode. */
const AGENT_PROMPT = 'The orchard has apples and pears. Once upon a time';

/** The least-squares line itself, intercept unclamped (fitDecodeCost takes a negative one as 0): ms and GB/s. */
function line(points: readonly { bytesPerToken: number; secondsPerToken: number }[]) {
  const n = points.length;
  const mx = points.reduce((t, p) => t + p.bytesPerToken, 0) / n;
  const my = points.reduce((t, p) => t + p.secondsPerToken, 0) / n;
  const slope = points.reduce((t, p) => t + (p.bytesPerToken - mx) * (p.secondsPerToken - my), 0) / points.reduce((t, p) => t + (p.bytesPerToken - mx) ** 2, 0);
  return { interceptMs: (my - slope * mx) * 1000, bandwidthGBps: 1 / slope / 1e9 };
}

function summary(configs: readonly Config[]) {
  const secondsOf = (c: Config) => 1 / median(c.windows.map((w) => w.tokensPerSecond));
  const depthRuns = configs.filter((c) => c.rpcServers === 1 && c.request === 'calibration');
  const fit = fitDecodeCost(depthRuns.flatMap((c) => c.windows.map((w) => ({ bytesPerToken: c.bytesPerToken, secondsPerToken: 1 / w.tokensPerSecond }))));
  const medianFit = fitDecodeCost(depthRuns.map((c) => ({ bytesPerToken: c.bytesPerToken, secondsPerToken: secondsOf(c) })));
  const twelve = depthRuns.find((c) => c.layers === CALIBRATION_SHAPE.layers);
  const rawFit = fitDecodeCost(depthRuns.flatMap((c) => c.windows.map((w) => ({ bytesPerToken: c.bytesPerToken, secondsPerToken: 1 / w.raw }))));
  const head = DEFAULT_PLACEMENT_OPTIONS.headOverheadSeconds;
  const oneDepthBandwidth = twelve ? twelve.bytesPerToken / (secondsOf(twelve) - head) : undefined;
  return {
    fit: { fixedMs: fit.fixedSecondsPerToken * 1000, bandwidthGBps: fit.bandwidthBytesPerSecond / 1e9 },
    rawFit: { fixedMs: rawFit.fixedSecondsPerToken * 1000, bandwidthGBps: rawFit.bandwidthBytesPerSecond / 1e9 },
    line: line(depthRuns.flatMap((c) => c.windows.map((w) => ({ bytesPerToken: c.bytesPerToken, secondsPerToken: 1 / w.tokensPerSecond })))),
    rawLine: line(depthRuns.flatMap((c) => c.windows.map((w) => ({ bytesPerToken: c.bytesPerToken, secondsPerToken: 1 / w.raw })))),
    fitOfMedians: { fixedMs: medianFit.fixedSecondsPerToken * 1000, bandwidthGBps: medianFit.bandwidthBytesPerSecond / 1e9 },
    configs: configs.map((c) => {
      const s = secondsOf(c);
      const oneDepth = oneDepthBandwidth ? 1 / (c.bytesPerToken / oneDepthBandwidth + head) : undefined;
      return {
        layers: c.layers,
        rpcServers: c.rpcServers,
        request: c.request,
        pids: c.engine.pids,
        rawTokensPerSecond: median(c.windows.map((w) => w.raw)),
        megabytesPerToken: c.bytesPerToken / 1e6,
        tokensPerWindow: c.tokens,
        tokensPerSecond: 1 / s,
        msPerToken: s * 1000,
        fixedMs: (s - c.bytesPerToken / fit.bandwidthBytesPerSecond) * 1000,
        fittedTokensPerSecond: 1 / (fit.fixedSecondsPerToken + c.bytesPerToken / fit.bandwidthBytesPerSecond),
        oneDepthTokensPerSecond: oneDepth,
        oneDepthError: oneDepth ? Number(((1 / s - oneDepth) / oneDepth).toFixed(4)) : undefined,
        windows: c.windows.map((w) => Number(w.tokensPerSecond.toFixed(2))),
        waited: median(c.windows.map((w) => w.waited)),
      };
    }),
  };
}

async function decodeDepth(): Promise<object> {
  const configs: Config[] = [];
  const load = [loadavg()[0]!];
  try {
    const depths = DEPTHS.flatMap((d) => Array.from({ length: REPLICAS }, () => [d, 1] as const));
    for (const [layers, rpcServers] of [...depths, ...SPLITS]) {
      progress(`starting ${layers} layers on ${rpcServers} rpc-server(s), ${THREADS} thread(s)`);
      configs.push(await start(layers, rpcServers));
    }
    // The same engines under the agents' request, as a cluster decodes it.
    for (const layers of AGENT_DEPTHS) {
      const c = configs.find((x) => x.layers === layers && x.rpcServers === 1);
      for (const request of REQUESTS) if (c) configs.push({ ...c, request, windows: [] });
    }
    for (let r = 0; r < ROUNDS; r++) {
      progress(`round ${r + 1} of ${ROUNDS}`);
      const order = r % 2 === 0 ? configs : [...configs].reverse();
      for (const c of order) await window(c);
      load.push(loadavg()[0]!);
    }
  } finally {
    for (const e of new Set(configs.map((c) => c.engine))) e.stop();
  }
  return { threads: THREADS, rounds: ROUNDS, windowSeconds: WINDOW_SECONDS, ...summary(configs), loadAverage: { min: Math.min(...load), max: Math.max(...load) } };
}

const procs = new BenchProcesses();
await runBench('decode-depth', procs, JSON_OUT, () => decodeDepth());
