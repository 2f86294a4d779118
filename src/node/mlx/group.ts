import { type ChildProcess, spawn } from 'node:child_process';
import { rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { OrchardError } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import { engineEnv } from '../engine-spec.ts';
import { startupFolder } from '../run-dir.ts';
import { mlxProcessEnv } from './env.ts';
import { launchFiles, launchSize, type MlxLaunch, type MlxMode, rankEnv, workerArgs } from './launch.ts';
import { TokenTextDecoder } from './token-text.ts';
import {
  cancelLine,
  type DoneMessage,
  type MemoryMessage,
  type MlxRequest,
  parseWorkerLine,
  type ReadyMessage,
  requestLine,
  type TokenMessage,
  type WorkerMessage,
} from './protocol.ts';

export const MLX_WORKER_SCRIPT = join(dirname(fileURLToPath(import.meta.url)), 'mlx_worker.py');

export interface MlxGroupOptions {
  /** The venv's Python (`MlxEnv.python`). */
  python: string;
  /** MLX model directory (config.json, safetensors, tokenizer). */
  model: string;
  mode: MlxMode;
  /**
   * Pipeline: layers per plan stage, first layers first. As in mlx-lm, stage s runs on rank
   * N-1-s, so rank 0 holds the last layers and the output: the head. Default: even split.
   */
  split?: number[];
  /** How the ranks connect; undefined = one process, no distributed env. */
  launch?: MlxLaunch;
  /**
   * The ranks this owner starts. Default: all of them (tests, single-host groups). A node agent
   * passes only its own ranks; every agent must then submit() the same requests to its ranks.
   */
  localRanks?: number[];
  /** Folder for the launch file; default a fresh start-up folder in `workRoot` (run-dir.ts), removed once every local rank is ready. */
  workDir?: string;
  /** Where the fresh folder goes (default the system temp dir; an agent gives its `<state dir>/run`). */
  workRoot?: string;
  /** Every local rank must report "ready" within this (default 120 s). */
  startupTimeoutMs?: number;
  /** During a request, rank 0 must emit something at least this often (default 30 s). */
  stallTimeoutMs?: number;
  /** Extra environment for the workers. */
  env?: Record<string, string>;
  /**
   * Called when a local rank has finished its imports and is about to listen/dial. Across
   * agents, the coordinator should start the agent holding rank N-1 only after every other
   * rank reported this (rank N-1 dials with ~31 s of retries; the others wait without limit).
   */
  onRankStarting?: (rank: number) => void;
  /** A local rank's process exists (pid known): register it with a watchdog right away. */
  onRankSpawned?: (rank: number, pid: number) => void;
  /** A local rank's process has exited (forget its pid so a recycled one is never signalled). */
  onRankExited?: (rank: number, pid: number) => void;
  log?: Logger;
}

/** What went wrong with a group; after it, every local rank is dead. */
export class MlxGroupError extends OrchardError {
  override readonly name: string = 'MlxGroupError';
}

interface Rank {
  rank: number;
  child: ChildProcess;
  stderrTail: string[];
  exited: Promise<void>;
  exitInfo?: string;
  listeners: Set<(msg: WorkerMessage) => void>;
}

const STDERR_LINES = 30;

/**
 * Driver for the local ranks of one MLX model instance.
 *
 * Use from a node agent (ranks spread over agents): every agent calls
 * `MlxGroup.start({ python, model, mode, split, launch, localRanks: [its ranks] })` with the same
 * launch (the coordinator picks fresh ports); agents holding ranks 0..N-2 first, the one holding
 * N-1 once the others reported `onRankStarting`. Every agent then `submit()`s each request to its
 * ranks; the agent holding rank 0 uses `generate()` instead, which submits and streams tokens.
 * `cancel(id)` must reach every agent too (ranks agree collectively on the step to stop at). On
 * `onFailure` the agent reports the error upstream; the coordinator restarts the whole instance.
 *
 * Single host (tests, benches): omit localRanks and the group starts every rank itself.
 *
 * Details: Spawns `mlx_worker.py` per rank with the
 * exact MLX env (no ssh, no mlx.launch), starts rank N-1 last, waits for every "ready", speaks
 * the JSON-lines protocol, and enforces the watchdogs: a start-up timeout, a per-request stall
 * timeout, and "any rank dies → kill every local rank". After a failure the group is dead; the
 * owner starts a new one (fresh ports) to recover.
 */
export class MlxGroup {
  readonly ready: ReadyMessage[] = [];
  /** Each local rank's latest `memory` line (MLX's counters after its last request). */
  readonly lastMemory = new Map<number, MemoryMessage>();
  private readonly ranks = new Map<number, Rank>();
  private failureError: MlxGroupError | undefined;
  private closing = false;
  private readonly failureListeners = new Set<(err: MlxGroupError) => void>();
  private readonly active = new Set<string>();
  /** Workers serve one request at a time; so does generate(), so a queued request's stall clock
   * does not run while it waits behind another. */
  private turn: Promise<void> = Promise.resolve();

  private constructor(
    private readonly opts: MlxGroupOptions,
    private readonly workDir: string,
    private readonly ownsWorkDir: boolean,
  ) {}

  get size(): number {
    return this.opts.launch ? launchSize(this.opts.launch) : 1;
  }

  get failure(): MlxGroupError | undefined {
    return this.failureError;
  }

  /** Process ids of the local ranks (for stats and for tests that check nothing is left). */
  get pids(): Map<number, number> {
    return new Map([...this.ranks].map(([r, p]) => [r, p.child.pid ?? -1]));
  }

  onFailure(cb: (err: MlxGroupError) => void): () => void {
    this.failureListeners.add(cb);
    return () => this.failureListeners.delete(cb);
  }

  static async start(opts: MlxGroupOptions): Promise<MlxGroup> {
    const size = opts.launch ? launchSize(opts.launch) : 1;
    const local = [...(opts.localRanks ?? Array.from({ length: size }, (_, i) => i))].sort((a, b) => a - b);
    if (local.length === 0) throw new OrchardError('an MLX group needs at least one local rank');
    for (const r of local) rankEnv(opts.launch, r, opts.launch ? '-' : undefined); // validates ranks early
    const ownsWorkDir = !opts.workDir;
    const workDir = opts.workDir ?? (await startupFolder('mlx', opts.workRoot));
    const group = new MlxGroup(opts, workDir, ownsWorkDir);
    try {
      await group.boot(local);
    } catch (err) {
      await group.close();
      throw err;
    }
    return group;
  }

  private async boot(local: number[]): Promise<void> {
    const { launch } = this.opts;
    let filePath: string | undefined;
    if (launch) {
      const file = launchFiles(launch);
      filePath = join(this.workDir, file.name === 'MLX_HOSTFILE' ? 'hostfile.json' : 'ibv-devices.json');
      await writeFile(filePath, file.content);
    }
    const timeoutMs = this.opts.startupTimeoutMs ?? 120_000;
    const deadline = Date.now() + timeoutMs;
    const last = this.size - 1;
    // Ranks 0..N-2 block in accept with no timeout while rank N-1 dials with ~31 s of retries:
    // start N-1 only once the others are past their slow imports and about to listen.
    const early = local.filter((r) => r !== last);
    const waits = early.map((r) => this.waitFor(this.spawnRank(r, filePath), 'starting', deadline, timeoutMs));
    await Promise.all(waits);
    if (local.includes(last) && last > 0) this.spawnRank(last, filePath);
    if (local.length === 1 && last === 0) this.spawnRank(0, filePath);
    const readies = await Promise.all(
      local.map((r) => this.waitFor(this.ranks.get(r) as Rank, 'ready', deadline, timeoutMs) as Promise<ReadyMessage>),
    );
    this.ready.push(...readies);
    // Every local rank read its launch file in mx.distributed.init, before "ready", and nothing
    // reads it again: gone now, a SIGKILLed agent leaves nothing of a running group behind.
    await this.removeWorkDir();
  }

  private async removeWorkDir(): Promise<void> {
    if (this.ownsWorkDir) await rm(this.workDir, { recursive: true, force: true });
  }

  private spawnRank(rank: number, filePath: string | undefined): Rank {
    const { opts } = this;
    // The allow-listed part of our environment only (no LD_PRELOAD, PYTHON*…), as for every engine.
    const env: Record<string, string> = {
      ...engineEnv(process.env),
      ...mlxProcessEnv(),
      ...opts.env,
      ...rankEnv(opts.launch, rank, filePath),
    };
    if (!opts.launch) {
      // A stray MLX_* in our own environment must not turn a single process into a broken ring.
      for (const k of ['MLX_RANK', 'MLX_HOSTFILE', 'MLX_IBV_DEVICES', 'MLX_JACCL_COORDINATOR']) delete env[k];
    }
    const args = [
      MLX_WORKER_SCRIPT,
      ...workerArgs({
        model: opts.model,
        mode: opts.mode,
        split: opts.split,
        backend: opts.launch?.backend,
      }),
    ];
    // Own process group, so a kill takes any helper processes with it.
    const child = spawn(opts.python, args, { env, stdio: ['pipe', 'pipe', 'pipe'], detached: true });
    const entry: Rank = {
      rank,
      child,
      stderrTail: [],
      listeners: new Set(),
      exited: new Promise<void>((resolve) => {
        child.once('exit', (code, signal) => {
          entry.exitInfo = signal ? `signal ${signal}` : `code ${code}`;
          resolve();
        });
        child.once('error', (err) => {
          entry.exitInfo = `spawn error: ${err.message}`;
          resolve();
        });
      }),
    };
    child.stdin?.on('error', () => {}); // EPIPE after the worker died is reported via exit
    this.ranks.set(rank, entry);
    const pid = child.pid;
    if (pid !== undefined) {
      opts.onRankSpawned?.(rank, pid);
      void entry.exited.then(() => opts.onRankExited?.(rank, pid));
    }
    createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
      const msg = parseWorkerLine(line);
      if (!msg) {
        this.opts.log?.debug({ rank, line }, 'mlx worker stdout (not protocol)');
        return;
      }
      if (msg.type === 'starting') this.opts.onRankStarting?.(rank);
      if (msg.type === 'memory') this.lastMemory.set(rank, msg);
      if (msg.type === 'error' && msg.fatal) {
        this.fail(new MlxGroupError(`MLX rank ${rank} failed: ${msg.message}`));
      }
      for (const l of entry.listeners) l(msg);
    });
    createInterface({ input: child.stderr as NodeJS.ReadableStream }).on('line', (line) => {
      entry.stderrTail.push(line);
      if (entry.stderrTail.length > STDERR_LINES) entry.stderrTail.shift();
      this.opts.log?.debug({ rank, line }, 'mlx worker');
    });
    void entry.exited.then(() => {
      if (this.closing || this.failureError) return;
      this.fail(new MlxGroupError(`MLX rank ${rank} exited (${entry.exitInfo})${lastWords(entry)}`));
    });
    return entry;
  }

  /** Resolve on the rank's first message of `type`; reject on failure or the start-up deadline. */
  private waitFor(entry: Rank, type: 'starting' | 'ready', deadline: number, timeoutMs: number): Promise<WorkerMessage> {
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        entry.listeners.delete(onMsg);
        off();
      };
      const onMsg = (msg: WorkerMessage) => {
        if (msg.type === type) {
          done();
          resolve(msg);
        }
      };
      const off = this.onFailure((err) => {
        done();
        reject(err);
      });
      const timer = setTimeout(
        () => {
          done();
          const err = new MlxGroupError(
            `MLX group did not start within ${Math.round(timeoutMs / 1000)} s: rank ${entry.rank} never reported ${type}` +
              `${lastWords(entry)}; all local ranks killed`,
          );
          this.fail(err);
          reject(err);
        },
        Math.max(0, deadline - Date.now()),
      );
      if (this.failureError) {
        done();
        reject(this.failureError);
        return;
      }
      entry.listeners.add(onMsg);
    });
  }

  private fail(err: MlxGroupError): void {
    if (this.failureError || this.closing) return;
    this.failureError = err;
    this.opts.log?.warn({ err: err.message }, 'MLX group failed; killing every local rank');
    this.killAll();
    for (const cb of [...this.failureListeners]) cb(err);
  }

  private killAll(): void {
    for (const entry of this.ranks.values()) {
      const pid = entry.child.pid;
      if (pid === undefined || entry.exitInfo) continue;
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        try {
          entry.child.kill('SIGKILL');
        } catch {
          // already gone
        }
      }
    }
  }

  /**
   * Send a request to every local rank. A node agent that does not hold rank 0 calls only this;
   * the agent that holds rank 0 uses generate(), which calls it.
   */
  submit(req: MlxRequest): void {
    if (this.failureError) throw this.failureError;
    const line = requestLine(req);
    for (const entry of this.ranks.values()) entry.child.stdin?.write(line);
  }

  /** Ask every local rank to stop request `id`; ranks agree collectively on the step. */
  cancel(id: string): void {
    const line = cancelLine(id);
    for (const entry of this.ranks.values()) entry.child.stdin?.write(line);
  }

  /**
   * Stream the tokens of one request from rank 0 (their text decoded from their bytes where the
   * tokenizer gives them, token-text.ts); returns the "done" message. Rejects with
   * MlxGroupError (group dead) on a rank failure or stall, with OrchardError (group healthy) when
   * the request itself is bad. An abort signal cancels collectively and ends with "cancelled".
   */
  async *generate(req: MlxRequest, opts: { signal?: AbortSignal } = {}): AsyncGenerator<TokenMessage, DoneMessage> {
    const head = this.ranks.get(0);
    if (!head) throw new OrchardError('generate() needs rank 0 in this group; use submit() on the other ranks');
    if (this.failureError) throw this.failureError;
    if (this.active.has(req.id)) throw new OrchardError(`request id ${req.id} is already running`);
    const stallMs = this.opts.stallTimeoutMs ?? 30_000;
    // The text from the tokens' bytes: a character split over tokens waits for its last byte.
    const text = new TokenTextDecoder();
    const queue: (TokenMessage | DoneMessage | Error)[] = [];
    let wake: (() => void) | undefined;
    const push = (item: TokenMessage | DoneMessage | Error) => {
      queue.push(item);
      wake?.();
    };
    let stallTimer: NodeJS.Timeout | undefined;
    const armStall = () => {
      clearTimeout(stallTimer);
      stallTimer = setTimeout(() => {
        this.fail(
          new MlxGroupError(
            `MLX group stalled: no output for request ${req.id} within ${Math.round(stallMs / 1000)} s; all local ranks killed`,
          ),
        );
      }, stallMs);
    };
    const onMsg = (msg: WorkerMessage) => {
      if (!('id' in msg) || msg.id !== req.id) return;
      armStall();
      if (msg.type === 'token' || msg.type === 'done') push(msg);
      else if (msg.type === 'error' && !msg.fatal) push(new OrchardError(`MLX request ${req.id}: ${msg.message}`));
    };
    const offFailure = this.onFailure((err) => push(err));
    const onAbort = () => this.cancel(req.id);
    this.active.add(req.id);
    const previous = this.turn;
    let release = () => {};
    this.turn = new Promise<void>((resolve) => {
      release = resolve;
    });
    try {
      let offWait = () => {};
      await Promise.race([
        previous,
        new Promise<void>((_, reject) => {
          offWait = this.onFailure(reject);
        }),
      ]).finally(() => offWait());
      if (opts.signal?.aborted) throw new OrchardError(`MLX request ${req.id} was cancelled before it started`);
      head.listeners.add(onMsg);
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      this.submit(req);
      armStall();
      if (opts.signal?.aborted) onAbort();
      for (;;) {
        const item = queue.shift();
        if (item === undefined) {
          await new Promise<void>((resolve) => {
            wake = resolve;
          });
          wake = undefined;
          continue;
        }
        if (item instanceof Error) throw item;
        if (item.type === 'done') return text.done(item);
        yield text.token(item);
      }
    } finally {
      clearTimeout(stallTimer);
      head.listeners.delete(onMsg);
      offFailure();
      opts.signal?.removeEventListener('abort', onAbort);
      this.active.delete(req.id);
      release();
    }
  }

  /**
   * Every local rank's memory line for request `id`, in rank order. Ranks other than 0 may write
   * theirs a moment after rank 0's done, so this waits (bounded) for the stragglers.
   */
  async memoryAfter(id: string, timeoutMs = 10_000): Promise<MemoryMessage[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const lines = [...this.ranks.keys()].sort((a, b) => a - b).map((r) => this.lastMemory.get(r));
      if (lines.every((m) => m?.id === id)) return lines as MemoryMessage[];
      if (this.failureError) throw this.failureError;
      if (Date.now() > deadline) throw new OrchardError(`not every MLX rank reported its memory for request ${id} within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Kill every local rank and wait until each has exited; remove the launch file. */
  async close(): Promise<void> {
    this.closing = true;
    this.killAll();
    await Promise.all([...this.ranks.values()].map((r) => r.exited));
    await this.removeWorkDir();
  }
}

function lastWords(entry: Rank): string {
  const useful = entry.stderrTail.filter((l) => l.trim() && !l.startsWith('[ring] Socket'));
  const tail = useful.slice(-2).join(' | ');
  return tail ? ` (stderr: ${tail.slice(0, 400)})` : '';
}

/** Collect a whole generation: token ids, text and the final message. */
export async function collect(
  gen: AsyncGenerator<TokenMessage, DoneMessage>,
): Promise<{ tokens: number[]; text: string; events: TokenMessage[]; done: DoneMessage }> {
  const events: TokenMessage[] = [];
  for (;;) {
    const next = await gen.next();
    if (next.done) {
      return {
        tokens: events.map((e) => e.token),
        text: events.map((e) => e.text).join('') + next.value.text_tail,
        events,
        done: next.value,
      };
    }
    events.push(next.value);
  }
}
