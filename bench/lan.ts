/**
 * bench:lan — measured vs predicted decode tok/s and time to first token on a simulated LAN, for
 * Orchard's plan and the baselines' layouts, and model load time cold vs pre-seeded.
 *
 * Three nodes, each in its own network namespace on a bridge, every node's link shaped by tc tbf
 * to the profile's rate (1 GbE, 10 GbE; this kernel has no netem, and Toxiproxy's latency toxic has
 * 1 ms granularity, ten times a LAN's round trip: the latency is what the path has, and Orchard
 * measures it). A coordinator in this process (bench/lan/cluster.ts) with real joined agents and
 * real llama.cpp engines (one thread each); the placement rule is swapped per scenario: Orchard's
 * planner, exo's rule, llama.cpp's default split (src/shared/placement/baselines.ts).
 *
 * Predictions come from the product's cost model only: the planner (or the fixed split of a
 * baseline, costed by the same model: src/shared/placement/fixed.ts) fed with what the
 * coordinator's planner saw — the engine calibration the agents report (`measureCalibration`, one
 * node, no network, taken at the start of the run under the machine's load as the demo does) and
 * the links Orchard measured itself after shaping — never with this bench's results.
 *
 * Loads: cold = a file of the same shape and size the nodes do not hold (every worker's weights
 * cross the shaped link); pre-seeded = the file every node holds in its --models-dir, its tensor
 * cache seeded once at the start (seedingSeconds: that one-time cost, paid when a node first
 * holds the file).
 *
 *   npm run bench:lan -- [--json] [--runs 3] [--tokens 24] [--prompt-words 120] [--profiles 1gbe,10gbe]
 * Needs root (namespaces, tc) and the engines `orchard setup` builds.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { loadavg } from 'node:os';
import { measureCalibration } from '../src/node/calibrate.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import { planPlacement } from '../src/shared/placement/planner.ts';
import { type LanCluster, RULES, type Rule, startLanCluster } from './lan/cluster.ts';
import { measure, measuredLinks, predict, timedLoad, unload } from './lan/measure.ts';
import { rankingAgreement } from './lan/ranking.ts';
import { BenchProcesses, benchEnv, runBench, writeTestModel } from './lib/cluster.ts';
import { flag } from './lib/stats.ts';

const argv = process.argv.slice(2);
const JSON_OUT = argv.includes('--json');
const RUNS = Number(flag(argv, '--runs', '3'));
const TOKENS = Number(flag(argv, '--tokens', '24'));
const PROMPT_WORDS = Number(flag(argv, '--prompt-words', '120'));
const CTX = 1024;
const PROFILES: Record<string, number> = { '1gbe': 1e9, '10gbe': 10e9 };
const chosenProfiles = flag(argv, '--profiles', '1gbe,10gbe').split(',');
/** The calibration model's shape (src/node/calibrate.ts CALIBRATION_SHAPE) with other weights: the node's figure is of this very shape. */
const SHAPE = ['--layers', '12', '--dim', '1024', '--ffn', '2816', '--heads', '16', '--kv-heads', '4', '--type', 'f16', '--ctx', String(CTX)];
/**
 * Budgets from what one node needs for the whole model (`single`: weights, KV, compute buffers and
 * llama-server's own 512 MiB): none holds it alone; alpha has the most memory. Orchard's plan
 * then needs all three (the head's fixed 512 MiB leaves alpha room for a few layers only).
 */
const NODES = [
  { name: 'alpha', budget: (single: number) => 0.8 * single },
  { name: 'bravo', budget: (single: number) => 0.5 * single },
  { name: 'charlie', budget: (single: number) => 0.5 * single },
];

const t0 = performance.now();
const progress = (what: string) => process.stderr.write(`bench:lan +${((performance.now() - t0) / 1000).toFixed(0)} s: ${what}\n`);

async function sha256(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Seed every node's tensor cache with the whole model from its own copy (what a node does once when it first holds a file). */
async function seedAll(c: LanCluster, model: string, layers: number): Promise<Record<string, number>> {
  const id = { modelSha256: await sha256(model), modelSizeBytes: (await stat(model)).size };
  const out: Record<string, number> = {};
  for (const n of c.handle.membership.registry.nodes()) {
    const t0 = performance.now();
    await c.handle.membership.client(n.nodeId)!.prepareCache({ ...id, firstLayer: 0, lastLayer: layers - 1, holdsOutput: true }, () => {}, 600_000);
    out[n.profile.name] = (performance.now() - t0) / 1000;
  }
  return out;
}

async function scenario(c: LanCluster, profile: string, rule: Rule, models: { cold: string; seeded: string }) {
  c.rule = rule;
  const cold = await timedLoad(c.client, models.cold, 'cold', CTX);
  await unload(c.client, 'cold');
  const seeded = await timedLoad(c.client, models.seeded, 'bench', CTX);
  const m = await measure(c.client, 'bench', { runs: RUNS, tokens: TOKENS, promptWords: PROMPT_WORDS });
  await unload(c.client, 'bench');
  const plan = predict(c.seen!, seeded, m.promptTokens);
  const over = plan.stages.filter((s) => s.headroomBytes < 0).map((s) => s.node);
  const err = (p: number, x: number) => Number(((x - p) / p).toFixed(4));
  return {
    profile,
    name: rule,
    predictedTokensPerSecond: plan.predicted.tokensPerSecond,
    measuredTokensPerSecond: m.decodeTokensPerSecond,
    predictedTtftMs: plan.predicted.ttftSeconds * 1000,
    measuredTtftMs: m.ttftMs,
    loadSecondsCold: cold.seconds,
    loadSecondsPreseeded: seeded.seconds,
    decodeError: err(plan.predicted.tokensPerSecond, m.decodeTokensPerSecond),
    ttftError: err(plan.predicted.ttftSeconds * 1000, m.ttftMs),
    preseededOverCold: seeded.seconds / cold.seconds,
    stages: seeded.stages.map((s) => `${s.node}:${s.firstLayer}-${s.lastLayer}`),
    predictedHopMs: plan.predicted.hopSeconds * 1000,
    budgetViolations: over,
    promptTokens: m.promptTokens,
    enginePromptMs: m.enginePromptMs,
    decodeRuns: m.decodeRuns,
    ttftRuns: m.ttftRuns,
  };
}

async function lan(procs: BenchProcesses, dir: string): Promise<object> {
  const bins = await findLlamaBinaries();
  const calibrationFile = join(dir, 'calibration.json');
  progress('calibrating the engine (one node, no network)');
  const calibration = await measureCalibration(1, process.env, { file: calibrationFile });
  // The agents' cache root is in the run's folder: a node's files outside --models-dir it may still
  // load (the cold model), and its hashes of model files start empty.
  const env = { ...benchEnv(bins.binDir), ORCHARD_CALIBRATION_FILE: calibrationFile, ORCHARD_LOG_LEVEL: 'warn', ORCHARD_CACHE_DIR: join(dir, 'cache') };
  await mkdir(join(dir, 'models'));
  await mkdir(join(dir, 'cache'));
  const seededModel = await writeTestModel(join(dir, 'models', 'm.gguf'), [...SHAPE, '--seed', '7'], env);
  // Same shape, other weights: no node holds it, so every weight crosses the network.
  const coldModel = await writeTestModel(join(dir, 'cache', 'm-cold.gguf'), [...SHAPE, '--seed', '8'], env);
  const profile = modelProfile(await readGgufHeader(seededModel));
  const single = planPlacement(profile, [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 1e9 }], { ctx: CTX }).stages[0]!.bytes.total;
  const nodes = NODES.map((n) => ({ name: n.name, budgetBytes: Math.floor(n.budget(single)) }));
  const c = await startLanCluster(procs, { dir, env, nodes, tag: String(process.pid % 10_000) });
  const load = [loadavg()[0]!];
  try {
    progress('seeding every node\'s tensor cache');
    const seedingSeconds = await seedAll(c, seededModel, profile.layerCount);
    const scenarios = [];
    const links: Record<string, ReturnType<typeof measuredLinks>> = {};
    for (const p of chosenProfiles) {
      await c.shape(PROFILES[p]!);
      links[p] = measuredLinks(c);
      for (const rule of RULES) {
        progress(`${p} ${rule}`);
        scenarios.push(await scenario(c, p, rule, { cold: coldModel, seeded: seededModel }));
        load.push(loadavg()[0]!);
      }
    }
    return {
      scenarios,
      rankingAgreement: rankingAgreement(scenarios),
      goals: goals(scenarios),
      setup: { nodes, model: `${profile.layerCount} layers, dim ${profile.embd}, f16, ${(profile.fileTensorBytes / 1e6).toFixed(0)} MB`, ctx: CTX, runs: RUNS, tokens: TOKENS, threadsPerEngine: 1 },
      calibration: { effectiveBandwidthBytesPerSecond: calibration.effectiveBandwidthBytesPerSecond, prefillFlopsPerSecond: calibration.prefillFlopsPerSecond },
      links,
      seedingSeconds,
      loadAverage: { min: Math.min(...load), max: Math.max(...load), samples: load },
    };
  } finally {
    await c.close();
  }
}

function goals(s: { profile: string; decodeError: number; ttftError: number; preseededOverCold: number }[]) {
  return {
    decodeWithin15Percent: s.every((x) => Math.abs(x.decodeError) <= 0.15),
    ttftWithin25Percent: s.every((x) => Math.abs(x.ttftError) <= 0.25),
    preseededAtMostFifthOfColdOn1GbE: s.filter((x) => x.profile === '1gbe').every((x) => x.preseededOverCold <= 0.2),
  };
}

const procs = new BenchProcesses();
await runBench('lan', procs, JSON_OUT, (dir) => lan(procs, dir));
