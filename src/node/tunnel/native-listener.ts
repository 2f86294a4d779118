import { z } from 'zod';
import type { TunnelListener, TunnelListenerOptions, TunnelStats } from './listener.ts';
import { type RelayProcess, relayAddress, spawnRelay } from './native-forwarder.ts';

/**
 * The worker side of a tunnel in native code (native/tunnel-relay `listen`): bench:tunnel
 * measured the Node listener at 0.78 CPU seconds per cold load against 0.30 for the native head
 * side, which on a loaded machine is most of the tunnel's load-time cost. Same contract as
 * startTunnelListener: TLS 1.3 with cluster certificates only, role node or coordinator, the
 * revoked refused, engine ports this agent registered only (pending otherwise), link probes
 * answered on the same listener (so a probe measures the engines' path), counts per (peer, engine
 * port). What lives in this process reaches the relay as stdin commands: registered ports as they
 * change, revocations, disconnects; `settled()` waits until every change sent is in force. The
 * credentials go on stdin only; the relay exits when stdin ends, so it never outlives the agent,
 * and if it dies on its own it is started again on the same port.
 */
export interface NativeListenerOptions extends Omit<TunnelListenerOptions, 'isRevoked' | 'preambleTimeoutMs'> {
  /** Peers revoked when it starts; later ones arrive through revoke(). */
  readonly revoked: ReadonlySet<string>;
  /** The relay died on its own (it is restarted). */
  readonly onCrash?: (message: string) => void;
}

export interface NativeTunnelListener extends Omit<TunnelListener, 'disconnect'> {
  /** Cut every open session of `peerId` (authenticated ones, link probes included); how many. */
  disconnect(peerId: string): Promise<number>;
  /** Refuse `peerId` from now on and cut its open sessions; how many were cut. */
  revoke(peerId: string): Promise<number>;
  /** Resolves once every command sent so far (ports, revocations) is in force in the relay. */
  settled(): Promise<void>;
  /** The relay's current process. */
  pid(): number | undefined;
}

const Line = z.union([
  z.strictObject({ peer: z.string(), enginePort: z.number().int(), toEngine: z.number(), fromEngine: z.number(), connections: z.number() }),
  z.strictObject({ refused: z.string(), peer: z.string().optional() }),
  z.strictObject({ ack: z.number().int(), sessions: z.number().int() }),
]);

const RESTART_DELAY_MS = 1000;

function addInto(total: Map<string, TunnelStats>, key: string, s: TunnelStats): void {
  const t = total.get(key);
  total.set(key, t ? { ...t, toEngine: t.toEngine + s.toEngine, fromEngine: t.fromEngine + s.fromEngine, connections: t.connections + s.connections } : { ...s });
}

export async function startNativeListener(binary: string, o: NativeListenerOptions): Promise<NativeTunnelListener> {
  const revoked = new Set(o.revoked);
  // counters of the running relay, and those of relays that died (a restart starts from zero)
  const live = new Map<string, TunnelStats>();
  const earlier = new Map<string, TunnelStats>();
  const acks = new Map<number, (sessions: number) => void>();
  let seq = 0;
  let closing = false;
  const onLine = (raw: unknown) => {
    const line = Line.safeParse(raw);
    if (!line.success) return;
    const l = line.data;
    if ('refused' in l) o.onRefused?.(l.refused, l.peer ? { id: l.peer } : undefined);
    else if ('ack' in l) {
      acks.get(l.ack)?.(l.sessions);
      acks.delete(l.ack);
    } else live.set(`${l.peer}:${l.enginePort}`, { peer: l.peer, enginePort: l.enginePort, toEngine: l.toEngine, fromEngine: l.fromEngine, connections: l.connections });
  };
  const c = o.credentials;
  const launch = (port: number) =>
    spawnRelay(
      binary,
      { mode: 'listen', listen: relayAddress(o.host, port), enginePorts: o.enginePorts.ports(), engineSockets: o.enginePorts.sockets(), revoked: [...revoked], certPem: c.certPem, keyPem: c.keyPem, caPem: c.caCertPem },
      onLine,
    );
  let relay: RelayProcess = await launch(o.port);
  const port = relay.port;
  const watch = (r: RelayProcess) =>
    void r.closed.then(() => {
      if (closing) return;
      for (const [k, s] of live) addInto(earlier, k, s);
      live.clear();
      for (const resolve of acks.values()) resolve(0); // its sessions died with it
      acks.clear();
      o.onCrash?.(`native tunnel listener exited (${r.proc.exitCode ?? r.proc.signalCode}); starting it again on port ${port}`);
      const again = () =>
        setTimeout(() => {
          if (closing) return;
          launch(port).then((next) => {
            relay = next;
            watch(next);
          }, again);
        }, RESTART_DELAY_MS).unref();
      again();
    });
  watch(relay);
  const request = (command: object) =>
    new Promise<number>((resolve) => {
      seq += 1;
      acks.set(seq, resolve);
      relay.send({ ...command, ack: seq });
      // a relay already gone answers nothing: its restart replays the state instead
      if (relay.proc.exitCode !== null || relay.proc.signalCode !== null) {
        acks.delete(seq);
        resolve(0);
      }
    });
  const offPorts = o.enginePorts.onChange((p, entry) => relay.send(entry === undefined ? { unregister: p } : { register: p, ...(entry.socket ? { socket: entry.socket } : {}) }));
  return {
    port,
    pid: () => relay.proc.pid,
    stats: () => {
      const all = new Map<string, TunnelStats>();
      for (const [k, s] of [...earlier, ...live]) addInto(all, k, s);
      return [...all.values()];
    },
    disconnect: (peerId) => request({ disconnect: peerId }),
    revoke: (peerId) => {
      revoked.add(peerId);
      return request({ revoke: peerId });
    },
    settled: () => request({}).then(() => undefined),
    close: async () => {
      closing = true;
      offPorts();
      await relay.close();
    },
  };
}
