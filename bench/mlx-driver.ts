/**
 * bench:mlx-driver — decode tokens/s of the same MLX model driven three ways, side by side:
 *   direct      : mlx-lm's generate_step in one plain Python process (no Orchard at all)
 *   group-1     : Orchard's MlxGroup → mlx_worker.py, one rank (JSON-lines protocol overhead)
 *   pipeline-2/3: MlxGroup, 2 or 3 ranks over the ring on 127.0.0.1 (adds send/recv, all_gather
 *                 and the per-token agreement all_sum)
 * Prints one JSON object; ratios are relative to direct (tokens/s, and CPU time per token
 * summed over ranks, which other load on a shared machine disturbs far less). Goal for group-1: ≥ 0.95.
 * On Linux these are CPU wheels with reference BLAS: absolute numbers mean little, ratios do.
 *
 * Usage: node --import tsx bench/mlx-driver.ts [--tokens N] [--hidden H] [--layers L] [--rounds R]
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ensureMlxEnv, mlxProcessEnv } from '../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../src/node/mlx/group.ts';
import { localRingEndpoints } from '../src/node/mlx/ports.ts';
import type { MlxRequest } from '../src/node/mlx/protocol.ts';
import { writeMlxTestModel } from '../src/node/mlx/testmodel.ts';
import { decodeTokensPerSecond, numberFlag } from './lib/stats.ts';

const run = promisify(execFile);

const argv = process.argv.slice(2);
const TOKENS = numberFlag(argv, '--tokens', 200);
const HIDDEN = numberFlag(argv, '--hidden', 256);
const LAYERS = numberFlag(argv, '--layers', 6);
const ROUNDS = numberFlag(argv, '--rounds', 3);
const PROMPT = [...Buffer.from('Benchmarks measure; they do not assert.')];

const DIRECT = `
import sys, json, time, mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
model, tok = load(sys.argv[1])
n = int(sys.argv[2])
prompt = mx.array(json.loads(sys.argv[3]))
for rep in range(2):  # first pass warms up
    times, ids, cpu = [], [], []
    for (t, _), _i in zip(generate_step(prompt, model, max_tokens=n), range(n)):
        ids.append(int(t)); times.append(time.perf_counter()); cpu.append(time.process_time())
print(json.dumps({"ids": ids, "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
                  "cpu_ms_per_token": (cpu[-1] - cpu[0]) * 1000 / (len(cpu) - 1)}))
`;

/** CPU seconds (user + system) a process has used, from /proc (Linux; 0 elsewhere). */
function cpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in USER_HZ (100)
  } catch {
    return 0;
  }
}

async function viaGroup(g: MlxGroup, req: MlxRequest): Promise<{ ids: number[]; tps: number; cpuMsPerToken: number }> {
  await collect(g.generate({ ...req, id: `${req.id}-warm` }));
  const arrivals: number[] = [];
  const ids: number[] = [];
  const pids = [...g.pids.values()];
  let cpuAtFirst = 0;
  const gen = g.generate(req);
  for (;;) {
    const next = await gen.next();
    if (next.done) break;
    arrivals.push(performance.now());
    if (arrivals.length === 1) cpuAtFirst = pids.reduce((a, p) => a + cpuSeconds(p), 0);
    ids.push(next.value.token);
  }
  const cpu = pids.reduce((a, p) => a + cpuSeconds(p), 0) - cpuAtFirst;
  return { ids, tps: decodeTokensPerSecond(arrivals), cpuMsPerToken: (cpu * 1000) / (arrivals.length - 1) };
}

async function main(): Promise<void> {
  const env = await ensureMlxEnv();
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-mlx-'));
  const groups = new Map<string, MlxGroup>();
  try {
    const model = join(dir, 'model');
    await writeMlxTestModel(env.python, { out: model, layers: LAYERS, hidden: HIDDEN, heads: 4, seed: 1 });
    groups.set('group-1', await MlxGroup.start({ python: env.python, model, mode: 'single' }));
    for (const n of [2, 3]) {
      const launch = { backend: 'ring' as const, endpoints: await localRingEndpoints(n) };
      groups.set(`pipeline-${n}`, await MlxGroup.start({ python: env.python, model, mode: 'pipeline', launch }));
    }
    // The machine is shared: interleave the modes over several rounds and keep each mode's best
    // round (the one least disturbed by other load) next to its median.
    const samples = new Map<string, number[]>();
    const add = (name: string, tps: number) => samples.set(name, [...(samples.get(name) ?? []), tps]);
    let directIds: number[] = [];
    const same = new Map<string, boolean>();
    const req: MlxRequest = { id: 'bench', tokens: PROMPT, maxTokens: TOKENS, ignoreEos: true };
    for (let round = 0; round < ROUNDS; round++) {
      const { stdout } = await run(env.python, ['-c', DIRECT, model, String(TOKENS), JSON.stringify(PROMPT)], {
        env: { ...process.env, ...mlxProcessEnv() },
      });
      const direct = JSON.parse(stdout.trim().split('\n').pop() ?? '{}') as { ids: number[]; decode_tps: number; cpu_ms_per_token: number };
      directIds = direct.ids;
      add('direct', direct.decode_tps);
      add('direct/cpu', direct.cpu_ms_per_token);
      for (const [name, g] of groups) {
        const r = await viaGroup(g, { ...req, id: `bench-${round}` });
        add(name, r.tps);
        add(`${name}/cpu`, r.cpuMsPerToken);
        same.set(name, (same.get(name) ?? true) && sameIds(r.ids, directIds));
      }
    }
    const best = (name: string) => Math.max(...(samples.get(name) ?? [0]));
    const median = (name: string) => {
      const v = [...(samples.get(name) ?? [0])].sort((a, b) => a - b);
      return v[Math.floor(v.length / 2)] ?? 0;
    };
    const out: Record<string, unknown> = {
      bench: 'mlx-driver',
      model: { layers: LAYERS, hidden: HIDDEN },
      tokens: TOKENS,
      rounds: ROUNDS,
      direct: { bestTps: round(best('direct')), medianTps: round(median('direct')), medianCpuMsPerToken: round(median('direct/cpu'), 2) },
    };
    for (const name of groups.keys()) {
      out[name] = {
        bestTps: round(best(name)),
        medianTps: round(median(name)),
        ratioBest: round(best(name) / best('direct'), 3),
        ratioMedian: round(median(name) / median('direct'), 3),
        // CPU time per token summed over the ranks: robust to other load on a shared machine.
        medianCpuMsPerToken: round(median(`${name}/cpu`), 2),
        cpuRatio: round(median('direct/cpu') / median(`${name}/cpu`), 3),
        sameTokens: same.get(name),
      };
    }
    process.stdout.write(`${JSON.stringify(out)}\n`);
  } finally {
    await Promise.all([...groups.values()].map((g) => g.close()));
    await rm(dir, { recursive: true, force: true });
  }
}

function sameIds(a: number[], b: number[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function round(x: number, digits = 1): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

await main();
