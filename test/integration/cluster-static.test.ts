import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import { findLlamaBinaries, type LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { plainLlamaTokens } from '../helpers/oracle.ts';
import { canConnectEndpoint, freePort, killGroup, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';

/*
 * The coordinator end to end, with real processes on 127.0.0.1 (static join with a real join
 * token: pin, CSR, node certificate, announce): one coordinator,
 * three `orchard node` agents whose budgets force a multi-stage plan, a generated 8-layer GGUF,
 * real ggml-rpc-server / llama-server engines. The oracle: greedy token ids through the cluster
 * equal those of one plain llama-server on the same file. Then a worker agent is SIGKILLed
 * mid-stream: the client must get UNAVAILABLE naming the node within 2 s, no engine may be left
 * after 5 s, status must show the node down, and a new load on the two survivors must work and
 * give the same tokens again. The coordinator runs with --heal off: this is the path without
 * self-healing (self-heal.test.ts has the one with it).
 */

const ROOT = new URL('../..', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');
const CTX = 2048;
const PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time';
const N_PREDICT = 48;

const procs: Proc[] = [];

function start(name: string, args: string[], env: NodeJS.ProcessEnv, file = process.execPath): Proc {
  const p = spawnProc(name, args, env, file);
  procs.push(p);
  return p;
}


describe('cluster: coordinator + 3 node agents, static join on 127.0.0.1', () => {
  let dir: string;
  let bins: LlamaBinaries;
  let env: NodeJS.ProcessEnv;
  let model: string;
  let coordinator: Proc;
  let coordAddr: string;
  let token: string;
  const agents = new Map<string, { proc: Proc; address: string; nodeId: string }>();
  let oracle: number[];

  beforeAll(async () => {
    bins = await findLlamaBinaries();
    dir = await mkdtemp(join(tmpdir(), 'orchard-cluster-'));
    env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    const split = await modelThatMustSplit(['--layers', '8', '--seed', '7'], CTX);
    model = split.model;
    // Budgets: a hair below what one node needs for the whole model, so the planner must split.
    const budget = split.budget;

    // The CLI on this machine trusts the coordinator by its state dir (CA, local admin key).
    env.ORCHARD_COORDINATOR_STATE_DIR = join(dir, 'coord');
    coordinator = start('coordinator', [BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--max-queue', '1', '--heal', 'off', '--no-nats', '--json'], env);
    const ready = await readyLine(coordinator);
    coordAddr = `127.0.0.1:${String(ready.grpcPort)}`;
    const t = await orchard(['coordinator', 'token', '--uses', '3', '--ttl', '10m'], env);
    expect(t.code, t.stderr).toBe(0);
    token = t.stdout.trim();
    expect(token).toMatch(/^orchard1\./);
    expect(token.endsWith(String(ready.caFingerprint))).toBe(true);
    for (const name of ['alpha', 'bravo', 'charlie']) {
      // alpha and bravo join by themselves (`orchard node --join` + ORCHARD_NODE_TOKEN); charlie is
      // enrolled first with `orchard cluster join` and started without a token.
      if (name === 'charlie') {
        const j = await orchard(['cluster', 'join', coordAddr, '--state-dir', join(dir, name), '--json'], { ...env, ORCHARD_NODE_TOKEN: token });
        expect(j.code, j.stderr).toBe(0);
      }
      const nodeEnv = name === 'charlie' ? env : { ...env, ORCHARD_NODE_TOKEN: token };
      const proc = start(`node ${name}`, [BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', join(dir, name), '--models-dir', dir, '--json', '--join', coordAddr], nodeEnv);
      const r = await readyLine(proc);
      agents.set(name, { proc, address: `127.0.0.1:${String(r.grpcPort)}`, nodeId: String(r.nodeId) });
    }
    oracle = await plainLlamaTokens(bins, { model, ctx: CTX, prompt: PROMPT, nPredict: N_PREDICT, threads: 2 });
  });

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  const status = async () => {
    const r = await orchard(['status', '--json', '--coordinator', coordAddr], env);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as {
      nodes: { id: string; name: string; state: string; hardware: { budgetBytes: number; memoryBytes: number } }[];
      models: { name: string; state: string; error?: string; stages: { nodeId: string; nodeName: string; firstLayer: number; lastLayer: number; endpoint: string }[] }[];
    };
  };

  it('refuses a forged, a foreign and a used-up join token with one clear line; the three nodes are up', async () => {
    const [v, id, secret, ca] = token.split('.') as [string, string, string, string];
    const forged = [v, id, `${secret.slice(0, -1)}${secret.endsWith('A') ? 'B' : 'A'}`, ca].join('.');
    const foreign = [v, id, secret, 'f'.repeat(64)].join('.');
    const attempt = async (t: string, state: string) => orchard(['cluster', 'join', coordAddr, '--state-dir', join(dir, state)], { ...env, ORCHARD_NODE_TOKEN: t });
    const bad = await attempt(forged, 'forged');
    expect(bad.code).toBe(1);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toMatch(/join token is not valid for this cluster/);
    const other = await attempt(foreign, 'foreign');
    expect(other.code).toBe(1);
    expect(other.stderr).toMatch(/not the cluster this token is for/);
    const spent = await attempt(token, 'fourth');
    expect(spent.code).toBe(1);
    expect(spent.stderr).toMatch(/join token has no uses left/);
    let s = await status();
    for (let i = 0; i < 50 && s.nodes.length < 3; i++) {
      await sleep(200);
      s = await status();
    }
    expect(s.nodes.map((n) => [n.name, n.state]).sort()).toEqual([
      ['alpha', 'up'],
      ['bravo', 'up'],
      ['charlie', 'up'],
    ]);
    expect(s.nodes[0]!.hardware.budgetBytes).toBeGreaterThan(0);
  });

  it('`orchard plan` without --nodes plans for the live cluster through the coordinator', async () => {
    const r = await orchard(['plan', model, '--ctx', String(CTX), '--json', '--coordinator', coordAddr], env);
    expect(r.code, r.stderr).toBe(0);
    const plan = JSON.parse(r.stdout) as { fits: boolean; stages: { node: string; firstLayer: number; lastLayer: number; bytes: { total: number }; budgetBytes: number }[]; predicted: { tokensPerSecond: number } };
    expect(plan.fits).toBe(true);
    // The agents' budgets are a hair below the whole model, so the live plan must split, and
    // only over the live nodes, each stage within its node's budget.
    expect(plan.stages.length).toBeGreaterThanOrEqual(2);
    const live = new Set((await status()).nodes.filter((n) => n.state === 'up').map((n) => n.name));
    for (const st of plan.stages) {
      expect(live.has(st.node), `${st.node} is not a live node`).toBe(true);
      expect(st.bytes.total).toBeLessThanOrEqual(st.budgetBytes);
    }
    expect(new Set(plan.stages.map((st) => st.node)).size).toBe(plan.stages.length);
    expect(plan.stages[0]!.firstLayer).toBe(0);
    for (let i = 1; i < plan.stages.length; i++) expect(plan.stages[i]!.firstLayer).toBe(plan.stages[i - 1]!.lastLayer + 1);
    expect(plan.stages.at(-1)!.lastLayer).toBe(7);
    expect(plan.predicted.tokensPerSecond).toBeGreaterThan(0);

    // Human table: same renderer as --nodes, naming the live nodes.
    const table = await orchard(['plan', model, '--ctx', String(CTX), '--coordinator', coordAddr], env);
    expect(table.code, table.stderr).toBe(0);
    for (const st of plan.stages) expect(table.stdout).toContain(st.node);
    expect(table.stdout).toMatch(/predicted: [\d.]+ tok\/s/);

    // Does not fit: the planner's answer (fits false, shortfall), exit 1.
    const huge = await orchard(['plan', model, '--ctx', '1048576', '--json', '--coordinator', coordAddr], env);
    expect(huge.code, huge.stderr).toBe(1);
    const no = JSON.parse(huge.stdout) as { fits: boolean; shortfall?: { shortfallBytes: number } };
    expect(no.fits).toBe(false);
    expect(no.shortfall?.shortfallBytes).toBeGreaterThan(0);

    // No coordinator there: one clear line, exit 1.
    const nobody = await orchard(['plan', model, '--json', '--coordinator', `127.0.0.1:${await freePort()}`], env);
    expect(nobody.code).toBe(1);
    expect(nobody.stdout).toBe('');
    expect(nobody.stderr.trim().split('\n')).toHaveLength(1);
    expect(nobody.stderr).toMatch(/cannot reach the coordinator/);
  });

  it('rejects bad loads with clear errors and leaves nothing behind', async () => {
    const missing = await orchard(['load', join(dir, 'nope.gguf'), '--coordinator', coordAddr], env);
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/nope\.gguf/);
    const huge = await orchard(['load', model, '--ctx', '1048576', '--name', 'huge', '--coordinator', coordAddr], env);
    expect(huge.code).toBe(1);
    expect(huge.stderr).toMatch(/does not fit/);
    expect((await status()).models).toEqual([]);
  });

  it('loads across ≥ 2 stages, verified, and greedy tokens equal one plain llama-server', async () => {
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
    const m = (await status()).models.find((x) => x.name === 'm8')!;
    expect(m.state).toBe('ready');
    expect(m.stages.length).toBeGreaterThanOrEqual(2);
    expect(new Set(m.stages.map((s) => s.nodeId)).size).toBe(m.stages.length);
    // the coordinator logged the engine's own assignment next to the plan, and they agree
    expect(coordinator.err).toMatch(/"msg":"stage verification"/);

    const again = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/already loaded/);

    const g = await orchard(['generate', '--prompt', PROMPT, '--max-tokens', String(N_PREDICT), '--temperature', '0', '--json', '--coordinator', coordAddr], env);
    expect(g.code, g.stderr).toBe(0);
    const out = JSON.parse(g.stdout) as { tokens: number[]; text: string; timings: { predictedTokensPerSecond: number } };
    expect(out.tokens).toHaveLength(N_PREDICT);
    expect(new Set(out.tokens).size).toBeGreaterThan(5); // varied output, or equality would prove little
    expect(out.tokens).toEqual(oracle);
    expect(out.timings.predictedTokensPerSecond).toBeGreaterThan(0);
  });

  it('a worker agent SIGKILLed mid-stream: UNAVAILABLE naming it within 2 s, no engines left, node down, reload works', async () => {
    const before = (await status()).models.find((x) => x.name === 'm8')!;
    const workerStage = before.stages[0]!; // the last stage is the head; the first is a worker
    const worker = [...agents.values()].find((a) => a.nodeId === workerStage.nodeId)!;
    const endpoints = before.stages.map((s) => s.endpoint).filter(Boolean);

    const client = await localCoordinatorClient(coordAddr, join(dir, 'coord'));
    let tokens = 0;
    let killedAt = 0;
    let error: (Error & { message: string }) | undefined;
    try {
      for await (const ev of client.stream('generate', { model: 'm8', prompt: PROMPT, maxTokens: 100_000, temperature: 0, seed: '1' })) {
        if (ev.event === 'token') tokens++;
        if (tokens === 3 && !killedAt) {
          killedAt = Date.now();
          process.kill(worker.proc.child.pid!, 'SIGKILL');
        }
      }
    } catch (err) {
      error = err as Error;
    } finally {
      client.close();
    }
    const errorAfterMs = Date.now() - killedAt;
    expect(killedAt).toBeGreaterThan(0);
    expect(error, 'the stream must end with an error, not quietly').toBeDefined();
    expect(error!.message).toMatch(new RegExp(workerStage.nodeName));
    expect(errorAfterMs).toBeLessThan(2000);

    // No engine left after 5 s: every endpoint of the instance refuses connections, and the
    // surviving agents report no engines.
    await sleep(5000);
    for (const e of endpoints) expect(await canConnectEndpoint(e), `${e} still accepting`).toBe(false);
    const s = await status();
    expect(s.nodes.find((n) => n.id === worker.nodeId)!.state).toBe('down');
    const failed = s.models.find((x) => x.name === 'm8')!;
    expect(failed.state).toBe('failed');
    expect(failed.error).toMatch(new RegExp(workerStage.nodeName));

    // Reload on the remaining two nodes; same tokens as the oracle.
    const reload = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    expect(reload.code, reload.stderr).toBe(0);
    const m = (await status()).models.find((x) => x.name === 'm8')!;
    expect(m.state).toBe('ready');
    expect(m.stages.length).toBeGreaterThanOrEqual(2);
    expect(m.stages.some((st) => st.nodeId === worker.nodeId)).toBe(false);
    const g = await orchard(['generate', '--prompt', PROMPT, '--max-tokens', String(N_PREDICT), '--temperature', '0', '--json', '--model', 'm8', '--coordinator', coordAddr], env);
    expect(g.code, g.stderr).toBe(0);
    expect((JSON.parse(g.stdout) as { tokens: number[] }).tokens).toEqual(oracle);

  });

  it('cancellation frees the engine slot; beyond --parallel + --max-queue a request gets RESOURCE_EXHAUSTED busy', async () => {
    // m8 is loaded with --parallel 1 and the coordinator runs with --max-queue 1.
    const client = () => localCoordinatorClient(coordAddr, join(dir, 'coord'));
    const [a, b, c] = [await client(), await client(), await client()];
    const cancelA = new AbortController();
    const long = { model: 'm8', prompt: PROMPT, maxTokens: 100_000, temperature: 0, seed: '1' };
    try {
      const aStream = a.stream('generate', long, cancelA.signal);
      await aStream.next(); // A holds the only slot
      let bFirstTokenAt = 0;
      const bDone = (async () => {
        for await (const ev of b.stream('generate', { ...long, maxTokens: 4 })) {
          if (ev.event === 'token' && !bFirstTokenAt) bFirstTokenAt = Date.now();
        }
      })();
      await sleep(300); // B is queued now
      const busy = await (async () => {
        for await (const _ of c.stream('generate', { ...long, maxTokens: 4 })) return undefined;
        return undefined;
      })().catch((e: Error) => e);
      expect(busy).toBeInstanceOf(Error);
      expect((busy as Error).message).toMatch(/^busy/);
      expect(bFirstTokenAt).toBe(0);
      // Cancel A: its engine slot must go idle, so B starts long before A could have finished
      // (A alone would run to the 2048-token context, tens of seconds here).
      const cancelledAt = Date.now();
      cancelA.abort();
      await aStream.return(undefined);
      await bDone;
      expect(bFirstTokenAt).toBeGreaterThan(0);
      expect(bFirstTokenAt - cancelledAt).toBeLessThan(5000);
    } finally {
      a.close();
      b.close();
      c.close();
    }
  });

  it('a restarted coordinator that lost its stored instances cleans up the engines its predecessor left on the agents', async () => {
    const m = (await status()).models.find((x) => x.name === 'm8')!;
    const endpoints = m.stages.map((s) => s.endpoint).filter(Boolean);
    for (const e of endpoints) expect(await canConnectEndpoint(e)).toBe(true);
    // A crash, not a clean stop: nothing gets to unload. File store (--no-nats): without
    // instances.json nothing claims the engines (with it they are re-adopted:
    // coordinator-restart.test.ts).
    await killGroup(coordinator);
    await rm(join(dir, 'coord', 'instances.json'));
    coordinator = start('coordinator 2', [BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--no-nats', '--json'], env);
    const ready = await readyLine(coordinator);
    coordAddr = `127.0.0.1:${String(ready.grpcPort)}`;
    // It finds the agents that joined before (state dir) and stops the orphaned engines.
    const deadline = Date.now() + 15_000;
    let open = endpoints.length;
    while (Date.now() < deadline && open > 0) {
      await sleep(250);
      open = 0;
      for (const e of endpoints) if (await canConnectEndpoint(e)) open++;
    }
    expect(open).toBe(0);
    const s = await status();
    expect(s.models).toEqual([]);
    expect(s.nodes.filter((n) => n.state === 'up').length).toBe(2);
    // and it can load again
    const reload = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    expect(reload.code, reload.stderr).toBe(0);
    const u = await orchard(['unload', 'm8', '--coordinator', coordAddr], env);
    expect(u.code, u.stderr).toBe(0);
    const after = (await status()).models;
    expect(after).toEqual([]);
  });
});
