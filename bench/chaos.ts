import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { localCoordinatorClient } from '../src/cli/credentials.ts';
import type { CoordinatorClient } from '../src/coordinator/api/client.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import { planPlacement } from '../src/shared/placement/planner.ts';
import { readyLine } from '../test/helpers/processes.ts';
import { agentArgs, BenchProcesses, type BenchCluster, benchEnv, loadModel, runBench, sleep, startBenchCluster, writeTestModel } from './lib/cluster.ts';

/**
 * bench:chaos — faults under a steady load, on a real cluster: a coordinator and three agents on
 * 127.0.0.1 whose budgets force a 2-stage plan of a generated 8-layer GGUF (one node spare),
 * real ggml-rpc-server / llama-server engines, 4 streaming clients asking for the same greedy
 * completion in a loop. Each scenario injects one fault and measures, from the clients' side and
 * the coordinator's metrics: recoverySeconds (fault → first token after it), requestsFailed /
 * requestsTotal, streamsResumed (orchard_streams_resumed_total), streamsResumedIdentical (streams
 * that spanned the fault and still equal the undisturbed reference), reloads
 * (orchard_instance_recoveries_total), orphanEngines (engine processes no stage accounts for).
 *
 * Not here yet (listed in the output as `notCovered`): link down 3 s / 30 s and a throttled link
 * (they need nodes in network namespaces), coordinator SIGKILL (needs re-adoption of running
 * engines), drain (not built).
 *
 *   npm run bench:chaos -- [--json] [--tokens 48]
 */

const CTX = 2048;
const PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time';
const CLIENTS = 4;
const argv = process.argv.slice(2);
const jsonOut = argv.includes('--json');
const TOKENS = Number(argv[argv.indexOf('--tokens') + 1]) || 48;

interface Stream {
  readonly startMs: number;
  endMs: number;
  tokens: number[];
  failed: boolean;
}

interface Scenario {
  readonly name: string;
  /** Injects the fault; returns once it is over (a blip) or done (a kill). */
  fault(c: Chaos): Promise<void>;
}

interface Chaos {
  readonly cluster: BenchCluster;
  readonly procs: BenchProcesses;
  readonly dir: string;
  readonly env: NodeJS.ProcessEnv;
  readonly budget: string;
  readonly names: string[];
  /** Engine processes under the agents right after the load (a CPU head runs its own rpc-server too). */
  readonly baselineEngines: number;
  /** Greedy tokens of the first request after the load (cold prompt cache). */
  readonly coldReference: readonly number[];
}

/** pid → ppid and command name of every process (the engines are the agents' descendants). */
function processTable(): { pid: number; ppid: number; comm: string }[] {
  return execFileSync('ps', ['-eo', 'pid=,ppid=,comm='], { encoding: 'utf8' })
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .map(([pid, ppid, comm]) => ({ pid: Number(pid), ppid: Number(ppid), comm: comm ?? '' }));
}

function descendants(pid: number): { pid: number; comm: string }[] {
  const table = processTable();
  const out: { pid: number; comm: string }[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    const p = queue.shift()!;
    for (const row of table) {
      if (row.ppid !== p) continue;
      out.push(row);
      queue.push(row.pid);
    }
  }
  return out;
}

const isEngine = (comm: string) => /llama-server|rpc-server/.test(comm);

function engineCount(c: Pick<Chaos, 'cluster'>): number {
  return c.cluster.agentProcs.flatMap((p) => descendants(p.child.pid!)).filter((d) => isEngine(d.comm)).length;
}

async function status(client: CoordinatorClient): Promise<{ state: string; stages: { nodeName: string }[]; recoveries: number }> {
  const s = await client.unary('status', {});
  const m = ((s.models ?? []) as Record<string, unknown>[]).find((x) => x.name === 'm8') ?? {};
  return { state: String(m.state ?? ''), stages: (m.stages ?? []) as { nodeName: string }[], recoveries: Number(m.recoveries ?? 0) };
}

async function metric(http: string, name: string): Promise<number> {
  const text = await (await fetch(`http://${http}/metrics`)).text();
  return text
    .split('\n')
    .filter((l) => l.startsWith(`${name}{`))
    .reduce((t, l) => t + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
}

/** One client: greedy streams of TOKENS tokens until `stop` is set; every token's arrival in `arrivals`. */
async function client(cluster: BenchCluster, streams: Stream[], arrivals: number[], stop: { done: boolean }): Promise<void> {
  const c = await localCoordinatorClient(cluster.coordinatorAddress, cluster.coordinatorDir);
  try {
    while (!stop.done) {
      const s: Stream = { startMs: Date.now(), endMs: 0, tokens: [], failed: false };
      streams.push(s);
      try {
        for await (const ev of c.stream('generate', { model: 'm8', prompt: PROMPT, maxTokens: TOKENS, temperature: 0 })) {
          if (ev.event !== 'token') continue;
          s.tokens.push(...((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number));
          arrivals.push(Date.now());
        }
      } catch {
        s.failed = true;
        await sleep(200);
      }
      s.endMs = Date.now();
    }
  } finally {
    c.close();
  }
}

/** A worker (not the head) of the current placement: its agent's index. */
async function workerIndex(c: Chaos): Promise<number> {
  const { stages } = await status(c.cluster.client);
  return c.names.indexOf(stages[0]!.nodeName);
}

const SCENARIOS: Scenario[] = [
  {
    name: 'agent SIGSTOP 3 s then SIGCONT (agent and its engines)',
    async fault(c) {
      const agent = c.cluster.agentProcs[await workerIndex(c)]!.child.pid!;
      const frozen = [agent, ...descendants(agent).map((d) => d.pid)];
      for (const p of frozen) process.kill(p, 'SIGSTOP');
      await sleep(3000);
      for (const p of frozen) process.kill(p, 'SIGCONT');
    },
  },
  {
    name: 'worker agent SIGKILL',
    async fault(c) {
      const i = await workerIndex(c);
      process.kill(c.cluster.agentProcs[i]!.child.pid!, 'SIGKILL');
      await restartAfterRecovery(c, i);
    },
  },
  {
    name: 'worker rpc-server SIGKILL',
    async fault(c) {
      const agent = c.cluster.agentProcs[await workerIndex(c)]!.child.pid!;
      for (const e of descendants(agent).filter((d) => /rpc-server/.test(d.comm))) process.kill(e.pid, 'SIGKILL');
    },
  },
  {
    name: 'head engine SIGKILL',
    async fault(c) {
      const { stages } = await status(c.cluster.client);
      const agent = c.cluster.agentProcs[c.names.indexOf(stages.at(-1)!.nodeName)]!.child.pid!;
      for (const e of descendants(agent).filter((d) => /llama-server/.test(d.comm))) process.kill(e.pid, 'SIGKILL');
    },
  },
];

/** Bring a killed agent back (same state dir, same node id) once the model serves without it. */
async function restartAfterRecovery(c: Chaos, i: number): Promise<void> {
  await waitReady(c.cluster.client, 90_000);
  const p = c.procs.start(`${c.names[i]} (restarted)`, agentArgs(c.dir, { name: c.names[i]!, budget: c.budget }, c.cluster.coordinatorAddress), c.env);
  await readyLine(p);
  (c.cluster.agentProcs as unknown[])[i] = p;
}

async function waitReady(client: CoordinatorClient, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  while ((await status(client)).state !== 'ready') {
    if (Date.now() > until) throw new Error('the model did not serve again in time');
    await sleep(200);
  }
}

async function runScenario(c: Chaos, s: Scenario, reference: readonly number[]): Promise<Record<string, unknown>> {
  const streams: Stream[] = [];
  const arrivals: number[] = [];
  const stop = { done: false };
  const before = { resumed: await metric(c.cluster.httpAddress, 'orchard_streams_resumed_total'), reloads: (await status(c.cluster.client)).recoveries };
  const clients = Array.from({ length: CLIENTS }, () => client(c.cluster, streams, arrivals, stop));
  await sleep(2000);
  const faultMs = Date.now();
  await s.fault(c);
  await waitReady(c.cluster.client, 120_000);
  await sleep(3000);
  stop.done = true;
  await Promise.all(clients);
  await sleep(1000);
  const after = await status(c.cluster.client);
  // The pause the clients saw: the longest gap between tokens (any client) from the fault on.
  const times = [faultMs, ...arrivals.filter((t) => t >= faultMs)].sort((a, b) => a - b);
  const pauseMs = times.slice(1).reduce((m, t, i) => Math.max(m, t - times[i]!), 0);
  const spanning = streams.filter((x) => x.startMs < faultMs && x.endMs > faultMs && !x.failed);
  const differing = streams.filter((x) => !x.failed && x.tokens.join() !== reference.join());
  const cold = (x: Stream) => x.tokens.join() === c.coldReference.join();
  const firstDiff = differing.map((x) => x.tokens.findIndex((t, k) => t !== reference[k]));
  return {
    scenario: s.name,
    recoverySeconds: pauseMs / 1000,
    requestsFailed: streams.filter((x) => x.failed).length,
    requestsTotal: streams.length,
    streamsResumed: (await metric(c.cluster.httpAddress, 'orchard_streams_resumed_total')) - before.resumed,
    streamsSpanningFault: spanning.length,
    streamsResumedIdentical: spanning.filter((x) => x.tokens.join() === reference.join()).length,
    streamsSpanningFaultEqualColdRun: spanning.filter(cold).length,
    streamsDiffering: differing.length,
    firstDifferingTokenIndex: firstDiff.length > 0 ? Math.min(...firstDiff) : null,
    reloads: after.recoveries - before.reloads,
    orphanEngines: Math.max(0, engineCount(c) - c.baselineEngines),
  };
}

async function greedy(client: CoordinatorClient): Promise<number[]> {
  const tokens: number[] = [];
  for await (const ev of client.stream('generate', { model: 'm8', prompt: PROMPT, maxTokens: TOKENS, temperature: 0 })) {
    if (ev.event === 'token') tokens.push(...((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number));
  }
  return tokens;
}

async function chaos(procs: BenchProcesses, dir: string): Promise<object> {
  const bins = await findLlamaBinaries();
  const env = benchEnv(bins.binDir);
  const model = await writeTestModel(join(dir, 'm8.gguf'), ['--layers', '8', '--seed', '7'], env);
  const single = planPlacement(modelProfile(await readGgufHeader(model)), [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx: CTX });
  const budget = String(Math.floor(single.stages[0]!.bytes.total) - 2 * 2 ** 20);
  const names = ['alpha', 'bravo', 'charlie'];
  const cluster = await startBenchCluster(procs, { dir, env, nodes: names.map((name) => ({ name, budget })), coordinatorArgs: ['--suspect-after', '1000'] });
  await loadModel(cluster.client, model, 'm8', CTX);
  // The reference is the steady state: the first request after a load runs with a cold prompt
  // cache, and on this random test model llama.cpp's greedy tokens differ from the warm ones
  // after a few tokens (measured: from token 7), so both are kept and reported.
  const cold = await greedy(cluster.client);
  const reference = await greedy(cluster.client);
  const c: Chaos = { cluster, procs, dir, env, budget, names, baselineEngines: engineCount({ cluster }), coldReference: cold };
  const scenarios = [];
  for (const s of SCENARIOS) scenarios.push(await runScenario(c, s, reference));
  cluster.client.close();
  return {
    bench: 'chaos',
    setup: { nodes: 3, stages: 2, clients: CLIENTS, tokensPerRequest: TOKENS, model: '8-layer test GGUF', suspectAfterMs: 1000, downAfterMs: 10_000 },
    referenceTokens: reference.length,
    coldAndWarmRunsAgree: cold.join() === reference.join(),
    scenarios,
    notCovered: ['link down 3 s', 'link down 30 s', 'link throttled to 1 Mbit/s + 200 ms', 'coordinator SIGKILL (needs engine re-adoption)', 'drain (not built)'],
  };
}

const procs = new BenchProcesses();
await runBench('chaos', procs, jsonOut, (dir) => chaos(procs, dir));
