/**
 * Where Orchard's time-to-first-token overhead goes: the SAME llama-server (the head engine of an
 * Orchard load) reached three ways, alternating, many runs:
 *   direct      HTTP POST /completion to the engine (the same body the agent sends)
 *   agent       NodeAgent.Generate over gRPC (agent → engine)
 *   coordinator Coordinator.Generate over gRPC (coordinator → agent → engine)
 * so agent − direct is the agent hop and coordinator − agent the coordinator hop, without the
 * instance-to-instance noise of comparing two engines. Single-stage tiny model: the engine's own
 * first-token time is small, so the relay's share is visible.
 * Usage: npm run bench:ttft-path -- [--json] [--runs 40] [--tokens 4]
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { AgentClient } from '../src/coordinator/membership/agent-client.ts';
import { CoordinatorClient } from '../src/coordinator/api/client.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { completionBody } from '../src/node/generate.ts';

const ROOT = new URL('../', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');
const argv = process.argv.slice(2);
const flag = (name: string, def: string) => {
  const i = argv.indexOf(name);
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : def;
};
const RUNS = Number(flag('--runs', '40'));
const TOKENS = Number(flag('--tokens', '4'));
const JSON_OUT = argv.includes('--json');
const PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const procs: ChildProcess[] = [];
function start(args: string[], env: NodeJS.ProcessEnv): ChildProcess & { out: string } {
  const c = spawn(process.execPath, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env }) as ChildProcess & { out: string };
  c.out = '';
  c.stdout?.on('data', (d: Buffer) => {
    c.out += d.toString();
  });
  c.stderr?.on('data', () => {});
  procs.push(c);
  return c;
}
function killAll(): void {
  for (const c of procs.splice(0)) {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
}
process.on('SIGINT', () => {
  killAll();
  process.exit(130);
});
async function ready(c: ChildProcess & { out: string }): Promise<Record<string, unknown>> {
  for (let i = 0; i < 600; i++) {
    const line = c.out.split('\n').find((l) => l.includes('"event":"ready"'));
    if (line) return JSON.parse(line) as Record<string, unknown>;
    await sleep(100);
  }
  throw new Error('not ready in 60 s');
}

const q = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
};
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

const params = { prompt: PROMPT, maxTokens: TOKENS, temperature: 0, topP: 0, seed: 1, stop: [] as string[] };

async function direct(port: number): Promise<number> {
  const t0 = performance.now();
  const res = await fetch(`http://127.0.0.1:${port}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', accept: 'text/event-stream' },
    body: JSON.stringify(completionBody(params)),
  });
  let first = 0;
  const dec = new TextDecoder();
  let buf = '';
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    buf += dec.decode(chunk, { stream: true });
    if (!first && buf.includes('"tokens":[')) first = performance.now();
  }
  return first - t0;
}

async function viaAgent(agent: AgentClient, engineId: string): Promise<number> {
  const t0 = performance.now();
  let first = 0;
  for await (const m of agent.generate({ engineId, requestId: '', ...params }) as AsyncIterable<Record<string, unknown>>) {
    if (!first && m.token) first = performance.now();
  }
  return first - t0;
}

async function viaCoordinator(client: CoordinatorClient): Promise<number> {
  const t0 = performance.now();
  let first = 0;
  for await (const ev of client.stream('generate', { model: 'ttft', prompt: PROMPT, maxTokens: TOKENS, temperature: 0, seed: '1' })) {
    if (!first && ev.event === 'token') first = performance.now();
  }
  return first - t0;
}

async function main(): Promise<void> {
  const bins = await findLlamaBinaries();
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-ttft-'));
  try {
    const env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    const model = join(dir, 'm.gguf');
    await promisify(execFile)(process.execPath, [BIN, 'testmodel', 'gguf', '--out', model, '--layers', '4', '--seed', '3'], { env });
    const token = `bench-${randomBytes(12).toString('hex')}`;
    const coord = start([BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--join-token', token, '--json'], env);
    const addr = `127.0.0.1:${String((await ready(coord)).grpcPort)}`;
    const node = start([BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', 'n1', '--state-dir', join(dir, 'n1'), '--join', addr, '--token', token, '--json'], env);
    const agentAddr = `127.0.0.1:${String((await ready(node)).grpcPort)}`;
    const client = new CoordinatorClient(addr);
    for (let i = 0; i < 100; i++) {
      if ((((await client.unary('status', {})).nodes ?? []) as unknown[]).length === 1) break;
      await sleep(200);
    }
    for await (const p of client.stream('load', { modelPath: model, name: 'ttft', options: { ctx: 1024, cacheType: 'f16', parallel: 1, pinnedNodes: [] }, engine: '' })) {
      if (p.phase === 'failed') throw new Error(String(p.message));
    }
    const agent = new AgentClient(agentAddr, token);
    const head = (await agent.describe()).engines.find((e) => e.kind === 'ENGINE_KIND_LLAMA_SERVER');
    if (!head) throw new Error('no head engine on the node');
    const d: number[] = [];
    const a: number[] = [];
    const c: number[] = [];
    for (let i = 0; i < 3; i++) {
      await direct(head.port);
      await viaAgent(agent, head.engineId);
      await viaCoordinator(client);
    }
    for (let i = 0; i < RUNS; i++) {
      d.push(await direct(head.port));
      a.push(await viaAgent(agent, head.engineId));
      c.push(await viaCoordinator(client));
    }
    client.close();
    agent.close();
    const row = (xs: number[]) => ({ p50: median(xs), p90: q(xs, 0.9), min: Math.min(...xs) });
    const result = {
      bench: 'ttft-path',
      runs: RUNS,
      tokens: TOKENS,
      directMs: row(d),
      agentMs: row(a),
      coordinatorMs: row(c),
      agentHopMsP50: median(a) - median(d),
      coordinatorHopMsP50: median(c) - median(a),
      addedTtftMsP50: median(c) - median(d),
    };
    process.stdout.write(JSON_OUT ? `${JSON.stringify(result)}\n` : `${JSON.stringify(result, null, 2)}\n`);
  } finally {
    killAll();
    await sleep(300);
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  killAll();
  process.stderr.write(`bench:ttft-path failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
