import { join } from 'node:path';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import type { CoordinatorClient } from '../../src/coordinator/api/client.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { pickFreePort } from '../../src/node/ports.ts';
import type { Proc } from '../../test/helpers/processes.ts';
import { readyLine } from '../../test/helpers/processes.ts';
import { type BenchProcesses, ORCHARD_BIN, sleep } from '../lib/cluster.ts';
import { type ChaosNetwork, inNodeNamespace, type NodeNet } from './network.ts';
import type { Toxiproxy } from './toxiproxy.ts';

/**
 * The chaos cluster: a coordinator on the host's LAN address (fixed ports, so a restarted one is
 * where the clients and agents left it), one agent per node namespace listening on its own
 * address and announcing its Toxiproxy address (--advertise-host), so the coordinator's calls and
 * the other nodes' engine tunnels to it all cross its proxy and its link.
 */

/** Inside each node namespace the same ports are free: gRPC and tunnel ports are fixed so the proxies can front them. */
const AGENT_GRPC_PORT = 7600;
const AGENT_TUNNEL_PORT = 7601;

export interface ChaosNode {
  readonly name: string;
  readonly net: NodeNet;
  proc: Proc;
}

export interface ChaosCluster {
  readonly dir: string;
  readonly env: NodeJS.ProcessEnv;
  readonly procs: BenchProcesses;
  readonly coordinatorDir: string;
  readonly coordinatorAddress: string;
  readonly httpAddress: string;
  readonly grpcPort: number;
  readonly httpPort: number;
  readonly budget: string;
  readonly nodes: ChaosNode[];
  coordinator: Proc;
  client: CoordinatorClient;
}

function coordinatorArgs(c: Pick<ChaosCluster, 'coordinatorDir' | 'grpcPort' | 'httpPort'>, host: string): string[] {
  return [ORCHARD_BIN, 'coordinator', '--no-mdns', '--json', '--host', host, '--grpc-port', String(c.grpcPort), '--http-port', String(c.httpPort), '--state-dir', c.coordinatorDir, '--suspect-after', '1000'];
}

function agentProc(c: ChaosCluster, n: Omit<ChaosNode, 'proc'>, label: string, extraEnv: NodeJS.ProcessEnv = {}): Proc {
  const args = [ORCHARD_BIN, 'node', '--no-mdns', '--json', '--bind', n.net.ip, '--advertise-host', n.net.proxyIp, '--grpc-port', String(AGENT_GRPC_PORT), '--tunnel-port', String(AGENT_TUNNEL_PORT), '--metrics-port', '0', '--name', n.name, '--budget', c.budget, '--state-dir', join(c.dir, n.name), '--models-dir', c.dir, '--join', c.coordinatorAddress];
  const cmd = inNodeNamespace(n.net.ns, process.execPath, args);
  return c.procs.start(label, cmd.args, { ...c.env, ...extraEnv }, cmd.file);
}

/** Coordinator, proxies, agents (joined with a real token), all nodes up. */
export async function startChaosCluster(o: { procs: BenchProcesses; dir: string; env: NodeJS.ProcessEnv; net: ChaosNetwork; toxiproxy: Toxiproxy; budget: string; names: readonly string[] }): Promise<ChaosCluster> {
  const coordinatorDir = join(o.dir, 'coord');
  const ports = { coordinatorDir, grpcPort: await pickFreePort(o.net.hostIp), httpPort: await pickFreePort('127.0.0.1') };
  const coordinator = o.procs.start('coordinator', coordinatorArgs(ports, o.net.hostIp), o.env);
  await readyLine(coordinator);
  const coordinatorAddress = `${o.net.hostIp}:${ports.grpcPort}`;
  const c: ChaosCluster = {
    ...ports,
    dir: o.dir,
    env: o.env,
    procs: o.procs,
    coordinatorAddress,
    httpAddress: `127.0.0.1:${ports.httpPort}`,
    budget: o.budget,
    nodes: [],
    coordinator,
    client: await localCoordinatorClient(coordinatorAddress, coordinatorDir),
  };
  const { token } = await (await new StateDir(coordinatorDir).joinTokens()).create({ uses: o.names.length, ttlMs: 10 * 60_000 });
  for (const [i, name] of o.names.entries()) {
    const net = o.net.nodes[i]!;
    for (const port of [AGENT_GRPC_PORT, AGENT_TUNNEL_PORT]) await o.toxiproxy.proxy(proxyName(i, port), `${net.proxyIp}:${port}`, `${net.ip}:${port}`);
    const proc = agentProc(c, { name, net }, name, { ORCHARD_NODE_TOKEN: token });
    await readyLine(proc);
    c.nodes.push({ name, net, proc });
  }
  await waitNodesUp(c, o.names.length, 30_000).catch((err: Error) => {
    const tails = [c.coordinator, ...c.nodes.map((n) => n.proc)].map((p) => `${p.name}: ${p.err.slice(-1500)}`);
    throw new Error(`${err.message}\n${tails.join('\n')}`);
  });
  return c;
}

/** The proxies of node `i`: its gRPC and its tunnel port. */
export function proxyName(i: number, port: number): string {
  return `n${i}-${port === AGENT_GRPC_PORT ? 'grpc' : 'tunnel'}`;
}

export const NODE_PORTS = [AGENT_GRPC_PORT, AGENT_TUNNEL_PORT] as const;

export async function waitNodesUp(c: ChaosCluster, count: number, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const s = await c.client.unary('status', {}).catch(() => ({ nodes: [] }));
    if (((s.nodes ?? []) as { state: string }[]).filter((n) => n.state === 'NODE_STATE_UP').length >= count) return;
    if (Date.now() > until) throw new Error(`${count} nodes not up within ${timeoutMs / 1000} s`);
    await sleep(200);
  }
}

/** Start a killed agent again in its namespace (same state dir: same node id and certificate, no token). */
export async function restartAgent(c: ChaosCluster, i: number): Promise<void> {
  const n = c.nodes[i]!;
  n.proc = agentProc(c, n, `${n.name} (restarted)`);
  await readyLine(n.proc);
}

/** A new coordinator on the same state dir and ports; returns the seconds until it printed its ready line. */
export async function restartCoordinator(c: ChaosCluster, host: string): Promise<number> {
  const t0 = Date.now();
  c.coordinator = c.procs.start('coordinator (restarted)', coordinatorArgs(c, host), c.env);
  await readyLine(c.coordinator);
  c.client.close();
  c.client = await localCoordinatorClient(c.coordinatorAddress, c.coordinatorDir);
  return (Date.now() - t0) / 1000;
}
