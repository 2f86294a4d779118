/**
 * bench:mlx-driver — decode tokens/s of the same MLX model driven three ways, side by side:
 *   direct      : mlx-lm's generate_step in one plain Python process (no Orchard at all)
 *   group-1     : Orchard's MlxGroup → mlx_worker.py, one rank (JSON-lines protocol overhead)
 *   pipeline-2/3: MlxGroup, 2 or 3 ranks over the ring on 127.0.0.1 (adds send/recv, all_gather
 *                 and the per-token agreement all_sum)
 * Prints one JSON object; ratios are relative to direct. Goal for group-1: ≥ 0.95.
 * On Linux these are CPU wheels with reference BLAS: absolute numbers mean little, ratios do.
 *
 * Usage: node --import tsx bench/mlx-driver.ts [--tokens N] [--hidden H] [--layers L]
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ensureMlxEnv, mlxProcessEnv } from '../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../src/node/mlx/group.ts';
import { localRingEndpoints } from '../src/node/mlx/ports.ts';
import type { MlxRequest } from '../src/node/mlx/protocol.ts';
import { writeMlxTestModel } from '../src/node/mlx/testmodel.ts';

const run = promisify(execFile);

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

const TOKENS = arg('tokens', 200);
const HIDDEN = arg('hidden', 256);
const LAYERS = arg('layers', 6);
const PROMPT = [...Buffer.from('Benchmarks measure; they do not assert.')];

const DIRECT = `
import sys, json, time, mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
model, tok = load(sys.argv[1])
n = int(sys.argv[2])
prompt = mx.array(json.loads(sys.argv[3]))
for rep in range(2):  # first pass warms up
    times, ids = [], []
    for (t, _), _i in zip(generate_step(prompt, model, max_tokens=n), range(n)):
        ids.append(int(t)); times.append(time.perf_counter())
print(json.dumps({"ids": ids, "decode_tps": (len(times) - 1) / (times[-1] - times[0])}))
`;

/** Decode tokens/s from token arrival times (first token excluded: it carries the prefill). */
function decodeTps(arrivals: number[]): number {
  const first = arrivals[0] ?? 0;
  const last = arrivals.at(-1) ?? 0;
  return ((arrivals.length - 1) * 1000) / (last - first);
}

async function viaGroup(g: MlxGroup, req: MlxRequest): Promise<{ ids: number[]; tps: number }> {
  await collect(g.generate({ ...req, id: `${req.id}-warm` }));
  const arrivals: number[] = [];
  const ids: number[] = [];
  const gen = g.generate(req);
  for (;;) {
    const next = await gen.next();
    if (next.done) break;
    arrivals.push(performance.now());
    ids.push(next.value.token);
  }
  return { ids, tps: decodeTps(arrivals) };
}

async function main(): Promise<void> {
  const env = await ensureMlxEnv();
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-mlx-'));
  const groups: MlxGroup[] = [];
  try {
    const model = join(dir, 'model');
    await writeMlxTestModel(env.python, { out: model, layers: LAYERS, hidden: HIDDEN, heads: 4, seed: 1 });
    const { stdout } = await run(env.python, ['-c', DIRECT, model, String(TOKENS), JSON.stringify(PROMPT)], {
      env: { ...process.env, ...mlxProcessEnv() },
    });
    const direct = JSON.parse(stdout.trim().split('\n').pop() ?? '{}') as { ids: number[]; decode_tps: number };
    const req: MlxRequest = { id: 'bench', tokens: PROMPT, maxTokens: TOKENS, ignoreEos: true };
    const results: Record<string, { tps: number; ratio: number; sameTokens: boolean }> = {};
    const record = (name: string, r: { ids: number[]; tps: number }) => {
      results[name] = { tps: round(r.tps), ratio: round(r.tps / direct.decode_tps, 3), sameTokens: sameIds(r.ids, direct.ids) };
    };
    const single = await MlxGroup.start({ python: env.python, model, mode: 'single' });
    groups.push(single);
    record('group-1', await viaGroup(single, req));
    await single.close();
    for (const n of [2, 3]) {
      const g = await MlxGroup.start({
        python: env.python,
        model,
        mode: 'pipeline',
        launch: { backend: 'ring', endpoints: await localRingEndpoints(n) },
      });
      groups.push(g);
      record(`pipeline-${n}`, await viaGroup(g, req));
      await g.close();
    }
    process.stdout.write(
      `${JSON.stringify({ bench: 'mlx-driver', model: { layers: LAYERS, hidden: HIDDEN }, tokens: TOKENS, direct: { tps: round(direct.decode_tps) }, ...results })}\n`,
    );
  } finally {
    await Promise.all(groups.map((g) => g.close()));
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
