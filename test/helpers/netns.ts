import { execFileSync } from 'node:child_process';

/**
 * Two network namespaces joined by a veth pair, for the mDNS tests: multicast stays between
 * them and never reaches the host's interfaces. Needs root (see networkNamespaces in needs.ts).
 */
export interface NetnsEnd {
  readonly ns: string;
  /** Interface name: at most 15 bytes. */
  readonly veth: string;
  /** IPv4 address on a /24 shared by both ends. */
  readonly ip: string;
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });

/** Create both namespaces and the link; `deleteNamespaces` undoes it (also after a partial failure). */
export function linkNamespaces(a: NetnsEnd, b: NetnsEnd): void {
  ip('netns', 'add', a.ns);
  ip('netns', 'add', b.ns);
  ip('link', 'add', a.veth, 'type', 'veth', 'peer', 'name', b.veth);
  for (const end of [a, b]) {
    ip('link', 'set', end.veth, 'netns', end.ns);
    ip('-n', end.ns, 'addr', 'add', `${end.ip}/24`, 'dev', end.veth);
    ip('-n', end.ns, 'link', 'set', 'lo', 'up');
    ip('-n', end.ns, 'link', 'set', end.veth, 'up');
  }
}

/** Delete namespaces that may or may not exist; deleting one also removes the veth end inside it (and so its peer). */
export function deleteNamespaces(...names: string[]): void {
  for (const ns of names) {
    try {
      ip('netns', 'del', ns);
    } catch {
      // never created, or already gone
    }
  }
}

/**
 * One namespace linked to the host's own network by a veth pair (`host` end stays in the test's
 * namespace): a machine "on the LAN" that can reach whatever listens on `host.ip`, and nothing on
 * the host's loopback. `deleteNamespaces(ns.ns)` removes both ends.
 */
export function linkNamespaceToHost(host: { readonly veth: string; readonly ip: string }, ns: NetnsEnd): void {
  ip('netns', 'add', ns.ns);
  ip('link', 'add', host.veth, 'type', 'veth', 'peer', 'name', ns.veth);
  ip('link', 'set', ns.veth, 'netns', ns.ns);
  ip('addr', 'add', `${host.ip}/24`, 'dev', host.veth);
  ip('link', 'set', host.veth, 'up');
  ip('-n', ns.ns, 'addr', 'add', `${ns.ip}/24`, 'dev', ns.veth);
  ip('-n', ns.ns, 'link', 'set', 'lo', 'up');
  ip('-n', ns.ns, 'link', 'set', ns.veth, 'up');
}

/** Run `argv` inside namespace `ns` (ip netns exec) and return its stdout. */
export function inNamespace(ns: string, argv: readonly string[]): string {
  return execFileSync('ip', ['netns', 'exec', ns, ...argv], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** A bridge in the test's namespace with one veth per node namespace: a simulated LAN switch. */
export interface Lan {
  readonly bridge: string;
  /** The host's address on the bridge (a coordinator there reaches every node). */
  readonly hostIp: string;
  readonly nodes: readonly (NetnsEnd & { readonly hostVeth: string })[];
}

/**
 * Create namespaces `nodes` (ns, veth, ip) on a new bridge `bridge` with `hostIp` on it (all on
 * one /24). Each node's link is its veth pair: `hostVeth` in the bridge, `veth` in its namespace.
 * `deleteLan` undoes it, also after a partial failure.
 */
export function createLan(bridge: string, hostIp: string, nodes: readonly NetnsEnd[]): Lan {
  ip('link', 'add', bridge, 'type', 'bridge');
  ip('addr', 'add', `${hostIp}/24`, 'dev', bridge);
  ip('link', 'set', bridge, 'up');
  const out: (NetnsEnd & { hostVeth: string })[] = [];
  for (const [i, n] of nodes.entries()) {
    const hostVeth = `${bridge.slice(0, 10)}h${i}`;
    ip('netns', 'add', n.ns);
    ip('link', 'add', hostVeth, 'type', 'veth', 'peer', 'name', n.veth);
    ip('link', 'set', n.veth, 'netns', n.ns);
    ip('link', 'set', hostVeth, 'master', bridge);
    ip('link', 'set', hostVeth, 'up');
    ip('-n', n.ns, 'addr', 'add', `${n.ip}/24`, 'dev', n.veth);
    ip('-n', n.ns, 'link', 'set', 'lo', 'up');
    ip('-n', n.ns, 'link', 'set', n.veth, 'up');
    out.push({ ...n, hostVeth });
  }
  return { bridge, hostIp, nodes: out };
}

export function deleteLan(bridge: string, namespaces: readonly string[]): void {
  deleteNamespaces(...namespaces);
  try {
    ip('link', 'del', bridge);
  } catch {
    // never created, or already gone
  }
}

/** An Ethernet frame at the veths' 1500-byte MTU: payload + header. */
const FRAME_BYTES = 1514;

const tc = (...args: string[]) => execFileSync('tc', args, { stdio: ['ignore', 'ignore', 'pipe'] });

/** Below this rate a link is paced frame by frame (tbf peakrate); see shapeLink. */
const PACED_BELOW_BITS_PER_SECOND = 200e6;

/**
 * Shape a node's link to `rateBitsPerSecond` both ways with a token bucket (`tc tbf`; this kernel
 * has no netem, so latency comes from a userspace proxy instead): egress of the node's veth
 * (node → LAN) and of its bridge port (LAN → node). Burst: 1 ms at line rate (tbf needs rate ÷
 * HZ), at least four full frames; tbf cuts a GSO packet larger than that into segments
 * (sch_tbf.c `tbf_segment`). It was at least 64 KiB until session 12, which let a token's few KB of
 * boundary traffic cross a 20 Mbit/s link at veth speed where a real wire of that rate serializes
 * every byte (the cost model does: bench:lan's slow-link llama-default measured 15 % faster than
 * priced). Even four frames are 2.4 ms at 20 Mbit/s, most of a decode token's boundary message, so
 * slow links also get a peak rate 1 % above the rate with a one-frame bucket: after the first frame
 * every byte leaves at line rate, as on a wire (session 14, 4 KiB ping-pong at 20 Mbit/s: 0.21 ms
 * round trip without it, 2.27 with it, 3.44 on an ideal wire). Fast links skip it: there a frame
 * is microseconds and per-frame pacing only costs timer wakeups. Queue: 20 ms of data, so a full
 * queue adds bounded delay, as a switch.
 */
export function shapeLink(n: { readonly ns: string; readonly veth: string; readonly hostVeth: string }, rateBitsPerSecond: number): void {
  const bytesPerMs = rateBitsPerSecond / 8 / 1000;
  const burst = String(Math.max(4 * FRAME_BYTES, Math.ceil(bytesPerMs)));
  const limit = String(Math.max(131_072, Math.ceil(20 * bytesPerMs)));
  const args = ['root', 'tbf', 'rate', `${Math.round(rateBitsPerSecond)}bit`, 'burst', burst, 'limit', limit];
  // mtu: tbf drops (not segments) non-GSO packets above it, so one frame plus room for a VLAN tag.
  if (rateBitsPerSecond < PACED_BELOW_BITS_PER_SECOND) args.push('peakrate', `${Math.round(rateBitsPerSecond * 1.01)}bit`, 'mtu', String(FRAME_BYTES + 86));
  tc('qdisc', 'replace', 'dev', n.hostVeth, ...args);
  execFileSync('ip', ['netns', 'exec', n.ns, 'tc', 'qdisc', 'replace', 'dev', n.veth, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** From inside namespace `ns`: which of host:ports accept a TCP connection. */
export function reachableFrom(ns: string, host: string, ports: readonly number[]): number[] {
  if (ports.length === 0) return [];
  const script = `const net=require('node:net');const ports=${JSON.stringify(ports)};let open=[];let left=ports.length;
for(const p of ports){const s=net.connect({host:${JSON.stringify(host)},port:p,timeout:2000});
const done=(ok)=>{if(ok)open.push(p);s.destroy();if(--left===0)console.log(JSON.stringify(open));};
s.once('connect',()=>done(true));s.once('error',()=>done(false));s.once('timeout',()=>done(false));}`;
  return JSON.parse(inNamespace(ns, [process.execPath, '-e', script]).trim()) as number[];
}

/** The host's listening TCP sockets on `port` (ss): local address and the owning pids. */
export function listenersOn(port: number): { address: string; pids: string[] }[] {
  return execFileSync('ss', ['-Hltnp', `sport = :${port}`], { encoding: 'utf8' })
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const local = line.trim().split(/\s+/)[3] ?? '';
      return { address: local.slice(0, local.lastIndexOf(':')), pids: [...line.matchAll(/pid=(\d+)/g)].map((m) => m[1]!) };
    });
}

/**
 * Which of `ports` — engine and forwarder ports, listening on 127.0.0.1 — a client in namespace
 * `ns` reaches on `hostIp` through the engine itself. A port-0 bind on `hostIp` (an agent's or the
 * coordinator's own door) may get a number an engine holds on 127.0.0.1 — another address, so no
 * clash — and then answers there (it failed CI once that way): a port is only excused when every
 * non-loopback listener on it is bound to `hostIp` by another process than the loopback one.
 */
export function facingTheNetwork(ns: string, hostIp: string, ports: readonly number[]): number[] {
  return reachableFrom(ns, hostIp, ports).filter((port) => {
    const all = listenersOn(port);
    const engine = all.filter((l) => l.address === '127.0.0.1').flatMap((l) => l.pids);
    const others = all.filter((l) => l.address !== '127.0.0.1');
    const door = others.length > 0 && others.every((l) => l.address === hostIp && l.pids.length > 0 && !l.pids.some((p) => engine.includes(p)));
    return !door;
  });
}
