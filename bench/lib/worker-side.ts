/**
 * Where bench:tunnel's worker side runs — its rpc-server, the tunnel's worker-side listener and the
 * replay's fake engine — and how the head (llama-server, the head-side forwarder, this process)
 * reaches it.
 *
 * Loopback (the default, and the headline): on this machine's 127.0.0.1 next to the head. The only
 * bottleneck there is CPU, and the two relay processes compete with the engines for the guest's
 * cores: the tunnel's worst case.
 *
 * A link (`--link 1gbe|10gbe`): a network namespace of its own on a bridge, its veth pair shaped as
 * bench:lan shapes a node's link (test/helpers/netns.ts createLan, shapeLink; rates from
 * bench/lib/links.ts), so every byte between head and worker crosses that link once each way, as
 * between two Macs on one switch port each (bench:lan's node-to-node traffic crosses two shaped
 * links: both nodes are in namespaces; here the head is this machine). No added latency: bench:lan
 * adds none either (no netem on this kernel; the path's own). The rpc-server binds every address of
 * its namespace, so direct mode dials it across the link (raw llama.cpp RPC's insecure path) and
 * the listener reaches it on the namespace's 127.0.0.1. The bridge and namespace are removed on
 * every way out: close(), a normal exit, an error, SIGINT and SIGTERM (after children.ts has
 * killed the processes in it); a SIGKILL of the bench leaves them, and the next run on the same
 * tag removes them first.
 */
import { createLan, deleteLan, shapeLink } from '../../test/helpers/netns.ts';
import { linkCounters } from '../lan/wire.ts';
import { LINK_BITS_PER_SECOND, type LinkName } from './links.ts';

export interface WorkerSide {
  /** `loopback`, or the link profile between head and worker. */
  readonly link: 'loopback' | LinkName;
  /** The worker's address as the head dials it: its rpc-server (direct), its listener (tunnel). */
  readonly host: string;
  /** Where the worker's engines bind. */
  readonly engineBind: string;
  /** `cmd args` as run on the worker side. */
  command(cmd: string, args: readonly string[]): [string, string[]];
  /** What the link has carried so far, bytes each way, as its tbf qdiscs count them; null on loopback. */
  carried(): { toWorker: number; toHead: number } | null;
  close(): void;
}

const LOOPBACK: WorkerSide = {
  link: 'loopback',
  host: '127.0.0.1',
  engineBind: '127.0.0.1',
  command: (cmd, args) => [cmd, [...args]],
  carried: () => null,
  close: () => {},
};

/** The worker side for `link` (loopback when undefined); a link needs root (namespaces, tc). */
export function workerSide(link: LinkName | undefined, tag = String(process.pid % 10_000)): WorkerSide {
  if (!link) return LOOPBACK;
  const bridge = `otun${tag}`;
  // a /24 of its own per tag, apart from bench:lan's 10.93.x
  const net = `10.94.${(Number(tag) % 250) + 1}`;
  const node = { ns: `otun-${tag}-w`, veth: `otun${tag}w`, ip: `${net}.11` };
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    process.off('exit', close);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    deleteLan(bridge, [node.ns]);
  };
  // exit: children.ts's handler (registered at import, so first) has killed the processes in it
  const onSignal = (signal: NodeJS.Signals) => process.exit(signal === 'SIGINT' ? 130 : 143);
  process.on('exit', close);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  deleteLan(bridge, [node.ns]);
  try {
    const lan = createLan(bridge, `${net}.1`, [node]);
    shapeLink(lan.nodes[0]!, LINK_BITS_PER_SECOND[link]);
    return {
      link,
      host: node.ip,
      engineBind: '0.0.0.0',
      command: (cmd, args) => ['ip', ['netns', 'exec', node.ns, cmd, ...args]],
      carried: () => {
        const c = linkCounters(lan, ['worker']).worker!;
        return { toWorker: c.in, toHead: c.out };
      },
      close,
    };
  } catch (err) {
    close();
    throw err;
  }
}
