import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
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
  for (const f of ['go.mod', 'main.go']) hash.update(readFileSync(join(TUNNEL_RELAY_SOURCE, f)));
  return join(cacheRoot(env, process.platform, homedir()), 'tunnel-relay', hash.digest('hex').slice(0, 16), 'orchard-tunnel-relay');
}

const Line = z.union([
  z.strictObject({ port: z.number().int() }),
  z.strictObject({ error: z.string() }),
  z.strictObject({ toEngine: z.number(), fromEngine: z.number(), connections: z.number(), resumed: z.number() }),
]);

export async function startNativeForwarder(binary: string, o: TunnelForwarderOptions): Promise<TunnelForwarder> {
  const proc: ChildProcess = spawn(binary, [], { stdio: ['pipe', 'pipe', 'inherit'] });
  const bytes: TunnelBytes = { toEngine: 0, fromEngine: 0 };
  let connections = 0;
  let resumed = 0;
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  const port = new Promise<number>((resolve, reject) => {
    proc.once('error', reject);
    void exited.then(() => reject(new Error(`tunnel relay ${binary} exited before it listened`)));
    createInterface({ input: proc.stdout! }).on('line', (text) => {
      let line: z.infer<typeof Line>;
      try {
        line = Line.parse(JSON.parse(text));
      } catch {
        return;
      }
      if ('port' in line) resolve(line.port);
      else if ('error' in line) o.onError?.(line.error);
      else {
        Object.assign(bytes, { toEngine: line.toEngine, fromEngine: line.fromEngine });
        [connections, resumed] = [line.connections, line.resumed];
      }
    });
  });
  const c = o.credentials;
  proc.stdin?.write(
    `${JSON.stringify({
      mode: 'forward',
      listen: `127.0.0.1:${o.localPort ?? 0}`,
      remote: `${o.remote.host}:${o.remote.port}`,
      enginePort: o.enginePort,
      expectId: o.expectPeer.id ?? '',
      waitForEngineMs: o.waitForEngineMs ?? 0,
      certPem: c.certPem,
      keyPem: c.keyPem,
      caPem: c.caCertPem,
    })}\n`,
  );
  try {
    return {
      port: await port,
      bytes,
      ...(proc.pid ? { pid: proc.pid } : {}),
      connections: () => connections,
      resumed: () => resumed,
      // stdin's end makes the relay report its final counters and exit
      close: async () => {
        proc.stdin?.end();
        const timer = setTimeout(() => proc.kill('SIGKILL'), 2000);
        await exited;
        clearTimeout(timer);
      },
    };
  } catch (err) {
    proc.kill('SIGKILL');
    throw err;
  }
}
