import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { Logger } from '../../shared/log.ts';
import type { RpcTarget } from '../../shared/placement/llama-args.ts';
import type { NodeCredentials } from '../../shared/pki/store.ts';
import { rpcServerSocket, unixEndpoint } from '../engine-sockets.ts';
import { EngineRequestError } from '../engine-spec.ts';
import type { EngineExit, EngineInfo } from '../supervisor.ts';
import { EnginePorts } from './engine-ports.ts';
import { type TunnelForwarder, startTunnelForwarder } from './forwarder.ts';
import { type TunnelListener, startTunnelListener } from './listener.ts';
import { type LinkSample, measureLink } from './link-probe.ts';
import { startNativeForwarder } from './native-forwarder.ts';
import { type NativeTunnelListener, startNativeListener } from './native-listener.ts';

/** How the head reaches one rpc target: its own loopback, or a forwarder to another node's tunnel. */
export type RpcRoute = { readonly kind: 'direct'; readonly port: number } | { readonly kind: 'tunnel'; readonly target: RpcTarget & { readonly tunnel: { host: string; port: number } } };

/**
 * Pure: the route for `target` from node `self`. Same node → 127.0.0.1 directly (no TLS for a
 * loopback hop). Another node → through its tunnel, always: that needs credentials on both ends,
 * and a target that names no tunnel (its node holds no cluster credentials) is refused rather
 * than dialled on this machine's loopback, which would reach whatever listens there.
 */
export function rpcRoute(target: RpcTarget, self: { nodeId: string; hasCredentials: boolean }): RpcRoute {
  if (target.nodeId === self.nodeId) return { kind: 'direct', port: target.enginePort };
  if (!self.hasCredentials) {
    throw new EngineRequestError('FAILED_PRECONDITION', `this node holds no cluster credentials, so it cannot tunnel to node ${target.nodeId}: join the cluster (\`orchard node --token …\`)`);
  }
  if (target.tunnel === undefined) {
    throw new EngineRequestError('FAILED_PRECONDITION', `node ${target.nodeId} runs no tunnel listener (it holds no cluster credentials): its rpc-server cannot be reached`);
  }
  return { kind: 'tunnel', target: target as RpcTarget & { tunnel: { host: string; port: number } } };
}

/** Payload bytes this node exchanged with one peer node through tunnels, both roles summed. */
export interface PeerBytes {
  readonly peer: string;
  readonly sent: number;
  readonly received: number;
}

export interface EngineTunnelsOptions {
  readonly nodeId: string;
  /** Without them the node runs no listener and opens no forwarder (it is not a proven member yet). */
  readonly credentials: NodeCredentials | undefined;
  /** The agent's bind host: the listener faces the network the gRPC API faces. */
  readonly host: string;
  readonly port: number;
  /** How long a ring rank's forwarder waits for a remote rank that is not listening yet (default RING_WAIT_MS). */
  readonly ringWaitMs?: number | undefined;
  /**
   * The native relay (findTunnelRelay) for both sides: every forwarder, and the listener;
   * undefined = the Node forwarder and listener.
   */
  readonly relayBinary?: string | undefined;
  /**
   * The agent's private socket directory (engine-sockets.ts): a head dials this node's rpc-servers
   * at their sockets there and its forwarders listen there (`unix:` endpoints); absent = 127.0.0.1
   * ports (MLX ring ranks always: MLX needs host:port).
   */
  readonly socketDir?: string | undefined;
  readonly log: Logger;
}

/**
 * Ranks of one ring start in parallel on different nodes, so a rank may dial a neighbour whose
 * agent has not registered (or whose process has not bound) its ring port yet. MLX itself
 * retries a refused dial for about 31 s; through a forwarder the local dial always succeeds, so
 * the forwarder does that waiting instead, for as long.
 */
export const RING_WAIT_MS = 30_000;

/** A peer whose tunnel this node probes (the coordinator names them: the nodes it may pair us with). */
export interface LinkPeer {
  readonly nodeId: string;
  readonly tunnel: { readonly host: string; readonly port: number };
}

/** One peer's probe: a sample, or why there is none. */
export type LinkResult = { readonly peer: string; readonly measuredAtSeconds: number } & ({ readonly sample: LinkSample } | { readonly error: string });

interface HeadTunnels {
  readonly forwarders: readonly (TunnelForwarder & { readonly peer: string })[];
  readonly endpoints: readonly string[];
}

/**
 * The agent's tunnel side, both roles. Worker: one listener on the bind host that forwards only
 * to the engine ports registered here (rpc-servers and MLX ring ranks this agent started,
 * unregistered at exit). Dialling side (a llama-server head, every MLX ring rank): per engine, one
 * forwarder per remote target (checked to be that node), closed when the engine exits or fails to
 * start. Byte totals per peer survive closed forwarders so
 * `orchard_rpc_bytes_total` only ever grows.
 */
export class EngineTunnels {
  readonly enginePorts = new EnginePorts();
  readonly #o: EngineTunnelsOptions;
  #listener: TunnelListener | NativeTunnelListener | undefined;
  /** Peers revoked (`revoke`): refused by the listener from then on. */
  readonly #revoked = new Set<string>();
  readonly #heads = new Map<string, Promise<HeadTunnels>>();
  readonly #closedBytes = new Map<string, { sent: number; received: number }>();
  readonly #links = new Map<string, LinkResult & { sample: LinkSample }>();
  #probing: Promise<unknown> = Promise.resolve();

  constructor(o: EngineTunnelsOptions) {
    this.#o = o;
  }

  /** Start the listener (when the node holds credentials); its port, or undefined. */
  async start(): Promise<number | undefined> {
    const o = this.#o;
    if (!o.credentials) return undefined;
    const common = {
      host: o.host,
      port: o.port,
      credentials: o.credentials,
      enginePorts: this.enginePorts,
      onRefused: (reason: string, peer: { id: string } | undefined) => o.log.warn({ reason, peer: peer?.id }, 'tunnel connection refused'),
    };
    this.#listener = o.relayBinary
      ? await startNativeListener(o.relayBinary, { ...common, revoked: this.#revoked, onCrash: (message) => o.log.error(message) })
      : await startTunnelListener({ ...common, isRevoked: (peer) => this.#revoked.has(peer.id) });
    o.log.info({ host: o.host, port: this.#listener.port, relay: o.relayBinary ? 'native' : 'node' }, 'tunnel listener ready');
    return this.#listener.port;
  }

  get port(): number | undefined {
    return this.#listener?.port;
  }

  /**
   * Resolves once the listener enforces every registration and revocation made so far: the
   * native listener learns them over a pipe, so a StartEngine answer waits for this before the
   * head may dial the engine it announces.
   */
  async settled(): Promise<void> {
    const l = this.#listener;
    if (l && 'settled' in l) await l.settled();
  }

  /** Register rpc-servers as they start, drop them (and a head's forwarders) as they exit. */
  follow(supervisor: { on(e: 'started', f: (i: EngineInfo) => void): unknown; on(e: 'exited', f: (x: EngineExit) => void): unknown }): void {
    supervisor.on('started', (info) => {
      if (info.kind === 'rpc-server') this.enginePorts.register(info.port, info.engineId, info.socket);
    });
    supervisor.on('exited', (exit) => {
      if (this.enginePorts.engine(exit.port) === exit.engineId) this.enginePorts.unregister(exit.port);
      void this.release(exit.engineId);
    });
  }

  /**
   * The endpoints engine `engineId` (a llama-server head, an MLX ring rank) dials for `targets`,
   * opening one forwarder per remote target: `unix:` sockets in `socketDir` (a head), else
   * 127.0.0.1 ports (a ring rank). Idempotent per engine id (a StartEngine
   * retry reuses them).
   */
  endpoints(engineId: string, targets: readonly RpcTarget[], waitForEngineMs = 0): Promise<readonly string[]> {
    return this.#endpoints(engineId, targets, waitForEngineMs, this.#o.socketDir);
  }

  #endpoints(engineId: string, targets: readonly RpcTarget[], waitForEngineMs: number, socketDir: string | undefined): Promise<readonly string[]> {
    let head = this.#heads.get(engineId);
    if (!head) {
      head = this.#open(targets, waitForEngineMs, socketDir);
      this.#heads.set(engineId, head);
      head.catch(() => this.#heads.delete(engineId));
    }
    return head.then((h) => h.endpoints);
  }

  async #open(targets: readonly RpcTarget[], waitForEngineMs: number, socketDir: string | undefined): Promise<HeadTunnels> {
    const o = this.#o;
    const self = { nodeId: o.nodeId, hasCredentials: o.credentials !== undefined };
    const routes = targets.map((t) => rpcRoute(t, self));
    const forwarders: (TunnelForwarder & { peer: string })[] = [];
    try {
      const endpoints: string[] = [];
      for (const r of routes) {
        if (r.kind === 'direct') {
          endpoints.push(socketDir !== undefined ? unixEndpoint(rpcServerSocket(socketDir, r.port)) : `127.0.0.1:${r.port}`);
          continue;
        }
        const localSocket = socketDir !== undefined ? join(socketDir, `fwd-${randomBytes(4).toString('hex')}.sock`) : undefined;
        const options = {
          remote: r.target.tunnel,
          enginePort: r.target.enginePort,
          expectPeer: { id: r.target.nodeId },
          credentials: o.credentials!,
          waitForEngineMs,
          onError: (message: string) => o.log.warn({ peer: r.target.nodeId, err: message }, 'tunnel to a remote engine failed'),
          ...(localSocket !== undefined ? { localSocket } : {}),
        };
        const f = o.relayBinary ? await startNativeForwarder(o.relayBinary, options) : await startTunnelForwarder(options);
        forwarders.push(Object.assign(f, { peer: r.target.nodeId }));
        endpoints.push(f.socket !== undefined ? unixEndpoint(f.socket) : `127.0.0.1:${f.port}`);
      }
      if (forwarders.length > 0) o.log.info({ tunnels: forwarders.map((f) => ({ peer: f.peer, ...(f.socket !== undefined ? { socket: f.socket } : { port: f.port }) })), relay: o.relayBinary ? 'native' : 'node' }, 'engine tunnels open');
      return { forwarders, endpoints };
    } catch (err) {
      await Promise.all(forwarders.map((f) => f.close()));
      throw err;
    }
  }

  /**
   * The hostfile entries of MLX ring rank `engineId` (rank order, all on 127.0.0.1): its own ring
   * port (registered here, so peers' tunnels may reach it), same-node ranks directly, a forwarder
   * per rank on another node. Idempotent per engine id like `endpoints`.
   */
  ringEndpoints(engineId: string, rank: number, ring: readonly RpcTarget[]): Promise<readonly string[]> {
    const own = ring[rank];
    if (own?.nodeId !== this.#o.nodeId) {
      return Promise.reject(new EngineRequestError('INVALID_ARGUMENT', `mlx.ring_ranks[${rank}] names node ${own?.nodeId ?? '(none)'}, but this rank runs on node ${this.#o.nodeId}`));
    }
    const holder = this.enginePorts.engine(own.enginePort);
    if (holder !== undefined && holder !== engineId) {
      return Promise.reject(new EngineRequestError('ALREADY_EXISTS', `ring port ${own.enginePort} belongs to engine ${holder} of this node`));
    }
    this.enginePorts.register(own.enginePort, engineId);
    return this.#endpoints(engineId, ring, this.#o.ringWaitMs ?? RING_WAIT_MS, undefined); // MLX needs host:port
  }

  /**
   * Probe the tunnel of each peer, one after another (probes never overlap, so one does not
   * steal another's bandwidth), over the path engine traffic takes. Needs credentials.
   */
  measureLinks(peers: readonly LinkPeer[]): Promise<LinkResult[]> {
    const credentials = this.#o.credentials;
    if (!credentials) throw new EngineRequestError('FAILED_PRECONDITION', 'this node holds no cluster credentials, so it has no tunnel to measure: join the cluster first');
    const run = this.#probing.then(async () => {
      const out: LinkResult[] = [];
      for (const p of peers) {
        if (p.nodeId === this.#o.nodeId) continue;
        const measuredAtSeconds = Date.now() / 1000;
        try {
          const sample = await measureLink({ remote: p.tunnel, expectPeer: { id: p.nodeId }, credentials });
          const r = { peer: p.nodeId, measuredAtSeconds, sample };
          this.#links.set(p.nodeId, r);
          out.push(r);
        } catch (err) {
          this.#o.log.warn({ peer: p.nodeId, err: (err as Error).message }, 'link probe failed');
          out.push({ peer: p.nodeId, measuredAtSeconds, error: (err as Error).message });
        }
      }
      return out;
    });
    this.#probing = run.catch(() => undefined);
    return run;
  }

  /** The last successful probe per peer (metrics). */
  links(): (LinkResult & { sample: LinkSample })[] {
    return [...this.#links.values()];
  }

  /** Close the forwarders of engine `engineId` and drop its registered ports (it exited or never started). */
  async release(engineId: string): Promise<void> {
    this.enginePorts.unregisterEngine(engineId);
    const head = this.#heads.get(engineId);
    if (!head) return;
    this.#heads.delete(engineId);
    const h = await head.catch(() => undefined);
    if (!h) return;
    for (const f of h.forwarders) {
      const c = this.#closedBytes.get(f.peer) ?? { sent: 0, received: 0 };
      await f.close();
      c.sent += f.bytes.toEngine;
      c.received += f.bytes.fromEngine;
      this.#closedBytes.set(f.peer, c);
    }
  }

  /**
   * The cluster revoked `peerId`: the listener refuses it from now on, and every session it has
   * open either way is cut (ggml-rpc keeps its connection for the engine's lifetime). The count.
   */
  revoke(peerId: string): Promise<number> {
    this.#revoked.add(peerId);
    return this.#cut(peerId, true);
  }

  /** Cut every tunnel session of `peerId` both ways, refusing nothing new. Returns the count. */
  disconnect(peerId: string): Promise<number> {
    return this.#cut(peerId, false);
  }

  async #cut(peerId: string, revoked: boolean): Promise<number> {
    const l = this.#listener;
    let n = l === undefined ? 0 : revoked && 'revoke' in l ? await l.revoke(peerId) : await l.disconnect(peerId);
    for (const [engineId, head] of [...this.#heads]) {
      const h = await head.catch(() => undefined);
      if (h?.forwarders.some((f) => f.peer === peerId)) {
        n += h.forwarders.filter((f) => f.peer === peerId).reduce((a, f) => a + f.connections(), 0);
        await this.release(engineId);
      }
    }
    return n;
  }

  /** Bytes per peer node, this node's view: sent = toward the peer, received = from it. */
  async bytes(): Promise<PeerBytes[]> {
    const total = new Map<string, { sent: number; received: number }>();
    const add = (peer: string, sent: number, received: number) => {
      const t = total.get(peer) ?? { sent: 0, received: 0 };
      t.sent += sent;
      t.received += received;
      total.set(peer, t);
    };
    for (const [peer, c] of this.#closedBytes) add(peer, c.sent, c.received);
    for (const head of this.#heads.values()) {
      const h = await head.catch(() => undefined);
      for (const f of h?.forwarders ?? []) add(f.peer, f.bytes.toEngine, f.bytes.fromEngine);
    }
    // worker side: the peer (a head) sends toward our engine and receives what it answers
    for (const s of this.#listener?.stats() ?? []) add(s.peer, s.fromEngine, s.toEngine);
    return [...total].map(([peer, t]) => ({ peer, ...t }));
  }

  async close(): Promise<void> {
    await Promise.all([...this.#heads.keys()].map((id) => this.release(id)));
    await this.#listener?.close();
  }
}
