import type { Logger } from '../../shared/log.ts';
import { errorMessage } from '../../shared/errors.ts';
import { MlxGroup, MlxGroupError } from './group.ts';
import type { MlxRankSpec } from './rank-spec.ts';

/**
 * One MLX rank run by a node agent: the MlxGroup driver with `localRanks = [rank]`, seen from the
 * supervisor as an engine with two milestones — "starting" (imports done, about to listen/dial;
 * the coordinator starts rank N-1 only after every other rank got here) and "ready" (the whole
 * group loaded and passed its barrier). After either fails, or the group fails later, the rank is
 * dead and `exited` resolves with the reason; the coordinator restarts the whole group.
 */
export interface MlxRankEngineOptions {
  readonly engineId: string;
  readonly spec: MlxRankSpec;
  readonly python: string;
  /** Extra environment for the rank (the agent adds none). */
  readonly env?: Readonly<Record<string, string>>;
  readonly readyTimeoutMs: number;
  /** The agent's `<state dir>/run`: the group's launch files go there, not to the shared /tmp. */
  readonly workRoot?: string | undefined;
  readonly log: Logger;
  /** Watchdog hooks: the agent's sentinel kills the rank if the agent dies, even by SIGKILL. */
  readonly onPid: (pid: number) => void;
  readonly onPidGone: (pid: number) => void;
}

export interface MlxRankExit {
  readonly exitCode: number;
  readonly signal: string;
  readonly reason: string;
}

export class MlxRankEngine {
  readonly starting: Promise<void>;
  readonly ready: Promise<MlxGroup>;
  readonly exited: Promise<MlxRankExit>;
  pid = 0;
  /** Set once the rank is dead (failed start, failed group, or stopped). */
  failedReason: string | undefined;
  private group: MlxGroup | undefined;
  private stopRequested = false;
  private resolveExit: (e: MlxRankExit) => void = () => {};

  constructor(o: MlxRankEngineOptions) {
    let markStarting: () => void = () => {};
    this.starting = new Promise<void>((resolve) => {
      markStarting = resolve;
    });
    this.exited = new Promise<MlxRankExit>((resolve) => {
      this.resolveExit = resolve;
    });
    const { spec } = o;
    this.ready = MlxGroup.start({
      python: o.python,
      model: spec.modelDir,
      mode: spec.mode,
      ...(spec.split.length > 0 ? { split: [...spec.split] } : {}),
      ...(spec.launch ? { launch: spec.launch, localRanks: [spec.rank] } : {}),
      startupTimeoutMs: o.readyTimeoutMs,
      ...(o.workRoot ? { workRoot: o.workRoot } : {}),
      stallTimeoutMs: spec.stallTimeoutMs,
      env: { ...o.env },
      onRankStarting: () => markStarting(),
      onRankSpawned: (_rank, pid) => {
        this.pid = pid;
        o.onPid(pid);
      },
      onRankExited: (_rank, pid) => o.onPidGone(pid),
      log: o.log,
    }).then(
      (group) => {
        this.group = group;
        if (this.stopRequested) {
          void this.close();
          throw new MlxGroupError(`MLX rank ${spec.rank} (${o.engineId}) was stopped before it was ready`);
        }
        // A later failure (a peer lost, a stall, the rank died) ends this rank for good.
        group.onFailure((err) => this.finish(err));
        return group;
      },
      (err: unknown) => {
        this.finish(err);
        throw err;
      },
    );
    // "starting" never comes when start-up fails first; do not leave a waiter hanging.
    this.ready.catch(() => markStarting());
    this.ready.catch(() => {});
  }

  get running(): MlxGroup | undefined {
    return this.group?.failure ? undefined : this.group;
  }

  private finish(err: unknown): void {
    const reason = errorMessage(err);
    this.failedReason ??= reason;
    const signal = /signal (SIG[A-Z]+)/.exec(reason)?.[1] ?? '';
    const code = /exited \(code (-?\d+)\)/.exec(reason)?.[1];
    this.resolveExit({ exitCode: code !== undefined ? Number(code) : -1, signal, reason });
  }

  /** Kill the rank and wait until its process is gone. */
  async close(): Promise<void> {
    this.stopRequested = true;
    const group = this.group;
    if (group) {
      await group.close();
      this.resolveExit({ exitCode: -1, signal: 'SIGKILL', reason: 'stopped' });
    } else {
      // Still starting (MlxGroup.start has not returned the group yet): kill the process; the
      // driver sees the exit, fails the start and cleans up. If the start succeeds just now, the
      // then-branch above closes the group.
      if (this.pid > 0) {
        try {
          process.kill(-this.pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      await this.ready.catch(() => {});
      if (this.group) await (this.group as MlxGroup).close();
      this.resolveExit({ exitCode: -1, signal: 'SIGKILL', reason: 'stopped' });
    }
  }
}
