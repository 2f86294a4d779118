import { execFile } from 'node:child_process';
import { readdir, readFile, readlink } from 'node:fs/promises';
import { connect, createServer } from 'node:net';
import { promisify } from 'node:util';
import { errorMessage } from '../shared/errors.ts';
import { EngineRequestError } from './engine-spec.ts';
import { DEFAULT_ENGINE_PORT_RANGE, drawPorts, type PortRange, parseEphemeralRange, parsePortRange, usableEngineRange } from '../shared/engine-port-range.ts';

/**
 * Port helpers for engines. Engines take a port number on their command line, so a port is
 * chosen, checked free by a bind, released and handed to the engine, which binds it a moment
 * later. Engines get theirs from the engine port range (shared/engine-port-range.ts: outside the
 * kernel's ephemeral range, so no outgoing connection takes one in that moment); port 0
 * (`pickFreePort`) is for the benches' own servers.
 */

/** The kernel's ephemeral port range, or undefined where it cannot be read. */
export async function ephemeralPortRange(): Promise<PortRange | undefined> {
  if (process.platform === 'darwin') {
    const sysctl = await promisify(execFile)('sysctl', ['-n', 'net.inet.ip.portrange.first', 'net.inet.ip.portrange.last']).catch(() => undefined);
    return sysctl ? parseEphemeralRange(sysctl.stdout) : undefined;
  }
  const text = await readFile('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').catch(() => undefined);
  return text === undefined ? undefined : parseEphemeralRange(text);
}

/**
 * This machine's engine port range: `configured` (else ORCHARD_NODE_ENGINE_PORTS, else the
 * default) without its part in the ephemeral range. UsageError when too little is left.
 */
export async function engineRangeOf(configured: PortRange | undefined, env: NodeJS.ProcessEnv = process.env): Promise<PortRange> {
  const fromEnv = env.ORCHARD_NODE_ENGINE_PORTS ? parsePortRange(env.ORCHARD_NODE_ENGINE_PORTS, 'ORCHARD_NODE_ENGINE_PORTS') : undefined;
  return usableEngineRange(configured ?? fromEnv ?? DEFAULT_ENGINE_PORT_RANGE, await ephemeralPortRange());
}

/**
 * The engine ports this process hands out: from its engine port range, checked free by a bind on
 * `host`, and never handed out again while held (until `release`: the engine exited) — two
 * engines started at once cannot get the same one.
 */
export class EnginePortAllocator {
  readonly #held = new Set<number>();
  readonly #range: Promise<PortRange>;

  constructor(
    range: PortRange | Promise<PortRange>,
    private readonly random: () => number = Math.random,
  ) {
    this.#range = Promise.resolve(range);
    this.#range.catch(() => {}); // reported by take()
  }

  range(): Promise<PortRange> {
    return this.#range;
  }

  /** A free port of the range on `host`, held until released. */
  async take(host: string): Promise<number> {
    const range = await this.#range;
    const refused = new Set<number>();
    for (let attempt = 0; attempt < 32; attempt++) {
      const [port] = drawPorts(1, range, this.random, (p) => this.#held.has(p) || refused.has(p));
      this.#held.add(port!);
      const code = await portBindError(host, port!);
      if (code === undefined) return port!;
      this.#held.delete(port!);
      if (code !== 'EADDRINUSE' && code !== 'EACCES') throw new Error(`cannot bind ${host}:${port}: ${code}`);
      refused.add(port!);
    }
    throw new Error(`no free port in the engine port range ${range[0]}-${range[1]} on ${host} after 32 tries`);
  }

  /**
   * An engine's port, held until released: a free one of the range for 0, else the one asked for
   * (an MLX ring rank's, chosen by the coordinator) once no engine of ours holds it and a bind
   * shows it free. FAILED_PRECONDITION otherwise.
   */
  async claim(host: string, port: number): Promise<number> {
    if (port === 0) {
      return this.take(host).catch((err: unknown) => {
        throw new EngineRequestError('FAILED_PRECONDITION', `cannot bind ${host}: ${errorMessage(err)}`);
      });
    }
    if (this.#held.has(port)) throw new EngineRequestError('FAILED_PRECONDITION', `port ${port} on ${host} is already in use by an engine of this node`);
    this.#held.add(port);
    const code = await portBindError(host, port);
    if (code === undefined) return port;
    this.#held.delete(port);
    if (code === 'EADDRINUSE') throw new EngineRequestError('FAILED_PRECONDITION', `port ${port} on ${host} is already in use`);
    throw new EngineRequestError('FAILED_PRECONDITION', `cannot bind ${host}:${port} (${code})`);
  }

  release(port: number): void {
    this.#held.delete(port);
  }
}

/** An engine died before it was ready and the port it was handed is bound by someone else now. */
export class PortTakenError extends EngineRequestError {
  constructor(
    readonly port: number,
    host: string,
    message: string,
  ) {
    super('FAILED_PRECONDITION', `${message} (port ${port} on ${host} is already in use)`);
  }
}

/**
 * What to throw for an engine that died before it was ready on `port`: PortTakenError when another
 * process holds that port now (it took it between our check and the engine's bind), else `err`.
 */
export async function portTakenOr(err: unknown, host: string, port: number): Promise<unknown> {
  return (await portBindError(host, port)) === 'EADDRINUSE' ? new PortTakenError(port, host, errorMessage(err)) : err;
}

/**
 * Start an engine on ports the allocator picks; when another process took one of them before the
 * engine bound it (PortTakenError), start it once more on fresh ones. Once: a second loss in a row
 * is not a race but a full range or a misbehaving neighbour, for the caller to report.
 */
export async function onceMoreIfPortTaken<T>(start: () => Promise<T>, onRetry?: (err: PortTakenError) => void): Promise<T> {
  try {
    return await start();
  } catch (err) {
    if (!(err instanceof PortTakenError)) throw err;
    onRetry?.(err);
    return start();
  }
}

/** Resolve with a currently free TCP port on `host` (port 0: from the ephemeral range). */
export function pickFreePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen({ host, port: 0, exclusive: true }, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error('no port assigned'))));
    });
  });
}

/**
 * Whether `port` on `host` can be bound right now. Resolves to the errno code when it cannot
 * (EADDRINUSE, EADDRNOTAVAIL, EACCES), undefined when free.
 */
export function portBindError(host: string, port: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.unref();
    srv.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'EUNKNOWN'));
    srv.listen({ host, port, exclusive: true }, () => srv.close(() => resolve(undefined)));
  });
}

/**
 * Whether process `pid` holds a listening TCP socket on `port` (any port when undefined): its
 * socket inodes against the kernel's table on Linux (/proc), lsof on macOS; undefined where it
 * cannot be told. A connect only shows that SOMETHING accepts there — another process that took
 * an engine's port before the engine bound it accepts too.
 */
export async function listensOn(pid: number, port?: number): Promise<boolean | undefined> {
  if (process.platform === 'darwin') {
    const args = ['-nP', '-a', '-p', String(pid), `-iTCP${port === undefined ? '' : `:${port}`}`, '-sTCP:LISTEN', '-t'];
    const out = await promisify(execFile)('lsof', args).catch((err: { code?: unknown; stdout?: string }) => (err.code === 1 ? { stdout: '' } : undefined));
    return out === undefined ? undefined : out.stdout.trim() !== '';
  }
  if (process.platform !== 'linux') return undefined;
  let fds: string[];
  try {
    fds = await readdir(`/proc/${pid}/fd`);
  } catch (err) {
    // Gone: it listens nowhere. Not ours to read (hidepid, another user): cannot tell.
    return (err as NodeJS.ErrnoException).code === 'ENOENT' ? false : undefined;
  }
  const inodes = new Set<string>();
  for (const fd of fds) {
    const m = /^socket:\[(\d+)\]$/.exec(await readlink(`/proc/${pid}/fd/${fd}`).catch(() => ''));
    if (m) inodes.add(m[1]!);
  }
  for (const table of ['tcp', 'tcp6']) {
    const rows = (await readFile(`/proc/${pid}/net/${table}`, 'utf8').catch(() => '')).split('\n').slice(1);
    for (const row of rows) {
      // sl local_address rem_address st … inode: local "ADDR:PORT" (hex), st 0A = LISTEN
      const f = row.trim().split(/\s+/);
      if (f[3] !== '0A' || !inodes.has(f[9] ?? '')) continue;
      if (port === undefined || Number.parseInt(f[1]?.split(':')[1] ?? '', 16) === port) return true;
    }
  }
  return false;
}

/** One TCP connect attempt; true when something accepts on host:port. */
export function canConnect(host: string, port: number, timeoutMs = 1000): Promise<boolean> {
  return acceptsConnection({ host, port }, timeoutMs);
}

/** Whether a Unix-domain socket at `path` accepts a connection (closed at once). */
export function canConnectSocket(path: string, timeoutMs = 1000): Promise<boolean> {
  return acceptsConnection({ path }, timeoutMs);
}

function acceptsConnection(to: { host: string; port: number } | { path: string }, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect(to);
    const done = (ok: boolean) => {
      sock.removeAllListeners();
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}
