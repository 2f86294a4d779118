/**
 * bench:tunnel's native controls: the same two relay hops as the agents' tunnel (a head-side end,
 * a worker-side end, each its own process), done by C programs instead of Node. `socat` relays
 * plain TCP (the hops' floor without TLS); `stunnel` relays TLS 1.3 with mutual certificates of
 * the same cluster CA (what a native TLS relay costs). If a native pair meets the goals where the
 * Node pair does not, Node is the gap; if even socat misses them, the two extra processes on a
 * saturated machine are. Used when socat, stunnel and Go are all installed (bench:tunnel runs them with `--controls`).
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { NodeCredentials } from '../../src/shared/pki/store.ts';
import { track } from './children.ts';

export interface NativeRelay {
  /** The head-side end: where llama-server's `--rpc` points. */
  readonly port: number;
  /** Worker end first, then head end: their ports (to wait for) and processes (CPU accounting). */
  readonly ends: readonly { readonly port: number; readonly proc: ChildProcess }[];
  close(): void;
}

export function nativeRelaysInstalled(): boolean {
  const has = (cmd: string) => {
    try {
      execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  };
  return has('socat') && has('stunnel') && has('go');
}

/**
 * CPU seconds (user + system, plus reaped children: socat forks one relay per connection) a
 * process has used so far, from /proc (Linux; 0 elsewhere). Clock ticks are 100 per second on Linux.
 */
export function processCpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return [11, 12, 13, 14].reduce((sum, i) => sum + Number(fields[i]), 0) / 100;
  } catch {
    return 0;
  }
}

function run(cmd: string, args: string[]): ChildProcess {
  const proc = track(spawn(cmd, args, { detached: true, stdio: ['ignore', 'ignore', 'pipe'] }));
  proc.stderr?.on('data', (d: Buffer) => process.stderr.write(`${cmd}: ${d}`));
  return proc;
}

function pair([head, worker]: [number, number], w: ChildProcess, h: ChildProcess): NativeRelay {
  return {
    port: head,
    ends: [
      { port: worker, proc: w },
      { port: head, proc: h },
    ],
    close: () => {
      for (const p of [h, w]) p.kill('SIGKILL');
    },
  };
}

/** socat head end → socat worker end → target, one forked relay per connection, TCP_NODELAY both ways. */
export function startSocatRelay(targetPort: number, ports: [number, number]): NativeRelay {
  const [head, worker] = ports;
  const hop = (listen: number, to: number) => run('socat', [`TCP-LISTEN:${listen},bind=127.0.0.1,reuseaddr,fork,nodelay`, `TCP:127.0.0.1:${to},nodelay`]);
  return pair(ports, hop(worker, targetPort), hop(head, worker));
}

/**
 * stunnel client (head) → stunnel server (worker) → target. TLS 1.3 only, both ends present a
 * cluster certificate and require the peer's to chain to the cluster CA (verifyChain). Keys go to
 * 0600 files in `dir`, never argv. What stunnel cannot do that the agent does: check the peer's
 * role and id (our identity is a URI SAN; stunnel checks host names, e-mails and IPs only) and
 * refuse a revoked peer — a bench control for cost, not a product relay.
 */
export async function startStunnelRelay(
  targetPort: number,
  ports: [number, number],
  creds: { head: NodeCredentials; worker: NodeCredentials },
  dir: string,
): Promise<NativeRelay> {
  const [head, worker] = ports;
  const end = async (name: 'head' | 'worker', accept: number, connect: number) => {
    const c = creds[name];
    const file = (f: string) => join(dir, `stunnel-${name}.${f}`);
    await writeFile(file('key'), c.keyPem, { mode: 0o600 });
    await writeFile(file('crt'), c.certPem);
    await writeFile(file('ca'), c.caCertPem);
    const conf = [
      'foreground = yes',
      'pid =',
      'syslog = no',
      'debug = 2', // errors only: the bench's readiness probes are bare TCP connects
      'socket = l:TCP_NODELAY=1',
      'socket = r:TCP_NODELAY=1',
      `[${name}]`,
      `client = ${name === 'head' ? 'yes' : 'no'}`,
      `accept = 127.0.0.1:${accept}`,
      `connect = 127.0.0.1:${connect}`,
      `cert = ${file('crt')}`,
      `key = ${file('key')}`,
      `CAfile = ${file('ca')}`,
      'verifyChain = yes',
      'sslVersionMin = TLSv1.3',
      'sslVersionMax = TLSv1.3',
    ];
    await writeFile(file('conf'), `${conf.join('\n')}\n`, { mode: 0o600 });
    return run('stunnel', [file('conf')]);
  };
  return pair(ports, await end('worker', worker, targetPort), await end('head', head, worker));
}

const GO_RELAY_DIR = new URL('../../native/tunnel-relay/', import.meta.url).pathname;

/**
 * Build the agents' Go relay (native/tunnel-relay) into `dir`; undefined when there is no Go
 * toolchain. Unlike stunnel it keeps the agents' checks: role and id from the URI SAN, revocation,
 * registered engine ports only — and speaks their preamble, so it can face a Node end.
 */
export function buildGoRelay(dir: string): string | undefined {
  const out = join(dir, 'tunnel-relay');
  try {
    execFileSync('go', ['build', '-o', out, '.'], { cwd: GO_RELAY_DIR, stdio: ['ignore', 'ignore', 'pipe'] });
    return out;
  } catch {
    return undefined;
  }
}

async function goEnd(binary: string, config: object): Promise<{ port: number; proc: ChildProcess }> {
  const proc = track(spawn(binary, [], { detached: true, stdio: ['pipe', 'pipe', 'pipe'] }));
  proc.stderr?.on('data', (d: Buffer) => process.stderr.write(`tunnel-relay: ${d}`));
  proc.stdin?.write(`${JSON.stringify(config)}\n`); // keys on stdin, never argv
  // the first line is the port; later ones (counters) are read and dropped, so the pipe never fills
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: proc.stdout! }).once('line', resolve);
    proc.once('exit', (code) => reject(new Error(`tunnel-relay exited (${code})`)));
  });
  return { port: (JSON.parse(line) as { port: number }).port, proc };
}

/** Go worker end (listen, forwards to `targetPort` only) ← Go head end (forward, expects node `worker`). */
export async function startGoRelay(targetPort: number, creds: { head: NodeCredentials; worker: NodeCredentials }, binary: string): Promise<NativeRelay> {
  const pem = (c: NodeCredentials) => ({ certPem: c.certPem, keyPem: c.keyPem, caPem: c.caCertPem });
  const w = await goEnd(binary, { mode: 'listen', listen: '127.0.0.1:0', enginePorts: [targetPort], ...pem(creds.worker) });
  const remote = `127.0.0.1:${w.port}`;
  const h = await goEnd(binary, { mode: 'forward', listen: '127.0.0.1:0', remote, enginePort: targetPort, expectId: 'worker', ...pem(creds.head) });
  return pair([h.port, w.port], w.proc, h.proc);
}
