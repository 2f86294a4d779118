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
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CoordinatorClient } from '../src/coordinator/api/client.ts';
import { mlxPlacementOptions } from '../src/coordinator/instances/planner-adapter.ts';
import { ensureMlxEnv } from '../src/node/mlx/env.ts';
import { MlxGroup } from '../src/node/mlx/group.ts';
import { localRingEndpoints } from '../src/node/mlx/ports.ts';
import { mlxRequestOf } from '../src/node/mlx/rank-spec.ts';
import { writeMlxTestModel } from '../src/node/mlx/testmodel.ts';
import { readMlxModelProfile } from '../src/shared/model/mlx-profile.ts';
import { planPlacement } from '../src/shared/placement/planner.ts';

const run = promisify(execFile);
const ROOT = new URL('../', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}
const TOKENS = arg('tokens', 128);
const HIDDEN = arg('hidden', 512);
const LAYERS = arg('layers', 6);
const ROUNDS = arg('rounds', 5);
const CTX = 2048;
const PROMPT = 'Benchmarks measure; they do not assert. The orchard';

const procs: ChildProcess[] = [];
function start(args: string[], env: NodeJS.ProcessEnv): { child: ChildProcess; out: () => string } {
  const child = spawn(process.execPath, [BIN, ...args], { detached: true, stdio: ['ignore', 'pipe', 'ignore'], env });
  let out = '';
  child.stdout?.on('data', (c: Buffer) => {
    out += c.toString('utf8');
  });
  procs.push(child);
  return { child, out: () => out };
}

async function ready(p: { out: () => string }): Promise<Record<string, unknown>> {
  for (let i = 0; i < 600; i++) {
    const line = p.out().split('\n').find((l) => l.includes('"event":"ready"'));
    if (line) return JSON.parse(line) as Record<string, unknown>;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('process not ready in 60 s');
}

function decodeTps(arrivals: number[]): number {
  return ((arrivals.length - 1) * 1000) / ((arrivals.at(-1) ?? 0) - (arrivals[0] ?? 0));
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const env = await ensureMlxEnv();
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-mlx-'));
  const model = join(dir, 'm');
  let direct: MlxGroup | undefined;
  try {
    await writeMlxTestModel(env.python, { out: model, arch: 'llama', layers: LAYERS, hidden: HIDDEN, heads: 8, seed: 3 });
    const profile = await readMlxModelProfile(model);
    const opts = { ctx: CTX, ...mlxPlacementOptions(profile) };
    const one = planPlacement(profile, [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], opts);
    const budget = Math.floor(one.stages[0]!.bytes.total) - 2 * 2 ** 20;

    const penv = { ...process.env, ORCHARD_LOG_LEVEL: 'warn', ORCHARD_LOG_FORMAT: 'json' };
    const coord = start(['coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--json'], penv);
    const coordAddr = `127.0.0.1:${String((await ready(coord)).grpcPort)}`;
    const token = (await run(process.execPath, [BIN, 'coordinator', 'token', '--state-dir', join(dir, 'coord')], { env: penv })).stdout.trim();
    for (const name of ['alpha', 'bravo']) {
      const a = start(['node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', join(dir, name), '--json'], penv);
      const r = await ready(a);
      await run(process.execPath, [BIN, 'cluster', 'join', coordAddr, '--token', token, '--agent', `127.0.0.1:${String(r.grpcPort)}`], { env: penv });
    }
    await new Promise((r) => setTimeout(r, 1500)); // both agents up in the registry
    await run(process.execPath, [BIN, 'load', model, '--ctx', String(CTX), '--name', 'm', '--coordinator', coordAddr], { env: penv });
    const client = new CoordinatorClient(coordAddr);
    const status = await client.unary('status', {});
    const stages = ((status.models as Record<string, unknown>[])[0]!.stages as { firstLayer: number; lastLayer: number }[]).map((s) => s.lastLayer - s.firstLayer + 1);
    if (stages.length !== 2) throw new Error(`expected a 2-rank split, got ${stages.length}`);

    // The same ranks, driven directly.
    direct = await MlxGroup.start({ python: env.python, model, mode: 'pipeline', split: stages, launch: { backend: 'ring', endpoints: await localRingEndpoints(2) }, startupTimeoutMs: 180_000 });

    const results = { orchard: [] as number[], direct: [] as number[] };
    let orchardTokens: number[] = [];
    let directTokens: number[] = [];
    for (let round = -1; round < ROUNDS; round++) {
      // round -1 warms both up and is not counted
      const arrivalsO: number[] = [];
      const toks: number[] = [];
      for await (const ev of client.stream('generate', { model: 'm', prompt: PROMPT, maxTokens: TOKENS, temperature: 0, seed: '0' })) {
        if (ev.event === 'token') {
          const ids = ((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number);
          for (const id of ids) {
            toks.push(id);
            arrivalsO.push(performance.now());
          }
        }
      }
      orchardTokens = toks;
      const arrivalsD: number[] = [];
      const dt: number[] = [];
      const gen = direct.generate(mlxRequestOf({ prompt: PROMPT, maxTokens: TOKENS, temperature: 0, topP: 0, seed: 0 }, `d${round}`, CTX));
      for (;;) {
        const n = await gen.next();
        if (n.done) break;
        dt.push(n.value.token);
        arrivalsD.push(performance.now());
      }
      directTokens = dt;
      if (round >= 0) {
        results.orchard.push(decodeTps(arrivalsO));
        results.direct.push(decodeTps(arrivalsD));
      }
    }
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
    for (const c of procs) {
      try {
        if (c.pid) process.kill(-c.pid, 'SIGKILL');
      } catch {}
    }
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
