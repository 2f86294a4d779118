/**
 * Orchard's overhead on the token path: the same pipeline split (same model, same layer ranges
 * on the same devices, same threads, the same request) run (a) through Orchard — coordinator +
 * node agents, gRPC relay, `orchard load` — and (b) started by hand (`ggml-rpc-server` per
 * stage, one `llama-server` with the arguments Orchard's coordinator computes for that plan:
 * headLayout, so on macOS the head's layers sit on its Metal device on both sides), streamed
 * from its `/completion` with the byte-same body the agent sends (completionBody of the same
 * GenerateParams). Runs alternate A/B so machine noise hits both. Prints JSON:
 *   ratio = median decode tokens/s through Orchard ÷ by hand (goal ≥ 0.97)
 *   addedTtftMsP50 = median client-observed time to first token, Orchard − by hand (goal < 5 ms)
 * Usage: npm run bench:overhead -- [--json] [--runs 7] [--tokens 128]
 * Needs ORCHARD_LLAMA_BIN_DIR (or `orchard setup`). Every process is killed (process group) at
 * the end, on error and on SIGINT.
 */
import { join } from 'node:path';
import { engineSpecFromRequest, llamaServerArgs } from '../src/node/engine-spec.ts';
import type { CoordinatorClient } from '../src/coordinator/api/client.ts';
import { headLayout } from '../src/coordinator/instances/llama/layout.ts';
import { memoryOptionsOf } from '../src/coordinator/instances/planner-adapter.ts';
import { resolveLoadOptions } from '../src/coordinator/instances/runtime.ts';
import { llamaServerToWire } from '../src/coordinator/membership/agent-client.ts';
import { completionBody } from '../src/node/generate.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { pickFreePort } from '../src/node/ports.ts';
import type { GenerateParams } from '../src/shared/generation.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import type { RpcTarget } from '../src/shared/placement/llama-args.ts';
import { planPlacement } from '../src/shared/placement/planner.ts';
import { ssePayloads } from '../src/shared/sse.ts';
import { BenchProcesses, benchEnv, type LoadedStage, loadModel, runBench, sleep, startBenchCluster, waitForPort, writeTestModel } from './lib/cluster.ts';
import { flag, median } from './lib/stats.ts';

const argv = process.argv.slice(2);
const RUNS = Number(flag(argv, '--runs', '7'));
const TOKENS = Number(flag(argv, '--tokens', '128'));
const JSON_OUT = argv.includes('--json');
const CTX = 2048;
/** One request for both sides: Orchard's agent turns it into completionBody(PARAMS), so does (b). */
const PARAMS: GenerateParams = { prompt: 'The quick brown fox jumps over the lazy dog. Once upon a time', maxTokens: TOKENS, temperature: 0, topP: 0, seed: 1, stop: [] };
/** What both heads get beyond the layout: one thread (ORCHARD_LLAMA_SERVER_EXTRA_ARGS in benchEnv). */
const HEAD_EXTRA_ARGS = ['-t', '1'];
/** Orchard's own rule (llama driver): a macOS head holds its stage on Metal, a CPU-only head on a local rpc-server. */
const HEAD_HAS_GPU = process.platform === 'darwin';

const procs = new BenchProcesses();

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
  for await (const ev of client.stream('generate', { model: 'bench', ...PARAMS, seed: String(PARAMS.seed) })) {
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
    headers: { 'content-type': 'application/json', accept: 'text/event-stream' },
    body: JSON.stringify(completionBody(PARAMS)),
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

/**
 * (b): the same split by hand — an rpc-server per RPC stage (the CPU-only head's own layers
 * too), then llama-server with the very arguments Orchard's coordinator builds for these stages.
 */
async function startByHand(bins: { rpcServer: string; llamaServer: string }, model: string, nLayer: number, stages: readonly LoadedStage[]): Promise<{ port: number; args: string[] }> {
  const last = stages.length - 1;
  const targets: (RpcTarget | undefined)[] = [];
  for (const [i] of stages.entries()) {
    if (i === last && HEAD_HAS_GPU) {
      targets.push(undefined);
      continue;
    }
    const port = await pickFreePort('127.0.0.1');
    const p = procs.start(`rpc-server-${i}`, ['-H', '127.0.0.1', '-p', String(port), '-t', '1'], process.env, bins.rpcServer);
    await waitForPort('127.0.0.1', port, 30_000, `rpc-server ${i}`, () => p.child.exitCode === null);
    targets.push({ nodeId: `n${i + 1}`, enginePort: port });
  }
  const layoutStages = stages.map((s, i) => ({ nodeId: `n${i + 1}`, nodeName: `n${i + 1}`, ...s }));
  const layout = headLayout(layoutStages, targets, { modelPath: model, nLayer, memory: memoryOptionsOf(resolveLoadOptions({ ctx: CTX })), headHasGpu: HEAD_HAS_GPU });
  const port = await pickFreePort('127.0.0.1');
  // The argv the agent builds from the typed request the coordinator sends.
  // The argv the agent builds from the typed request the coordinator sends (all stages on this machine: direct loopback).
  const llama = engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: llamaServerToWire(layout.llama) }).llama!;
  const headArgs = llamaServerArgs(llama, llama.rpc.map((t) => `127.0.0.1:${t.enginePort}`));
  const args = [...headArgs, ...HEAD_EXTRA_ARGS, '--host', '127.0.0.1', '--port', String(port), ...(process.env.BENCH_HAND_EXTRA_ARGS?.split(/\s+/).filter(Boolean) ?? [])];
  procs.start('llama-server', args, process.env, bins.llamaServer);
  for (let i = 0; i < 600; i++) {
    if (await fetch(`http://127.0.0.1:${port}/health`).then((r) => r.status === 200, () => false)) break;
    await sleep(100);
  }
  return { port, args };
}

function summary(runs: readonly Run[]) {
  return {
    tokensPerSecondP50: median(runs.map((r) => r.tokensPerSecond)),
    engineTokensPerSecondP50: median(runs.map((r) => r.engineTokensPerSecond)),
    ttftMsP50: median(runs.map((r) => r.ttftMs)),
    tokens: runs.map((r) => r.tokens),
  };
}

await runBench('overhead', procs, JSON_OUT, async (dir) => {
  const bins = await findLlamaBinaries();
  const env = benchEnv(bins.binDir);
  const model = await writeTestModel(join(dir, 'm.gguf'), ['--layers', '8', '--dim', '512', '--ffn', '1536', '--seed', '3'], env);
  const profile = modelProfile(await readGgufHeader(model));
  // Budgets a little under the whole model: the planner must split it over both agents.
  const single = planPlacement(profile, [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx: CTX });
  const budget = String(Math.floor(single.stages[0]!.bytes.total) - 2 * 2 ** 20);
  // (a) Orchard: coordinator + two agents that join by themselves.
  const cluster = await startBenchCluster(procs, { dir, env, nodes: [{ name: 'n1', budget }, { name: 'n2', budget }] });
  const { client } = cluster;
  const stages = await loadModel(client, model, 'bench', CTX);
  const hand = await startByHand(bins, model, profile.layerCount, stages);
  // warm-up both, then alternate
  await viaOrchard(client);
  await byHand(hand.port);
  const a: Run[] = [];
  const b: Run[] = [];
  for (let i = 0; i < RUNS; i++) {
    a.push(await viaOrchard(client));
    b.push(await byHand(hand.port));
  }
  client.close();
  return {
    bench: 'overhead',
    model: { layers: profile.layerCount, embd: profile.embd, stages: stages.length, headHasGpu: HEAD_HAS_GPU },
    runs: RUNS,
    tokens: TOKENS,
    requestBody: completionBody(PARAMS),
    orchard: summary(a),
    byHand: { ...summary(b), args: hand.args.slice(2).join(' ') },
    ratio: median(a.map((r) => r.tokensPerSecond)) / median(b.map((r) => r.tokensPerSecond)),
    addedTtftMsP50: median(a.map((r) => r.ttftMs)) - median(b.map((r) => r.ttftMs)),
    note: 'both paths share one machine; same llama-server arguments (headLayout), same request body (completionBody); Orchard adds the agent and coordinator gRPC relay',
  };
});
