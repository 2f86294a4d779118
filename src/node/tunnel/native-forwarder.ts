import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { cacheRoot } from '../../shared/cache-dir.ts';
import type { TunnelForwarder, TunnelForwarderOptions } from './forwarder.ts';
import type { TunnelBytes } from './relay.ts';

/**
 * The head side of a tunnel in native code (native/tunnel-relay, Go): bench:tunnel measured the
 * Node forwarder's TLS path at about twice the CPU and half the throughput of a native TLS relay,
 * which on a loaded machine doubles a model load's time. Same wire, same checks as
 * startTunnelForwarder: TLS 1.3 only, the worker's certificate must chain to the cluster CA and
 * name the expected node, the preamble names the engine port, a pending refusal is retried for
 * waitForEngineMs. The credentials travel on the relay's stdin (never argv, never a file), and the
 * relay exits when its stdin closes, so it never outlives the agent.
 */
export const TUNNEL_RELAY_ENV = 'ORCHARD_TUNNEL_RELAY';

/**
 * The relay binary the agent uses: ORCHARD_TUNNEL_RELAY (a path, or `node` for the Node relay),
 * else what `orchard setup` built into the cache; undefined = the Node relay.
 */
export function findTunnelRelay(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const choice = env[TUNNEL_RELAY_ENV];
  if (choice === 'node') return undefined;
  if (choice) return choice;
  try {
    const built = tunnelRelayPath(env);
    return existsSync(built) ? built : undefined;
  } catch {
    return undefined; // no relay source next to this code (a trimmed install): the Node relay
  }
}

/** The relay's Go source, shipped with Orchard; `orchard setup` builds it when Go is installed. */
export const TUNNEL_RELAY_SOURCE = fileURLToPath(new URL('../../../native/tunnel-relay/', import.meta.url));

/** Where `orchard setup` puts the relay built from this source: keyed by its hash, so an update rebuilds. */
export function tunnelRelayPath(env: NodeJS.ProcessEnv = process.env): string {
  const hash = createHash('sha256');
  const files = readdirSync(TUNNEL_RELAY_SOURCE).filter((f) => f === 'go.mod' || f.endsWith('.go'));
  for (const f of files.sort()) hash.update(f).update('\0').update(readFileSync(join(TUNNEL_RELAY_SOURCE, f)));
  return join(cacheRoot(env, process.platform, homedir()), 'tunnel-relay', hash.digest('hex').slice(0, 16), 'orchard-tunnel-relay');
}

/** One running relay process: its port, and its end (stdout read to the last line). */
export interface RelayProcess {
  readonly proc: ChildProcess;
  readonly port: number;
  readonly closed: Promise<void>;
  /** One command line on its stdin (dropped once it is gone: its state is rebuilt at a restart). */
  send(command: object): void;
  /** End stdin (the relay reports its final counters and exits); SIGKILL after 2 s. */
  close(): Promise<void>;
}

/**
 * Start the relay with `config` (credentials included) as its first stdin line, never argv;
 * every stdout line after the port goes to `onLine` as parsed JSON.
 */
export async function spawnRelay(binary: string, config: object, onLine: (line: unknown) => void): Promise<RelayProcess> {
  const proc: ChildProcess = spawn(binary, [], { stdio: ['pipe', 'pipe', 'inherit'] });
  proc.stdin?.on('error', () => {}); // EPIPE once it died: reported by 'close'
  // 'close', not 'exit': the final counters may still be in the pipe when the process is gone
  const closed = new Promise<void>((resolve) => proc.once('close', () => resolve()));
  const port = new Promise<number>((resolve, reject) => {
    proc.once('error', reject);
    void closed.then(() => reject(new Error(`tunnel relay ${binary} exited before it listened`)));
    createInterface({ input: proc.stdout! }).on('line', (text) => {
      let line: unknown;
      try {
        line = JSON.parse(text);
      } catch {
        return;
      }
      const first = z.strictObject({ port: z.number().int() }).safeParse(line);
      if (first.success) resolve(first.data.port);
      else onLine(line);
    });
  });
  proc.stdin?.write(`${JSON.stringify(config)}\n`);
  try {
    return {
      proc,
      port: await port,
      closed,
      send: (command) => {
        if (proc.exitCode === null && proc.signalCode === null && proc.stdin?.writable) proc.stdin.write(`${JSON.stringify(command)}\n`);
      },
      close: async () => {
        proc.stdin?.end();
        const timer = setTimeout(() => proc.kill('SIGKILL'), 2000);
        await closed;
        clearTimeout(timer);
      },
    };
  } catch (err) {
    proc.kill('SIGKILL');
    throw err;
  }
}

/** The relay's TCP address for a host (an IPv6 literal in brackets). */
export const relayAddress = (host: string, port: number): string => (host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`);

const Line = z.union([z.strictObject({ error: z.string() }), z.strictObject({ toEngine: z.number(), fromEngine: z.number(), connections: z.number(), resumed: z.number() })]);

export async function startNativeForwarder(binary: string, o: TunnelForwarderOptions): Promise<TunnelForwarder> {
  const bytes: TunnelBytes = { toEngine: 0, fromEngine: 0 };
  let connections = 0;
  let resumed = 0;
  const c = o.credentials;
  const config = {
    mode: 'forward',
    listen: o.localSocket !== undefined ? `unix:${o.localSocket}` : relayAddress('127.0.0.1', o.localPort ?? 0),
    remote: relayAddress(o.remote.host, o.remote.port),
    enginePort: o.enginePort,
    expectId: o.expectPeer.id ?? '',
    waitForEngineMs: o.waitForEngineMs ?? 0,
    certPem: c.certPem,
    keyPem: c.keyPem,
    caPem: c.caCertPem,
  };
  const relay = await spawnRelay(binary, config, (raw) => {
    const line = Line.safeParse(raw);
    if (!line.success) return;
    if ('error' in line.data) o.onError?.(line.data.error);
    else {
      Object.assign(bytes, { toEngine: line.data.toEngine, fromEngine: line.data.fromEngine });
      [connections, resumed] = [line.data.connections, line.data.resumed];
    }
  });
  return {
    port: relay.port,
    ...(o.localSocket !== undefined ? { socket: o.localSocket } : {}),
    bytes,
    ...(relay.proc.pid ? { pid: relay.proc.pid } : {}),
    connections: () => connections,
    resumed: () => resumed,
    // stdin's end makes the relay report its final counters and exit (leaving its socket file)
    close: () => relay.close().then(() => (o.localSocket !== undefined ? rm(o.localSocket, { force: true }) : undefined)),
  };
}
