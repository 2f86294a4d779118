/**
 * bench:mlx — decode tokens/s of one MLX pipeline split driven two ways, side by side, alternating:
 *   orchard : `orchard coordinator` + two `orchard node` agents (127.0.0.1, static join), the
 *             planner's 2-rank split, tokens streamed agent → coordinator gRPC → this client
 *   direct  : the same two ranks (same split, same model, same request) started by MlxGroup in
 *             this process — no agents, no coordinator, no gRPC
 * Prints one JSON object: per-run tokens/s (decode, first token excluded), medians and the ratio
 * orchard/direct (goal ≥ 0.95), plus whether both produced identical tokens. Linux CPU wheels:
 * absolute numbers mean little, the ratio does.
 *
 * Usage: npm run bench:mlx -- [--tokens N] [--hidden H] [--layers L] [--rounds R]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { CoordinatorClient } from '../src/coordinator/api/client.ts';
import { mlxPlacementOptions } from '../src/coordinator/instances/planner-adapter.ts';
import { ensureMlxEnv } from '../src/node/mlx/env.ts';
import { MlxGroup } from '../src/node/mlx/group.ts';
import { localRingEndpoints } from '../src/node/mlx/ports.ts';
import { mlxRequestOf } from '../src/node/mlx/rank-spec.ts';
import { writeMlxTestModel } from '../src/node/mlx/testmodel.ts';
import { readMlxModelProfile } from '../src/shared/model/mlx-profile.ts';
import { planPlacement } from '../src/shared/placement/planner.ts';
import { BenchProcesses, loadModel, startBenchCluster } from './lib/cluster.ts';
import { decodeTokensPerSecond, median, numberFlag } from './lib/stats.ts';

const argv = process.argv.slice(2);
const TOKENS = numberFlag(argv, '--tokens', 128);
const HIDDEN = numberFlag(argv, '--hidden', 512);
const LAYERS = numberFlag(argv, '--layers', 6);
const ROUNDS = numberFlag(argv, '--rounds', 5);
const CTX = 2048;
const PROMPT = 'Benchmarks measure; they do not assert. The orchard';
const procs = new BenchProcesses();

/** One request through Orchard (agent → coordinator gRPC → here): token ids and their arrival times. */
async function viaOrchard(client: CoordinatorClient): Promise<{ tokens: number[]; arrivals: number[] }> {
  const tokens: number[] = [];
  const arrivals: number[] = [];
  for await (const ev of client.stream('generate', { model: 'm', prompt: PROMPT, maxTokens: TOKENS, temperature: 0, seed: '0' })) {
    if (ev.event !== 'token') continue;
    for (const id of ((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number)) {
      tokens.push(id);
      arrivals.push(performance.now());
    }
  }
  return { tokens, arrivals };
}

/** The same request to the same ranks driven in this process. */
async function viaGroup(group: MlxGroup, id: string): Promise<{ tokens: number[]; arrivals: number[] }> {
  const tokens: number[] = [];
  const arrivals: number[] = [];
  const gen = group.generate(mlxRequestOf({ prompt: PROMPT, maxTokens: TOKENS, temperature: 0, topP: 0, seed: 0 }, id, CTX));
  for (;;) {
    const n = await gen.next();
    if (n.done) break;
    tokens.push(n.value.token);
    arrivals.push(performance.now());
  }
  return { tokens, arrivals };
}

/** Alternate both ways ROUNDS times after one uncounted warm-up round. */
async function alternate(client: CoordinatorClient, direct: MlxGroup) {
  const results = { orchard: [] as number[], direct: [] as number[] };
  let orchardTokens: number[] = [];
  let directTokens: number[] = [];
  for (let round = -1; round < ROUNDS; round++) {
    const o = await viaOrchard(client);
    const d = await viaGroup(direct, `d${round}`);
    orchardTokens = o.tokens;
    directTokens = d.tokens;
    if (round >= 0) {
      results.orchard.push(decodeTokensPerSecond(o.arrivals));
      results.direct.push(decodeTokensPerSecond(d.arrivals));
    }
  }
  return { results, orchardTokens, directTokens };
}

async function main(): Promise<void> {
  const env = await ensureMlxEnv();
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-mlx-'));
  const model = join(dir, 'm');
  let direct: MlxGroup | undefined;
  try {
    await writeMlxTestModel(env.python, { out: model, arch: 'llama', layers: LAYERS, hidden: HIDDEN, heads: 8, seed: 3 });
    const profile = await readMlxModelProfile(model);
    const one = planPlacement(profile, [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx: CTX, ...mlxPlacementOptions() });
    // Budgets a little under the whole model: the planner must split it over both agents.
    const budget = String(Math.floor(one.stages[0]!.bytes.total) - 2 * 2 ** 20);
    const penv = { ...process.env, ORCHARD_LOG_LEVEL: 'warn', ORCHARD_LOG_FORMAT: 'json' };
    const { client } = await startBenchCluster(procs, { dir, env: penv, nodes: [{ name: 'alpha', budget }, { name: 'bravo', budget }] });
    const stages = (await loadModel(client, model, 'm', CTX)).map((s) => s.lastLayer - s.firstLayer + 1);
    if (stages.length !== 2) throw new Error(`expected a 2-rank split, got ${stages.length}`);
    // The same ranks, driven directly.
    direct = await MlxGroup.start({ python: env.python, model, mode: 'pipeline', split: stages, launch: { backend: 'ring', endpoints: await localRingEndpoints(2) }, startupTimeoutMs: 180_000 });
    const { results, orchardTokens, directTokens } = await alternate(client, direct);
    client.close();
    const o = median(results.orchard);
    const d = median(results.direct);
    process.stdout.write(
      `${JSON.stringify(
        {
          bench: 'mlx-orchestrated',
          model: { layers: LAYERS, hidden: HIDDEN, split: stages },
          tokens: TOKENS,
          generated: { orchard: orchardTokens.length, direct: directTokens.length },
          rounds: ROUNDS,
          tokensPerSecond: { orchard: results.orchard, direct: results.direct, orchardMedian: o, directMedian: d },
          ratio: o / d,
          goal: 0.95,
          identicalTokens: JSON.stringify(orchardTokens) === JSON.stringify(directTokens),
        },
        null,
        2,
      )}\n`,
    );
  } finally {
    await direct?.close();
    await procs.killAll();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
