import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureMlxEnv } from '../../src/node/mlx/env.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { type DelayProxy, startDelayProxy } from '../helpers/delay-proxy.ts';
import { freePort, killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { mlxTensorBudgets } from '../helpers/split-model.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * How the coordinator lays an MLX model over 2 ranks, with real processes on loopback:
 *  - `auto` decides from the links the agents measured: bravo is reached through a relay that
 *    holds every chunk 15 ms each way (a loopback link with latency; this kernel has no netem),
 *    so the measured round trip is ≥ 30 ms and auto picks pipeline, saying so — with the
 *    measured link — in `orchard plan`, the load and `orchard status`;
 *  - `--parallelism tensor` on a model whose 3 experts do not divide by 2 ranks is refused by
 *    `orchard load` with one clear error, and nothing is started.
 */

const execFileP = promisify(execFile);
const CTX = 256;
const DELAY_MS = 15;

async function workerPids(modelDir: string): Promise<number[]> {
  const { stdout } = await execFileP('pgrep', ['-f', `mlx_worker.py --model ${modelDir}`]).catch(() => ({ stdout: '' }));
  return stdout.split('\n').filter(Boolean).map(Number);
}

describe('MLX parallelism through the coordinator: auto from measured links, impossible tensor refused', () => {
  const dir = tempDir('orchard-mlx-par-', 'all');
  const procs: Proc[] = [];
  const proxies: DelayProxy[] = [];
  let env: NodeJS.ProcessEnv;
  let coordAddr: string;
  let even: string;
  let odd: string;

  beforeAll(async () => {
    const mlx = await ensureMlxEnv();
    even = join(dir.path, 'moe4');
    odd = join(dir.path, 'moe3');
    await writeMlxTestModel(mlx.python, { out: even, arch: 'qwen3_moe', layers: 4, hidden: 64, heads: 4, intermediate: 384, experts: 4, activeExperts: 2, seed: 3 });
    await writeMlxTestModel(mlx.python, { out: odd, arch: 'qwen3_moe', layers: 4, hidden: 64, heads: 4, intermediate: 512, experts: 3, activeExperts: 2, seed: 3 });
    const coordState = join(dir.path, 'coord');
    env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_COORDINATOR_STATE_DIR: coordState, ORCHARD_MLX_READY_TIMEOUT: '60' };
    const coordinator = spawnProc('coordinator', [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', coordState, '--heal', 'off', '--json'], env);
    procs.push(coordinator);
    coordAddr = `127.0.0.1:${String((await readyLine(coordinator)).grpcPort)}`;
    const t = await orchard(['coordinator', 'token', '--uses', '2', '--ttl', '10m'], env);
    expect(t.code, t.stderr).toBe(0);
    const nodeEnv = { ...env, ORCHARD_NODE_TOKEN: t.stdout.trim() };
    // Budgets under which the planner must split either model over both nodes, each node with room
    // for a tensor rank (so auto decides on the link, not on memory).
    const budgets = await mlxTensorBudgets([even, odd], CTX);
    const agent = (name: 'alpha' | 'bravo', extra: string[]) =>
      spawnProc(`node ${name}`, [ORCHARD_BIN, 'node', '--no-mdns', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budgets[name]), '--state-dir', join(dir.path, name), '--models-dir', dir.path, '--json', '--join', coordAddr, ...extra], nodeEnv);
    procs.push(agent('alpha', ['--grpc-port', '0']));
    await readyLine(procs.at(-1)!);
    // bravo is reached at 127.0.0.2: its gRPC port passes straight through, its tunnel (engine
    // traffic and the link probes) through the delaying relay.
    const [grpcPort, tunnelPort] = [await freePort(), await freePort()];
    proxies.push(await startDelayProxy({ listenHost: '127.0.0.2', listenPort: grpcPort, targetHost: '127.0.0.1', targetPort: grpcPort, delayMs: 0 }));
    proxies.push(await startDelayProxy({ listenHost: '127.0.0.2', listenPort: tunnelPort, targetHost: '127.0.0.1', targetPort: tunnelPort, delayMs: DELAY_MS }));
    procs.push(agent('bravo', ['--grpc-port', String(grpcPort), '--tunnel-port', String(tunnelPort), '--advertise-host', '127.0.0.2']));
    await readyLine(procs.at(-1)!);
  }, 300_000);

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
    await Promise.all(proxies.splice(0).map((p) => p.close()));
  });

  const status = async () => {
    const s = await orchard(['status', '--json', '--coordinator', coordAddr], env);
    expect(s.code, s.stderr).toBe(0);
    return JSON.parse(s.stdout) as {
      nodes: { name: string; state: string }[];
      models: { name: string; parallelism?: { mode: string; reason: string } }[];
      links: { fromName: string; toName: string; rttSeconds: number | null }[];
    };
  };

  it('auto picks pipeline on the measured 30 ms link and says why in plan, load and status', async () => {
    let links: Awaited<ReturnType<typeof status>>['links'] = [];
    for (const until = Date.now() + 60_000; Date.now() < until; await sleep(500)) {
      links = (await status()).links.filter((l) => l.rttSeconds);
      if (links.length === 2) break;
    }
    expect(links.map((l) => `${l.fromName}>${l.toName}`).sort()).toEqual(['alpha>bravo', 'bravo>alpha']);
    // Each probe round trip crosses the relay both ways in one direction of the pair at least.
    expect(Math.max(...links.map((l) => l.rttSeconds!))).toBeGreaterThanOrEqual((2 * DELAY_MS) / 1000);

    const why = /auto: pipeline, predicted [\d.]+ ms\/token pipeline vs [\d.]+ ms\/token tensor \(8 all-reduces, [\d.]+ KiB per token, at (\d+\.\d+) ms per link round trip, measured: slowest ring link (alpha↔bravo|bravo↔alpha)/;
    const plan = await orchard(['plan', even, '--ctx', String(CTX), '--pin', 'alpha', 'bravo', '--coordinator', coordAddr], env);
    expect(plan.code, plan.stderr).toBe(0);
    const line = plan.stdout.split('\n').find((l) => l.startsWith('parallelism: '));
    expect(line).toMatch(new RegExp(`^parallelism: pipeline — ${why.source}`));
    expect(Number(why.exec(line!)![1])).toBeGreaterThanOrEqual(2 * DELAY_MS);

    const load = await orchard(['load', even, '--ctx', String(CTX), '--name', 'even', '--pin', 'alpha', 'bravo', '--json', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
    expect(load.stdout).toMatch(/MLX pipeline parallel over 2 rank\(s\): auto: pipeline, .*measured: slowest ring link/);
    const m = (await status()).models.find((x) => x.name === 'even');
    expect(m?.parallelism?.mode).toBe('pipeline');
    expect(m?.parallelism?.reason).toMatch(why);
    const text = await orchard(['status', '--coordinator', coordAddr], env);
    expect(text.stdout).toMatch(new RegExp(`parallelism: pipeline — ${why.source}`));
    const g = await orchard(['generate', '--model', 'even', '--prompt', 'Once upon a time', '--max-tokens', '4', '--temperature', '0', '--json', '--coordinator', coordAddr], env);
    expect(g.code, g.stderr).toBe(0);
    expect((JSON.parse(g.stdout) as { tokens: number[] }).tokens.length).toBeGreaterThan(0);
    expect((await orchard(['unload', 'even', '--coordinator', coordAddr], env)).code).toBe(0);
  }, 300_000);

  it('orchard load --parallelism tensor with 3 experts over 2 ranks: one clear error, nothing started', async () => {
    const r = await orchard(['load', odd, '--ctx', String(CTX), '--name', 'odd', '--parallelism', 'tensor', '--pin', 'alpha', 'bravo', '--coordinator', coordAddr], env);
    expect(r.code).not.toBe(0);
    const refusal = 'tensor parallel over 2 ranks is impossible: 3 experts are not divisible by 2 ranks (use --parallelism pipeline)';
    expect(r.stderr).toContain(refusal);
    expect(r.stderr.split(refusal).length - 1).toBe(1);
    expect(r.stdout).not.toMatch(/starting-workers|MLX rank/);
    expect(await workerPids(odd)).toEqual([]);
    expect((await status()).models.map((x) => x.name)).not.toContain('odd');
    // The same model loads as a pipeline: the refusal was about the layout, not the file.
    const p = await orchard(['load', odd, '--ctx', String(CTX), '--name', 'odd', '--parallelism', 'pipeline', '--pin', 'alpha', 'bravo', '--coordinator', coordAddr], env);
    expect(p.code, p.stderr).toBe(0);
    expect((await workerPids(odd)).length).toBe(2);
    expect((await orchard(['unload', 'odd', '--coordinator', coordAddr], env)).code).toBe(0);
  }, 300_000);
});
