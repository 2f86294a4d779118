import { existsSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { findLlamaBinaries, type LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { TENSOR_HASHES_ENV } from '../../src/shared/rpc-cache/known-hashes.ts';
import { stageCachePlan } from '../../src/shared/rpc-cache/plan.ts';
import { ORACLE_PROMPT, plainLlamaTokens } from '../helpers/oracle.ts';
import { ORCHARD_BIN as BIN, killGroup, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { joinToken } from '../helpers/join.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';

/*
 * Pre-seeding through the whole product path on 127.0.0.1: a coordinator and two `orchard node`
 * agents started with `--models-dir` holding the model; budgets force two stages. The load must
 * pre-seed each stage's rpc-server cache (PrepareCache), so the bytes the worker's rpc-server
 * received through its tunnel (the agents' orchard_rpc_bytes_total; rpc-servers listen on Unix
 * sockets, which have no kernel byte counters) stay ≤ 1 % of that stage's weight bytes; and greedy tokens still equal one plain llama-server (the weights
 * served from the cache are the right ones).
 */
const CTX = 1024;
const PROMPT = ORACLE_PROMPT;
const N_PREDICT = 16;

const procs: Proc[] = [];

function start(name: string, args: string[], env: NodeJS.ProcessEnv, file = process.execPath): Proc {
  const p = spawnProc(name, args, env, file);
  procs.push(p);
  return p;
}

/** A worker agent's orchard_rpc_bytes_total{peer, direction="received"}: what the head sent through the tunnel toward its rpc-server. */
async function tunnelBytesFrom(metricsPort: number, peer: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`orchard_rpc_bytes_total{peer="${peer}",direction="received"}`));
  return Number(line?.split(' ').pop() ?? 0);
}

/** The environment of the running llama-server loading `model` (the head), from /proc. */
async function headEnvironment(model: string): Promise<Record<string, string>> {
  for (const pid of (await readdir('/proc')).filter((p) => /^\d+$/.test(p))) {
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    const argv = cmd.split('\0');
    if (!argv[0]?.endsWith('llama-server') || argv[argv.indexOf('-m') + 1] !== model) continue;
    const env = (await readFile(`/proc/${pid}/environ`, 'utf8')).split('\0').filter(Boolean);
    return Object.fromEntries(env.map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
  }
  throw new Error(`no llama-server running ${model}`);
}

describe('cluster: rpc-server caches pre-seeded from the nodes’ own model files', () => {
  let dir: string;
  let env: NodeJS.ProcessEnv;
  let model: string;
  let coordAddr: string;
  let bins: LlamaBinaries;
  const stateDirs = new Map<string, string>();
  const agentProcs = new Map<string, Proc>();
  const agents = new Map<string, { nodeId: string; metricsPort: number }>();

  beforeAll(async () => {
    bins = await findLlamaBinaries();
    dir = await mkdtemp(join(tmpdir(), 'orchard-cluster-cache-'));
    env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1', XDG_CACHE_HOME: join(dir, 'xdg') };
    const models = join(dir, 'models');
    await mkdir(models);
    model = join(models, 'wide.gguf');
    // every matrix above ggml-rpc's 10 MiB hash threshold (dim 2304, 8 KV heads, f16)
    const split = await modelThatMustSplit(['--layers', '2', '--dim', '2304', '--ffn', '5632', '--heads', '8', '--kv-heads', '8', '--seed', '3'], CTX);
    // A copy under --models-dir: the agents seed their tensor cache from the files there.
    await copyFile(split.model, model);
    const budget = split.budget;

    env.ORCHARD_COORDINATOR_STATE_DIR = join(dir, 'coord'); // the CLI trusts the coordinator by its state dir
    const coordinator = start('coordinator', [BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--json'], env);
    coordAddr = `127.0.0.1:${String((await readyLine(coordinator)).grpcPort)}`;
    const token = await joinToken(join(dir, 'coord'), 2);
    for (const name of ['alpha', 'bravo']) {
      const stateDir = join(dir, name);
      stateDirs.set(name, stateDir);
      const proc = start(`node ${name}`, [BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', stateDir, '--models-dir', models, '--json', '--join', coordAddr], { ...env, ORCHARD_NODE_TOKEN: token });
      agentProcs.set(name, proc);
      const ready = await readyLine(proc);
      agents.set(name, { nodeId: String(ready.nodeId), metricsPort: Number(ready.metricsPort) });
    }
    for (let i = 0; i < 100; i++) {
      const s = await orchard(['status', '--json', '--coordinator', coordAddr], env);
      if (s.code === 0 && (JSON.parse(s.stdout) as { nodes: { state: string }[] }).nodes.filter((n) => n.state === 'up').length === 2) break;
      await sleep(200);
    }
  }, 180_000);

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('sends ≤ 1 % of each stage’s weight bytes during the load, and the tokens equal one plain llama-server', async () => {
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'wide', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
    const s = JSON.parse((await orchard(['status', '--json', '--coordinator', coordAddr], env)).stdout) as {
      models: { name: string; stages: { nodeName: string; firstLayer: number; lastLayer: number; endpoint: string }[] }[];
    };
    const stages = s.models.find((m) => m.name === 'wide')!.stages;
    expect(stages.length).toBe(2);
    const header = await readGgufHeader(model);
    const head = agents.get(stages.at(-1)!.nodeName)!; // the last stage's node runs the head
    for (const [i, st] of stages.entries()) {
      const plan = stageCachePlan(header, { firstLayer: st.firstLayer, lastLayer: st.lastLayer, holdsOutput: i === stages.length - 1 });
      const shard = plan.cachedBytes + plan.sentBytes;
      // The worker's stage: what crossed its tunnel toward its rpc-server (the agents' own count).
      // The head's own stage is reached on its rpc-server's Unix socket, which no counter sees:
      // its cache use is checked by the entries below and the known hashes after the loop.
      if (i < stages.length - 1) {
        const received = await tunnelBytesFrom(agents.get(st.nodeName)!.metricsPort, head.nodeId);
        expect(received, `${st.nodeName} rpc-server received ${received} of ${shard} shard bytes`).toBeGreaterThan(0);
        expect(received, `${st.nodeName} rpc-server received ${received} of ${shard} shard bytes`).toBeLessThanOrEqual(0.01 * shard);
      }
      // the entries sit in the agent's default cache dir, one per hashed tensor of the stage
      const entries = (await readdir(join(stateDirs.get(st.nodeName)!, 'llama-cache', 'rpc'))).filter((n) => /^[0-9a-f]{16}$/.test(n));
      expect(entries.length).toBe(plan.cached.length);
    }
    // The head offers the hashes the agents computed while seeding (each stage's own), not its own:
    // it read one per cached tensor (its own count, logged by its agent), and each named a cache
    // entry, or that tensor's bytes would have been sent (≤ 1 % above). The file was in the head
    // agent's run folder and is gone now that the head is ready (read once, while loading).
    const hints = (await headEnvironment(model))[TENSOR_HASHES_ENV]!;
    expect([...stateDirs.values()].some((d) => hints.startsWith(join(d, 'run', 'orchard-engine-')))).toBe(true);
    expect(existsSync(hints), 'a ready head keeps no hints file').toBe(false);
    const seeded = stages.flatMap((st, i) => stageCachePlan(header, { firstLayer: st.firstLayer, lastLayer: st.lastLayer, holdsOutput: i === stages.length - 1 }).cached);
    expect(seeded.length).toBeGreaterThan(0);
    const reported = [...agentProcs.values()].flatMap((p) => [...p.err.matchAll(/GGML_RPC_TENSOR_HASHES: (\d+) known tensor hashes/g)].map((m) => Number(m[1])));
    expect(reported).toEqual([seeded.length]);
    const g = await orchard(['generate', '--prompt', PROMPT, '--max-tokens', String(N_PREDICT), '--temperature', '0', '--json', '--coordinator', coordAddr], env);
    expect(g.code, g.stderr).toBe(0);
    const out = JSON.parse(g.stdout) as { tokens: number[] };
    expect(new Set(out.tokens).size).toBeGreaterThan(3);
    expect(out.tokens).toEqual(await plainLlamaTokens(bins, { model, ctx: CTX, prompt: PROMPT, nPredict: N_PREDICT, threads: 1 }));
  }, 300_000);
});
