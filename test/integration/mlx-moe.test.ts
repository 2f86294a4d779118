import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureMlxEnv, type MlxEnv } from '../../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../../src/node/mlx/group.ts';
import { mlxRequestOf } from '../../src/node/mlx/rank-spec.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { mlxPlacementOptions } from '../../src/shared/placement/types.ts';
import { killGroup, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';

/*
 * Mixture-of-experts MLX models (mlx-lm's own qwen3_moe and deepseek_v3 classes: routed experts,
 * and for deepseek_v3 Multi-head Latent Attention, a shared expert and a leading dense layer)
 * split over 2 ranks through `orchard node` agents and the coordinator, real processes on
 * 127.0.0.1. The oracle: the greedy tokens of one MLX process running the same directory.
 */

const ROOT = new URL('../..', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');
const CTX = 512;
const PROMPT = 'The orchard has apples and pears. Once upon a time';
const N = 20;
const ARCHS = ['qwen3_moe', 'deepseek_v3'] as const;
// Seeds whose greedy output runs N tokens without hitting </s> (deepseek_v3 at seed 3 stops after 2).
const SEEDS = { qwen3_moe: 3, deepseek_v3: 4 } as const;

describe('MoE MLX models over 2 pipeline ranks through the coordinator (127.0.0.1, real MLX CPU wheels)', () => {
  let dir: string;
  let mlx: MlxEnv;
  let env: NodeJS.ProcessEnv;
  const procs: Proc[] = [];
  const oracles = new Map<string, number[]>();

  beforeAll(async () => {
    mlx = await ensureMlxEnv();
    dir = await mkdtemp(join(tmpdir(), 'orchard-mlx-moe-'));
    for (const arch of ARCHS) {
      const model = join(dir, arch);
            // Wide experts (2048) so layer bytes, not fixed overheads, decide the placement.
      const r = await writeMlxTestModel(mlx.python, { out: model, arch, layers: 4, hidden: 64, heads: 4, intermediate: 2048, experts: 4, activeExperts: 2, seed: SEEDS[arch] });
      expect(r.experts).toBe(4);
      const single = await MlxGroup.start({ python: mlx.python, model, mode: 'single', startupTimeoutMs: 120_000 });
      try {
        const req = mlxRequestOf({ prompt: PROMPT, maxTokens: N, temperature: 0, topP: 0, seed: 0 }, 'oracle', CTX);
        oracles.set(arch, (await collect(single.generate(req))).tokens);
      } finally {
        await single.close();
      }
    }

    env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_MLX_READY_TIMEOUT: '60', ORCHARD_MLX_STALL_TIMEOUT: '20' };
  }, 600_000);

  /**
   * Budgets from the coordinator's own planner (64 KiB steps): alpha one layer short of the whole
   * model, bravo the least that lets both together hold it, so the plan must use both nodes.
   */
  const splittingBudgets = async (model: string): Promise<Record<string, number>> => {
    const profile = await readMlxModelProfile(model);
    const plan = (b: Record<string, number>) =>
      planPlacement(profile, Object.entries(b).map(([name, budgetBytes]) => ({ name, budgetBytes, bandwidthBytesPerSecond: 100e9 })), { ctx: CTX, ...mlxPlacementOptions(profile) });
    const least = (fits: (b: number) => boolean): number => {
      let lo = 1;
      let hi = 2 ** 32;
      expect(fits(hi)).toBe(true);
      while (hi - lo > 65_536) {
        const mid = Math.floor((lo + hi) / 2);
        if (fits(mid)) hi = mid;
        else lo = mid;
      }
      return hi;
    };
    const alpha = least((b) => plan({ alpha: b }).fits) - Math.max(...profile.layers.map((l) => l.weightBytes));
    const bravo = least((b) => plan({ alpha, bravo: b }).fits);
    const two = plan({ alpha, bravo });
    expect(two.fits && two.stages.length, 'the planner cannot split the model over 2 nodes').toBe(2);
    return { alpha, bravo };
  };

  /** A coordinator and agents alpha + bravo with `budgets`, joined; returns the coordinator address. */
  const cluster = async (budgets: Record<string, number>, state: string): Promise<string> => {
    const start = (name: string, args: string[]) => {
      const p = spawnProc(name, args, env);
      procs.push(p);
      return p;
    };
    const coordState = join(state, 'coord');
    const coordinator = start('coordinator', [BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', coordState, '--heal', 'off', '--json']);
    const cr = await readyLine(coordinator);
    const coordAddr = `127.0.0.1:${String(cr.grpcPort)}`;
    // The CLI trusts this coordinator (and finds its admin credential) through its state dir.
    env.ORCHARD_COORDINATOR_STATE_DIR = coordState;
    const t = await orchard(['coordinator', 'token', '--uses', '2', '--ttl', '10m'], env);
    expect(t.code, t.stderr).toBe(0);
    const token = t.stdout.trim();
    for (const name of ['alpha', 'bravo']) {
      // Agents join with the token flow: without a certificate they serve nothing.
      const proc = spawnProc(`node ${name}`, [BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budgets[name]), '--state-dir', join(state, name), '--models-dir', dir, '--json', '--join', coordAddr], { ...env, ORCHARD_NODE_TOKEN: token });
      procs.push(proc);
      await readyLine(proc);
    }
    for (let i = 0; i < 50; i++) {
      const s = await orchard(['status', '--json', '--coordinator', coordAddr], env);
      if ((JSON.parse(s.stdout) as { nodes: { state: string }[] }).nodes.filter((n) => n.state === 'up').length === 2) break;
      await sleep(200);
    }
    return coordAddr;
  };

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  for (const arch of ARCHS) {
    it(`${arch}: greedy tokens on 2 ranks equal one MLX process`, async () => {
      const oracle = oracles.get(arch)!;
      // A non-trivial oracle: a broken split or a lost step must change it.
      expect(oracle.length).toBe(N);
      expect(new Set(oracle).size).toBeGreaterThan(3);
      const coordAddr = await cluster(await splittingBudgets(join(dir, arch)), join(dir, `state-${arch}`));
      const load = await orchard(['load', join(dir, arch), '--ctx', String(CTX), '--name', arch, '--pin', 'alpha', 'bravo', '--coordinator', coordAddr], env);
      expect(load.code, load.stderr).toBe(0);
      const s = await orchard(['status', '--json', '--coordinator', coordAddr], env);
      const m = (JSON.parse(s.stdout) as { models: { name: string; engine: string; stages: { nodeId: string; firstLayer: number; lastLayer: number }[] }[] }).models.find((x) => x.name === arch)!;
      expect(m.engine).toBe('mlx');
      expect(m.stages).toHaveLength(2);
      expect(new Set(m.stages.map((st) => st.nodeId)).size).toBe(2);
      const g = await orchard(['generate', '--model', arch, '--prompt', PROMPT, '--max-tokens', String(N), '--temperature', '0', '--json', '--coordinator', coordAddr], env);
      expect(g.code, g.stderr).toBe(0);
      expect((JSON.parse(g.stdout) as { tokens: number[] }).tokens).toEqual(oracle);
      const u = await orchard(['unload', arch, '--coordinator', coordAddr], env);
      expect(u.code, u.stderr).toBe(0);
      await Promise.all(procs.splice(0).map(killGroup));
    }, 300_000);
  }
});
