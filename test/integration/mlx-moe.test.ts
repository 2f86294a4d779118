import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureMlxEnv, type MlxEnv } from '../../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../../src/node/mlx/group.ts';
import type { TokenMessage } from '../../src/node/mlx/protocol.ts';
import { mlxRequestOf } from '../../src/node/mlx/rank-spec.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { killGroup, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { mlxSplittingBudgets, mlxTensorBudgets } from '../helpers/split-model.ts';

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
  /** One process's token lines with logprobs (5 alternatives), the tensor-parallel oracle. */
  const oracleLogprobs = new Map<string, TokenMessage[]>();

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
        const req = mlxRequestOf({ prompt: PROMPT, maxTokens: N, temperature: 0, topP: 0, seed: 0, logprobs: true, topLogprobs: 5 }, 'oracle', CTX);
        const got = await collect(single.generate(req));
        oracles.set(arch, got.tokens);
        oracleLogprobs.set(arch, got.events);
      } finally {
        await single.close();
      }
    }

    env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_MLX_READY_TIMEOUT: '60', ORCHARD_MLX_STALL_TIMEOUT: '20' };
  }, 600_000);

  const splittingBudgets = (model: string) => mlxSplittingBudgets([model], CTX);

  /** A coordinator and agents alpha + bravo with `budgets`, joined; returns the coordinator's gRPC address and HTTP base. */
  const cluster = async (budgets: Record<string, number>, state: string): Promise<{ coordAddr: string; httpBase: string }> => {
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
    return { coordAddr, httpBase: `http://127.0.0.1:${String(cr.httpPort)}` };
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
      const { coordAddr } = await cluster(await splittingBudgets(join(dir, arch)), join(dir, `state-${arch}`));
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

  it('qwen3_moe tensor parallel on 2 ranks through the coordinator: every logprob within 1e-3 of one process (OpenAI API, official client)', async () => {
    const arch = 'qwen3_moe';
    const want = oracleLogprobs.get(arch)!;
    expect(want).toHaveLength(N);
    const { coordAddr, httpBase } = await cluster(await mlxTensorBudgets([join(dir, arch)], CTX), join(dir, 'state-tp'));
    const load = await orchard(['load', join(dir, arch), '--ctx', String(CTX), '--name', 'tp', '--parallelism', 'tensor', '--pin', 'alpha', 'bravo', '--json', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
    expect(load.stdout).toMatch(/MLX tensor parallel over 2 rank\(s\)/);
    const client = new OpenAI({ baseURL: `${httpBase}/v1`, apiKey: 'unused', maxRetries: 0 });
    const r = await client.completions.create({ model: 'tp', prompt: PROMPT, max_tokens: N, temperature: 0, logprobs: 5 });
    const lp = r.choices[0]!.logprobs!;
    // Compare step by step while the sequences agree (an exact near-tie could flip a later id).
    let compared = 0;
    for (let i = 0; i < want.length && i < lp.tokens!.length; i++) {
      const w = want[i]!;
      expect(Math.abs(lp.token_logprobs![i]! - w.logprob!)).toBeLessThan(1e-3);
      // The legacy shape keys alternatives by text: only texts no other alternative shares
      // (byte-level pieces of one character all decode to U+FFFD) identify a token.
      const top = lp.top_logprobs![i]!;
      const texts = w.top_logprobs!.map(([, , token]) => token);
      for (const [, logprob, token] of w.top_logprobs!) if (texts.indexOf(token) === texts.lastIndexOf(token)) expect(Math.abs(top[token]! - logprob)).toBeLessThan(1e-3);
      compared++;
      if (lp.tokens![i] !== (w.token_text ?? '')) break;
    }
    expect(compared).toBe(N);
    // The gRPC path carries the same logprobs (orchard generate --logprobs).
    // Alternatives as lists: sorted by logprob, so position by position within 1e-3 even where
    // two near-equal ones swap places.
    const g = await orchard(['generate', '--model', 'tp', '--prompt', PROMPT, '--max-tokens', String(N), '--temperature', '0', '--logprobs', '5', '--json', '--coordinator', coordAddr], env);
    expect(g.code, g.stderr).toBe(0);
    const out = JSON.parse(g.stdout) as { tokens: number[]; logprobs: { tokenId: number; logprob: number; topLogprobs: { logprob: number }[] }[] };
    expect(out.tokens).toEqual(want.map((w) => w.token));
    expect(out.logprobs.map((l) => l.tokenId)).toEqual(out.tokens);
    out.logprobs.forEach((l, i) => {
      expect(Math.abs(l.logprob - want[i]!.logprob!)).toBeLessThan(1e-3);
      expect(l.topLogprobs).toHaveLength(5);
      l.topLogprobs.forEach((t, k) => {
        expect(Math.abs(t.logprob - want[i]!.top_logprobs![k]![1])).toBeLessThan(1e-3);
      });
    });
    await Promise.all(procs.splice(0).map(killGroup));
  }, 300_000);
});
