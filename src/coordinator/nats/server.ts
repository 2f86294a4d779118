import { execFileSync, spawn } from 'node:child_process';
import { accessSync, closeSync, constants, openSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { delimiter, join, relative } from 'node:path';
import { OrchardError } from '../../shared/errors.ts';
import { cacheRoot } from '../../shared/cache-dir.ts';
import { writeFileAtomic } from '../../shared/pki/files.ts';
import { processAlive } from '../../shared/process-alive.ts';
import { type NatsTlsFiles, natsTlsBlock } from './auth.ts';

/**
 * A local `nats-server -js` the coordinator starts when no `--nats URL` is given and one is
 * installed: config and JetStream store in `<state dir>/nats/`, clients on 127.0.0.1. It lives
 * exactly as long as the coordinator: a `/bin/sh` keeper in its own process group (so Ctrl-C on
 * the terminal reaches only the coordinator, which then unloads and writes its last state before
 * it stops the server) holds a pipe from the coordinator and stops the server with SIGTERM — a
 * clean JetStream shutdown — when the pipe closes, whatever ended the coordinator (SIGKILL
 * included). The store survives on disk: the next coordinator starts a server on it again.
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
  /** Client certificates from the cluster CA, mapped to users with permissions (auth.ts). */
  readonly auth?: { readonly tls: NatsTlsFiles; readonly authorization: string } | undefined;
  /** A configuration file to include, as an operator includes `orchard coordinator nats-config`'s for an external server. */
  readonly include?: string | undefined;
}

export interface LocalNats {
  readonly url: string;
  readonly pid: number;
  /** SIGTERM through the keeper and wait (a clean stop flushes JetStream). */
  stop(): Promise<void>;
  /** Rewrite the user list (auth.ts) and have the server reload it; resolves once it has. */
  reload(authorization: string): Promise<void>;
}

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

/** The nats-server configuration this launcher writes (pure). */
export function natsConfig(o: LocalNatsOptions, dir: string): string {
  const lines = [
    `server_name: ${JSON.stringify(o.serverName ?? 'orchard')}`,
    `listen: ${JSON.stringify(`${o.host ?? '127.0.0.1'}:${o.port && o.port > 0 ? o.port : -1}`)}`,
    `jetstream { store_dir: ${JSON.stringify(join(dir, 'jetstream'))} }`,
    `pid_file: ${JSON.stringify(join(dir, 'server.pid'))}`,
  ];
  if (o.auth) lines.push(natsTlsBlock(o.auth.tls), o.auth.authorization);
  // nats-server resolves an include against the including file's directory, absolute or not.
  if (o.include) lines.push(`include ${JSON.stringify(relative(dir, o.include))}`);
  if (o.cluster) {
    lines.push(
      `cluster { name: ${JSON.stringify(o.cluster.name)}, listen: ${JSON.stringify(`${o.host ?? '127.0.0.1'}:${o.cluster.port}`)}, routes: [${o.cluster.routes.map((r) => JSON.stringify(r)).join(', ')}] }`,
    );
  }
  return `${lines.join('\n')}\n`;
}

// $1 binary, $2 config. EOF on stdin = the coordinator is gone (or closed the pipe to stop it).
const KEEPER = `
trap '' INT HUP
"$1" -c "$2" &
pid=$!
read -r _
kill -TERM "$pid" 2>/dev/null
wait "$pid"
`;

/** Start the local server on the state dir's store; resolves once it accepts clients. */
export async function startLocalNats(o: LocalNatsOptions): Promise<LocalNats> {
  const dir = join(o.stateDir, 'nats');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await predecessorGone(join(dir, 'server.pid'), o.readyTimeoutMs ?? 15_000);
  const confPath = join(dir, 'server.conf');
  await writeFileAtomic(confPath, natsConfig(o, dir), 0o600);
  const logPath = join(dir, 'server.log');
  const logFd = openSync(logPath, 'w', 0o600);
  const keeper = spawn('/bin/sh', ['-c', KEEPER, 'orchard-nats-keeper', o.binary, confPath], { detached: true, stdio: ['pipe', logFd, logFd] });
  closeSync(logFd);
  const exited = new Promise<void>((r) => keeper.once('exit', () => r()));
  // The keeper must not hold the coordinator's event loop open, nor its pipe keep it from exiting.
  keeper.unref();
  (keeper.stdin as unknown as { unref?: () => void } | null)?.unref?.();
  const stop = async () => {
    keeper.stdin?.end();
    await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
    if (keeper.exitCode === null && keeper.pid) process.kill(-keeper.pid, 'SIGKILL');
  };
  let current = o;
  const reload = async (authorization: string) => {
    if (!current.auth) throw new OrchardError('this nats-server runs without client certificates: nothing to reload');
    current = { ...current, auth: { ...current.auth, authorization } };
    await writeFileAtomic(confPath, natsConfig(current, dir), 0o600);
    await signalReload(join(dir, 'server.pid'), logPath);
  };
  try {
    const url = await waitForListening(logPath, exited, o.readyTimeoutMs ?? 15_000);
    return { url, pid: keeper.pid ?? 0, stop, reload };
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * A coordinator killed a moment ago leaves its server shutting down (its keeper saw the pipe
 * close and sent SIGTERM): two servers on one JetStream store would corrupt it, so wait for
 * that one to finish. One still running after the wait belongs to a live coordinator.
 */
async function predecessorGone(pidFile: string, timeoutMs: number): Promise<void> {
  const pid = Number.parseInt(await readFile(pidFile, 'utf8').catch(() => ''), 10);
  if (!(pid > 0)) return;
  const deadline = Date.now() + timeoutMs;
  while (isNatsServer(pid)) {
    if (Date.now() > deadline) throw new OrchardError(`another nats-server (pid ${pid}) runs on this state dir's store: is another coordinator using ${pidFile.replace(/\/nats\/server\.pid$/, '')}?`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function isNatsServer(pid: number): boolean {
  if (!processAlive(pid)) return false;
  // The pid may have been reused by something else since: only a nats-server counts.
  try {
    return execFileSync('ps', ['-o', 'command=', '-p', String(pid)], { encoding: 'utf8' }).includes('nats-server');
  } catch {
    return false;
  }
}

const RELOADED = /Reloaded server configuration/g;

/** SIGHUP = reload the configuration file (nats-server's documented signal); wait for its log line. */
async function signalReload(pidFile: string, logPath: string): Promise<void> {
  const pid = Number.parseInt(await readFile(pidFile, 'utf8'), 10);
  const before = (await readFile(logPath, 'utf8')).match(RELOADED)?.length ?? 0;
  process.kill(pid, 'SIGHUP');
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const log = await readFile(logPath, 'utf8');
    if ((log.match(RELOADED)?.length ?? 0) > before) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new OrchardError(`nats-server (pid ${pid}) did not reload its configuration (log: ${logPath})`);
}

async function waitForListening(logPath: string, exited: Promise<void>, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let gone = false;
  void exited.then(() => {
    gone = true;
  });
  let log = '';
  while (Date.now() < deadline && !gone) {
    log = await readFile(logPath, 'utf8').catch(() => '');
    const m = /Listening for client connections on ([^\s]+)/.exec(log);
    if (m && log.includes('Server is ready')) return `nats://${m[1]}`;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new OrchardError(`nats-server did not become ready: ${log.trim().split('\n').slice(-3).join(' | ') || 'no output'} (log: ${logPath})`);
}
