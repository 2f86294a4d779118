import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeWith, llamaEngines } from '../helpers/needs.ts';
import { ORACLE_PROMPT, plainLlamaTokens } from '../helpers/oracle.ts';
import { killGroup, orchard, type Proc, readyLine, spawnProc } from '../helpers/processes.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';

/*
 * Mixture-of-experts models split over node agents: generated deepseek2 (Multi-head Latent
 * Attention, a leading dense layer, routed + shared experts) and qwen3moe GGUFs — the real
 * tensor tables at toy size (`orchard testmodel gguf --arch`) — loaded through the coordinator
 * over two `orchard node` agents whose budgets force a split (llama.cpp RPC between them), must
 * give exactly the greedy token ids of one plain llama-server on the same file.
 */

const ROOT = new URL('../..', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');
// Small context: the pipeline's extra scheduler copies of the KQ mask stay below what moving half
// the layers off the head saves, so two nodes at a budget under the whole model can hold it.
const CTX = 512;
const N_PREDICT = 32;
const FAMILIES = ['deepseek2', 'qwen3moe'] as const;

const engines = await llamaEngines();

describeWith([engines], 'MoE models (deepseek2 MLA + experts, qwen3moe) split over 2 node agents', () => {
  const procs: Proc[] = [];
  let dir: string;
  let env: NodeJS.ProcessEnv;
  let coordAddr: string;
  const models = new Map<string, string>();
  const budgets: number[] = [];

  beforeAll(async () => {
    const bins = engines.ok ? engines.value : undefined;
    if (!bins) throw new Error('unreachable: describeWith skips without engines');
    dir = await mkdtemp(join(tmpdir(), 'orchard-moe-cluster-'));
    // ORCHARD_COORDINATOR_STATE_DIR: the CLI trusts the coordinator by its state dir (CA, admin key).
    env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1', ORCHARD_COORDINATOR_STATE_DIR: join(dir, 'coord') };
    for (const arch of FAMILIES) {
      const { model, budget } = await modelThatMustSplit(['--arch', arch, '--layers', '24', '--seed', '11'], CTX);
      budgets.push(budget);
      models.set(arch, model);
    }
    // One budget that neither model fits in alone.
    const budget = Math.min(...budgets);
    const coordinator = spawnProc('coordinator', [BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--json'], env, process.execPath);
    procs.push(coordinator);
    coordAddr = `127.0.0.1:${String((await readyLine(coordinator)).grpcPort)}`;
    const token = (await orchard(['coordinator', 'token', '--uses', '2'], env)).stdout.trim();
    for (const name of ['alpha', 'bravo']) {
      const args = [BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', join(dir, name), '--models-dir', dir, '--json', '--join', coordAddr];
      const p = spawnProc(`node ${name}`, args, { ...env, ORCHARD_NODE_TOKEN: token }, process.execPath);
      procs.push(p);
      await readyLine(p);
    }
  }, 300_000);

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  for (const arch of FAMILIES) {
    it(`${arch}: split over both agents, greedy ids equal one plain llama-server`, async () => {
      const bins = engines.ok ? engines.value : undefined;
      const model = models.get(arch)!;
      const oracle = await plainLlamaTokens(bins!, { model, ctx: CTX, prompt: ORACLE_PROMPT, nPredict: N_PREDICT, threads: 2 });
      expect(new Set(oracle).size).toBeGreaterThan(5); // varied output, or equality would prove little

      // The nodes may still be joining: wait for both in status before loading.
      for (let i = 0; i < 100; i++) {
        const s = await orchard(['status', '--json', '--coordinator', coordAddr], env);
        if (s.code === 0 && (JSON.parse(s.stdout) as { nodes: { state: string }[] }).nodes.filter((n) => n.state === 'up').length === 2) break;
        await new Promise((r) => setTimeout(r, 200));
      }
      // llama.cpp RPC only pipelines: a tensor-parallel request is refused before any engine starts.
      const tp = await orchard(['load', model, '--ctx', String(CTX), '--name', arch, '--parallelism', 'tensor', '--coordinator', coordAddr], env);
      expect(tp.code).toBe(2); // a usage error
      expect(tp.stderr).toMatch(/--parallelism tensor is for MLX models/);
      const load = await orchard(['load', model, '--ctx', String(CTX), '--name', arch, '--coordinator', coordAddr], env);
      expect(load.code, load.stderr).toBe(0);
      const s = JSON.parse((await orchard(['status', '--json', '--coordinator', coordAddr], env)).stdout) as { models: { name: string; state: string; stages: { nodeId: string }[] }[] };
      const m = s.models.find((x) => x.name === arch)!;
      expect(m.state).toBe('ready');
      expect(new Set(m.stages.map((st) => st.nodeId)).size).toBe(2);

      const g = await orchard(['generate', '--model', arch, '--prompt', ORACLE_PROMPT, '--max-tokens', String(N_PREDICT), '--temperature', '0', '--json', '--coordinator', coordAddr], env);
      expect(g.code, g.stderr).toBe(0);
      expect((JSON.parse(g.stdout) as { tokens: number[] }).tokens).toEqual(oracle);
      const u = await orchard(['unload', arch, '--coordinator', coordAddr], env);
      expect(u.code, u.stderr).toBe(0);
    }, 300_000);
  }
});
