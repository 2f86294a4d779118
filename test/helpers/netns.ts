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
