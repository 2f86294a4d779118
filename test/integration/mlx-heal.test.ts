import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mlxPlacementOptions } from '../../src/shared/placement/types.ts';
import { ensureMlxEnv, type MlxEnv } from '../../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../../src/node/mlx/group.ts';
import { mlxRequestOf } from '../../src/node/mlx/rank-spec.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { type JoinedCluster, startJoinedCluster } from '../helpers/joined-cluster.ts';
import { orchard } from '../helpers/processes.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * Self-healing of an MLX pipeline: three agents whose equal budgets make the coordinator's
 * planner split an MLX test model over 2 ranks (one node spare). The agent holding a rank is
 * SIGKILLed mid-stream (its watchdog takes the rank with it): the instance goes recovering, is
 * planned again on the two nodes that are up — a new ring without the lost rank — serves, and the
 * in-flight greedy stream resumes there with prompt + delivered tokens. The oracle: the greedy
 * tokens of one MLX process running the same directory. Real processes on 127.0.0.1, real MLX
 * CPU wheels, agents joined with the token flow.
 */

const CTX = 512;
const PROMPT = 'The orchard has apples and pears. Once upon a time';
const N = 24;
const MiB = 2 ** 20;
const dir = tempDir('orchard-mlx-heal-', 'all');

interface Status {
  nodes: { name: string; state: string }[];
  models: { name: string; state: string; engine: string; recoveries?: number; stages: { nodeName: string }[] }[];
}

/** The process and every descendant (the agent's watchdog and its MLX rank). */
function processTree(pid: number): number[] {
  const rows = execFileSync('ps', ['-eo', 'pid=,ppid='], { encoding: 'utf8' })
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).map(Number) as [number, number]);
  const out = [pid];
  for (let i = 0; i < out.length; i++) for (const [p, pp] of rows) if (pp === out[i]) out.push(p);
  return out;
}

describe('MLX self-healing: a lost rank is re-placed on a rebuilt ring and the stream resumes', () => {
  let mlx: MlxEnv;
  let model: string;
  let env: NodeJS.ProcessEnv;
  let coordAddr: string;
  let coordHttp: string;
  let oracle: number[];
  let cluster: JoinedCluster;
  const status = () => cluster.status<Status>();

  beforeAll(async () => {
    mlx = await ensureMlxEnv();
    model = join(dir.path, 'm6');
    await writeMlxTestModel(mlx.python, { out: model, arch: 'llama', layers: 6, hidden: 512, heads: 8, seed: 7 });
    const single = await MlxGroup.start({ python: mlx.python, model, mode: 'single', startupTimeoutMs: 120_000 });
    try {
      oracle = (await collect(single.generate(mlxRequestOf({ prompt: PROMPT, maxTokens: N, temperature: 0, topP: 0, seed: 0 }, 'oracle', CTX)))).tokens;
    } finally {
      await single.close();
    }
    // One budget for all three nodes, from the coordinator's own planner: one node cannot hold the
    // model, two can, so the plan uses 2 ranks and losing either leaves room on the other two.
    const profile = await readMlxModelProfile(model);
    const plan = (names: string[], b: number) => planPlacement(profile, names.map((name) => ({ name, budgetBytes: b, bandwidthBytesPerSecond: 100e9 })), { ctx: CTX, ...mlxPlacementOptions() });
    let budget = 0;
    for (let b = 100 * MiB; b <= 2000 * MiB && budget === 0; b += 5 * MiB) {
      const three = plan(['a', 'b', 'c'], b);
      if (!plan(['a'], b).fits && three.fits && three.stages.length === 2) budget = b;
    }
    expect(budget, 'no budget makes the planner split 2 ways').toBeGreaterThan(0);

    cluster = await startJoinedCluster({
      dir: dir.path,
      env: { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_MLX_READY_TIMEOUT: '60', ORCHARD_MLX_STALL_TIMEOUT: '20' },
      agents: ['alpha', 'bravo', 'charlie'],
      agentArgs: ['--budget', String(budget)],
    });
    ({ env, grpcAddress: coordAddr, httpAddress: coordHttp } = cluster);
    await cluster.waitUp(3);
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm6', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
  }, 600_000);

  afterAll(async () => {
    await cluster?.stop();
  });

  it('a rank node SIGKILLed mid-stream: recovering → ready on a 2-rank ring without it, the stream resumes with the oracle tokens', async () => {
    expect(oracle.length).toBe(N);
    expect(new Set(oracle).size).toBeGreaterThan(3);
    const before = (await status()).models.find((m) => m.name === 'm6')!;
    expect(before.engine).toBe('mlx');
    expect(before.stages).toHaveLength(2);
    // The rank that does not emit tokens (the first layers): a follower of the ring is lost.
    const victim = before.stages[0]!.nodeName;
    const client = await cluster.client();
    const tokens: number[] = [];
    let killedAt = 0;
    let error: Error | undefined;
    try {
      for await (const ev of client.stream('generate', { model: 'm6', prompt: PROMPT, maxTokens: N, temperature: 0, seed: '0' })) {
        if (ev.event !== 'token') continue;
        tokens.push(...((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number));
        if (tokens.length >= 3 && killedAt === 0) {
          killedAt = Date.now();
          for (const p of processTree(cluster.agents.get(victim)!.proc.child.pid!)) process.kill(p, 'SIGKILL');
        }
      }
    } catch (err) {
      error = err as Error;
    } finally {
      client.close();
    }
    const resumedAfterS = (Date.now() - killedAt) / 1000;
    expect(error?.message).toBeUndefined();
    expect(killedAt).toBeGreaterThan(0);
    // MLX runs the resumed prefill (prompt + delivered tokens) through the same kernels: greedy
    // output is the undisturbed run's.
    expect(tokens).toEqual(oracle);
    const after = (await status()).models.find((m) => m.name === 'm6')!;
    expect(after.state).toBe('ready');
    expect(after.recoveries).toBe(1);
    expect(after.stages).toHaveLength(2);
    expect(after.stages.some((s) => s.nodeName === victim)).toBe(false);
    const metrics = await (await fetch(`http://${coordHttp}/metrics`)).text();
    expect(metrics).toMatch(/orchard_streams_resumed_total\{[^}]*model="m6"[^}]*\} 1\b/);
    console.info(`mlx-heal: ${victim} SIGKILLed at token 3; stream finished ${resumedAfterS.toFixed(1)} s later on ${after.stages.map((s) => s.nodeName).join('+')}`);
    // The healed ring serves new requests too.
    const g = await orchard(['generate', '--model', 'm6', '--prompt', PROMPT, '--max-tokens', String(N), '--temperature', '0', '--json', '--coordinator', coordAddr], env);
    expect(g.code, g.stderr).toBe(0);
    expect((JSON.parse(g.stdout) as { tokens: number[] }).tokens).toEqual(oracle);
  }, 300_000);
});
