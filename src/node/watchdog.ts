import { type ChildProcess, spawn } from 'node:child_process';
import type { Logger } from '../shared/log.ts';

/**
 * Engines must never outlive the agent, not even when the agent is SIGKILLed. Linux has
 * PR_SET_PDEATHSIG but Node cannot set it, and macOS has no equivalent; so the agent keeps one
 * tiny `/bin/sh` sentinel per agent whose stdin is a pipe from the agent. The agent tells it
 * which engine pids are alive ("+pid" / "-pid" lines). When the agent dies for any reason the
 * kernel closes the pipe, `read` sees EOF, and the sentinel sends SIGTERM to every engine still
 * listed, then SIGKILL after a grace period. POSIX sh only: the same script runs on macOS.
 *
 * Why a separate sentinel instead of wrapping each engine in `sh`: the agent stays the engine's
 * real parent, so it gets the true exit code/signal and the engine's own stderr, and the pid it
 * reports is the engine's.
 *
 * The sentinel runs in its own process group (as do the engines), so a signal to the agent's
 * group — Ctrl-C on the terminal, `kill -9 -PGID` — reaches neither; it also ignores
 * SIGINT/SIGHUP for good measure.
 */
export const WATCHDOG_SCRIPT = `
trap '' INT HUP
grace="$1"
pids=""
while IFS= read -r line; do
  case "$line" in
    +*) pids="$pids \${line#+}" ;;
    -*) p="\${line#-}"; keep=""; for q in $pids; do [ "$q" = "$p" ] || keep="$keep $q"; done; pids="$keep" ;;
  esac
done
[ -z "$pids" ] && exit 0
kill -TERM $pids 2>/dev/null
i=0
while [ "$i" -lt "$grace" ]; do
  alive=""
  for q in $pids; do kill -0 "$q" 2>/dev/null && alive="$alive $q"; done
  [ -z "$alive" ] && exit 0
  sleep 0.2 2>/dev/null || sleep 1
  i=$((i + 1))
done
kill -KILL $pids 2>/dev/null
exit 0
`;

export interface WatchdogOptions {
  /** Grace between TERM and KILL once the agent is gone, in 0.2 s steps (default 10 = 2 s). */
  readonly graceTicks?: number;
  readonly log?: Logger;
}

export class EngineWatchdog {
  private child: ChildProcess | undefined;
  private readonly pids = new Set<number>();
  private closed = false;

  constructor(private readonly options: WatchdogOptions = {}) {
    this.spawn();
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Register an engine the sentinel must kill if the agent dies. */
  add(pid: number): void {
    this.pids.add(pid);
    this.send(`+${pid}\n`);
  }

  /** The engine exited (or was reaped): forget it so a recycled pid is never signalled. */
  remove(pid: number): void {
    this.pids.delete(pid);
    this.send(`-${pid}\n`);
  }

  /** Orderly shutdown: engines were already stopped; close the pipe so the sentinel exits. */
  close(): void {
    this.closed = true;
    this.child?.stdin?.end();
  }

  private send(line: string): void {
    const stdin = this.child?.stdin;
    if (stdin && !stdin.destroyed && !stdin.writableEnded) stdin.write(line);
  }

  private spawn(): void {
    const child = spawn('/bin/sh', ['-c', WATCHDOG_SCRIPT, 'orchard-engine-watchdog', String(this.options.graceTicks ?? 10)], {
      stdio: ['pipe', 'ignore', 'ignore'],
      // Own process group, so killing the agent's whole group (kill -9 -PGID, a service
      // manager) cannot take the sentinel down with it.
      detached: true,
    });
    this.child = child;
    child.stdin?.on('error', () => {}); // EPIPE if it died; the exit handler respawns it
    // The sentinel must not keep the agent's event loop alive on its own.
    child.unref();
    (child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
    child.on('exit', (code, signal) => {
      if (this.closed) return;
      // Someone killed the sentinel: start a new one and hand it the live engines, so the
      // guarantee holds for the rest of the agent's life.
      this.options.log?.warn({ code, signal }, 'engine watchdog exited; restarting it');
      this.spawn();
      for (const pid of this.pids) this.send(`+${pid}\n`);
    });
  }
}
