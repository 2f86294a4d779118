import { spawn } from 'node:child_process';
import { accessSync, constants, openSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { delimiter, join } from 'node:path';
import { z } from 'zod';
import { OrchardError } from '../../shared/errors.ts';
import { cacheRoot } from '../../shared/cache-dir.ts';
import { writeFileAtomic } from '../../shared/pki/files.ts';
import { processAlive } from '../../shared/process-alive.ts';

/**
 * A local `nats-server -js` the coordinator starts when no `--nats URL` is given and one is
 * installed: config and JetStream store in `<state dir>/nats/`, clients on 127.0.0.1. It runs in
 * its own process group and is recorded in `nats/server.json`, so it outlives a coordinator crash
 * with the cluster's state in it, and the restarted coordinator connects to the same server
 * instead of starting a second one on the same store. A clean shutdown stops it.
 *
 * Found as `$ORCHARD_NATS_SERVER`, `nats-server` on PATH, `~/go/bin/nats-server` (what
 * `orchard setup --nats` builds with `go install`), Orchard's cache `bin/` or `/usr/sbin` (Debian).
 */
export interface LocalNatsOptions {
  /** The coordinator's state dir; the server lives in `<stateDir>/nats/`. */
  readonly stateDir: string;
  readonly binary: string;
  readonly host?: string | undefined;
  /** Client port; 0 = any free port. */
  readonly port?: number | undefined;
  /** Server name (JetStream needs one per server in a cluster). */
  readonly serverName?: string | undefined;
  /** Clustering (JetStream replicas across servers): this server's route listener and its peers. */
  readonly cluster?: { readonly name: string; readonly port: number; readonly routes: readonly string[] } | undefined;
  readonly readyTimeoutMs?: number | undefined;
}

export interface LocalNats {
  readonly url: string;
  readonly pid: number;
  /** Whether this process started it (false: a running one from before was reused). */
  readonly started: boolean;
  /** SIGTERM and wait for the exit (a clean stop flushes JetStream). */
  stop(): Promise<void>;
}

const Recorded = z.object({ pid: z.number().int().positive(), url: z.string() });

export function findNatsServer(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const candidates = [
    env.ORCHARD_NATS_SERVER,
    ...(env.PATH ?? '').split(delimiter).filter(Boolean).map((d) => join(d, 'nats-server')),
    join(env.GOPATH ?? join(homedir(), 'go'), 'bin', 'nats-server'),
    join(cacheRoot(env, process.platform, homedir()), 'bin', 'nats-server'),
    // Debian's package installs it outside a normal user's PATH.
    '/usr/sbin/nats-server',
  ];
  for (const c of candidates) {
    if (!c) continue;
    try {
      accessSync(c, constants.X_OK);
      return c;
    } catch {}
  }
  return undefined;
}

function isNatsServer(pid: number): Promise<boolean> {
  return readFile(`/proc/${pid}/cmdline`, 'utf8').then(
    (c) => c.includes('nats-server'),
    () => {
      try {
        process.kill(pid, 0);
        return process.platform === 'darwin'; // no /proc: trust a live pid from our own record
      } catch {
        return false;
      }
    },
  );
}

function stopper(pid: number): () => Promise<void> {
  return async () => {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      return;
    }
    for (let i = 0; i < 100 && processAlive(pid); i++) await new Promise((r) => setTimeout(r, 50));
    if (processAlive(pid)) process.kill(pid, 'SIGKILL');
  };
}

/** The nats-server configuration this launcher writes (pure). */
export function natsConfig(o: LocalNatsOptions, dir: string): string {
  const lines = [
    `server_name: ${JSON.stringify(o.serverName ?? 'orchard')}`,
    `listen: ${JSON.stringify(`${o.host ?? '127.0.0.1'}:${o.port && o.port > 0 ? o.port : -1}`)}`,
    `jetstream { store_dir: ${JSON.stringify(join(dir, 'jetstream'))} }`,
  ];
  if (o.cluster) {
    lines.push(
      `cluster { name: ${JSON.stringify(o.cluster.name)}, listen: ${JSON.stringify(`${o.host ?? '127.0.0.1'}:${o.cluster.port}`)}, routes: [${o.cluster.routes.map((r) => JSON.stringify(r)).join(', ')}] }`,
    );
  }
  return `${lines.join('\n')}\n`;
}

/** Reuse the server a previous coordinator left running on this state dir, or start one. */
export async function startLocalNats(o: LocalNatsOptions): Promise<LocalNats> {
  const dir = join(o.stateDir, 'nats');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const recordPath = join(dir, 'server.json');
  const before = Recorded.safeParse(JSON.parse((await readFile(recordPath, 'utf8').catch(() => 'null')) || 'null'));
  if (before.success && (await isNatsServer(before.data.pid))) {
    return { url: before.data.url, pid: before.data.pid, started: false, stop: stopper(before.data.pid) };
  }
  const confPath = join(dir, 'server.conf');
  await writeFileAtomic(confPath, natsConfig(o, dir), 0o600);
  const logPath = join(dir, 'server.log');
  const logFd = openSync(logPath, 'w', 0o600);
  const child = spawn(o.binary, ['-c', confPath], { detached: true, stdio: ['ignore', logFd, logFd] });
  child.unref();
  const pid = child.pid;
  if (!pid) throw new OrchardError(`could not start ${o.binary}`);
  const url = await waitForListening(logPath, pid, o.readyTimeoutMs ?? 15_000);
  await writeFileAtomic(recordPath, `${JSON.stringify({ pid, url })}\n`, 0o600);
  return { url, pid, started: true, stop: stopper(pid) };
}

async function waitForListening(logPath: string, pid: number, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let log = '';
  while (Date.now() < deadline) {
    log = await readFile(logPath, 'utf8').catch(() => '');
    const m = /Listening for client connections on ([^\s]+)/.exec(log);
    if (m && log.includes('Server is ready')) return `nats://${m[1]}`;
    if (!processAlive(pid)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (processAlive(pid)) process.kill(pid, 'SIGKILL');
  throw new OrchardError(`nats-server did not become ready: ${log.trim().split('\n').slice(-3).join(' | ') || 'no output'} (log: ${logPath})`);
}
