import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { findNatsServer } from '../../src/coordinator/nats/server.ts';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import { findLlamaBinaries } from '../../src/node/llama/binaries.ts';
import { testNats } from '../../test/helpers/nats.ts';
import { modelThatMustSplit } from '../../test/helpers/split-model.ts';
import { enginePids } from '../chaos/engines.ts';
import { agentArgs, BenchProcesses, benchEnv, loadModel, ORCHARD_BIN, sleep } from './cluster.ts';
import { median } from './stats.ts';
import type { Proc } from '../../test/helpers/processes.ts';
import { killGroup, readyLine } from '../../test/helpers/processes.ts';

/**
 * Coordinator failover time, measured the way the acceptance test does it but repeated: one real
 * nats-server -js, two coordinators of one cluster (shared CA), three agents, a model split over
 * the agents. Each trial SIGKILLs the leader and times until the standby reports itself leader
 * with the model ready again; the killed one is restarted as the next standby. `reloads` counts
 * trials after which the engine processes were not the same ones (a reload restarts them).
 */
export interface FailoverResult {
  readonly trials: number;
  readonly secondsP50: number;
  readonly secondsMax: number;
  readonly reloads: number;
  readonly seconds: readonly number[];
  readonly leaseTtlMs: number;
}

interface Coordinator {
  p: Proc;
  grpc: string;
  stateDir: string;
}

const LEASE_TTL_MS = 5000;

export async function measureFailover(o: { trials: number }): Promise<FailoverResult> {
  const natsBinary = findNatsServer();
  if (!natsBinary) throw new Error('nats-server is not installed (`orchard setup --nats`, or apt install nats-server)');
  const procs = new BenchProcesses();
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-failover-'));
  const nats = await testNats(natsBinary);
  try {
    const env = benchEnv((await findLlamaBinaries()).binDir);
    const start = async (name: string, stateDir: string): Promise<Coordinator> => {
      const p = procs.start(name, [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', stateDir, '--nats', nats.url, '--lease-ttl', String(LEASE_TTL_MS), '--json'], env);
      return { p, grpc: `127.0.0.1:${String((await readyLine(p)).grpcPort)}`, stateDir };
    };
    const { model, budget } = await modelThatMustSplit(['--layers', '8', '--seed', '11'], 2048, dir);
    let leader = await start('coordinator A', join(dir, 'a'));
    await new StateDir(join(dir, 'b')).importCa(await new StateDir(leader.stateDir).exportCa());
    let standby = await start('coordinator B', join(dir, 'b'));
    const agents = await joinAgents(procs, dir, env, leader, budget);
    const client = await localCoordinatorClient(leader.grpc, leader.stateDir);
    await loadModel(client, model, 'm8', 2048);
    client.close();
    const seconds: number[] = [];
    let reloads = 0;
    for (let i = 0; i < o.trials; i++) {
      const before = enginePids(agents.map((a) => a.child.pid!));
      const killedAt = performance.now();
      await killGroup(leader.p);
      await untilLeading(standby, 20_000);
      seconds.push((performance.now() - killedAt) / 1000);
      if (JSON.stringify(enginePids(agents.map((a) => a.child.pid!))) !== JSON.stringify(before)) reloads++;
      const next = await start(`coordinator ${i}`, leader.stateDir);
      [leader, standby] = [standby, next];
    }
    const sorted = [...seconds].sort((a, b) => a - b);
    return { trials: o.trials, secondsP50: round(median(sorted)), secondsMax: round(sorted.at(-1) ?? 0), reloads, seconds: seconds.map(round), leaseTtlMs: LEASE_TTL_MS };
  } finally {
    await procs.killAll();
    await nats.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

const round = (s: number) => Math.round(s * 1000) / 1000;

/** Three agents that join the leader with one token; resolves once the leader has them all up. */
async function joinAgents(procs: BenchProcesses, dir: string, env: NodeJS.ProcessEnv, leader: Coordinator, budget: number): Promise<Proc[]> {
  const { token } = await (await new StateDir(leader.stateDir).joinTokens()).create({ uses: 3, ttlMs: 10 * 60_000 });
  const agents: Proc[] = [];
  for (const name of ['alpha', 'bravo', 'charlie']) {
    const p = procs.start(name, agentArgs(dir, { name, budget: String(budget) }, leader.grpc), { ...env, ORCHARD_NODE_TOKEN: token });
    agents.push(p);
    await readyLine(p);
  }
  const client = await localCoordinatorClient(leader.grpc, leader.stateDir);
  try {
    for (let i = 0; i < 150; i++) {
      const nodes = ((await client.unary('status', {})).nodes ?? []) as { state?: string }[];
      if (nodes.filter((n) => n.state === 'NODE_STATE_UP').length === 3) return agents;
      await sleep(200);
    }
    throw new Error('the agents did not come up on the leader within 30 s');
  } finally {
    client.close();
  }
}

/** Until this coordinator says it leads and serves the model again. */
async function untilLeading(c: Coordinator, timeoutMs: number): Promise<void> {
  const client = await localCoordinatorClient(c.grpc, c.stateDir);
  const deadline = Date.now() + timeoutMs;
  try {
    while (Date.now() < deadline) {
      const s = await client.unary('status', {}, 2000).catch(() => undefined);
      const ready = ((s?.models ?? []) as { name?: string; state?: string }[]).some((m) => m.name === 'm8' && m.state === 'ready');
      if (s?.role === 'leader' && ready) return;
      await sleep(50);
    }
    throw new Error(`the standby at ${c.grpc} did not lead with the model ready within ${timeoutMs / 1000} s`);
  } finally {
    client.close();
  }
}
