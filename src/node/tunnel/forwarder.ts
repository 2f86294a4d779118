import { lstat, rm } from 'node:fs/promises';
import { type Socket, createServer } from 'node:net';
import { type PeerCertificate, type SecureContext, type TLSSocket, createSecureContext, connect as tlsConnect } from 'node:tls';
import type { Identity } from '../../shared/pki/identity.ts';
import type { NodeCredentials } from '../../shared/pki/store.ts';
import { certificateIdentity } from '../../shared/pki/verify.ts';
import { encodeRequest, parseReply, readLine } from './preamble.ts';
import { type TunnelBytes, relay } from './relay.ts';
import { clientTlsOptions } from './tls-options.ts';

export interface TunnelForwarderOptions {
  /** The worker agent's tunnel listener. */
  readonly remote: { readonly host: string; readonly port: number };
  /** The engine port on the worker's 127.0.0.1 (as the worker registered it). */
  readonly enginePort: number;
  /** Who the worker must prove to be: always role `node`; the id when the caller knows it. */
  readonly expectPeer: { readonly id?: string };
  readonly credentials: NodeCredentials;
  /** Local port for the engine to dial (`--rpc 127.0.0.1:<port>`); 0 = any free port. */
  readonly localPort?: number;
  /**
   * A Unix-domain socket to listen on instead (`--rpc unix:<path>`, a llama-server head: the path
   * is in the agent's 0700 socket directory, engine-sockets.ts); a stale socket file is replaced.
   * MLX ring ranks need host:port and use localPort.
   */
  readonly localSocket?: string;
  readonly timeoutMs?: number;
  /**
   * How long to keep dialling while the worker answers that the engine port is not listening
   * yet (an MLX ring rank starting on the other node); 0 = refuse at once (a llama.cpp head:
   * its rpc-servers run before it starts, so a refusal there is final).
   */
  readonly waitForEngineMs?: number;
  readonly onError?: (message: string) => void;
}

export interface TunnelForwarder {
  /** 127.0.0.1 port the head engine connects to (0 when it listens on `socket`). */
  readonly port: number;
  /** The Unix-domain socket it listens on (localSocket), removed by close(). */
  readonly socket?: string;
  /** Cumulative payload bytes through this tunnel (all its connections). */
  readonly bytes: Readonly<TunnelBytes>;
  connections(): number;
  /** Of those, how many resumed a TLS session instead of a full handshake. */
  resumed(): number;
  /** The native relay's process (native-forwarder.ts); absent when this process relays. */
  readonly pid?: number;
  close(): Promise<void>;
}

/** The worker's certificate must name a node (and the expected one): a coordinator or admin certificate is not a worker. */
export function checkWorkerIdentity(expect: { id?: string }) {
  return (_host: string, cert: PeerCertificate): Error | undefined => {
    let identity: Identity;
    try {
      identity = certificateIdentity(cert.raw);
    } catch (err) {
      return err as Error;
    }
    if (identity.role !== 'node') return new Error(`tunnel peer is a ${identity.role}, not a node`);
    if (expect.id !== undefined && identity.id !== expect.id) return new Error(`tunnel peer is node ${identity.id}, expected ${expect.id}`);
    return undefined;
  };
}

/**
 * The head side: a listener on 127.0.0.1 only. Each accepted connection (one per ggml-rpc
 * socket) becomes one TLS 1.3 session to the worker, which must present a node certificate of
 * this cluster; the preamble names the engine port and the worker's yes arrives before any
 * engine byte is sent. A refusal closes the local connection, so the engine sees a failed dial.
 */
export async function startTunnelForwarder(o: TunnelForwarderOptions): Promise<TunnelForwarder> {
  const sessions = new TunnelSessions(o.credentials);
  const bytes: TunnelBytes = { toEngine: 0, fromEngine: 0 };
  const sockets = new Set<Socket>();
  let connections = 0;
  let resumed = 0;
  const track = (s: Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  };
  const server = createServer({ allowHalfOpen: true, noDelay: true }, (local) => {
    track(local);
    // until relay() takes over: a reset from the engine must not be an unhandled 'error'
    local.on('error', () => local.destroy());
    // While the worker's engine is not up yet the local connection is held (what the engine
    // writes meanwhile waits in its buffer): closing it would look like a dead peer to the rank.
    void retryWhilePending(() => open(o, sessions, track), o.waitForEngineMs ?? 0, { cancelled: () => local.destroyed })
      .then((tls) => {
        connections += 1;
        if (tls.isSessionReused()) resumed += 1;
        return relay(local, tls, bytes);
      })
      .catch((err: Error) => {
        o.onError?.(err.message);
        local.destroy();
      });
  });
  if (o.localSocket !== undefined) await removeStaleSocket(o.localSocket);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    if (o.localSocket !== undefined) server.listen(o.localSocket, () => resolve());
    else server.listen(o.localPort ?? 0, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  return {
    port: typeof address === 'object' && address ? address.port : 0,
    ...(o.localSocket !== undefined ? { socket: o.localSocket } : {}),
    bytes,
    connections: () => connections,
    resumed: () => resumed,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/**
 * What the next connection to the same worker can reuse. llama.cpp opens a dozen short RPC
 * connections while it loads a model (device queries, then the load itself): parsing the PEM
 * credentials and a full handshake (two ECDSA signatures, a chain check each way) per connection
 * cost more than the load's own transfer on a busy machine. So: one secure context per
 * forwarder, and TLS 1.3 resumption from the worker's last ticket (PSK with a fresh ECDHE share:
 * still forward secret). A resumed session carries the same verified certificates, so both
 * ends' identity and revocation checks still run on every connection.
 */
export class TunnelSessions {
  readonly context: SecureContext;
  ticket: Buffer | undefined;
  constructor(credentials: NodeCredentials) {
    this.context = createSecureContext(clientTlsOptions(credentials));
  }
}

/** Where and to whom a tunnel session goes (a forwarder's target, a link probe's peer). */
export interface TunnelDial {
  readonly remote: { readonly host: string; readonly port: number };
  readonly expectPeer: { readonly id?: string };
  readonly credentials: NodeCredentials;
  readonly timeoutMs?: number;
  /** Reuse a secure context and resume the last session (a forwarder's many connections); absent = a fresh full handshake. */
  readonly sessions?: TunnelSessions;
}

/** The worker answered no. `pending`: the engine port is not listening yet, so a later dial may succeed. */
export class TunnelRefused extends Error {
  override readonly name = 'TunnelRefused';
  constructor(
    message: string,
    readonly pending: boolean,
  ) {
    super(message);
  }
}

export interface RetryClock {
  readonly now?: () => number;
  readonly sleep?: (ms: number) => Promise<void>;
  /** Stop early (the engine side went away). */
  readonly cancelled?: () => boolean;
}

/**
 * Dial again while the refusal is `pending`: 50 ms doubling to 1 s between attempts, no attempt
 * after `forMs`. Any other failure, or one after the bound, is thrown as it came. MLX's own ring
 * dial retries for about 31 s, so a ring forwarder waits as long as the rank would have.
 */
export async function retryWhilePending<T>(dial: () => Promise<T>, forMs: number, clock: RetryClock = {}): Promise<T> {
  const now = clock.now ?? Date.now;
  const sleep = clock.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
  const deadline = now() + forMs;
  for (let delay = 50; ; delay = Math.min(1000, delay * 2)) {
    try {
      return await dial();
    } catch (err) {
      if (!(err instanceof TunnelRefused && err.pending) || now() + delay > deadline || clock.cancelled?.()) throw err;
    }
    await sleep(delay);
  }
}

/** One authenticated session to the worker, past the preamble, ready to carry engine bytes. */
function open(o: TunnelForwarderOptions, sessions: TunnelSessions, track: (s: Socket) => void): Promise<TLSSocket> {
  return dialTunnel({ ...o, sessions }, encodeRequest(o.enginePort), track);
}

/**
 * A TLS 1.3 session to a node's tunnel listener whose certificate names the expected node, the
 * preamble `requestLine` sent and answered yes: what follows is the session's payload.
 */
export async function dialTunnel(o: TunnelDial, requestLine: string, track: (s: Socket) => void = () => {}): Promise<TLSSocket> {
  const timeoutMs = o.timeoutMs ?? 10_000;
  const where = `tunnel to ${o.remote.host}:${o.remote.port}`;
  const tls = tlsConnect({
    ...clientTlsOptions(o.credentials),
    ...(o.sessions ? { secureContext: o.sessions.context, session: o.sessions.ticket } : {}),
    host: o.remote.host,
    port: o.remote.port,
    checkServerIdentity: checkWorkerIdentity(o.expectPeer),
  });
  const sessions = o.sessions;
  if (sessions) {
    tls.on('session', (ticket: Buffer) => {
      sessions.ticket = ticket;
    });
  }
  track(tls);
  tls.setNoDelay(true);
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${where}: handshake timed out`)), timeoutMs);
      tls.once('secureConnect', () => {
        clearTimeout(timer);
        resolve();
      });
      tls.once('error', (err) => {
        clearTimeout(timer);
        reject(new Error(`${where}: ${err.message}`));
      });
    });
    tls.write(requestLine);
    const reply = parseReply(await readLine(tls, timeoutMs));
    if (!reply) throw new Error(`${where}: malformed reply`);
    if (!reply.ok) throw new TunnelRefused(`${where} refused: ${reply.error}`, reply.pending === true);
    return tls;
  } catch (err) {
    tls.destroy();
    throw err;
  }
}

/** A socket file left by a forwarder that died is replaced; any other file is not ours to delete. */
export async function removeStaleSocket(path: string): Promise<void> {
  const st = await lstat(path).catch(() => undefined);
  if (st === undefined) return;
  if (!st.isSocket()) throw new Error(`${path} exists and is not a socket`);
  await rm(path, { force: true });
}
