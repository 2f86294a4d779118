import { execFile } from 'node:child_process';
import { chmod, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import { mlxPlacementOptions } from '../../src/coordinator/instances/planner-adapter.ts';
import { AgentClient } from '../../src/coordinator/membership/agent-client.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import type { TlsCredentials } from '../../src/shared/pki/grpc-tls.ts';
import { ensureMlxEnv, type MlxEnv } from '../../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../../src/node/mlx/group.ts';
import { mlxRequestOf } from '../../src/node/mlx/rank-spec.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { mlxTensorFit } from '../../src/shared/placement/stage-memory.ts';
import { alive, killGroup, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';

/*
 * MLX through `orchard node` agents and the coordinator, real processes on 127.0.0.1 (static
 * join), real MLX CPU wheels. The oracle: greedy tokens of a pipeline split across ranks equal a
 * single-process MLX run of the same directory. Then: a rank killed mid-stream → client error
 * within 5 s, every rank of the group gone, agents healthy, reload works; a rank that never comes
 * up → the load fails with a clear message within the watchdog timeout, nothing left running.
 * The coordinator runs with --heal off: these are the failure paths without self-healing.
 */

const execFileP = promisify(execFile);
const ROOT = new URL('../..', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');
// Two contexts: CTX for the 2-rank loads, CTX_3 (a larger context) for the 3-rank one.
const CTX = 512;
const CTX_3 = 768;
const PROMPT = 'The orchard has apples and pears. Once upon a time';
const N = 24;
const READY_TIMEOUT_S = 40;

const procs: Proc[] = [];

function start(name: string, args: string[], env: NodeJS.ProcessEnv): Proc {
  const p = spawnProc(name, args, env);
  procs.push(p);
  return p;
}


/** Pids of MLX rank workers serving `modelDir` (any agent), from /proc. */
async function workerPids(modelDir: string): Promise<number[]> {
  const { stdout } = await execFileP('pgrep', ['-f', `mlx_worker.py --model ${modelDir}`]).catch(() => ({ stdout: '' }));
  return stdout.split('\n').filter(Boolean).map(Number);
}

describe('MLX through node agents and the coordinator (127.0.0.1, real MLX CPU wheels)', () => {
  let dir: string;
  let mlx: MlxEnv;
  let model: string;
  let env: NodeJS.ProcessEnv;
  let coordAddr: string;
  let agentTls: TlsCredentials;
  let coordinator: Proc;
  const agents = new Map<string, { proc: Proc; address: string; nodeId: string }>();
  let oracle: number[];
  let oracleText: string;
  let chatOracle: { tokens: number[]; text: string };
  let httpBase: string;
  let budgets: Record<string, number> | undefined;
  const CHAT = [{ role: 'user', content: 'Which fruit grows in the orchard?' }];

  beforeAll(async () => {
    mlx = await ensureMlxEnv();
    dir = await mkdtemp(join(tmpdir(), 'orchard-mlx-cluster-'));
    model = join(dir, 'm6');
    // hidden 512: big enough that the planner splits it when one node is a hair too small.
    await writeMlxTestModel(mlx.python, { out: model, arch: 'llama', layers: 6, hidden: 512, heads: 8, seed: 7 });

    // The oracle: one MLX process, the exact request the agents build from a Generate.
    const single = await MlxGroup.start({ python: mlx.python, model, mode: 'single', startupTimeoutMs: 120_000 });
    try {
      const req = mlxRequestOf({ prompt: PROMPT, maxTokens: N, temperature: 0, topP: 0, seed: 0 }, 'oracle', CTX);
      const o = await collect(single.generate(req));
      oracle = o.tokens;
      oracleText = o.text;
      // Chat: the worker applies the tokenizer's chat template.
      const chatReq = mlxRequestOf({ prompt: '', messagesJson: JSON.stringify(CHAT), maxTokens: 16, temperature: 0, topP: 0, seed: 0 }, 'chat', CTX);
      const c = await collect(single.generate(chatReq));
      chatOracle = { tokens: c.tokens, text: c.text };
    } finally {
      await single.close();
    }

    const profile = await readMlxModelProfile(model);
    // Budgets (alpha: head-sized, the others worker-sized) for which the real planner splits the
    // model over alpha+bravo at CTX and over alpha+bravo+charlie at CTX_3, and alpha and bravo each
    // hold a tensor-parallel rank at CTX, found with the same pure planner the coordinator runs (so
    // the test follows memory-model changes). An MLX rank's transient peak, held by every rank,
    // grows with the context faster than this small model's layers: CTX_3 is only a little larger.
    const mo = mlxPlacementOptions();
    const MiB = 2 ** 20;
    const plan = (names: string[], b: Record<string, number>, ctx: number) =>
      planPlacement(profile, names.map((name) => ({ name, budgetBytes: b[name]!, bandwidthBytesPerSecond: 100e9 })), { ctx, ...mo });
    const tensorShare = mlxTensorFit(profile, [{ node: 'alpha', budgetBytes: 0 }, { node: 'bravo', budgetBytes: 0 }], CTX).bytes.total;
    search: for (let w = Math.ceil(tensorShare / MiB); w <= 1200; w += 1) {
      for (let h = w; h <= w + 64; h += 1) {
        const b = { alpha: h * MiB, bravo: w * MiB, charlie: w * MiB };
        const two = plan(['alpha', 'bravo'], b, CTX);
        const three = plan(['alpha', 'bravo', 'charlie'], b, CTX_3);
        if (two.fits && two.stages.length === 2 && three.fits && three.stages.length === 3) {
          budgets = { ...b, delta: w * MiB };
          break search;
        }
      }
    }
    expect(budgets, 'no budgets make the planner split 2 and 3 ways with room for a tensor rank').toBeDefined();

    // ORCHARD_COORDINATOR_STATE_DIR: the CLI trusts the coordinator by its state dir (CA, admin key).
    env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_MLX_READY_TIMEOUT: String(READY_TIMEOUT_S), ORCHARD_MLX_STALL_TIMEOUT: '20', ORCHARD_COORDINATOR_STATE_DIR: join(dir, 'coord') };
    coordinator = start('coordinator', [BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--heal', 'off', '--json'], env);
    const cr = await readyLine(coordinator);
    coordAddr = `127.0.0.1:${String(cr.grpcPort)}`;
    httpBase = `http://127.0.0.1:${String(cr.httpPort)}`;
    const t = await orchard(['coordinator', 'token', '--uses', '4'], env);
    const token = t.stdout.trim();

    // delta's "Python" answers the MLX probe but never starts a rank: a rank that never comes up.
    // (findMlxEnv probes <venv>/bin/python of ORCHARD_MLX_PYTHON's venv, so it sits in one.)
    await mkdir(join(dir, 'hanging-venv', 'bin'), { recursive: true });
    const fakePython = join(dir, 'hanging-venv', 'bin', 'python');
    await writeFile(fakePython, `#!/bin/sh\ncase "$1" in -c) exec "${mlx.python}" "$@";; esac\nexec sleep 3600\n`);
    await chmod(fakePython, 0o755);
    for (const name of ['alpha', 'bravo', 'charlie', 'delta']) {
      const agentEnv = { ...env, ORCHARD_NODE_TOKEN: token, ...(name === 'delta' ? { ORCHARD_MLX_PYTHON: fakePython } : {}) };
      const proc = start(`node ${name}`, [BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budgets![name]), '--state-dir', join(dir, name), '--models-dir', dir, '--json', '--join', coordAddr], agentEnv);
      const r = await readyLine(proc);
      const address = `127.0.0.1:${String(r.grpcPort)}`;
      agents.set(name, { proc, address, nodeId: String(r.nodeId) });
    }
    agentTls = await new StateDir(join(dir, 'coord')).coordinatorCredentials();
    for (let i = 0; i < 100; i++) {
      const r = await orchard(['status', '--json', '--coordinator', coordAddr], env);
      if (r.code === 0 && (JSON.parse(r.stdout) as { nodes: { state: string }[] }).nodes.filter((n) => n.state === 'up').length === 4) break;
      await sleep(200);
    }
  }, 600_000);

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
    if (dir) {
      for (const pid of await workerPids(model)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {}
      }
      await rm(dir, { recursive: true, force: true });
    }
  });

  const status = async () => {
    const r = await orchard(['status', '--json', '--coordinator', coordAddr], env);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as {
      nodes: { id: string; name: string; state: string; hardware: { engines: string[] } }[];
      models: { name: string; state: string; engine: string; error?: string; stages: { nodeId: string; nodeName: string; firstLayer: number; lastLayer: number; endpoint: string }[] }[];
    };
  };

  const generate = async (model?: string) => {
    const g = await orchard(['generate', '--prompt', PROMPT, '--max-tokens', String(N), '--temperature', '0', '--json', '--coordinator', coordAddr, ...(model ? ['--model', model] : [])], env);
    expect(g.code, g.stderr).toBe(0);
    return JSON.parse(g.stdout) as { tokens: number[]; text: string; finishReason?: string };
  };

  it('agents report MLX in their profile', async () => {
    let s = await status();
    for (let i = 0; i < 50 && s.nodes.length < 4; i++) {
      await sleep(200);
      s = await status();
    }
    expect(s.nodes.map((n) => n.state)).toEqual(['up', 'up', 'up', 'up']);
    for (const n of s.nodes) expect(n.hardware.engines).toContain('mlx');
  });

  it('has a non-trivial oracle', () => {
    expect(oracle.length).toBeGreaterThan(5);
    expect(new Set(oracle).size).toBeGreaterThan(3);
  });

  const messages = (stdout: string) => stdout.split('\n').filter(Boolean).map((l) => String((JSON.parse(l) as { message?: string }).message ?? ''));

  it('2 ranks via the planner (auto engine by format, auto parallelism: the cheaper predicted layout, and why): greedy tokens equal one MLX process', async () => {
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm6', '--pin', 'alpha', 'bravo', '--json', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr + coordinator.err.slice(-3000)).toBe(0);
    // Which layout wins depends on what this machine measured (the calibrated bandwidth against the
    // ring's round trip): the load must say both predictions and take the cheaper one.
    const why = messages(load.stdout)
      .map((m) => /MLX (pipeline|tensor) parallel over 2 rank\(s\): auto: (pipeline|tensor), predicted ([\d.]+) ms\/token pipeline vs ([\d.]+) ms\/token tensor/.exec(m))
      .find((x) => x !== null);
    expect(why, messages(load.stdout).join('\n')).toBeDefined();
    const [, mode, said, pipeline, tensor] = why!;
    expect(said).toBe(mode);
    expect(mode).toBe(Number(tensor) < Number(pipeline) ? 'tensor' : 'pipeline');
    const m = (await status()).models.find((x) => x.name === 'm6')!;
    expect(m.engine).toBe('mlx');
    expect(m.stages).toHaveLength(2);
    expect(new Set(m.stages.map((s) => s.nodeId)).size).toBe(2);
    for (const s of m.stages) expect(s.endpoint).toMatch(/^127\.0\.0\.1:\d+$/);
    const out = await generate('m6');
    expect(out.tokens).toEqual(oracle);
    // a second request on the same group (ranks agree on each request in turn)
    expect((await generate('m6')).tokens).toEqual(oracle);
  }, 300_000);

  it('the OpenAI API (official client) serves the MLX model: completions, chat, streaming, stop, usage', async () => {
    const client = new OpenAI({ baseURL: `${httpBase}/v1`, apiKey: 'unused', maxRetries: 0 });
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toContain('m6');
    const r = await client.completions.create({ model: 'm6', prompt: PROMPT, max_tokens: N, temperature: 0 });
    expect(r.choices[0]!.text).toBe(oracleText);
    expect(r.usage!.completion_tokens).toBe(oracle.length);
    expect(r.usage!.prompt_tokens).toBeGreaterThan(0);
    let streamed = '';
    let finish: string | null = null;
    for await (const c of await client.completions.create({ model: 'm6', prompt: PROMPT, max_tokens: N, temperature: 0, stream: true })) {
      streamed += c.choices[0]?.text ?? '';
      finish = c.choices[0]?.finish_reason ?? finish;
    }
    expect(streamed).toBe(oracleText);
    expect(finish).toMatch(/length|stop/);
    const chat = await client.chat.completions.create({ model: 'm6', messages: CHAT as OpenAI.ChatCompletionMessageParam[], max_tokens: 16, temperature: 0 });
    expect(chat.choices[0]!.message.content).toBe(chatOracle.text);
    expect(chat.usage!.completion_tokens).toBe(chatOracle.tokens.length);
    let chatStreamed = '';
    for await (const c of await client.chat.completions.create({ model: 'm6', messages: CHAT as OpenAI.ChatCompletionMessageParam[], max_tokens: 16, temperature: 0, stream: true })) {
      chatStreamed += c.choices[0]?.delta?.content ?? '';
    }
    expect(chatStreamed).toBe(chatOracle.text);
    // a stop string cuts the text before it (the agent scans for it; ranks cancel collectively)
    const stop = oracleText.slice(6, 9);
    expect(stop.length).toBe(3);
    const cut = await client.completions.create({ model: 'm6', prompt: PROMPT, max_tokens: N, temperature: 0, stop: [stop] });
    expect(cut.choices[0]!.text).toBe(oracleText.slice(0, oracleText.indexOf(stop)));
    expect(cut.choices[0]!.finish_reason).toBe('stop');
    // the group still serves after a collective cancel
    expect((await generate('m6')).tokens).toEqual(oracle);
  }, 300_000);

  it('a client cancelling mid-stream (or before the first token) keeps the group in step', async () => {
    for (const after of [2, 0]) {
      const client = await localCoordinatorClient(coordAddr, join(dir, 'coord'));
      const ac = new AbortController();
      let tokens = 0;
      if (after === 0) setImmediate(() => ac.abort());
      try {
        for await (const ev of client.stream('generate', { model: 'm6', prompt: PROMPT, maxTokens: CTX, temperature: 0, seed: '0' }, ac.signal)) {
          if (ev.event === 'token' && ++tokens === after) ac.abort();
        }
      } catch {
        // the cancelled call ends with CANCELLED
      } finally {
        client.close();
      }
      expect(tokens).toBeLessThan(CTX);
      expect((await generate('m6')).tokens).toEqual(oracle);
    }
  }, 300_000);

  it('killing a rank mid-stream: client error within 5 s, the whole group gone, agents healthy, reload works', async () => {
    const before = await workerPids(model);
    expect(before).toHaveLength(2);
    const client = await localCoordinatorClient(coordAddr, join(dir, 'coord'));
    const stream = client.stream('generate', { model: 'm6', prompt: PROMPT, maxTokens: CTX, temperature: 0, seed: '0' });
    let tokens = 0;
    let killedAt = 0;
    let error: Error | undefined;
    // The rank that does not emit (rank 1, the first layers): stage 0's agent holds it.
    const m = (await status()).models.find((x) => x.name === 'm6')!;
    const follower = [...agents.values()].find((a) => a.nodeId === m.stages[0]!.nodeId)!;
    const engines = (await new AgentClient(follower.address, agentTls).describe()).engines.filter((e) => e.kind === 'ENGINE_KIND_MLX_RANK');
    expect(engines).toHaveLength(1);
    try {
      for await (const ev of stream) {
        if (ev.event === 'token') tokens++;
        if (tokens === 3 && killedAt === 0) {
          killedAt = Date.now();
          process.kill(engines[0]!.pid, 'SIGKILL');
        }
      }
    } catch (err) {
      error = err as Error;
    } finally {
      client.close();
    }
    expect(killedAt).toBeGreaterThan(0);
    expect(error?.message).toMatch(/MLX|rank|unavailable/i);
    expect(Date.now() - killedAt).toBeLessThan(5000);
    // every rank of that group is gone, on both agents
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline && before.some(alive)) await sleep(100);
    expect(before.filter(alive)).toEqual([]);
    // agents healthy: they answer and run no engine
    for (const a of agents.values()) expect((await new AgentClient(a.address, agentTls).describe()).engines).toEqual([]);
    expect((await status()).models.find((x) => x.name === 'm6')?.state ?? 'gone').toMatch(/failed|gone/);
    // a reload succeeds (fresh ports) and gives the same tokens
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm6', '--pin', 'alpha', 'bravo', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
    expect((await generate('m6')).tokens).toEqual(oracle);
    const un = await orchard(['unload', 'm6', '--coordinator', coordAddr], env);
    expect(un.code, un.stderr).toBe(0);
  }, 300_000);

  it('a rank that never comes up: the load fails clearly within the watchdog timeout, nothing left running', async () => {
    const t0 = Date.now();
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'hang', '--pin', 'alpha', 'delta', '--coordinator', coordAddr], env);
    const took = (Date.now() - t0) / 1000;
    expect(load.code).toBe(1);
    expect(load.stderr).toMatch(/MLX rank \d on (alpha|delta) failed to start: .*(did not start within|never reported)/);
    expect(took).toBeLessThan(READY_TIMEOUT_S + 20);
    expect((await status()).models).toEqual([]);
    for (const a of agents.values()) expect((await new AgentClient(a.address, agentTls).describe()).engines).toEqual([]);
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline && (await workerPids(model)).length > 0) await sleep(100);
    expect(await workerPids(model)).toEqual([]);
    const { stdout } = await execFileP('pgrep', ['-f', 'sleep 3600']).catch(() => ({ stdout: '' }));
    const hanging = stdout.split('\n').filter(Boolean).map(Number);
    expect(hanging.filter(alive)).toEqual([]);
  }, 300_000);

  it('3 ranks via the planner (larger context): greedy tokens equal one MLX process', async () => {
    // Ring ports come from each agent's engine port range, outside the ephemeral range, checked
    // free by the agent; a port still taken before a rank binds it is the product's to retry once
    // (mlx/driver.ts): no retry here.
    const load = await orchard(['load', model, '--ctx', String(CTX_3), '--name', 'm6x3', '--pin', 'alpha', 'bravo', 'charlie', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
    const m = (await status()).models.find((x) => x.name === 'm6x3')!;
    expect(m.engine).toBe('mlx');
    expect(m.stages).toHaveLength(3);
    expect(new Set(m.stages.map((s) => s.nodeId)).size).toBe(3);
    for (const s of m.stages) expect(s.lastLayer).toBeGreaterThanOrEqual(s.firstLayer); // every rank runs ≥ 1 layer
    expect(await workerPids(model)).toHaveLength(3);
    expect((await generate('m6x3')).tokens).toEqual(oracle);
  }, 300_000);

  it('SIGKILL of a rank’s agent mid-stream: client error within 5 s, every rank gone, the others healthy, reload after rejoin', async () => {
    const before = await workerPids(model);
    expect(before).toHaveLength(3);
    const charlie = agents.get('charlie')!;
    const client = await localCoordinatorClient(coordAddr, join(dir, 'coord'));
    let tokens = 0;
    let killedAt = 0;
    let error: Error | undefined;
    try {
      for await (const ev of client.stream('generate', { model: 'm6x3', prompt: PROMPT, maxTokens: CTX_3, temperature: 0, seed: '0' })) {
        if (ev.event === 'token') tokens++;
        if (tokens === 3 && killedAt === 0) {
          killedAt = Date.now();
          process.kill(charlie.proc.child.pid!, 'SIGKILL'); // the agent only; its watchdog ends its rank
        }
      }
    } catch (err) {
      error = err as Error;
    } finally {
      client.close();
    }
    expect(killedAt).toBeGreaterThan(0);
    expect(error?.message).toMatch(/charlie|MLX|rank|unavailable/i);
    expect(Date.now() - killedAt).toBeLessThan(5000);
    const deadline = Date.now() + 8000;
    while (Date.now() < deadline && before.some(alive)) await sleep(100);
    expect(before.filter(alive)).toEqual([]);
    // A dead rank is a zombie until its agent reaps it and drops it from its engine list: wait
    // (same deadline) for every surviving agent to list no engine.
    const listed = async () => (await Promise.all(['alpha', 'bravo', 'delta'].map((n) => new AgentClient(agents.get(n)!.address, agentTls).describe()))).flatMap((d) => d.engines);
    while (Date.now() < deadline && (await listed()).length > 0) await sleep(100);
    expect(await listed()).toEqual([]);
    // charlie comes back (same identity), joins again, and the 3-rank model loads and matches again
    await charlie.proc.exited;
    const proc = start('node charlie (restarted)', [BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', 'charlie', '--budget', String(budgets!.charlie), '--state-dir', join(dir, 'charlie'), '--models-dir', dir, '--json', '--join', coordAddr], env);
    const r = await readyLine(proc);
    const address = `127.0.0.1:${String(r.grpcPort)}`;
    agents.set('charlie', { proc, address, nodeId: String(r.nodeId) });
    // It holds its certificate already: restarted with --join it only announces its new address.
    for (let i = 0; i < 50 && (await status()).nodes.find((n) => n.name === 'charlie')?.state !== 'up'; i++) await sleep(200);
    await orchard(['unload', 'm6x3', '--coordinator', coordAddr], env); // the failed entry, if still listed
    const load = await orchard(['load', model, '--ctx', String(CTX_3), '--name', 'm6x3', '--pin', 'alpha', 'bravo', 'charlie', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
    expect((await generate('m6x3')).tokens).toEqual(oracle);
    const un = await orchard(['unload', 'm6x3', '--coordinator', coordAddr], env);
    expect(un.code, un.stderr).toBe(0);
    const gone = Date.now() + 5000;
    while (Date.now() < gone && (await workerPids(model)).length > 0) await sleep(100);
    expect(await workerPids(model)).toEqual([]);
  }, 300_000);
  // Auto parallelism (pipeline on this ring, and why) is checked on the first 2-rank load above.
  it('--parallelism tensor through the coordinator: 2 ranks, greedy tokens equal one process', async () => {
    const tp = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm6tp', '--parallelism', 'tensor', '--pin', 'alpha', 'bravo', '--json', '--coordinator', coordAddr], env);
    expect(tp.code, tp.stderr).toBe(0);
    expect(messages(tp.stdout).some((m) => /MLX tensor parallel over 2 rank\(s\): tensor requested/.test(m))).toBe(true);
    expect(await workerPids(model)).toHaveLength(2);
    // Tensor parallel is close to, not bit-identical with, one process (mlx-group.test.ts checks
    // logprobs within 1e-3); on this model greedy decoding lands on the same ids.
    expect((await generate('m6tp')).tokens).toEqual(oracle);
    expect((await orchard(['unload', 'm6tp', '--coordinator', coordAddr], env)).code).toBe(0);
  }, 300_000);
});
