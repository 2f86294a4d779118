import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { errorMessage, UsageError } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import { CoordinatorError } from '../errors.ts';
import type { AgentEvent } from '../membership/agent-client.ts';
import type { Membership } from '../membership/membership.ts';
import type { NodeEntry, RegistryChange } from '../membership/registry.ts';
import type { InstanceRecord } from '../state/instance-store.ts';
import type { Cluster, EngineDriver, EngineGroup, EngineRef, LoadContext } from './driver.ts';
import { LlamaDriver, type LlamaDriverOptions } from './llama/driver.ts';
import { MlxDriver, type MlxDriverOptions } from './mlx/driver.ts';
import { engineForModel, looksLikeMlxModelDir } from './mlx/launch.ts';
import { attemptFailure, DEFAULT_HEAL_OPTIONS, type HealOptions, parseHealMode, type RecoveryCause } from './healing.ts';
import { deferred, failureSignal, type Instance, instanceStatus, newInstance } from './instance.ts';
import { PlacementMoves } from './moves.ts';
import type { RebalanceMode } from './rebalance.ts';
import { AdoptionWaits } from './adoption-waits.ts';
import { pickInstance, type RequestContext, serveRequest } from './request.ts';
import { defaultModelName, enginePrefix, NAME, resolveLoadOptions } from './load-options.ts';
import { Slots } from './slots.ts';
import type { EngineFamily, GenerateEvent, GenerateRequest, LoadOptions, LoadProgress, LoadRequest, ModelStatus, PlacementResult, Planner } from './types.ts';

export { defaultModelName, enginePrefix, resolveLoadOptions } from './load-options.ts';

// The APIs speak the instance vocabulary of the runtime they drive (types.ts keeps it free of cycles).
export type * from './types.ts';

/**
 * The runtime: model instances across the cluster. Load = plan against live nodes → the engine
 * family's driver starts its engines on the plan's nodes and verifies them against the plan →
 * ready (driver.ts: the lifecycle; llama/driver.ts, mlx/driver.ts: the families). Generate takes
 * a slot and relays the head engine's token stream. When an engine of a ready instance is really
 * gone (its node down past the grace period, its agent restarted, an engine exit) the instance is
 * `recovering`: its surviving engines stop (llama.cpp cannot recover from a lost RPC stage), it is
 * planned again on the nodes that are up and reloaded (healing.ts: the policy), requests wait for
 * it, and in-flight streams resume on the new engines with the tokens already delivered. With
 * healing off, or once every attempt failed, it is `failed` and streams end with UNAVAILABLE
 * naming the cause; a failed instance that may heal is tried again when a node joins or returns.
 *
 * This is the API the gRPC server, the CLI and the OpenAI HTTP API build on:
 *   load(request, onProgress) · unload(name) · generate(request, signal) · models() · plan(...)
 *
 * Coordinator restart: re-adopt, then clean up. Every ready instance is stored (instance-store.ts,
 * written by readoption.ts); a restarted coordinator matches each stored instance against what
 * the agents run (adoption.ts: same processes, same command lines, the head still wired to the
 * same workers) and serves it again without reloading (`adopt`). Engine ids carry the cluster id
 * (`o<cluster8>-…`); when an agent (re)connects, any engine with this cluster's prefix that no
 * live instance owns and no stored instance still claims is stopped.
 */
export interface RuntimeOptions extends LlamaDriverOptions, MlxDriverOptions {
  readonly membership: Membership;
  readonly planner: Planner;
  readonly clusterId: string;
  readonly log: Logger;
  /** Requests that may wait per instance beyond its --parallel slots (default 4 × parallel). */
  readonly maxQueue?: number | undefined;
  /** Self-healing (the coordinator's --heal; a load may override the mode). */
  readonly heal?: Partial<HealOptions> | undefined;
  /** --rebalance auto: re-place a model when a node joins or returns and it is predicted ≥ 20 % faster. */
  readonly rebalance?: RebalanceMode | undefined;
}

/** An instance as the store keeps it, before the agents' pids and command lines are added. */
export type InstanceSnapshot = Omit<InstanceRecord, 'engines'> & { readonly engines: readonly (EngineRef & { readonly head: boolean })[] };

export interface RuntimeEvents {
  model: [status: ModelStatus];
  /** Every load's progress, whoever asked for the load (the console shows it to every viewer). */
  progress: [model: string, progress: LoadProgress];
  /** An instance served again after losing an engine (orchard_instance_recoveries_total). */
  recovered: [model: string, cause: RecoveryCause, seconds: number];
  /** An in-flight stream continued on the healed instance (orchard_streams_resumed_total). */
  'stream-resumed': [model: string];
  request: [model: string, outcome: string, seconds: number]; // emitted by MeteredRuntime (api/metrics.ts)
}

export class Runtime extends EventEmitter<RuntimeEvents> {
  readonly #o: RuntimeOptions;
  readonly #instances = new Map<string, Instance>();
  readonly #log: Logger;
  readonly #prefix: string;
  readonly #drivers: Readonly<Record<EngineFamily, EngineDriver>>;
  readonly #heal: HealOptions;
  readonly #requestContext: RequestContext;
  /** Drain and rebalance (moves.ts). */
  readonly moves: PlacementMoves;
  /** Stored models being re-adopted: requests for them wait (readoption.ts). */
  readonly adoptionWaits = new AdoptionWaits();

  constructor(o: RuntimeOptions) {
    super();
    this.#o = o;
    this.#log = o.log;
    this.#prefix = enginePrefix(o.clusterId);
    this.#heal = { ...DEFAULT_HEAL_OPTIONS, ...o.heal };
    this.#requestContext = {
      log: o.log,
      waitMs: this.#heal.waitMs,
      nodeName: (id) => o.membership.registry.get(id)?.profile.name ?? id,
      resumed: (model) => this.emit('stream-resumed', model),
    };
    const cluster: Cluster = { log: o.log, node: (id) => o.membership.registry.get(id), agent: (id) => o.membership.client(id) };
    this.#drivers = { llama: new LlamaDriver(cluster, o), mlx: new MlxDriver(cluster, o) };
    this.moves = new PlacementMoves(o.rebalance ?? 'off', {
      log: o.log,
      node: (id) => o.membership.registry.get(id),
      nodes: () => o.membership.registry.nodes(),
      instances: () => [...this.#instances.values()],
      plan: (inst, ignoringItself) => this.#o.planner(inst.path, this.#plannableNodes(inst.options), inst.options, ignoringItself ? inst.name : undefined),
      newGroup: (inst, gone) => this.#newGroup(inst, undefined, gone),
      changed: (inst) => this.emit('model', instanceStatus(inst)),
      reload: async (inst, reason) => {
        this.#loseEngines(inst, reason, true);
        this.#startRecovery(inst, reason, 'drain');
        this.emit('model', instanceStatus(inst));
        await inst.serving?.promise;
      },
    });
    o.membership.on('change', (c) => this.#onMembership(c));
    o.membership.on('agent-event', (nodeId, ev) => this.#onAgentEvent(nodeId, ev));
  }

  models(): ModelStatus[] {
    return [...this.#instances.values()].map((i) => instanceStatus(i));
  }

  model(name: string): ModelStatus | undefined {
    const i = this.#instances.get(name);
    return i ? instanceStatus(i) : undefined;
  }

  /** Requests generating and waiting for a slot, per model (the metrics read it at scrape time). */
  slotUsage(): { readonly model: string; readonly running: number; readonly queued: number }[] {
    return [...this.#instances.values()].map((i) => ({ model: i.name, running: i.slots.running, queued: i.slots.queued }));
  }

  async plan(modelPath: string, options?: Partial<LoadOptions>): Promise<PlacementResult> {
    const opts = resolveLoadOptions(options);
    return this.#o.planner(modelPath, this.#plannableNodes(opts), opts);
  }

  #plannableNodes(opts: LoadOptions): NodeEntry[] {
    const up = this.#o.membership.registry.upNodes().filter((n) => !this.moves.isDrained(n.nodeId));
    if (opts.pin.length === 0) return up;
    const pinned = up.filter((n) => opts.pin.includes(n.nodeId) || opts.pin.includes(n.profile.name));
    const missing = opts.pin.filter((p) => !pinned.some((n) => n.nodeId === p || n.profile.name === p));
    if (missing.length > 0) throw new CoordinatorError('FAILED_PRECONDITION', `pinned node(s) not up: ${missing.join(', ')}`);
    return pinned;
  }

  /**
   * Load a model; resolves with the ready status or rejects with the reason. A failed load
   * stops every engine it started and leaves no entry behind.
   */
  async load(req: LoadRequest, onProgress: (p: LoadProgress) => void = () => {}): Promise<ModelStatus> {
    const t0 = Date.now();
    const inst = this.#reserve(req);
    const elapsed = () => (Date.now() - t0) / 1000;
    let bytesTotal = 0;
    try {
      await this.#place(inst, elapsed, (phase, message, bytesDone, total) => {
        bytesTotal = total;
        this.#log.info({ model: inst.name, phase, elapsed: elapsed() }, message);
        const p: LoadProgress = { phase, message, bytesDone, bytesTotal, elapsedSeconds: elapsed(), model: instanceStatus(inst) };
        onProgress(p);
        this.emit('progress', inst.name, p);
      });
      this.emit('model', instanceStatus(inst));
      return instanceStatus(inst);
    } catch (err) {
      const reason = inst.error || errorMessage(err);
      await inst.group.stop();
      if (this.#instances.get(inst.name) === inst) this.#instances.delete(inst.name);
      onProgress({ phase: 'failed', message: reason, bytesDone: 0, bytesTotal, elapsedSeconds: elapsed(), model: { ...instanceStatus(inst), state: 'failed', error: reason } });
      this.#log.warn({ model: inst.name, err: reason }, 'load failed');
      if (inst.error && !(err instanceof CoordinatorError && err.message === inst.error)) throw new CoordinatorError('UNAVAILABLE', inst.error);
      throw err;
    }
  }

  /** Plan on the nodes that are up, start the engines of `inst.group`, verify them: ready. */
  async #place(inst: Instance, elapsed: () => number, report: (phase: LoadProgress['phase'], message: string, bytesDone: number, bytesTotal: number) => void): Promise<void> {
    let bytesTotal = 0;
    const progress = (phase: LoadProgress['phase'], message: string, bytesDone = 0) => report(phase, message, bytesDone, bytesTotal);
    progress('planning', `planning ${inst.path} on ${this.#o.membership.registry.upNodes().length} live node(s)`);
    const plan = await this.#o.planner(inst.path, this.#plannableNodes(inst.options), inst.options);
    bytesTotal = plan.stages.reduce((s, st) => s + st.bytes.weights, 0);
    inst.predictedTokensPerSecond = plan.predictedTokensPerSecond;
    inst.parallelism = plan.parallelism;
    const nodes = plan.stages.map((s) => {
      const n = this.#o.membership.registry.get(s.nodeId);
      if (n?.state !== 'up') throw new CoordinatorError('UNAVAILABLE', `node ${s.nodeName} (${s.nodeId}) is no longer up`);
      return n;
    });
    inst.stages = [...plan.stages];
    this.#assertLoading(inst);
    const load: LoadContext = { plan, nodes, bytesTotal, progress, assertLoading: () => this.#assertLoading(inst), elapsedSeconds: elapsed };
    await inst.group.start(load);
    inst.group.verify(load);
    this.#assertLoading(inst);
    inst.state = 'ready';
    inst.loadedAtMs = Date.now();
    progress('ready', `${inst.name} ready on ${plan.stages.length} ${inst.driver.stageNoun} in ${elapsed().toFixed(1)} s`, bytesTotal);
  }

  /** Check a load request and reserve its name, synchronously so a concurrent load of the name is refused. */
  #reserve(req: LoadRequest): Instance {
    if (!req.modelPath) throw new UsageError('model path is required');
    const name = req.name || defaultModelName(req.modelPath);
    if (!NAME.test(name)) throw new UsageError(`invalid model name "${name}": 1–128 of A-Z a-z 0-9 . _ : - (use --name)`);
    const driver = this.#drivers[engineForModel(req.modelPath, looksLikeMlxModelDir(req.modelPath), req.engine)];
    const options = driver.fitOptions(resolveLoadOptions(req.options), name);
    const heal = parseHealMode(req.heal, 'heal') ?? this.#heal.mode;
    const existing = this.#instances.get(name);
    if (existing && existing.state !== 'failed') {
      throw new CoordinatorError('ALREADY_EXISTS', `model "${name}" is already ${existing.state === 'ready' ? 'loaded' : existing.state}; unload it first or pick another --name`);
    }
    if (existing) this.#forget(existing);
    const inst = this.#instance(name, req.modelPath, driver, options, heal);
    this.#instances.set(name, inst);
    return inst;
  }

  /** A new instance in state `loading` (not registered yet); `groupId` names its first engine group. */
  #instance(name: string, path: string, driver: EngineDriver, options: LoadOptions, heal: Instance['heal'], groupId?: string): Instance {
    const inst = newInstance(name, path, driver, options, heal, new Slots(options.parallel, this.#o.maxQueue ?? 4 * options.parallel));
    inst.group = this.#newGroup(inst, groupId);
    return inst;
  }

  /**
   * A fresh, empty engine group for the instance (own engine ids, so old and new never mix). A
   * lost engine fails the instance only while the group is its current one; while it is staged by
   * a move, `staged` hears of it instead.
   */
  #newGroup(inst: Instance, id = randomUUID().replace(/-/g, '').slice(0, 8), staged?: (reason: string) => void): EngineGroup {
    const group: EngineGroup = inst.driver.group({
      name: inst.name,
      path: inst.path,
      options: inst.options,
      engineIdPrefix: `${this.#prefix}${id}`,
      owner: this.#o.clusterId,
      gone: (reason) => {
        if (inst.group === group) this.#fail(inst, reason, 'engine-exit');
        else if (inst.staged === group) staged?.(reason);
      },
    });
    return group;
  }

  /**
   * Serve an instance a previous coordinator loaded, on the engines adoption.ts matched against
   * the agents: nothing starts, nothing reloads. Refused when the name is taken meanwhile.
   */
  adopt(rec: InstanceRecord): ModelStatus {
    const existing = this.#instances.get(rec.name);
    if (existing && existing.state !== 'failed') throw new CoordinatorError('ALREADY_EXISTS', `model "${rec.name}" is already ${existing.state}`);
    if (existing) this.#forget(existing);
    const inst = this.#instance(rec.name, rec.path, this.#drivers[rec.family], rec.options, this.#heal.mode, rec.id);
    inst.group.adopt({ engines: rec.engines, endpoints: rec.endpoints, verification: rec.verification });
    inst.stages = rec.stages;
    inst.predictedTokensPerSecond = rec.predictedTokensPerSecond;
    inst.parallelism = rec.parallelism;
    inst.loadedAtMs = rec.loadedAtMs;
    inst.state = 'ready';
    this.#instances.set(rec.name, inst);
    this.#log.info({ model: rec.name, engines: rec.engines.map((e) => e.engineId) }, 're-adopted a running instance');
    this.emit('model', instanceStatus(inst));
    return instanceStatus(inst);
  }

  /** What the instance store keeps of an instance (the agents add each engine's pid and command line). */
  snapshot(name: string): InstanceSnapshot | undefined {
    const i = this.#instances.get(name);
    const head = i?.group.head;
    if (!i || !head) return undefined;
    return {
      name: i.name,
      // The group's id, from its engine ids (`<cluster prefix><id>-<role>`).
      id: head.engineId.slice(this.#prefix.length).split('-')[0]!,
      path: i.path,
      family: i.driver.family,
      options: { ...i.options, pin: [...i.options.pin] },
      stages: [...i.stages],
      endpoints: i.stages.map((_, k) => i.group.endpoint(k)),
      engines: i.group.engines.map((e) => ({ nodeId: e.nodeId, engineId: e.engineId, label: e.label, head: e === head })),
      predictedTokensPerSecond: i.predictedTokensPerSecond,
      ...(i.parallelism ? { parallelism: { ...i.parallelism } } : {}),
      verification: i.group.verification,
      loadedAtMs: i.loadedAtMs,
    };
  }

  /** Whether a live instance owns the engine (re-adoption leaves those alone). */
  ownsEngine(engineId: string): boolean {
    return [...this.#instances.values()].some((i) => i.group.engines.some((e) => e.engineId === engineId));
  }

  #assertLoading(inst: Instance): void {
    if (inst.abortReason) throw new CoordinatorError('UNAVAILABLE', inst.abortReason);
    if (inst.state !== 'loading' && inst.state !== 'recovering') throw new CoordinatorError('UNAVAILABLE', inst.error || `load of ${inst.name} was aborted`);
  }

  async unload(name: string): Promise<boolean> {
    const inst = this.#instances.get(name);
    if (!inst) throw new CoordinatorError('NOT_FOUND', `no model named "${name}" (loaded: ${[...this.#instances.keys()].join(', ') || 'none'})`);
    if (inst.state === 'unloading') throw new CoordinatorError('FAILED_PRECONDITION', `model "${name}" is already unloading`);
    const wasLoading = inst.state === 'loading';
    inst.state = 'unloading';
    inst.error = wasLoading ? `load of ${name} was cancelled by unload` : '';
    const err = new CoordinatorError('CANCELLED', `model "${name}" was unloaded`);
    inst.slots.failWaiting(err);
    inst.serving?.reject(err);
    for (const a of inst.active) a.abort(err);
    await inst.group.stop();
    if (this.#instances.get(name) === inst) this.#instances.delete(name);
    this.emit('model', { ...instanceStatus(inst), state: 'unloading' });
    return true;
  }

  /** A failed instance replaced by a new load of its name: it must neither heal nor keep engines. */
  #forget(inst: Instance): void {
    inst.state = 'unloading';
    inst.pending = undefined;
    void inst.group.stop();
  }

  /**
   * Stream a completion. Throws CoordinatorError: NOT_FOUND (no such model), FAILED_PRECONDITION
   * (not ready), RESOURCE_EXHAUSTED (busy), UNAVAILABLE (a node or engine failed and it could not
   * heal; names it), CANCELLED (the caller's signal aborted, or unload). A stream whose engines
   * are lost while it runs continues on the healed instance (request.ts).
   */
  async *generate(req: GenerateRequest, signal?: AbortSignal): AsyncGenerator<GenerateEvent> {
    if (req.model) await this.adoptionWaits.wait(req.model, signal, 60_000);
    const inst = pickInstance(this.#instances, req.model);
    if (!req.prompt && !req.messages?.length) throw new UsageError('prompt is empty');
    yield* serveRequest(inst, req, signal, this.#requestContext);
  }


  /**
   * An engine of the instance is gone. Loading: the load fails (load() cleans up). Recovering:
   * the current attempt fails. Ready: with healing, the instance recovers (its streams resume);
   * without, it fails — streams end with UNAVAILABLE naming the cause, surviving engines stop.
   */
  #fail(inst: Instance, reason: string, cause: RecoveryCause): void {
    if (inst.state === 'failed' || inst.state === 'unloading') return;
    if (inst.state === 'recovering') {
      inst.abortReason ||= reason;
      return;
    }
    const wasReady = inst.state === 'ready';
    this.#log.error({ model: inst.name, reason, heal: inst.heal }, 'model instance lost an engine');
    this.#loseEngines(inst, reason, wasReady);
    if (wasReady && inst.heal === 'auto') {
      this.#startRecovery(inst, reason, cause);
    } else {
      inst.state = 'failed';
      const err = new CoordinatorError('UNAVAILABLE', reason);
      inst.slots.failWaiting(err);
      for (const a of inst.active) a.abort(err);
    }
    this.emit('model', instanceStatus(inst));
  }

  /** The current engines are gone (or being stopped): streams on them resume once the instance serves again, or fail. */
  #loseEngines(inst: Instance, reason: string, stop: boolean): void {
    inst.error = reason;
    inst.epoch++;
    inst.markFailed(reason);
    Object.assign(inst, failureSignal());
    if (stop) void inst.group.stop();
  }

  /** A ready instance (its engines stopped or being stopped) is re-placed; its streams resume once it serves again. */
  #startRecovery(inst: Instance, reason: string, cause: RecoveryCause): void {
    inst.state = 'recovering';
    inst.pending = { cause: reason, kind: cause, sinceMs: Date.now() };
    inst.lost = this.#lostNodes(inst);
    inst.serving = deferred();
    for (const c of inst.calls) c.cancel();
    void this.#recover(inst);
  }

  /** Names of the plan's nodes that are not up now (what a shortfall asks to bring back). */
  #lostNodes(inst: Instance): string[] {
    const names = inst.stages.filter((s) => this.#o.membership.registry.get(s.nodeId)?.state !== 'up').map((s) => s.nodeName);
    return [...new Set([...inst.lost, ...names])];
  }

  /** Re-place a recovering instance, a bounded number of times; then failed, until a node returns. */
  async #recover(inst: Instance): Promise<void> {
    const pending = inst.pending;
    if (!pending) return;
    const { maxAttempts, retryDelayMs } = this.#heal;
    const elapsed = () => (Date.now() - pending.sinceMs) / 1000;
    let why = '';
    for (let attempt = 1; attempt <= maxAttempts && inst.state === 'recovering'; attempt++) {
      inst.abortReason = '';
      inst.recovery = { cause: pending.cause, attempt, maxAttempts, phase: 'planning', message: why, sinceMs: pending.sinceMs };
      this.emit('model', instanceStatus(inst));
      inst.group = this.#newGroup(inst);
      try {
        await this.#place(inst, elapsed, (phase, message, bytesDone, bytesTotal) => {
          inst.recovery = { ...inst.recovery!, phase, message };
          this.emit('progress', inst.name, { phase, message, bytesDone, bytesTotal, elapsedSeconds: elapsed(), model: instanceStatus(inst) });
        });
        inst.recoveries++;
        inst.recovery = undefined;
        inst.pending = undefined;
        inst.error = '';
        inst.lost = [];
        inst.serving?.resolve();
        inst.serving = undefined;
        this.#log.info({ model: inst.name, cause: pending.cause, seconds: elapsed(), attempt }, 'model instance recovered');
        this.emit('recovered', inst.name, pending.kind, elapsed());
        this.emit('model', instanceStatus(inst));
        return;
      } catch (err) {
        why = attemptFailure(err, this.#lostNodes(inst), inst.abortReason || errorMessage(err));
        inst.epoch++; // whatever the failed attempt started is not this instance's any more
        await inst.group.stop();
        this.#log.warn({ model: inst.name, attempt, maxAttempts, err: why }, 're-placing the model failed');
        if (attempt < maxAttempts && inst.state === 'recovering') await new Promise((r) => setTimeout(r, retryDelayMs));
      }
    }
    if (inst.state !== 'recovering') return; // unloaded meanwhile
    inst.state = 'failed';
    inst.error = `${pending.cause}; could not re-place it: ${why}`;
    inst.recovery = { cause: pending.cause, attempt: maxAttempts, maxAttempts, phase: 'failed', message: why, sinceMs: pending.sinceMs };
    const err = new CoordinatorError('UNAVAILABLE', `model "${inst.name}" failed: ${inst.error}`);
    inst.serving?.reject(err);
    inst.serving = undefined;
    inst.slots.failWaiting(err);
    this.emit('model', instanceStatus(inst));
  }

  /** A node joined or came back: failed instances that may heal try again. */
  #retryHealing(): void {
    for (const inst of this.#instances.values()) {
      if (inst.state !== 'failed' || !inst.pending) continue;
      inst.state = 'recovering';
      inst.serving = deferred();
      this.emit('model', instanceStatus(inst));
      void this.#recover(inst);
    }
  }

  #instancesOnNode(nodeId: string): Instance[] {
    return [...this.#instances.values()].filter((i) => i.stages.some((s) => s.nodeId === nodeId) || i.group.engines.some((e) => e.nodeId === nodeId));
  }

  #onMembership(c: RegistryChange): void {
    const n = c.node;
    const label = `node ${n.profile.name} (${n.nodeId})`;
    // Suspect is a blip (a late heartbeat, a broken stream being re-dialled): the engines may well
    // be fine, and requests on them simply wait. Only down — silent past the grace period, or its
    // agent refused the re-dial — means the engines are gone.
    if (c.kind === 'state' && c.to === 'down') {
      for (const i of this.#instancesOnNode(n.nodeId)) this.#fail(i, `${label} is down: ${c.reason}`, 'node-down');
    } else if (c.kind === 'state' && c.to === 'suspect') {
      const on = this.#instancesOnNode(n.nodeId);
      if (on.length > 0) this.#log.warn({ node: n.profile.name, models: on.map((i) => i.name), reason: c.reason }, 'node suspect: its models wait out the grace period');
    } else if (c.kind === 'removed') {
      for (const i of this.#instancesOnNode(n.nodeId)) this.#fail(i, `${label} left the cluster: ${c.reason}`, 'node-left');
    } else if (c.kind === 'replaced') {
      // The agent restarted: the engines it ran for us died with its previous process.
      for (const i of this.#instancesOnNode(n.nodeId)) this.#fail(i, `${label} restarted`, 'node-restarted');
    }
    if (c.kind === 'added' || c.kind === 'replaced' || (c.kind === 'state' && c.to === 'up')) {
      this.#retryHealing();
      this.moves.nodeArrived();
    }
    // A node back from down may still run engines of an instance failed meanwhile: stop them.
  }

  #onAgentEvent(nodeId: string, ev: AgentEvent): void {
    // Expected or not: an engine its own unload stops is already off its group's roster, so any
    // exit that still matches one (a foreign StopEngine, the agent shutting down, an OOM kill)
    // fails that instance at once instead of leaving it "ready" and broken.
    if (ev.kind !== 'engine-exited') return;
    for (const i of this.#instancesOnNode(nodeId)) i.group.engineExited(nodeId, ev);
    // A move's new engines (moves.ts) are not the instance's yet: their loss aborts only the move.
    for (const i of this.#instances.values()) i.staged?.engineExited(nodeId, ev);
  }

  /** Stop: unload every model, or with `keepEngines` leave them running for the next leader to re-adopt. */
  async close(o: { keepEngines?: boolean } = {}): Promise<void> {
    this.moves.close();
    if (!o.keepEngines) await Promise.all([...this.#instances.keys()].map((n) => this.unload(n).catch(() => {})));
  }
}
