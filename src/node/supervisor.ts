import type { ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { rm } from 'node:fs/promises';
import { errorMessage } from '../shared/errors.ts';
import { makeScratchDir } from '../shared/scratch-dir.ts';
import { TENSOR_HASHES_ENV } from '../shared/rpc-cache/known-hashes.ts';
import type { Logger } from '../shared/log.ts';
import { type EngineExit, type EngineInfo, mlxRankInfo } from './engine-info.ts';
import { ENGINE_HOST, type EngineBinaries, EngineRequestError, type EngineSpec, engineCommand, sameEngineRequest } from './engine-spec.ts';
import { MAX_ENGINES } from './engine-roots.ts';
import { spawnEngine } from './engine-process.ts';
import { rpcServerSocket } from './engine-sockets.ts';
import { LineTail } from './line-tail.ts';
import { waitEngineReady } from './engine-readiness.ts';
import { EnginePortAllocator, engineRangeOf, onceMoreIfPortTaken, portTakenOr } from './ports.ts';
import { EngineWatchdog } from './watchdog.ts';
import type { MlxGroup } from './mlx/group.ts';
import { MlxRankEngine } from './mlx/rank-engine.ts';
import { mlxRankPort } from './mlx/rank-spec.ts';

/**
 * Start-up lines worth returning: llama.cpp's layer → device assignment and buffer sizes, and how
 * many known tensor hashes a head read (its hints file is gone once it is ready: this is the record).
 */
const STARTUP_LOG = /assigned to device|buffer size|memory_breakdown|projected memory|using device|GGML_RPC_TENSOR_HASHES/;

/**
 * Engine supervisor: starts llama.cpp engines as children of the agent, decides when they are
 * ready, stops them (TERM, then KILL after a grace period), and reports every exit with the
 * last lines of the engine's stderr. It never restarts an engine on its own: a dead RPC worker
 * already aborted its head (llama.cpp has no recovery), so re-placement is the coordinator's
 * decision; it learns about the exit from the `exited` event (gRPC Watch).
 */

export type { EngineExit, EngineInfo } from './engine-info.ts';

export interface SupervisorEvents {
  started: [EngineInfo];
  exited: [EngineExit];
}

export interface SupervisorOptions {
  /** Resolves the engine binaries; rejects with a one-line reason when they are missing. */
  readonly binaries: () => Promise<EngineBinaries>;
  readonly log: Logger;
  /** Time between SIGTERM and SIGKILL when stopping (default 5 s). */
  readonly stopGraceMs?: number;
  readonly watchdog?: EngineWatchdog;
  /** Where engines' ports come from (default: this machine's engine port range, engine-port-range.ts). */
  readonly ports?: EnginePortAllocator;
  /** The MLX venv's Python; rejects with a one-line reason when MLX is not set up. */
  readonly mlxPython?: () => Promise<string>;
  /** Where engines keep their start-up files (the agent's `<state dir>/run`, run-dir.ts; default the system temp dir). */
  readonly runDir?: string;
  /**
   * The agent's private socket directory (engine-sockets.ts prepareEngineSocketDir), where its
   * rpc-servers listen; absent = a fresh private one in the temp dir, removed at shutdown.
   */
  readonly socketDir?: string;
}

/** An MLX rank (`src/node/mlx/`): driven by MlxRankEngine, reported like any other engine. */
interface MlxRunning {
  readonly spec: EngineSpec;
  readonly info: EngineInfo;
  readonly engine: MlxRankEngine;
  readonly ready: Promise<EngineInfo>;
  isReady: boolean;
  stopping: boolean;
  readonly exited: Promise<EngineExit>;
}

interface Running {
  readonly spec: EngineSpec; // port resolved
  readonly info: EngineInfo;
  readonly child: ChildProcess;
  readonly tail: LineTail;
  readonly exited: Promise<EngineExit>;
  ready: boolean;
  stopping: boolean;
}

export class EngineSupervisor extends EventEmitter<SupervisorEvents> {
  private readonly running = new Map<string, Running>();
  private readonly mlx = new Map<string, MlxRunning>();
  private readonly starting = new Map<string, Promise<EngineInfo>>();
  private readonly watchdog: EngineWatchdog;
  private readonly ports: EnginePortAllocator;
  private readonly stopGraceMs: number;
  private shuttingDown = false;
  /** Starts per engine id, so a second start of the same id counts as a restart. */
  private readonly startCounts = new Map<string, number>();

  constructor(private readonly options: SupervisorOptions) {
    super();
    this.watchdog = options.watchdog ?? new EngineWatchdog({ log: options.log });
    this.ports = options.ports ?? new EnginePortAllocator(engineRangeOf(undefined));
    this.stopGraceMs = options.stopGraceMs ?? 5000;
  }

  get watchdogPid(): number | undefined {
    return this.watchdog.pid;
  }

  list(): EngineInfo[] {
    return [
      ...[...this.running.values()].filter((r) => r.ready).map((r) => r.info),
      ...[...this.mlx.values()].filter((r) => r.isReady).map((r) => r.info),
    ];
  }

  get(engineId: string): EngineInfo | undefined {
    const m = this.mlx.get(engineId);
    if (m) return m.isReady ? m.info : undefined;
    const r = this.running.get(engineId);
    return r?.ready ? r.info : undefined;
  }

  /** The live MLX group of a ready mlx-rank engine (for Generate). */
  mlxGroup(engineId: string): { group: MlxGroup; spec: EngineSpec } | undefined {
    const m = this.mlx.get(engineId);
    const group = m?.isReady ? m.engine.running : undefined;
    return m && group ? { group, spec: m.spec } : undefined;
  }

  /** Engine ids started more than once (a coordinator restarting a stage). */
  restartsOf(engineId: string): number {
    return Math.max(0, (this.startCounts.get(engineId) ?? 0) - 1);
  }

  /**
   * Start an engine and resolve once it accepts connections. Idempotent per engine id: the
   * same request again returns the running engine; a different request for a running id is
   * ALREADY_EXISTS.
   */
  start(spec: EngineSpec): Promise<EngineInfo> {
    if (this.shuttingDown) return Promise.reject(new EngineRequestError('FAILED_PRECONDITION', 'the node agent is shutting down'));
    const engineId = spec.engineId || `${spec.kind}-${randomUUID().slice(0, 8)}`;
    const known = this.running.has(engineId) || this.mlx.has(engineId) || this.starting.has(engineId);
    if (!known && this.running.size + this.mlx.size + this.starting.size >= MAX_ENGINES) {
      return Promise.reject(new EngineRequestError('INVALID_ARGUMENT', `this node already runs ${MAX_ENGINES} engines, the most it starts`));
    }
    if (spec.kind === 'mlx-rank') return this.startMlx(engineId, spec);
    const pending = this.starting.get(engineId);
    if (pending && !this.running.has(engineId)) return pending; // still resolving binaries/port
    const existing = this.running.get(engineId);
    if (existing) {
      if (!sameEngineRequest(existing.spec, spec)) {
        return Promise.reject(new EngineRequestError('ALREADY_EXISTS', `engine ${engineId} is already running with different settings; stop it first`));
      }
      return pending ?? Promise.resolve(existing.info);
    }
    const promise = this.launchOnFreePort(engineId, spec).finally(() => this.starting.delete(engineId));
    this.starting.set(engineId, promise);
    return promise;
  }

  /**
   * MLX rank: resolves at "ready" (the whole group is up), or at "starting" when the request asks
   * for it (so the coordinator can start rank N-1 last); the same request again then waits for
   * "ready". Idempotent per engine id like the llama.cpp engines.
   */
  private startMlx(engineId: string, spec: EngineSpec): Promise<EngineInfo> {
    const mlx = spec.mlx;
    if (!mlx) return Promise.reject(new EngineRequestError('INVALID_ARGUMENT', 'an MLX rank needs the mlx field'));
    // A ring rank without its hostfile would run as a group of one: never start it so.
    if (mlx.ring.length > 0 && mlx.launch?.backend !== 'ring') return Promise.reject(new EngineRequestError('INVALID_ARGUMENT', 'an MLX ring rank needs its ring routes resolved by the agent'));
    const existing = this.mlx.get(engineId);
    if (existing) {
      if (!sameEngineRequest(existing.spec, spec)) {
        return Promise.reject(new EngineRequestError('ALREADY_EXISTS', `engine ${engineId} is already running with different settings; stop it first`));
      }
      return mlx.returnWhenStarting ? existing.engine.starting.then(() => existing.info) : existing.ready;
    }
    if (this.running.has(engineId)) {
      return Promise.reject(new EngineRequestError('ALREADY_EXISTS', `engine ${engineId} is already running as another kind; stop it first`));
    }
    return this.launchMlx(engineId, spec);
  }

  private async launchMlx(engineId: string, spec: EngineSpec): Promise<EngineInfo> {
    const mlx = spec.mlx!;
    let python: string;
    try {
      if (!this.options.mlxPython) throw new Error('this node agent has no MLX environment configured');
      python = await this.options.mlxPython();
    } catch (err) {
      throw new EngineRequestError('FAILED_PRECONDITION', errorMessage(err));
    }
    // Another call may have started it while we looked for Python.
    if (this.mlx.has(engineId)) return this.startMlx(engineId, spec);
    // The coordinator chose the ring port from this node's engine port range: checked free and
    // held here (no engine of ours gets it while the rank runs); the rank binds it once loaded.
    const ringPort = mlxRankPort(mlx);
    if (ringPort > 0) await this.ports.claim(ENGINE_HOST, ringPort);
    const log = this.options.log.child({ engineId, kind: spec.kind, rank: mlx.rank, size: mlx.worldSize });
    log.info({ model: mlx.modelDir, mode: mlx.mode, backend: mlx.launch?.backend ?? 'none', split: mlx.split }, 'starting MLX rank');
    const engine = new MlxRankEngine({
      engineId,
      spec: mlx,
      python,
      readyTimeoutMs: spec.readyTimeoutMs,
      workRoot: this.options.runDir,
      log,
      onPid: (pid) => this.watchdog.add(pid),
      onPidGone: (pid) => this.watchdog.remove(pid),
    });
    this.startCounts.set(engineId, (this.startCounts.get(engineId) ?? 0) + 1);
    const entry: MlxRunning = {
      spec,
      info: mlxRankInfo(engineId, spec, python),
      engine,
      isReady: false,
      stopping: false,
      ready: this.mlxReady(engine, () => entry, log),
      exited: this.mlxExited(engine, () => entry, log),
    };
    entry.ready.catch(() => {});
    this.mlx.set(engineId, entry);
    if (mlx.returnWhenStarting) {
      await Promise.race([engine.starting, entry.ready]);
      if (engine.failedReason !== undefined) return entry.ready; // rejects with the reason
      return entry.info;
    }
    return entry.ready;
  }

  /** Resolves once the whole MLX group is up, with the rank's pid and its own report. */
  private mlxReady(engine: MlxRankEngine, self: () => MlxRunning, log: Logger): Promise<EngineInfo> {
    return engine.ready.then(
      (group) => {
        const entry = self();
        const rank = entry.spec.mlx!.rank;
        const withPid = { ...entry.info, pid: group.pids.get(rank) ?? engine.pid };
        (entry as { info: EngineInfo }).info = withPid;
        entry.isReady = true;
        const r = group.ready[0];
        log.info({ pid: withPid.pid, layers: r?.layers, loadMs: r?.load_ms }, 'MLX rank ready');
        this.emit('started', withPid);
        // What the worker itself reports (its layer range), so the coordinator can check the plan.
        const report = r ? { rank: r.rank, size: r.size, mode: r.mode, layers: r.layers, device: r.device, mlx: r.mlx, loadMs: r.load_ms } : undefined;
        return { ...withPid, startupLog: report ? [`mlx-ready ${JSON.stringify(report)}`] : [] };
      },
      (err: unknown) => {
        const msg = errorMessage(err);
        throw new EngineRequestError(/did not start within/.test(msg) ? 'DEADLINE_EXCEEDED' : 'FAILED_PRECONDITION', msg);
      },
    );
  }

  /** Resolves when the MLX rank is gone; reports the exit if the rank had been ready. */
  private mlxExited(engine: MlxRankEngine, self: () => MlxRunning, log: Logger): Promise<EngineExit> {
    return engine.exited.then((x) => {
      const entry = self();
      const { engineId, port } = entry.info;
      if (port > 0) this.ports.release(port);
      const expected = entry.stopping || this.shuttingDown;
      if (this.mlx.get(engineId) === entry) this.mlx.delete(engineId);
      const exit: EngineExit = {
        engineId,
        kind: 'mlx-rank',
        port,
        exitCode: x.exitCode,
        signal: x.signal,
        expected,
        lastStderrLines: [x.reason],
      };
      (expected ? log.info.bind(log) : log.warn.bind(log))({ reason: x.reason }, 'MLX rank exited');
      if (entry.isReady) this.emit('exited', exit);
      return exit;
    });
  }

  /**
   * With port 0 the agent picks the port, checked free, and the engine binds it a moment later: if
   * another process took it in that moment, once more on a fresh port (a requested port is the
   * caller's to choose again).
   */
  private launchOnFreePort(engineId: string, spec: EngineSpec): Promise<EngineInfo> {
    if (spec.port !== 0) return this.launch(engineId, spec);
    return onceMoreIfPortTaken(
      () => this.launch(engineId, spec),
      (err) => {
        this.options.log.warn({ engineId, port: err.port, err: err.message }, 'another process took the engine\'s port before it bound it: starting it again on a fresh port');
        this.startCounts.set(engineId, (this.startCounts.get(engineId) ?? 1) - 1); // not a restart
      },
    );
  }

  private async launch(engineId: string, spec: EngineSpec): Promise<EngineInfo> {
    let bins: EngineBinaries;
    try {
      bins = await this.options.binaries();
    } catch (err) {
      throw new EngineRequestError('FAILED_PRECONDITION', errorMessage(err));
    }
    const port = await this.ports.claim(ENGINE_HOST, spec.port);
    const socket = spec.kind === 'rpc-server' ? rpcServerSocket(await this.socketDir(), port) : undefined;
    const cmd = engineCommand(spec, port, bins, process.env, socket);
    const log = this.options.log.child({ engineId, kind: spec.kind, port });
    log.info({ file: cmd.file, argv: cmd.argv }, 'starting engine');
    const { child, removeStartupFiles } = await spawnEngine(cmd, this.options.runDir).catch((err: unknown) => {
      this.ports.release(port);
      throw err;
    });
    const pid = child.pid!;
    this.watchdog.add(pid);
    this.startCounts.set(engineId, (this.startCounts.get(engineId) ?? 0) + 1);

    const tail = new LineTail(20);
    child.stderr?.setEncoding('utf8').on('data', (s: string) => tail.push(s));
    // Until ready, also keep the lines the coordinator verifies placement with (bounded).
    // Filtered as lines arrive, so a chatty start-up cannot grow this beyond 4000 short lines.
    const startup = new LineTail(4000, 2000, (l) => STARTUP_LOG.test(l));
    const collectStartup = (s: string) => {
      if (this.running.get(engineId)?.ready) child.stderr?.off('data', collectStartup);
      else startup.push(s);
    };
    child.stderr?.on('data', collectStartup);
    // llama.cpp logs to stderr; stdout is drained so a chatty engine never blocks on a full pipe.
    child.stdout?.on('data', () => {});

    const info: EngineInfo = {
      engineId,
      kind: spec.kind,
      host: ENGINE_HOST,
      port,
      pid,
      model: spec.model,
      startedAtSeconds: Date.now() / 1000,
      argv: [cmd.file, ...cmd.argv],
      ...(socket !== undefined ? { socket } : {}),
    };
    const exited = this.engineExited(info, child, tail, log);
    const entry: Running = { spec: { ...spec, engineId, port }, info, child, tail, exited, ready: false, stopping: false };
    this.running.set(engineId, entry);

    try {
      await this.waitReady(entry, ENGINE_HOST);
    } catch (err) {
      entry.stopping = true;
      const exit = await this.terminate(entry);
      // Gone on its own before it was ready, and the port it was handed is bound now: taken.
      throw exit.expected ? err : await portTakenOr(err, ENGINE_HOST, port);
    }
    // Read while it loaded: a SIGKILLed agent must not leave it behind for the whole engine's life.
    await removeStartupFiles().catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'cannot remove the engine\'s start-up files'));
    entry.ready = true;
    const knownHashes = startup.snapshot().find((l) => l.includes(TENSOR_HASHES_ENV));
    log.info({ pid, ...(knownHashes ? { knownHashes: knownHashes.trim() } : {}) }, 'engine ready');
    this.emit('started', info);
    return { ...info, startupLog: startup.snapshot() };
  }

  /** Resolves when the engine process is gone; reports the exit if the engine had been ready. */
  private engineExited(info: EngineInfo, child: ChildProcess, tail: LineTail, log: Logger): Promise<EngineExit> {
    const { engineId, kind, port, pid } = info;
    return new Promise<EngineExit>((resolve) => {
      // 'close' (not 'exit') so the stderr tail is complete.
      child.once('close', (code, signal) => {
        this.watchdog.remove(pid);
        this.ports.release(port);
        // an rpc-server ended by a signal leaves its socket file (the next one on the port replaces it)
        if (info.socket !== undefined) void rm(info.socket, { force: true }).catch(() => undefined);
        const r = this.running.get(engineId);
        const expected = (r?.stopping ?? false) || this.shuttingDown;
        if (r?.child === child) this.running.delete(engineId);
        const exit: EngineExit = {
          engineId,
          kind,
          port,
          exitCode: code ?? -1,
          signal: signal ?? '',
          expected,
          lastStderrLines: tail.snapshot(),
        };
        (expected ? log.info.bind(log) : log.warn.bind(log))({ code, signal, lastStderrLines: exit.lastStderrLines }, 'engine exited');
        if (r?.ready) this.emit('exited', exit);
        resolve(exit);
      });
    });
  }

  private async waitReady(entry: Running, host: string): Promise<void> {
    const { spec, info } = entry;
    let exit: EngineExit | undefined;
    void entry.exited.then((e) => {
      exit = e;
    });
    await waitEngineReady({
      kind: spec.kind === 'llama-server' ? 'llama-server' : 'rpc-server',
      host,
      port: info.port,
      pid: info.pid,
      socket: info.socket,
      deadlineMs: Date.now() + spec.readyTimeoutMs,
      output: entry.child.stderr,
      gone: () => {
        if (exit) {
          const how = exit.signal ? `signal ${exit.signal}` : `code ${exit.exitCode}`;
          return new EngineRequestError('FAILED_PRECONDITION', `${spec.kind} ${info.engineId} exited with ${how} before it was ready: ${lastLines(exit.lastStderrLines)}`);
        }
        if (entry.stopping) return new EngineRequestError('FAILED_PRECONDITION', `${spec.kind} ${info.engineId} was stopped before it was ready`);
        return undefined;
      },
      timedOut: () =>
        new EngineRequestError('DEADLINE_EXCEEDED', `${spec.kind} ${info.engineId} did not accept connections within ${spec.readyTimeoutMs / 1000} s: ${lastLines(entry.tail.snapshot())}`),
    });
  }

  /**
   * Stop one engine for `owner` (who started it). Resolves with its exit, or undefined when no
   * such engine runs; PERMISSION_DENIED for somebody else's engine.
   */
  async stop(engineId: string, owner: string): Promise<EngineExit | undefined> {
    const started = (this.mlx.get(engineId) ?? this.running.get(engineId))?.spec.owner;
    if (started !== undefined && started !== owner) {
      throw new EngineRequestError('PERMISSION_DENIED', `engine ${engineId} was not started by this caller`);
    }
    const m = this.mlx.get(engineId);
    if (m) {
      m.stopping = true;
      await m.engine.close();
      return m.exited;
    }
    const entry = this.running.get(engineId);
    if (!entry) return undefined;
    entry.stopping = true;
    return this.terminate(entry);
  }

  /** SIGTERM, then SIGKILL after the grace period. */
  private async terminate(entry: Running): Promise<EngineExit> {
    const { child } = entry;
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => {
      if (child.exitCode === null && child.signalCode === null) {
        this.options.log.warn({ engineId: entry.info.engineId, pid: entry.info.pid }, 'engine ignored SIGTERM; sending SIGKILL');
        child.kill('SIGKILL');
      }
    }, this.stopGraceMs);
    try {
      return await entry.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Stop every engine (agent shutdown) and retire the watchdog. */
  async shutdown(): Promise<void> {
    this.shuttingDown = true;
    await Promise.all([
      ...[...this.running.values()].map((e) => {
        e.stopping = true;
        return this.terminate(e);
      }),
      ...[...this.mlx.values()].map(async (m) => {
        m.stopping = true;
        await m.engine.close();
        await m.exited;
      }),
    ]);
    this.watchdog.close();
    if (this.options.socketDir === undefined && this.#ownSocketDir) await rm(await this.#ownSocketDir, { recursive: true, force: true }).catch(() => undefined);
  }

  #ownSocketDir: Promise<string> | undefined;

  /** Where this supervisor's rpc-servers listen (SupervisorOptions.socketDir). */
  private socketDir(): Promise<string> {
    if (this.options.socketDir !== undefined) return Promise.resolve(this.options.socketDir);
    this.#ownSocketDir ??= makeScratchDir('orchard-sock-');
    return this.#ownSocketDir;
  }

  /** Last resort on a second Ctrl-C: SIGKILL everything now. */
  killAll(): void {
    this.shuttingDown = true;
    for (const e of this.running.values()) e.child.kill('SIGKILL');
    for (const m of this.mlx.values()) void m.engine.close();
  }
}

function lastLines(lines: readonly string[]): string {
  const picked = lines.slice(-3).join(' | ');
  return picked === '' ? '(no output on stderr)' : picked;
}
