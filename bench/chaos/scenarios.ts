import { orchardV1 } from '../../src/shared/proto.ts';
import { killGroup } from '../../test/helpers/processes.ts';
import { sleep } from '../lib/cluster.ts';
import { type ChaosCluster, NODE_PORTS, proxyName, restartAgent, restartCoordinator, waitNodesUp } from './cluster.ts';
import { descendants, signalAll } from './engines.ts';
import { type ChaosNetwork, setLink, throttle } from './network.ts';
import type { Toxiproxy } from './toxiproxy.ts';

/**
 * The faults. `kind` says which goal applies: a blip must cost nothing, a node loss with room
 * left must cost a pause (no failed request, resumed greedy streams identical), a degraded link
 * must not fail anything, a coordinator crash must not reload.
 */
export type ScenarioKind = 'blip' | 'node-loss' | 'degraded' | 'coordinator' | 'drain';

export interface Chaos {
  readonly cluster: ChaosCluster;
  readonly net: ChaosNetwork;
  readonly toxiproxy: Toxiproxy;
  readonly model: string;
}

export interface Scenario {
  readonly name: string;
  readonly kind: ScenarioKind;
  /** Why this build cannot run it (undefined: it can). */
  readonly unavailable?: () => string | undefined;
  /** The loss is only known once the node is silent past the grace (a cut link: no connection reset). */
  readonly lossNeedsGrace?: boolean;
  /** Injects the fault; returns once it is over (blip, degraded link) or done (a kill). Extra fields go into the report. */
  fault(c: Chaos): Promise<Record<string, number> | undefined>;
}

export async function modelStatus(c: Chaos): Promise<{ state: string; stages: { nodeName: string }[]; recoveries: number }> {
  const s = await c.cluster.client.unary('status', {});
  const m = ((s.models ?? []) as Record<string, unknown>[]).find((x) => x.name === c.model) ?? {};
  return { state: String(m.state ?? ''), stages: (m.stages ?? []) as { nodeName: string }[], recoveries: Number(m.recoveries ?? 0) };
}

/** Index of the node holding the first stage (a worker: the head holds the last). */
async function workerIndex(c: Chaos): Promise<number> {
  const { stages } = await modelStatus(c);
  return c.cluster.nodes.findIndex((n) => n.name === stages[0]!.nodeName);
}

async function headIndex(c: Chaos): Promise<number> {
  const { stages } = await modelStatus(c);
  return c.cluster.nodes.findIndex((n) => n.name === stages.at(-1)!.nodeName);
}

export async function waitReady(c: Chaos, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  while ((await modelStatus(c).catch(() => ({ state: '' }))).state !== 'ready') {
    if (Date.now() > until) throw new Error(`${c.model} did not serve again within ${timeoutMs / 1000} s`);
    await sleep(200);
  }
}

/** A killed agent comes back (same node id) once the model serves without it; the next scenario starts with 3 nodes. */
async function restartAfterRecovery(c: Chaos, i: number): Promise<void> {
  await waitReady(c, 120_000);
  await restartAgent(c.cluster, i);
  await waitNodesUp(c.cluster, c.cluster.nodes.length, 30_000);
}

async function linkDown(c: Chaos, seconds: number): Promise<undefined> {
  const n = c.cluster.nodes[await workerIndex(c)]!;
  setLink(n.net, false);
  await sleep(seconds * 1000);
  setLink(n.net, true);
  await waitNodesUp(c.cluster, c.cluster.nodes.length, 60_000);
  return undefined;
}

export const SCENARIOS: readonly Scenario[] = [
  {
    name: 'agent SIGSTOP 3 s then SIGCONT (worker agent and its engines)',
    kind: 'blip',
    async fault(c) {
      const agent = c.cluster.nodes[await workerIndex(c)]!.proc.child.pid!;
      const frozen = [agent, ...descendants(agent).map((d) => d.pid)];
      signalAll(frozen, 'SIGSTOP');
      await sleep(3000);
      signalAll(frozen, 'SIGCONT');
      return undefined;
    },
  },
  { name: 'link down 3 s (worker)', kind: 'blip', fault: (c) => linkDown(c, 3) },
  {
    name: 'link throttled to 1 Mbit/s + 200 ms round trip for 30 s (worker)',
    kind: 'degraded',
    async fault(c) {
      const i = await workerIndex(c);
      const n = c.cluster.nodes[i]!;
      throttle(c.net, n.net, '1mbit');
      for (const port of NODE_PORTS) await c.toxiproxy.addLatency(proxyName(i, port), 200);
      await sleep(30_000);
      for (const port of NODE_PORTS) await c.toxiproxy.removeLatency(proxyName(i, port));
      throttle(c.net, n.net, undefined);
      return undefined;
    },
  },
  {
    name: 'worker agent SIGKILL',
    kind: 'node-loss',
    async fault(c) {
      const i = await workerIndex(c);
      process.kill(c.cluster.nodes[i]!.proc.child.pid!, 'SIGKILL');
      await restartAfterRecovery(c, i);
      return undefined;
    },
  },
  {
    name: 'worker rpc-server SIGKILL',
    kind: 'node-loss',
    async fault(c) {
      const agent = c.cluster.nodes[await workerIndex(c)]!.proc.child.pid!;
      signalAll(descendants(agent).filter((d) => /rpc-server/.test(d.comm)).map((d) => d.pid), 'SIGKILL');
      return undefined;
    },
  },
  {
    name: 'head engine SIGKILL',
    kind: 'node-loss',
    async fault(c) {
      const agent = c.cluster.nodes[await headIndex(c)]!.proc.child.pid!;
      signalAll(descendants(agent).filter((d) => /llama-server/.test(d.comm)).map((d) => d.pid), 'SIGKILL');
      return undefined;
    },
  },
  { name: 'link down 30 s (worker)', kind: 'node-loss', lossNeedsGrace: true, fault: (c) => linkDown(c, 30) },
  {
    name: 'coordinator SIGKILL (restarted at once on the same state dir)',
    kind: 'coordinator',
    async fault(c) {
      await killGroup(c.cluster.coordinator);
      const startupSeconds = await restartCoordinator(c.cluster, c.net.hostIp);
      return { coordinatorReadyAtMs: Date.now(), coordinatorStartupSeconds: startupSeconds };
    },
  },
  {
    name: 'drain the worker (orchard node drain), then undo',
    kind: 'drain',
    unavailable: () => ('Drain' in (orchardV1().Coordinator as unknown as { service: object }).service ? undefined : 'orchard node drain is not in this build'),
    async fault(c) {
      const node = c.cluster.nodes[await workerIndex(c)]!.name;
      const t0 = Date.now();
      const r = await c.cluster.client.unary('drain', { node }, 300_000);
      const drainSeconds = (Date.now() - t0) / 1000;
      const { stages } = await modelStatus(c);
      const stillOnNode = stages.filter((s) => s.nodeName === node).length;
      await c.cluster.client.unary('drain', { node, undo: true });
      return { drainSeconds, modelsMoved: ((r.moved ?? []) as unknown[]).length, stagesLeftOnDrainedNode: stillOnNode };
    },
  },
];
