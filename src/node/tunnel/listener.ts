import { type Socket, connect } from 'node:net';
import { type TLSSocket, createServer } from 'node:tls';
import type { Role } from '../../shared/pki/identity.ts';
import type { NodeCredentials } from '../../shared/pki/store.ts';
import { CertificateRejected, type VerifiedPeer, verifyCertificate } from '../../shared/pki/verify.ts';
import type { EnginePorts } from './engine-ports.ts';
import { serveProbe } from './link-probe.ts';
import { encodeReply, parseRequest, readLine } from './preamble.ts';
import { type TunnelBytes, relay } from './relay.ts';
import { serverTlsOptions } from './tls-options.ts';

export interface TunnelListenerOptions {
  /** Where the listener is reachable by other nodes (the LAN address); 0 = any free port. */
  readonly host: string;
  readonly port: number;
  readonly credentials: NodeCredentials;
  readonly enginePorts: EnginePorts;
  /** Revocation as the coordinator last announced it; asked on every new connection. */
  readonly isRevoked?: (peer: VerifiedPeer) => boolean;
  /** A handshake or preamble that takes longer is dropped (slow peers hold no sockets). */
  readonly preambleTimeoutMs?: number;
  /** A refused connection and, once its certificate was read, who it was. */
  readonly onRefused?: (reason: string, peer: Pick<VerifiedPeer, 'id'> | undefined) => void;
}

/** Roles that may carry engine traffic: heads (nodes) and the coordinator. Never an admin client. */
export const TUNNEL_ROLES: readonly Role[] = ['node', 'coordinator'];

export interface TunnelStats extends TunnelBytes {
  readonly peer: string;
  readonly enginePort: number;
  connections: number;
}

export interface TunnelListener {
  readonly port: number;
  /** Byte counters per (peer id, engine port), cumulative since start. */
  stats(): TunnelStats[];
  /**
   * Cut every open session of `peerId` (call when the coordinator announces a revocation:
   * isRevoked only guards new connections, and ggml-rpc keeps its connection for hours).
   */
  disconnect(peerId: string): number;
  close(): Promise<void>;
}

/**
 * The worker side: accepts TLS 1.3 from certificates of this cluster only (OpenSSL checks the
 * chain during the handshake), then checks role and revocation, reads the preamble, and splices
 * the session to the named engine port on 127.0.0.1 if — and only if — that port is an engine
 * this agent registered. Every refusal is one reply line and a close; nothing is forwarded.
 */
export async function startTunnelListener(o: TunnelListenerOptions): Promise<TunnelListener> {
  const stats = new Map<string, TunnelStats>();
  const sockets = new Set<Socket>();
  const byPeer = new Map<string, Set<Socket>>();
  const server = createServer({ ...serverTlsOptions(o.credentials), handshakeTimeout: o.preambleTimeoutMs ?? 10_000 }, (tls) => {
    tls.setNoDelay(true);
    void accept(tls, o, { stats, sockets, byPeer });
  });
  // the raw TCP sockets, from accept on: close() must also cut handshakes still in progress
  server.on('connection', (raw: Socket) => track(sockets, raw));
  server.on('tlsClientError', (_err, tls) => {
    o.onRefused?.('TLS handshake failed (no certificate of this cluster)', undefined);
    tls.destroy();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(o.port, o.host, () => resolve());
  });
  const address = server.address();
  return {
    port: typeof address === 'object' && address ? address.port : o.port,
    stats: () => [...stats.values()].map((s) => ({ ...s })),
    disconnect: (peerId) => {
      const open = [...(byPeer.get(peerId) ?? [])];
      for (const s of open) s.destroy();
      return open.length;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

function track(sockets: Set<Socket>, s: Socket): void {
  sockets.add(s);
  s.once('close', () => sockets.delete(s));
}

function authorize(tls: TLSSocket, o: TunnelListenerOptions): { peer: VerifiedPeer } | { error: string; peer?: VerifiedPeer } {
  const cert = tls.getPeerX509Certificate();
  if (!cert) return { error: 'no client certificate' };
  let peer: VerifiedPeer;
  try {
    peer = verifyCertificate(cert.raw, o.credentials.caCertPem);
  } catch (err) {
    return { error: err instanceof CertificateRejected ? err.message : 'certificate rejected' };
  }
  if (!TUNNEL_ROLES.includes(peer.role)) return { error: `role ${peer.role} may not open tunnels`, peer };
  if (o.isRevoked?.(peer)) return { error: 'this identity has been revoked', peer };
  return { peer };
}

interface Sessions {
  readonly stats: Map<string, TunnelStats>;
  readonly sockets: Set<Socket>;
  readonly byPeer: Map<string, Set<Socket>>;
}

async function accept(tls: TLSSocket, o: TunnelListenerOptions, { stats, sockets, byPeer }: Sessions): Promise<void> {
  const refuse = (error: string, peer?: VerifiedPeer, pending?: true) => {
    o.onRefused?.(error, peer);
    tls.end(encodeReply(pending ? { ok: false, error, pending } : { ok: false, error }));
  };
  const auth = authorize(tls, o);
  if ('error' in auth) return refuse(auth.error, auth.peer);
  let line: string;
  try {
    line = await readLine(tls, o.preambleTimeoutMs ?? 10_000);
  } catch (err) {
    o.onRefused?.((err as Error).message, auth.peer);
    tls.destroy();
    return;
  }
  const request = parseRequest(line);
  if (!request) return refuse('malformed preamble', auth.peer);
  if ('probe' in request) {
    // a link measurement (link-probe.ts): answered here, never spliced to an engine
    tls.write(encodeReply({ ok: true }));
    return serveProbe(tls);
  }
  if (o.enginePorts.engine(request.port) === undefined) return refuse(`port ${request.port} is not an engine of this node`, auth.peer, true);
  // an rpc-server's Unix-domain socket when it has one, else its 127.0.0.1 port (MLX ring ranks)
  const socket = o.enginePorts.socket(request.port);
  const engine = socket ? connect({ path: socket, allowHalfOpen: true }) : connect({ host: '127.0.0.1', port: request.port, allowHalfOpen: true, noDelay: true });
  track(sockets, engine);
  const ready = await new Promise<boolean>((resolve) => {
    engine.once('connect', () => resolve(true));
    engine.once('error', () => resolve(false));
  });
  if (!ready) return refuse(`engine on port ${request.port} is not accepting connections`, auth.peer, true);
  const peerId = auth.peer.id;
  const mine = byPeer.get(peerId) ?? new Set<Socket>();
  byPeer.set(peerId, mine.add(tls));
  tls.once('close', () => {
    mine.delete(tls);
    if (mine.size === 0 && byPeer.get(peerId) === mine) byPeer.delete(peerId);
  });
  const key = `${peerId}:${request.port}`;
  const s = stats.get(key) ?? { peer: auth.peer.id, enginePort: request.port, toEngine: 0, fromEngine: 0, connections: 0 };
  s.connections += 1;
  stats.set(key, s);
  tls.write(encodeReply({ ok: true }));
  await relay(tls, engine, s);
}
