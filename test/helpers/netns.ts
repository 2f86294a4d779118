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
