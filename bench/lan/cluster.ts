import { join } from 'node:path';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import type { CoordinatorClient } from '../../src/coordinator/api/client.ts';
import { type CoordinatorHandle, startCoordinator } from '../../src/coordinator/coordinator.ts';
import { createPlanner } from '../../src/coordinator/instances/planner-adapter.ts';
import type { Planner } from '../../src/coordinator/instances/types.ts';
import { createLogger } from '../../src/shared/log.ts';
import type { ModelProfile } from '../../src/shared/model/profile.ts';
import { exoPlan, freeMemoryProportionalPlan } from '../../src/shared/placement/baselines.ts';
import { planFixedSplit } from '../../src/shared/placement/fixed.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import type { Plan, PlacementNode, PlacementOptions } from '../../src/shared/placement/types.ts';
import { createLan, deleteLan, type Lan, shapeLink } from '../../test/helpers/netns.ts';
import { type BenchProcesses, ORCHARD_BIN, sleep } from '../lib/cluster.ts';
import { readyLine } from '../../test/helpers/processes.ts';

/**
 * bench:lan's cluster: one network namespace per node on a bridge (test/helpers/netns.ts), each
 * node's link shaped with tc tbf; a coordinator in this process on the bridge, whose placement
 * rule can be swapped between loads (Orchard's planner, exo's rule, llama.cpp's default — the
 * baselines of src/shared/placement/baselines.ts) while everything after the decision is the
 * product's: the same adapter (live nodes, calibrated rates, measured links), the same llama
 * driver, real joined agents in their namespaces, real ggml-rpc-server and llama-server engines
 * whose traffic crosses the shaped links through the agents' TLS tunnels.
 */

export const RULES = ['orchard', 'exo', 'llama-default'] as const;
export type Rule = (typeof RULES)[number];

/** What the planner saw at the last load: the nodes (rates, budgets, measured links) and options. */
export interface Seen {
  readonly profile: ModelProfile;
  readonly nodes: readonly PlacementNode[];
  readonly options: Partial<PlacementOptions>;
}

export interface LanNode {
  readonly name: string;
  readonly budgetBytes: number;
}

export interface LanCluster {
  readonly lan: Lan;
  readonly handle: CoordinatorHandle;
  readonly client: CoordinatorClient;
  rule: Rule;
  seen: Seen | undefined;
  /** Shape every node's link to its rate (bits/s, by node name) and measure every link again before returning. */
  shape(rates: Readonly<Record<string, number>>): Promise<void>;
  close(): Promise<void>;
}

/** The layout `rule` picks for these nodes; baselines are costed with the planner's own model. */
export function placeBy(rule: Rule, profile: ModelProfile, nodes: readonly PlacementNode[], options: Partial<PlacementOptions>): Plan {
  if (rule === 'orchard') return planPlacement(profile, nodes, options);
  // The agents' budgets stand for the machines' memory: exo's ram_available and llama.cpp's free device memory.
  const memory = nodes.map((n) => n.budgetBytes);
  const base = rule === 'exo' ? exoPlan(profile, nodes, memory, options) : freeMemoryProportionalPlan(profile, nodes, memory, options);
  if (!base) throw new Error(`${rule}: no node set covers the weights`);
  return planFixedSplit(profile, nodes, base.stages, options);
}

function agentArgs(dir: string, n: LanNode & { ip: string }, coordinatorAddress: string): string[] {
  return [ORCHARD_BIN, 'node', '--no-mdns', '--json', '--grpc-port', '0', '--metrics-port', '0', '--bind', n.ip, '--name', n.name, '--budget', String(n.budgetBytes), '--state-dir', join(dir, n.name), '--models-dir', join(dir, 'models'), '--join', coordinatorAddress];
}

/** Build the LAN, start the coordinator here and one joined agent per node; all nodes up and every link measured. */
export async function startLanCluster(procs: BenchProcesses, o: { dir: string; env: NodeJS.ProcessEnv; nodes: readonly LanNode[]; tag: string }): Promise<LanCluster> {
  const bridge = `olan${o.tag}`;
  // A /24 of its own per run: two runs on one /24 (two helpers benching at once) route each other's joins astray.
  const net = `10.93.${(Number(o.tag) % 250) + 1}`;
  const hostIp = `${net}.1`;
  const spec = o.nodes.map((n, i) => ({ ...n, ns: `olan-${o.tag}-${i}`, veth: `olan${o.tag}n${i}`, ip: `${net}.${11 + i}` }));
  deleteLan(bridge, spec.map((n) => n.ns));
  const lan = createLan(bridge, hostIp, spec);
  try {
    return await startOnLan(procs, o, lan, spec, hostIp);
  } catch (err) {
    await procs.killAll();
    deleteLan(bridge, spec.map((n) => n.ns));
    throw err;
  }
}

async function startOnLan(procs: BenchProcesses, o: { dir: string; env: NodeJS.ProcessEnv; tag: string }, lan: Lan, spec: readonly (LanNode & { ns: string; ip: string })[], hostIp: string): Promise<LanCluster> {
  const coordinatorDir = join(o.dir, 'coord');
  let inner: Planner | undefined;
  const state: { rule: Rule; seen: Seen | undefined } = { rule: 'orchard', seen: undefined };
  const handle = await startCoordinator({
    stateDir: coordinatorDir,
    host: hostIp,
    grpcPort: 0,
    mdns: false,
    log: createLogger('bench-lan-coordinator', process.env.ORCHARD_BENCH_LOG_LEVEL ?? 'warn'),
    extraHeadArgs: ['-t', '1'],
    rpcThreads: 1,
    // links are measured when nodes come up and when the bench re-shapes them, never in between
    links: { maxAgeSeconds: 3600, retrySeconds: 2, tickMs: 1000 },
    planner: (...args) => inner!(...args),
  });
  const place = (profile: ModelProfile, nodes: readonly PlacementNode[], options?: Partial<PlacementOptions>) => {
    state.seen = { profile, nodes, options: options ?? {} };
    return placeBy(state.rule, profile, nodes, options ?? {});
  };
  inner = createPlanner(() => 0, handle.links.matrix, place);
  const coordinatorAddress = `${hostIp}:${handle.grpcPort}`;
  const token = await handle.createJoinToken({ uses: spec.length, ttlMs: 10 * 60_000 });
  try {
    for (const n of spec) {
      const p = procs.start(n.name, ['netns', 'exec', n.ns, process.execPath, ...agentArgs(o.dir, n, coordinatorAddress)], { ...o.env, ORCHARD_NODE_TOKEN: token }, 'ip');
      await readyLine(p);
    }
    await waitUp(handle, spec.length);
  } catch (err) {
    await handle.close();
    throw err;
  }
  const client = await localCoordinatorClient(coordinatorAddress, coordinatorDir);
  const cluster: LanCluster = {
    lan,
    handle,
    client,
    get rule() {
      return state.rule;
    },
    set rule(r: Rule) {
      state.rule = r;
    },
    get seen() {
      return state.seen;
    },
    set seen(s: Seen | undefined) {
      state.seen = s;
    },
    async shape(rates: Readonly<Record<string, number>>) {
      for (const [i, n] of lan.nodes.entries()) shapeLink(n, rates[spec[i]!.name]!);
      await measureAllLinks(handle, spec.length);
    },
    async close() {
      client.close();
      await handle.close();
      await procs.killAll();
      deleteLan(lan.bridge, spec.map((n) => n.ns));
    },
  };
  return cluster;
}

async function waitUp(handle: CoordinatorHandle, count: number): Promise<void> {
  for (const until = Date.now() + 60_000; Date.now() < until; await sleep(200)) {
    if (handle.membership.registry.nodes().filter((n) => n.state === 'up').length >= count) return;
  }
  throw new Error(`${count} nodes not up within 60 s`);
}

/** Forget every measured link and probe every ordered pair again (on the links as they are now). */
async function measureAllLinks(handle: CoordinatorHandle, count: number): Promise<void> {
  const ids = handle.membership.registry.nodes().map((n) => n.nodeId);
  for (const id of ids) handle.links.matrix.forget(id);
  for (const until = Date.now() + 120_000; Date.now() < until; await sleep(250)) {
    await handle.links.probeDue();
    const good = handle.links.matrix.list().filter((l) => l.rttSeconds && l.bytesPerSecond);
    if (good.length >= count * (count - 1)) return;
  }
  throw new Error('links not measured within 120 s');
}
