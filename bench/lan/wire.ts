import { execFileSync } from 'node:child_process';
import { promptBoundaryBytes } from '../../src/shared/placement/cost.ts';
import { resolveOptions } from '../../src/shared/placement/prepared.ts';
import type { Lan } from '../../test/helpers/netns.ts';
import type { Seen } from './cluster.ts';
import type { LoadedLayout } from './measure.ts';

/**
 * What a request moved over each node's shaped link, counted by the link itself (the tbf qdiscs'
 * byte counters: `out` on the node's veth, `in` on its bridge port), next to the bytes the cost
 * model charges for it (cost.ts promptBoundaryBytes): a check of the model's accounting that no
 * CPU load can blur. The counters include what the model leaves out on purpose — TLS records,
 * TCP/IP headers and ACKs (a few %), the coordinator's request and answer.
 */

export type LinkBytes = Record<string, { in: number; out: number }>;

const sent = (out: string): number => Number(/Sent (\d+) bytes/.exec(out)?.[1] ?? Number.NaN);

/** Every node's link counters now, by node name. */
export function linkCounters(lan: Lan, names: readonly string[]): LinkBytes {
  return Object.fromEntries(
    lan.nodes.map((n, i) => {
      const out = execFileSync('ip', ['netns', 'exec', n.ns, 'tc', '-s', 'qdisc', 'show', 'dev', n.veth], { encoding: 'utf8' });
      const inward = execFileSync('tc', ['-s', 'qdisc', 'show', 'dev', n.hostVeth], { encoding: 'utf8' });
      return [names[i]!, { in: sent(inward), out: sent(out) }];
    }),
  );
}

export function linkDelta(before: LinkBytes, after: LinkBytes): LinkBytes {
  return Object.fromEntries(Object.entries(after).map(([k, a]) => [k, { in: a.in - before[k]!.in, out: a.out - before[k]!.out }]));
}

/**
 * The bytes the model says a fresh prompt of `promptTokens` (after a like one-token request)
 * moves over each node's link for this layout: the head's link carries every worker's boundary,
 * a worker's its own; nodes without a stage carry nothing.
 */
export function predictedLinkBytes(seen: Seen, layout: LoadedLayout, promptTokens: number, names: readonly string[]): LinkBytes {
  const o = resolveOptions({ ...seen.options, promptTokens, outputTokens: 1 });
  const bytes: LinkBytes = Object.fromEntries(names.map((n) => [n, { in: 0, out: 0 }]));
  const head = layout.stages.at(-1)!.node;
  for (const s of layout.stages.slice(0, -1)) {
    const b = promptBoundaryBytes(seen.profile, o, s.firstLayer, s.lastLayer);
    bytes[s.node] = { in: bytes[s.node]!.in + b.toWorker, out: bytes[s.node]!.out + b.toHead };
    bytes[head] = { in: bytes[head]!.in + b.toHead, out: bytes[head]!.out + b.toWorker };
  }
  return bytes;
}
