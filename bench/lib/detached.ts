/**
 * bench:tunnel's child processes: each in its own process group (detached), killed as a group on
 * every way out, so a bench never leaves an engine or a relay behind.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { connect } from 'node:net';

export const procs = new Set<ChildProcess>();

export function killAll(): void {
  for (const c of procs) {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  procs.clear();
}
process.on('exit', killAll);
process.on('SIGINT', () => {
  killAll();
  process.exit(130);
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** An engine (TCP transport only: RDMA would bypass the relays under test), its last 20 kB of output kept. */
export function start(cmd: string, args: string[], env: Record<string, string> = {}): { proc: ChildProcess; log: () => string } {
  const proc = spawn(cmd, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, GGML_RPC_NO_RDMA: '1', ...env } });
  procs.add(proc);
  proc.once('exit', () => procs.delete(proc));
  let log = '';
  const keep = (d: Buffer) => {
    log = (log + d.toString()).slice(-20_000);
  };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
  return { proc, log: () => log };
}

export async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null || !proc.pid) return;
  const gone = new Promise<void>((r) => proc.once('exit', () => r()));
  process.kill(-proc.pid, 'SIGKILL');
  await gone;
}

/** ggml-rpc-server's stdout is block-buffered when piped, so readiness = the port accepts. */
export async function waitPort(port: number, proc: ChildProcess, log: () => string): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${proc.spawnfile} exited: ${log().slice(-2000)}`);
    const ok = await new Promise<boolean>((r) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        r(true);
      });
      s.once('error', () => r(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${proc.spawnfile} not listening on ${port}`);
    await sleep(50);
  }
}
