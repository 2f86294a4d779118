import { join } from 'node:path';
import { pickFreePort } from '../src/node/ports.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import { planPlacement } from '../src/shared/placement/planner.ts';
import { startChaosCluster } from './chaos/cluster.ts';
import { enginePids } from './chaos/engines.ts';
import { CLIENTS, greedy } from './chaos/load.ts';
import { runScenario } from './chaos/measure.ts';
import { createNetwork, destroyNetwork } from './chaos/network.ts';
import { type Chaos, SCENARIOS } from './chaos/scenarios.ts';
import { findToxiproxy, TOXIPROXY_INSTALL, Toxiproxy } from './chaos/toxiproxy.ts';
import { BenchProcesses, benchEnv, loadModel, runBench, writeTestModel } from './lib/cluster.ts';

/**
 * bench:chaos — faults under a steady load on a real cluster: a coordinator and three agents, each
 * agent in its own network namespace on a bridge (bench/chaos/network.ts) behind a Toxiproxy
 * listener, whose budgets force a 2-stage plan of a generated 8-layer GGUF (one node spare), real
 * ggml-rpc-server / llama-server engines, 4 streaming clients asking for the same greedy
 * completion in a loop. Each scenario (bench/chaos/scenarios.ts) injects one fault and measures
 * (bench/chaos/measure.ts): recoverySeconds (the longest pause any client saw from the fault on),
 * requestsFailed / requestsTotal, streamsResumed (orchard_streams_resumed_total), streamsResumedIdentical
 * (streams spanning the fault equal to the undisturbed reference), reloads
 * (orchard recoveries), enginesReplaced, orphanEngines, and whether the goal of its kind is met.
 * Needs root (namespaces, tc) and toxiproxy-server.
 *
 *   npm run bench:chaos -- [--json] [--tokens 48] [--only TEXT]
 */

const CTX = 2048;
const argv = process.argv.slice(2);
const jsonOut = argv.includes('--json');
const TOKENS = Number(argv[argv.indexOf('--tokens') + 1]) || 48;
const NAMES = ['alpha', 'bravo', 'charlie'];
// --only TEXT: just the scenarios whose name contains TEXT (a quicker look at one fault).
const ONLY = argv.includes('--only') ? argv[argv.indexOf('--only') + 1] : undefined;
const chosen = SCENARIOS.filter((s) => !ONLY || s.name.includes(ONLY));
const runnable = chosen.filter((s) => !s.unavailable?.());

async function chaos(procs: BenchProcesses, dir: string): Promise<object> {
  const toxiBinary = findToxiproxy();
  if (!toxiBinary) throw new Error(`toxiproxy-server not found; install it with: ${TOXIPROXY_INSTALL}`);
  const bins = await findLlamaBinaries();
  const env = benchEnv(bins.binDir);
  const model = await writeTestModel(join(dir, 'm8.gguf'), ['--layers', '8', '--seed', '7'], env);
  const single = planPlacement(modelProfile(await readGgufHeader(model)), [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx: CTX });
  const budget = String(Math.floor(single.stages[0]!.bytes.total) - 2 * 2 ** 20);
  const net = createNetwork(NAMES.length, String(process.pid));
  try {
    const toxiproxy = await Toxiproxy.start(procs, toxiBinary, await pickFreePort('127.0.0.1'));
    const cluster = await startChaosCluster({ procs, dir, env, net, toxiproxy, budget, names: NAMES });
    const t0 = Date.now();
    await loadModel(cluster.client, model, 'm8', CTX);
    const loadSeconds = (Date.now() - t0) / 1000;
    // The reference is the steady state: the first request after a load runs with a cold prompt
    // cache, and on this random model llama.cpp's greedy tokens can differ from the warm ones.
    const cold = await greedy(cluster.client, 'm8', TOKENS);
    const reference = await greedy(cluster.client, 'm8', TOKENS);
    const c: Chaos = { cluster, net, toxiproxy, model: 'm8' };
    const baseline = { engines: enginePids(cluster.nodes.map((n) => n.proc.child.pid!)).length, reference, coldReference: cold, tokens: TOKENS, loadSeconds, downAfterSeconds: 10 };
    const scenarios = [];
    for (const s of runnable) {
      process.stderr.write(`bench:chaos: ${s.name}\n`);
      scenarios.push(await runScenario(c, s, baseline));
    }
    cluster.client.close();
    return {
      bench: 'chaos',
      setup: { nodes: NAMES.length, stages: 2, clients: CLIENTS, tokensPerRequest: TOKENS, model: '8-layer test GGUF', network: 'a namespace per agent on a bridge, Toxiproxy in front of every agent', suspectAfterMs: 1000, downAfterMs: 10_000, loadSeconds },
      referenceTokens: reference.length,
      coldAndWarmRunsAgree: cold.join() === reference.join(),
      goalsMet: scenarios.filter((s) => s.met).length,
      scenarios,
      notCovered: chosen.filter((s) => s.unavailable?.()).map((s) => `${s.name}: ${s.unavailable!()}`),
    };
  } finally {
    await procs.killAll();
    destroyNetwork(net);
  }
}

const procs = new BenchProcesses();
await runBench('chaos', procs, jsonOut, (dir) => chaos(procs, dir));
