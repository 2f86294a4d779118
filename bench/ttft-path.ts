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
import { join } from 'node:path';
import type { CoordinatorClient } from '../src/coordinator/api/client.ts';
import { StateDir } from '../src/coordinator/state/state-dir.ts';
import { AgentClient } from '../src/coordinator/membership/agent-client.ts';
import { completionBody } from '../src/node/generate.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import type { GenerateParams } from '../src/shared/generation.ts';
import { BenchProcesses, benchEnv, loadModel, runBench, startBenchCluster, writeTestModel } from './lib/cluster.ts';
import { flag, median, quantile } from './lib/stats.ts';

const argv = process.argv.slice(2);
const RUNS = Number(flag(argv, '--runs', '40'));
const TOKENS = Number(flag(argv, '--tokens', '4'));
const JSON_OUT = argv.includes('--json');
const procs = new BenchProcesses();

const params: GenerateParams = { prompt: 'The quick brown fox jumps over the lazy dog. Once upon a time', maxTokens: TOKENS, temperature: 0, topP: 0, seed: 1, stop: [] };

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
  for await (const ev of client.stream('generate', { model: 'ttft', ...params, seed: String(params.seed) })) {
    if (!first && ev.event === 'token') first = performance.now();
  }
  return first - t0;
}

await runBench('ttft-path', procs, JSON_OUT, async (dir) => {
  const bins = await findLlamaBinaries();
  const env = benchEnv(bins.binDir);
  const model = await writeTestModel(join(dir, 'm.gguf'), ['--layers', '4', '--seed', '3'], env);
  const cluster = await startBenchCluster(procs, { dir, env, nodes: [{ name: 'n1' }] });
  const { client } = cluster;
  const agentAddr = cluster.agents[0]!;
  await loadModel(client, model, 'ttft', 1024);
  // The agent serves the coordinator role only: the bench holds a coordinator certificate of the cluster.
  const agent = new AgentClient(agentAddr, await new StateDir(cluster.coordinatorDir).coordinatorCredentials());
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
  const row = (xs: number[]) => ({ p50: median(xs), p90: quantile(xs, 0.9), min: Math.min(...xs) });
  return {
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
});
