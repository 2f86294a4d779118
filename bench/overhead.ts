/**
 * Orchard's overhead on the token path: the same pipeline split (same model, same layer ranges,
 * same threads) run (a) through Orchard — coordinator + node agents, gRPC relay, `orchard load` —
 * and (b) started by hand with llama.cpp's own flags (`ggml-rpc-server` per stage, one
 * `llama-server --rpc … --tensor-split …`), streamed from its `/completion`. Runs alternate
 * A/B so machine noise hits both. Prints JSON:
 *   ratio = median decode tokens/s through Orchard ÷ by hand (goal ≥ 0.97)
 *   addedTtftMsP50 = median client-observed time to first token, Orchard − by hand (goal < 5 ms)
 * Usage: npm run bench:overhead -- [--json] [--runs 7] [--tokens 128]
 * Needs ORCHARD_LLAMA_BIN_DIR (or `orchard setup`). Every process is killed (process group) at
 * the end, on error and on SIGINT.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CoordinatorClient } from '../src/coordinator/api/client.ts';
import { memoryOptionsOf } from '../src/coordinator/instances/planner-adapter.ts';
import { resolveLoadOptions } from '../src/coordinator/instances/runtime.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import { llamaDeviceArgs, llamaMemoryArgs } from '../src/shared/placement/llama-args.ts';
import { planPlacement } from '../src/shared/placement/planner.ts';
import { ssePayloads } from '../src/shared/sse.ts';

const ROOT = new URL('../', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');
const argv = process.argv.slice(2);
const flag = (name: string, def: string) => {
  const i = argv.indexOf(name);
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : def;
};
const RUNS = Number(flag('--runs', '7'));
const TOKENS = Number(flag('--tokens', '128'));
const JSON_OUT = argv.includes('--json');
const CTX = 2048;
const PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time';

const procs: ChildProcess[] = [];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function start(file: string, args: string[], env: NodeJS.ProcessEnv = process.env): ChildProcess & { out: string } {
  const child = spawn(file, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env }) as ChildProcess & { out: string };
  child.out = '';
  child.stdout?.on('data', (c: Buffer) => {
    child.out += c.toString('utf8');
  });
  child.stderr?.on('data', () => {});
  procs.push(child);
  return child;
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
  throw new Error('process not ready in 60 s');
}

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => resolve(typeof a === 'object' && a ? a.port : 0));
    });
  });
}

interface Run {
  readonly ttftMs: number;
  readonly tokensPerSecond: number;
  readonly tokens: number;
  /** What the engine itself reports (llama-server `timings.predicted_per_second`). */
  readonly engineTokensPerSecond: number;
}

async function viaOrchard(client: CoordinatorClient): Promise<Run> {
  const t0 = performance.now();
  let first = 0;
  let last = 0;
  let n = 0;
  let engine = 0;
  for await (const ev of client.stream('generate', { model: 'bench', prompt: PROMPT, maxTokens: TOKENS, temperature: 0, seed: '1' })) {
    if (ev.event === 'done') engine = Number(((ev.done as Record<string, unknown>).timings as Record<string, unknown>)?.predictedTokensPerSecond ?? 0);
    if (ev.event !== 'token') continue;
    const k = ((ev.token as { tokenIds?: unknown[] }).tokenIds ?? []).length || 1;
    last = performance.now();
    if (!first) first = last;
    n += k;
  }
  return { ttftMs: first - t0, tokensPerSecond: (n - 1) / ((last - first) / 1000), tokens: n, engineTokensPerSecond: engine };
}

async function byHand(port: number): Promise<Run> {
  const t0 = performance.now();
  const res = await fetch(`http://127.0.0.1:${port}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: PROMPT, n_predict: TOKENS, temperature: 0, seed: 1, stream: true }),
  });
  let first = 0;
  let last = 0;
  let n = 0;
  let engine = 0;
  for await (const data of ssePayloads(res.body as unknown as AsyncIterable<Uint8Array>)) {
    if (!data.startsWith('{')) continue;
    const j = JSON.parse(data) as { content?: string; tokens?: number[]; stop?: boolean; timings?: { predicted_per_second?: number } };
    if (j.stop) {
      engine = j.timings?.predicted_per_second ?? 0;
      continue;
    }
    last = performance.now();
    if (!first) first = last;
    n += j.tokens?.length || 1;
  }
  return { ttftMs: first - t0, tokensPerSecond: (n - 1) / ((last - first) / 1000), tokens: n, engineTokensPerSecond: engine };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

async function main(): Promise<void> {
  const bins = await findLlamaBinaries();
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-overhead-'));
  try {
    const env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    const model = join(dir, 'm.gguf');
    await promisify(execFile)(process.execPath, [BIN, 'testmodel', 'gguf', '--out', model, '--layers', '8', '--dim', '512', '--ffn', '1536', '--seed', '3'], { env });
    const profile = modelProfile(await readGgufHeader(model));
    const single = planPlacement(profile, [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx: CTX });
    const budget = Math.floor(single.stages[0]!.bytes.total) - 2 * 2 ** 20;

    // (a) Orchard: coordinator + two agents that join by themselves.
    const token = `bench-${randomBytes(12).toString('hex')}`;
    const coord = start(process.execPath, [BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--join-token', token, '--json'], env);
    const addr = `127.0.0.1:${String((await ready(coord)).grpcPort)}`;
    for (const name of ['n1', 'n2']) {
      const n = start(process.execPath, [BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', join(dir, name), '--join', addr, '--token', token, '--json'], env);
      await ready(n);
    }
    const client = new CoordinatorClient(addr);
    for (let i = 0; i < 100; i++) {
      const s = await client.unary('status', {});
      if (((s.nodes ?? []) as unknown[]).length === 2) break;
      await sleep(200);
    }
    let stages: { firstLayer: number; lastLayer: number }[] = [];
    for await (const p of client.stream('load', { modelPath: model, name: 'bench', options: { ctx: CTX, cacheType: 'f16', parallel: 1, pinnedNodes: [] }, engine: '' })) {
      if (p.phase === 'ready') stages = ((p.model as Record<string, unknown>).stages as { firstLayer: number; lastLayer: number }[]).map((s) => ({ firstLayer: Number(s.firstLayer), lastLayer: Number(s.lastLayer) }));
      if (p.phase === 'failed') throw new Error(String(p.message));
    }

    // (b) the same split by hand: one rpc-server per stage (the CPU-only head's layers too), same threads.
    const endpoints: string[] = [];
    for (const _ of stages) {
      const port = await freePort();
      start(bins.rpcServer, ['-H', '127.0.0.1', '-p', String(port), '-t', '1']);
      endpoints.push(`127.0.0.1:${port}`);
    }
    await sleep(500);
    const dev = llamaDeviceArgs(stages.map((s, i) => ({ ...s, rpc: endpoints[i]! })), profile.layerCount);
    const httpPort = await freePort();
    const handArgs = ['-m', model, ...llamaMemoryArgs(memoryOptionsOf(resolveLoadOptions({ ctx: CTX }))), ...dev.args, '-t', '1', '--host', '127.0.0.1', '--port', String(httpPort), ...(process.env.BENCH_HAND_EXTRA_ARGS?.split(/\s+/).filter(Boolean) ?? [])];
    start(bins.llamaServer, handArgs);
    for (let i = 0; i < 600; i++) {
      if (await fetch(`http://127.0.0.1:${httpPort}/health`).then((r) => r.status === 200, () => false)) break;
      await sleep(100);
    }

    // warm-up both, then alternate
    await viaOrchard(client);
    await byHand(httpPort);
    const a: Run[] = [];
    const b: Run[] = [];
    for (let i = 0; i < RUNS; i++) {
      a.push(await viaOrchard(client));
      b.push(await byHand(httpPort));
    }
    client.close();
    const result = {
      bench: 'overhead',
      model: { layers: profile.layerCount, embd: profile.embd, stages: stages.length },
      runs: RUNS,
      tokens: TOKENS,
      orchard: { tokensPerSecondP50: median(a.map((r) => r.tokensPerSecond)), engineTokensPerSecondP50: median(a.map((r) => r.engineTokensPerSecond)), ttftMsP50: median(a.map((r) => r.ttftMs)), tokens: a.map((r) => r.tokens) },
      byHand: { tokensPerSecondP50: median(b.map((r) => r.tokensPerSecond)), engineTokensPerSecondP50: median(b.map((r) => r.engineTokensPerSecond)), ttftMsP50: median(b.map((r) => r.ttftMs)), tokens: b.map((r) => r.tokens), args: handArgs.slice(2).join(' ') },
      ratio: median(a.map((r) => r.tokensPerSecond)) / median(b.map((r) => r.tokensPerSecond)),
      addedTtftMsP50: median(a.map((r) => r.ttftMs)) - median(b.map((r) => r.ttftMs)),
      note: 'both paths share one 2-core machine; Orchard adds -lv 4 (buffer-size lines for verification) and the gRPC relay',
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
  process.stderr.write(`bench:overhead failed: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
