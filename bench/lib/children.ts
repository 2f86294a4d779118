/**
 * The benches' own child processes (engines, relays, a worker): each in its own process group,
 * killed as a group on every way out — a normal exit, an error, and a SIGKILL of the bench, which
 * no handler sees: every child is registered with the agents' sentinel (src/node/watchdog.ts),
 * which ends it when this process's pipe to it closes. One helper for bench:tunnel,
 * bench:tunnel-relays, bench:memory, bench:split-prefill and the plan → device test.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { connect, createServer } from 'node:net';
import { EngineWatchdog } from '../../src/node/watchdog.ts';

const live = new Set<ChildProcess>();
/** Created on first use, so importing this module starts no process. */
let watchdog: EngineWatchdog | undefined;

/** Register a child spawned elsewhere (its own group, `detached: true`): killed with the rest. */
export function track(proc: ChildProcess): ChildProcess {
  live.add(proc);
  const pid = proc.pid;
  if (pid !== undefined) {
    watchdog ??= new EngineWatchdog({ graceTicks: 5 });
    watchdog.add(pid);
  }
  proc.once('exit', () => {
    live.delete(proc);
    if (pid !== undefined) watchdog?.remove(pid);
  });
  return proc;
}

/** SIGKILL every live child's group now and retire the sentinel. */
export function killAll(): void {
  for (const c of live) {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL');
    } catch {
      // already gone
    }
    if (c.pid) watchdog?.remove(c.pid);
  }
  live.clear();
  watchdog?.close();
  watchdog = undefined;
}
process.on('exit', killAll);

export interface Started {
  readonly proc: ChildProcess;
  /** Its stdout and stderr so far (the last `logBytes`, when bounded). */
  readonly log: () => string;
  readonly exited: Promise<number | null>;
}

/** Start `cmd` in its own process group, tracked; `env` is added to this process's environment. */
export function start(cmd: string, args: readonly string[], o: { readonly env?: Record<string, string>; readonly logBytes?: number } = {}): Started {
  const proc = track(spawn(cmd, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...o.env } }));
  let log = '';
  const keep = (d: Buffer) => {
    log += d.toString();
    if (o.logBytes !== undefined && log.length > o.logBytes) log = log.slice(-o.logBytes);
  };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  return { proc, log: () => log, exited };
}

/** SIGKILL the child's group and wait until it has exited. */
export async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null || !proc.pid) return;
  const gone = new Promise<void>((r) => proc.once('exit', () => r()));
  try {
    process.kill(-proc.pid, 'SIGKILL');
  } catch {
    // already gone
  }
  await gone;
}

/** A port that was free a moment ago (bound to 0 and released): the benches' engines take it. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

/** ggml-rpc-server's stdout is block-buffered when piped, so readiness = the port accepts (on `host`). */
export async function waitPort(port: number, proc: ChildProcess, log: () => string, ms = 60_000, host = '127.0.0.1'): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${proc.spawnfile} exited: ${log().slice(-2000)}`);
    const ok = await new Promise<boolean>((r) => {
      const s = connect(port, host);
      s.once('connect', () => {
        s.destroy();
        r(true);
      });
      s.once('error', () => r(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${proc.spawnfile} not listening on ${host}:${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
