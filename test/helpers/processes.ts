import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { createServer, Socket } from 'node:net';
import { promisify } from 'node:util';
import { canConnectSocket } from '../../src/node/ports.ts';

/**
 * Real child processes for the cluster tests (coordinators, agents): spawned in their own
 * process group so a group kill reaches every engine an agent forked, even after the agent died.
 */
export interface Proc {
  readonly child: ChildProcess;
  readonly name: string;
  out: string;
  err: string;
  readonly exited: Promise<void>;
}

export const ORCHARD_BIN = new URL('../../bin/orchard.js', import.meta.url).pathname;

const execFileP = promisify(execFile);

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Every group spawnProc started that has not exited. The caller still registers each for its own
 * cleanup; this is the net for a hook that timed out before it could (vitest then goes on to
 * afterAll, which never heard of that process — an oracle llama-server outlived its file by an
 * hour): test/helpers/leftovers.ts kills what is left after each file's own afterAll.
 */
const live = new Set<ChildProcess>();

/** SIGKILL the process group of every spawnProc child still running; returns their names. */
export function killLeftovers(): string[] {
  const names: string[] = [];
  for (const c of live) {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL');
      names.push(c.spawnfile);
    } catch {
      // already gone
    }
  }
  live.clear();
  return names;
}

/** Spawn and capture output (stderr keeps its last ~1 MB). The caller registers it for cleanup. */
export function spawnProc(name: string, args: string[], env: NodeJS.ProcessEnv, file = process.execPath): Proc {
  const child = spawn(file, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env });
  live.add(child);
  const p: Proc = {
    child,
    name,
    out: '',
    err: '',
    exited: new Promise((r) =>
      child.once('exit', () => {
        live.delete(child);
        r();
      }),
    ),
  };
  child.stdout?.on('data', (c: Buffer) => {
    p.out += c.toString('utf8');
  });
  child.stderr?.on('data', (c: Buffer) => {
    p.err = (p.err + c.toString('utf8')).slice(-1_000_000);
  });
  return p;
}

export async function killGroup(p: Proc): Promise<void> {
  if (p.child.exitCode === null && p.child.signalCode === null && p.child.pid) {
    try {
      process.kill(-p.child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await p.exited;
}

/** The `{"event":"ready",…}` line `orchard node|coordinator --json` prints once listening. */
export async function readyLine(p: Proc, timeoutMs = 60_000): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const line = p.out.split('\n').find((l) => l.includes('"event":"ready"'));
    if (line) return JSON.parse(line) as Record<string, unknown>;
    if (p.child.exitCode !== null) throw new Error(`${p.name} exited early: ${p.err.slice(-2000)}`);
    await sleep(100);
  }
  throw new Error(`${p.name} not ready in time: ${p.err.slice(-2000)}`);
}

/** Run one `orchard …` command to completion. */
export async function orchard(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [ORCHARD_BIN, ...args], { env, maxBuffer: 32 * 2 ** 20 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: typeof err.code === 'number' ? err.code : 1, stdout: err.stdout, stderr: err.stderr };
  }
}

/** A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot take port 0). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const a = srv.address();
      srv.close(() => resolve(typeof a === 'object' && a ? a.port : 0));
    });
  });
}

/**
 * Processes whose environment holds `marker` (Linux /proc): what a test started, engines
 * included, since agents pass their environment on. "Nothing left" is checked this way rather
 * than by trusting the program's own report.
 */
export async function pidsWithMarker(marker: string): Promise<number[]> {
  const out: number[] = [];
  for (const d of await readdir('/proc')) {
    if (!/^\d+$/.test(d) || Number(d) === process.pid) continue;
    try {
      if ((await readFile(`/proc/${d}/environ`, 'latin1')).includes(marker)) out.push(Number(d));
    } catch {}
  }
  return out;
}

/** Whether a process still runs (a zombie awaiting its reaper does not count). */
export function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    if (existsSync('/proc/self')) return false;
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  }
}

/**
 * Whether the engine behind a stage endpoint as `orchard status` shows it accepts: `unix:<path>`
 * (an agent's rpc-server, engine-sockets.ts) or host:port.
 */
export function canConnectEndpoint(endpoint: string): Promise<boolean> {
  if (endpoint.startsWith('unix:')) return canConnectSocket(endpoint.slice('unix:'.length));
  const i = endpoint.lastIndexOf(':');
  return canConnect(endpoint.slice(0, i), Number(endpoint.slice(i + 1)));
}

/** Whether a TCP connect to host:port succeeds within 1 s (a refused or silent port: false). */
export function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = new Socket();
    s.setTimeout(1000);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
    s.once('timeout', () => {
      s.destroy();
      resolve(false);
    });
    s.connect(port, host);
  });
}

/** Engine processes (llama-server, rpc-server) that are children of `parent`, from /proc. */
export async function engineChildren(parent: number): Promise<number[]> {
  const out: number[] = [];
  for (const d of await readdir('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = await readFile(`/proc/${d}/stat`, 'utf8');
      const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === parent && /llama-server|rpc-server/.test(comm)) out.push(Number(d));
    } catch {}
  }
  return out.sort((a, b) => a - b);
}
