import { execFileSync } from 'node:child_process';
import { deleteNamespaces } from '../../test/helpers/netns.ts';

/**
 * The bench's LAN: one network namespace per node, all on a bridge that lives in its own
 * namespace, plus a veth from the bench's own namespace onto that bridge (the coordinator and the
 * Toxiproxy listeners sit there). Cutting a node's link (`ip link set down`) or throttling it
 * (`tc tbf`, both directions) touches only that node. Subnet 10.78.0.0/24: the host is .1, node i
 * is .11+i, the proxy address other machines reach node i at is .101+i. Needs root.
 */
export interface NodeNet {
  readonly ns: string;
  /** The node's end of its veth (inside `ns`). */
  readonly veth: string;
  /** The bridge's end of the same veth (inside the LAN namespace). */
  readonly peer: string;
  /** Where the node's agent listens. */
  readonly ip: string;
  /** Where everybody else reaches it (a Toxiproxy listener on the host's veth). */
  readonly proxyIp: string;
}

export interface ChaosNetwork {
  readonly lanNs: string;
  readonly hostVeth: string;
  readonly hostIp: string;
  readonly nodes: readonly NodeNet[];
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
const tc = (ns: string, ...args: string[]) => execFileSync('ip', ['netns', 'exec', ns, 'tc', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });

/** Build the LAN for `count` nodes; names carry `tag` (the bench's pid) so parallel runs do not collide. */
export function createNetwork(count: number, tag: string): ChaosNetwork {
  const net: ChaosNetwork = {
    lanNs: `ochaos-lan-${tag}`,
    hostVeth: `och${tag}`.slice(0, 15),
    hostIp: '10.78.0.1',
    nodes: Array.from({ length: count }, (_, i) => ({ ns: `ochaos-n${i}-${tag}`, veth: 'eth0', peer: `ocn${i}p${tag}`.slice(0, 15), ip: `10.78.0.${11 + i}`, proxyIp: `10.78.0.${101 + i}` })),
  };
  destroyNetwork(net);
  ip('netns', 'add', net.lanNs);
  ip('-n', net.lanNs, 'link', 'add', 'br0', 'type', 'bridge');
  ip('-n', net.lanNs, 'link', 'set', 'br0', 'up');
  ip('link', 'add', net.hostVeth, 'type', 'veth', 'peer', 'name', 'hostp');
  ip('link', 'set', 'hostp', 'netns', net.lanNs);
  ip('-n', net.lanNs, 'link', 'set', 'hostp', 'master', 'br0', 'up');
  ip('addr', 'add', `${net.hostIp}/24`, 'dev', net.hostVeth);
  for (const n of net.nodes) ip('addr', 'add', `${n.proxyIp}/24`, 'dev', net.hostVeth);
  ip('link', 'set', net.hostVeth, 'up');
  for (const n of net.nodes) {
    ip('netns', 'add', n.ns);
    ip('-n', n.ns, 'link', 'add', n.veth, 'type', 'veth', 'peer', 'name', n.peer);
    ip('-n', n.ns, 'link', 'set', n.peer, 'netns', net.lanNs);
    ip('-n', net.lanNs, 'link', 'set', n.peer, 'master', 'br0', 'up');
    ip('-n', n.ns, 'addr', 'add', `${n.ip}/24`, 'dev', n.veth);
    ip('-n', n.ns, 'link', 'set', 'lo', 'up');
    ip('-n', n.ns, 'link', 'set', n.veth, 'up');
  }
  return net;
}

/** Remove every namespace (their veth ends go with them, and so do the peers on the host). */
export function destroyNetwork(net: ChaosNetwork): void {
  deleteNamespaces(...net.nodes.map((n) => n.ns), net.lanNs);
  try {
    ip('link', 'del', net.hostVeth);
  } catch {
    // gone with the LAN namespace
  }
}

/** Cut or restore a node's only link (its addresses stay; the kernel restores the subnet route). */
export function setLink(n: NodeNet, up: boolean): void {
  ip('-n', n.ns, 'link', 'set', n.veth, up ? 'up' : 'down');
}

/** Limit both directions of a node's link to `rate` (tc tbf: this kernel has no netem), or lift the limit. */
export function throttle(net: ChaosNetwork, n: NodeNet, rate: string | undefined): void {
  for (const [ns, dev] of [
    [n.ns, n.veth],
    [net.lanNs, n.peer],
  ] as const) {
    if (rate) tc(ns, 'qdisc', 'add', 'dev', dev, 'root', 'tbf', 'rate', rate, 'burst', '32kbit', 'latency', '400ms');
    else tc(ns, 'qdisc', 'del', 'dev', dev, 'root');
  }
}

/** argv that runs `file args` inside node namespace `ns` (ip netns exec execs it: the pid is the program's). */
export function inNodeNamespace(ns: string, file: string, args: readonly string[]): { file: string; args: string[] } {
  return { file: 'ip', args: ['netns', 'exec', ns, file, ...args] };
}
