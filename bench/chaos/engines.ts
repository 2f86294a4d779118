import { execFileSync } from 'node:child_process';

/**
 * Engine processes seen from the process table: an agent's engines are its descendants (in their
 * own process groups), so a pid set per agent tells a reload (new pids) and an orphan (an engine
 * left running that no stage accounts for) apart.
 */
interface Row {
  readonly pid: number;
  readonly ppid: number;
  readonly comm: string;
}

function processTable(): Row[] {
  return execFileSync('ps', ['-eo', 'pid=,ppid=,comm='], { encoding: 'utf8' })
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .map(([pid, ppid, comm]) => ({ pid: Number(pid), ppid: Number(ppid), comm: comm ?? '' }));
}

/** Every descendant of `pid` (children, their children, …). */
export function descendants(pid: number): { pid: number; comm: string }[] {
  const table = processTable();
  const out: Row[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    const p = queue.shift()!;
    for (const row of table) {
      if (row.ppid !== p) continue;
      out.push(row);
      queue.push(row.pid);
    }
  }
  return out;
}

const isEngine = (comm: string) => /llama-server|rpc-server/.test(comm);

/** The engine pids under these agents. */
export function enginePids(agentPids: readonly number[]): number[] {
  return agentPids.flatMap((p) => descendants(p)).filter((d) => isEngine(d.comm)).map((d) => d.pid).sort((a, b) => a - b);
}

/** SIGSTOP/SIGCONT/SIGKILL to a list of pids that may have exited meanwhile. */
export function signalAll(pids: readonly number[], sig: NodeJS.Signals): void {
  for (const p of pids) {
    try {
      process.kill(p, sig);
    } catch {
      // gone already
    }
  }
}
