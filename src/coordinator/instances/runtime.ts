import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { stat } from 'node:fs/promises';
import { basename } from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import { errorMessage, OrchardError, UsageError } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import type { AgentClient, AgentEvent } from '../membership/agent-client.ts';
import { type HeadOptions, headLayout, type LayoutStage } from './llama/layout.ts';
import { parseEngineLog, type VerifyResult, verifyEngineReport } from './llama/verify.ts';
import { CoordinatorError } from '../errors.ts';
import type { Membership } from '../membership/membership.ts';
import type { NodeEntry, RegistryChange } from '../membership/registry.ts';
import { memoryOptionsOf } from './planner-adapter.ts';
import { Slots } from './slots.ts';
import { ModelIdentity, defaultModelHashDir, seedStageCache } from './llama/tensor-cache.ts';
import { engineForModel, looksLikeMlxModelDir, mlxInstanceLaunch } from './mlx/launch.ts';
import { type MlxRankEngine, startMlxRanks, submitToFollowers } from './mlx/instance.ts';

/**
 * The runtime: model instances across the cluster. Load = plan against live nodes → start the
 * worker stages' ggml-rpc-servers → start llama-server on the head stage's node with `--rpc` and
 * arguments pinning every layer range → verify the engine's own log against the plan → ready.
 * Generate relays the head agent's token stream. Any failure of a node or engine an instance
 * uses fails the instance at once: in-flight streams end with UNAVAILABLE naming the node, and
 * the engines still alive are stopped (llama.cpp cannot recover from a lost RPC stage).
 *
 * This is the API the gRPC server, the CLI and the OpenAI HTTP API build on:
 *   load(request, onProgress) · unload(name) · generate(request, signal) · models() · plan(...)
 *
 * Coordinator restart policy: clean up, not re-adopt. Engine ids carry the cluster id
 * (`o<cluster8>-…`); when an agent (re)connects, any engine with this cluster's prefix that no
 * live instance owns is stopped. Re-adopting would mean trusting a split nobody verified in this
 * process and a head whose RPC peers may have changed; a reload from local files is cheap by
 * comparison, and "no orphan engines" then holds without persisted instance state.
 */

export interface LoadOptions {
  readonly ctx: number;
  readonly cacheType: string;
  readonly parallel: number;
  readonly pinnedNodes: readonly string[];
}

export const DEFAULT_LOAD_OPTIONS: LoadOptions = { ctx: 4096, cacheType: 'f16', parallel: 1, pinnedNodes: [] };

/** One stage as the planner returns it (the last stage is the head). */
export interface PlannedStage {
  readonly nodeId: string;
  readonly nodeName: string;
  readonly firstLayer: number;
  readonly lastLayer: number;
  readonly bytes: { readonly weights: number; readonly kv: number; readonly compute: number; readonly overhead: number; readonly total: number };
  readonly budgetBytes: number;
  /** What llama.cpp should report for this stage's device, when the planner predicts it. */
  readonly device?: { readonly model: number; readonly kv: number; readonly compute: number } | undefined;
}

export interface PlacementResult {
  readonly stages: readonly PlannedStage[];
  readonly nLayer: number;
  readonly predictedTokensPerSecond: number;
  /** KV bytes of every layer as the engine will allocate them (verification without -lv 5). */
  readonly layerKvBytes?: readonly number[] | undefined;
  /** The planner's full result, for `Plan` / `orchard plan --json`. */
  readonly raw: unknown;
}

/** Plans a model onto nodes; throws UsageError (bad file) or OrchardError ("does not fit …"). */
export type Planner = (modelPath: string, nodes: readonly NodeEntry[], options: LoadOptions) => Promise<PlacementResult>;

export type ModelState = 'loading' | 'ready' | 'failed' | 'unloading';

export interface ModelStage extends PlannedStage {
  readonly endpoint: string;
}

export interface ModelStatus {
  readonly name: string;
  readonly path: string;
  readonly state: ModelState;
  readonly engine: 'llama' | 'mlx';
  readonly stages: readonly ModelStage[];
  readonly error: string;
  readonly predictedTokensPerSecond: number;
  readonly options: LoadOptions;
  readonly verification?: VerifyResult | undefined;
  readonly loadedAtMs?: number | undefined;
}

export interface LoadRequest {
  readonly modelPath: string;
  readonly name?: string | undefined;
  readonly options?: Partial<LoadOptions> | undefined;
  /** "mlx" | "llama" | "auto"/"" (by format: a directory with config.json → mlx, .gguf → llama). */
  readonly engine?: string | undefined;
}

export interface LoadProgress {
  readonly phase: 'planning' | 'starting-workers' | 'starting-head' | 'verifying' | 'ready' | 'failed';
  readonly message: string;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly elapsedSeconds: number;
  readonly model?: ModelStatus | undefined;
}

export interface GenerateRequest {
  readonly model?: string | undefined;
  readonly prompt: string;
  readonly maxTokens: number;
  readonly temperature: number;
  readonly topP?: number | undefined;
  readonly seed?: number | undefined;
  readonly stop?: readonly string[] | undefined;
  /** Chat: the head applies the model's chat template to these instead of taking `prompt`. */
  readonly messages?: readonly ChatMessage[] | undefined;
}

export interface ChatMessage {
  readonly role: string;
  readonly content: string;
}

export interface Timings {
  readonly promptMs: number;
  readonly predictedMs: number;
  readonly promptTokensPerSecond: number;
  readonly predictedTokensPerSecond: number;
  readonly firstTokenMs: number;
}

export type GenerateEvent =
  | { readonly kind: 'token'; readonly text: string; readonly tokenIds: readonly number[] }
  | {
      readonly kind: 'done';
      readonly finishReason: string;
      readonly promptTokens: number;
      readonly completionTokens: number;
      readonly timings: Timings;
    };

export interface RuntimeOptions {
  readonly membership: Membership;
  readonly planner: Planner;
  readonly clusterId: string;
  readonly log: Logger;
  /** Requests that may wait per instance beyond its --parallel slots (default 4 × parallel). */
  readonly maxQueue?: number | undefined;
  /** llama-server readiness timeout (model load incl. pushing weights over RPC). */
  readonly headReadyTimeoutMs?: number | undefined;
  /** Extra llama-server arguments for every load (e.g. `-t 1` in tests). */
  readonly extraHeadArgs?: readonly string[] | undefined;
  /** Threads for each rpc-server (0 = its default). */
  readonly rpcThreads?: number | undefined;
  /**
   * Pre-seed each rpc-server's tensor cache from the node's own copy of the model when it has
   * one (tensor-cache.ts). Default on; false sends every weight over the network.
   */
  readonly tensorCache?: boolean | undefined;
  /** Where the coordinator caches model files' SHA-256 (default ~/.cache/orchard). */
  readonly modelHashDir?: string | undefined;
  /** MLX: every rank must be ready within this (each agent's start-up watchdog; default 300 s). */
  readonly mlxReadyTimeoutMs?: number | undefined;
  /** MLX: rank 0 must emit at least this often during a request (default 30 s). */
  readonly mlxStallTimeoutSeconds?: number | undefined;
  /** MLX: random source for fresh ring ports (tests may seed it). */
  readonly random?: (() => number) | undefined;
  /** Start llama-server with -lv 5 (every layer's device in its log); default ORCHARD_ENGINE_DEBUG_LOG=1. */
  readonly engineDebugLog?: boolean | undefined;
}

interface StartedEngine {
  readonly nodeId: string;
  readonly engineId: string;
  readonly kind: 'ENGINE_KIND_RPC_SERVER' | 'ENGINE_KIND_LLAMA_SERVER' | 'ENGINE_KIND_MLX_RANK';
}

interface Instance {
  readonly id: string;
  readonly name: string;
  readonly path: string;
  readonly engine: 'llama' | 'mlx';
  /** MLX: the ranks in rank order (rank 0 = head, it emits; the others get each request first). */
  mlxRanks: MlxRankEngine[];
  state: ModelState;
  stages: ModelStage[];
  readonly engines: StartedEngine[];
  head: StartedEngine | undefined;
  error: string;
  predictedTokensPerSecond: number;
  readonly options: LoadOptions;
  verification: VerifyResult | undefined;
  slots: Slots;
  readonly active: Set<AbortController>;
  loadedAtMs: number | undefined;
  /** Resolves with the reason when the instance fails (used to name the culprit in errors). */
  readonly failed: Promise<string>;
  markFailed: (reason: string) => void;
}

export interface RuntimeEvents {
  model: [status: ModelStatus];
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

export function defaultModelName(path: string): string {
  return basename(path).replace(/\.gguf$/i, '');
}

export function resolveLoadOptions(o: Partial<LoadOptions> | undefined): LoadOptions {
  const r: LoadOptions = {
    ctx: o?.ctx || DEFAULT_LOAD_OPTIONS.ctx,
    cacheType: o?.cacheType || DEFAULT_LOAD_OPTIONS.cacheType,
    parallel: o?.parallel || DEFAULT_LOAD_OPTIONS.parallel,
    pinnedNodes: o?.pinnedNodes ?? [],
  };
  if (!Number.isInteger(r.ctx) || r.ctx < 16 || r.ctx > 16_777_216) throw new UsageError(`invalid ctx ${r.ctx}: 16–16777216`);
  if (!Number.isInteger(r.parallel) || r.parallel < 1 || r.parallel > 256) throw new UsageError(`invalid parallel ${r.parallel}: 1–256`);
  if (!['f16', 'q8_0', 'q4_0', 'f32', 'bf16'].includes(r.cacheType)) {
    throw new UsageError(`invalid cache type "${r.cacheType}": f16, q8_0, q4_0, f32 or bf16`);
  }
  return r;
}

/** Short, engine-id-safe prefix of this cluster's engines (engine ids: ≤ 64 of [A-Za-z0-9._-]). */
export function enginePrefix(clusterId: string): string {
  return `o${clusterId.replace(/[^A-Za-z0-9]/g, '').slice(0, 8)}-`;
}

export class Runtime extends EventEmitter<RuntimeEvents> {
  readonly #o: RuntimeOptions;
  readonly #instances = new Map<string, Instance>();
  readonly #log: Logger;
  readonly #prefix: string;

  constructor(o: RuntimeOptions) {
    super();
    this.#o = o;
    this.#log = o.log;
    this.#prefix = enginePrefix(o.clusterId);
    o.membership.on('change', (c) => this.#onMembership(c));
    o.membership.on('agent-event', (nodeId, ev) => this.#onAgentEvent(nodeId, ev));
  }

  models(): ModelStatus[] {
    return [...this.#instances.values()].map((i) => this.#status(i));
  }

  model(name: string): ModelStatus | undefined {
    const i = this.#instances.get(name);
    return i ? this.#status(i) : undefined;
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
    const up = this.#o.membership.registry.upNodes();
    if (opts.pinnedNodes.length === 0) return up;
    const pinned = up.filter((n) => opts.pinnedNodes.includes(n.nodeId) || opts.pinnedNodes.includes(n.profile.name));
    const missing = opts.pinnedNodes.filter((p) => !pinned.some((n) => n.nodeId === p || n.profile.name === p));
    if (missing.length > 0) throw new CoordinatorError('FAILED_PRECONDITION', `pinned node(s) not up: ${missing.join(', ')}`);
    return pinned;
  }

  /**
   * Load a model; resolves with the ready status or rejects with the reason. A failed load
   * stops every engine it started and leaves no entry behind.
   */
  async load(req: LoadRequest, onProgress: (p: LoadProgress) => void = () => {}): Promise<ModelStatus> {
    const t0 = Date.now();
    if (!req.modelPath) throw new UsageError('model path is required');
    const name = req.name || defaultModelName(req.modelPath);
    if (!NAME.test(name)) throw new UsageError(`invalid model name "${name}": 1–128 of A-Z a-z 0-9 . _ : - (use --name)`);
    // Synchronous on purpose: the name must be reserved below without yielding in between.
    const engine = engineForModel(req.modelPath, looksLikeMlxModelDir(req.modelPath), req.engine);
    let options = resolveLoadOptions(req.options);
    // MLX ranks serve one request at a time in lockstep and must see requests in the same order.
    if (engine === 'mlx' && options.parallel !== 1) {
      this.#log.info({ model: name, parallel: options.parallel }, 'MLX serves one request at a time: parallel set to 1');
      options = { ...options, parallel: 1 };
    }
    const existing = this.#instances.get(name);
    if (existing && existing.state !== 'failed') {
      throw new CoordinatorError('ALREADY_EXISTS', `model "${name}" is already ${existing.state === 'ready' ? 'loaded' : existing.state}; unload it first or pick another --name`);
    }
    let markFailed: (reason: string) => void = () => {};
    const failed = new Promise<string>((resolve) => {
      markFailed = resolve;
    });
    const inst: Instance = {
      id: randomUUID().replace(/-/g, '').slice(0, 8),
      name,
      path: req.modelPath,
      engine,
      mlxRanks: [],
      state: 'loading',
      stages: [],
      engines: [],
      head: undefined,
      error: '',
      predictedTokensPerSecond: 0,
      options,
      verification: undefined,
      slots: new Slots(options.parallel, this.#o.maxQueue ?? 4 * options.parallel),
      active: new Set(),
      loadedAtMs: undefined,
      failed,
      markFailed,
    };
    // Reserve the name first so a concurrent load of the same name is refused.
    this.#instances.set(name, inst);
    const elapsed = () => (Date.now() - t0) / 1000;
    let bytesTotal = 0;
    const progress = (phase: LoadProgress['phase'], message: string, bytesDone = 0) => {
      this.#log.info({ model: name, phase, elapsed: elapsed() }, message);
      onProgress({ phase, message, bytesDone, bytesTotal, elapsedSeconds: elapsed(), model: this.#status(inst) });
    };
    try {
      progress('planning', `planning ${req.modelPath} on ${this.#o.membership.registry.upNodes().length} live node(s)`);
      const plan = await this.#o.planner(req.modelPath, this.#plannableNodes(options), options);
      bytesTotal = plan.stages.reduce((s, st) => s + st.bytes.weights, 0);
      inst.predictedTokensPerSecond = plan.predictedTokensPerSecond;
      const nodes = plan.stages.map((s) => {
        const n = this.#o.membership.registry.get(s.nodeId);
        if (n?.state !== 'up') throw new CoordinatorError('UNAVAILABLE', `node ${s.nodeName} (${s.nodeId}) is no longer up`);
        return n!;
      });
      const last = plan.stages.length - 1;
      const headNode = nodes[last]!;
      const headHasGpu = headNode.profile.os === 'macos';
      inst.stages = plan.stages.map((s) => ({ ...s, endpoint: '' }));
      this.#assertLoading(inst);
      if (engine === 'mlx') {
        await this.#startMlx(inst, plan, nodes, (m) => progress('starting-workers', m));
        inst.state = 'ready';
        inst.loadedAtMs = Date.now();
        progress('ready', `${name} ready on ${plan.stages.length} MLX rank(s) in ${elapsed().toFixed(1)} s`, bytesTotal);
        this.emit('model', this.#status(inst));
        return this.#status(inst);
      }

      // 1. rpc-servers: every worker stage, plus the head's own stage on a CPU-only head.
      progress('starting-workers', `starting ${headHasGpu ? last : last + 1} rpc-server(s)`);
      const identity = new ModelIdentity(req.modelPath, this.#o.modelHashDir ?? defaultModelHashDir());
      // The planner already read this file; -1 (no pre-seeding) if it is not readable here.
      const modelSize = await stat(req.modelPath).then((st) => st.size, () => -1);
      const endpoints = await Promise.all(
        plan.stages.map(async (_s, i) => {
          if (i === last && headHasGpu) return undefined;
          const node = nodes[i]!;
          // Workers listen on the address the coordinator reaches their agent at (the cluster
          // network); the head's own rpc-server only on loopback.
          const bindHost = i === last ? '127.0.0.1' : hostOf(node.address);
          const engineId = `${this.#prefix}${inst.id}-s${i}-rpc`;
          const seeded =
            this.#o.tensorCache === false || modelSize < 0
              ? undefined
              : await seedStageCache({
                  client: this.#client(node.nodeId),
                  nodeName: node.profile.name,
                  model: identity,
                  modelSizeBytes: modelSize,
                  stage: { firstLayer: plan.stages[i]!.firstLayer, lastLayer: plan.stages[i]!.lastLayer, holdsOutput: i === last },
                  log: this.#log,
                  onProgress: (m) => progress('starting-workers', m),
                });
          this.#assertLoading(inst);
          const e = await this.#startEngine(inst, node, {
            kind: 'ENGINE_KIND_RPC_SERVER',
            engineId,
            bindHost,
            ...(seeded ? { cacheDir: seeded.cacheDir } : {}),
            threads: this.#o.rpcThreads ?? 0,
            model: name,
            readyTimeoutSeconds: 60,
          }, 90_000);
          const endpoint = `${i === last ? '127.0.0.1' : e.host || bindHost}:${e.port}`;
          inst.stages[i] = { ...inst.stages[i]!, endpoint };
          return endpoint;
        }),
      );
      this.#assertLoading(inst);

      // 2. llama-server on the head node, pinned to the plan.
      const layoutStages: LayoutStage[] = plan.stages.map((s) => ({
        nodeId: s.nodeId,
        nodeName: s.nodeName,
        firstLayer: s.firstLayer,
        lastLayer: s.lastLayer,
        predicted: s.device,
        budgetBytes: s.budgetBytes,
      }));
      const headOpts: HeadOptions = {
        modelPath: req.modelPath,
        nLayer: plan.nLayer,
        memory: memoryOptionsOf(options),
        headHasGpu,
        debugLog: this.#o.engineDebugLog ?? process.env.ORCHARD_ENGINE_DEBUG_LOG === '1',
        extraArgs: this.#o.extraHeadArgs,
      };
      const layout = headLayout(layoutStages, endpoints, headOpts);
      progress('starting-head', `starting llama-server on ${headNode.profile.name}: ${layout.args.join(' ')}`);
      const headTimeout = this.#o.headReadyTimeoutMs ?? 600_000;
      const ticker = setInterval(() => progress('starting-head', `loading weights (${Math.round(elapsed())} s)`), 2000);
      let head: Awaited<ReturnType<Runtime['startEngineRaw']>>;
      try {
        head = await this.startEngineRaw(inst, headNode, {
          kind: 'ENGINE_KIND_LLAMA_SERVER',
          engineId: `${this.#prefix}${inst.id}-head`,
          args: layout.args,
          model: name,
          readyTimeoutSeconds: headTimeout / 1000,
        }, headTimeout + 10_000);
      } finally {
        clearInterval(ticker);
      }
      if (last === 0 && headHasGpu) inst.stages[last] = { ...inst.stages[last]!, endpoint: '' };
      this.#assertLoading(inst);

      // 3. verify what the engine actually did.
      progress('verifying', 'checking the engine’s device assignment against the plan', bytesTotal);
      const report = parseEngineLog(head.logLines);
      const v = verifyEngineReport(report, layout.devices, plan.nLayer, plan.layerKvBytes);
      inst.verification = v;
      for (const d of v.devices) {
        this.#log.info({ model: name, device: d.device, node: d.nodeName, planned: d.plannedLayers, actual: d.actualLayers, predicted: d.predicted, bytes: d.actual }, 'stage verification');
      }
      if (!v.ok) throw new CoordinatorError('INTERNAL', `the engine does not match the plan: ${v.problems.join('; ')}`);

      inst.state = 'ready';
      inst.loadedAtMs = Date.now();
      progress('ready', `${name} ready on ${plan.stages.length} stage(s) in ${elapsed().toFixed(1)} s`, bytesTotal);
      this.emit('model', this.#status(inst));
      return this.#status(inst);
    } catch (err) {
      const reason = inst.error || errorMessage(err);
      await this.#stopAll(inst);
      if (this.#instances.get(name) === inst) this.#instances.delete(name);
      onProgress({ phase: 'failed', message: reason, bytesDone: 0, bytesTotal, elapsedSeconds: elapsed(), model: { ...this.#status(inst), state: 'failed', error: reason } });
      this.#log.warn({ model: name, err: reason }, 'load failed');
      if (inst.error && !(err instanceof CoordinatorError && err.message === inst.error)) throw new CoordinatorError('UNAVAILABLE', inst.error);
      throw err;
    }
  }

  /** MLX: lay the ranks out over the plan's nodes and start them in the order the ring needs. */
  async #startMlx(inst: Instance, plan: PlacementResult, nodes: readonly NodeEntry[], say: (m: string) => void): Promise<void> {
    const launch = mlxInstanceLaunch(
      plan.stages.map((s, i) => ({
        nodeId: s.nodeId,
        nodeName: s.nodeName,
        agentAddress: nodes[i]!.address,
        interfaces: nodes[i]!.profile.interfaces,
        layers: s.lastLayer - s.firstLayer + 1,
      })),
      {
        modelDir: inst.path,
        maxTokens: inst.options.ctx,
        stallTimeoutSeconds: this.#o.mlxStallTimeoutSeconds ?? 30,
        random: this.#o.random ?? Math.random,
      },
    );
    this.#log.info({ model: inst.name, backend: launch.backend, reason: launch.reason, ranks: launch.ranks.map((r) => ({ rank: r.rank, node: r.nodeName, stage: r.stage, hosts: r.mlx.hosts })) }, 'MLX launch');
    inst.mlxRanks = await startMlxRanks(
      {
        client: (id) => this.#client(id),
        record: (e) => {
          const rec: StartedEngine = { nodeId: e.nodeId, engineId: e.engineId, kind: 'ENGINE_KIND_MLX_RANK' };
          inst.engines.push(rec);
          if (e.rank === 0) inst.head = rec;
        },
        assertLoading: () => this.#assertLoading(inst),
        progress: say,
      },
      launch,
      { engineIdPrefix: `${this.#prefix}${inst.id}`, model: inst.name, readyTimeoutMs: this.#o.mlxReadyTimeoutMs ?? 300_000 },
    );
    for (const r of launch.ranks) inst.stages[r.stage] = { ...inst.stages[r.stage]!, endpoint: r.mlx.hosts[r.rank]?.endpoints[0] ?? r.mlx.jacclCoordinator };
  }

  #assertLoading(inst: Instance): void {
    if (inst.state !== 'loading') throw new CoordinatorError('UNAVAILABLE', inst.error || `load of ${inst.name} was aborted`);
  }

  async #startEngine(inst: Instance, node: NodeEntry, o: Parameters<AgentClient['startEngine']>[0], timeoutMs: number) {
    return (await this.startEngineRaw(inst, node, o, timeoutMs)).engine;
  }

  /** Start an engine and record it on the instance before it can be needed for clean-up. */
  async startEngineRaw(inst: Instance, node: NodeEntry, o: Parameters<AgentClient['startEngine']>[0], timeoutMs: number) {
    const client = this.#client(node.nodeId);
    const rec: StartedEngine = { nodeId: node.nodeId, engineId: o.engineId, kind: o.kind };
    // Recorded before the call: if the call times out after the agent started it, clean-up still stops it.
    inst.engines.push(rec);
    if (o.kind === 'ENGINE_KIND_LLAMA_SERVER') inst.head = rec;
    try {
      return await client.startEngineWithLog(o, timeoutMs);
    } catch (err) {
      throw new CoordinatorError('UNAVAILABLE', `starting ${o.kind === 'ENGINE_KIND_RPC_SERVER' ? 'rpc-server' : 'llama-server'} on ${node.profile.name} failed: ${grpcMessage(err)}`);
    }
  }

  #client(nodeId: string): AgentClient {
    const c = this.#o.membership.client(nodeId);
    if (!c) throw new CoordinatorError('UNAVAILABLE', `node ${nodeId} is not connected`);
    return c;
  }

  /** Stop an instance's engines: head first (it holds connections to the workers), then workers. */
  async #stopAll(inst: Instance): Promise<void> {
    const engines = inst.engines.splice(0);
    const order = [...engines.filter((e) => e.kind === 'ENGINE_KIND_LLAMA_SERVER'), ...engines.filter((e) => e.kind !== 'ENGINE_KIND_LLAMA_SERVER')];
    const headStops = order.filter((e) => e.kind === 'ENGINE_KIND_LLAMA_SERVER').map((e) => this.#stopEngine(e));
    await Promise.all(headStops);
    await Promise.all(order.filter((e) => e.kind !== 'ENGINE_KIND_LLAMA_SERVER').map((e) => this.#stopEngine(e)));
  }

  async #stopEngine(e: StartedEngine): Promise<void> {
    const node = this.#o.membership.registry.get(e.nodeId);
    const client = this.#o.membership.client(e.nodeId);
    if (!node || !client || node.state === 'down') return; // a dead agent took its engines with it
    try {
      await client.stopEngine(e.engineId, 8000);
    } catch (err) {
      this.#log.warn({ engineId: e.engineId, node: node.profile.name, err: grpcMessage(err) }, 'could not stop engine');
    }
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
    for (const a of inst.active) a.abort(err);
    await this.#stopAll(inst);
    if (this.#instances.get(name) === inst) this.#instances.delete(name);
    this.emit('model', { ...this.#status(inst), state: 'unloading' });
    return true;
  }

  /**
   * Stream a completion. Throws CoordinatorError: NOT_FOUND (no such model), FAILED_PRECONDITION
   * (not ready), RESOURCE_EXHAUSTED (busy), UNAVAILABLE (a node or engine failed; names it),
   * CANCELLED (the caller's signal aborted, or unload).
   */
  async *generate(req: GenerateRequest, signal?: AbortSignal): AsyncGenerator<GenerateEvent> {
    const inst = this.#pick(req.model);
    if (!req.prompt && !req.messages?.length) throw new UsageError('prompt is empty');
    const ctl = new AbortController();
    const onCallerAbort = () => ctl.abort(new CoordinatorError('CANCELLED', 'request cancelled by the client'));
    if (signal?.aborted) onCallerAbort();
    signal?.addEventListener('abort', onCallerAbort, { once: true });
    let release: (() => void) | undefined;
    let call: grpc.ClientReadableStream<Record<string, unknown>> | undefined;
    inst.active.add(ctl);
    try {
      release = await inst.slots.acquire(ctl.signal);
      if (inst.state !== 'ready' || !inst.head) throw new CoordinatorError('UNAVAILABLE', inst.error || `model "${inst.name}" is not ready`);
      const client = this.#client(inst.head.nodeId);
      const agentReq = {
        prompt: req.prompt,
        maxTokens: req.maxTokens,
        temperature: req.temperature,
        topP: req.topP ?? 0,
        seed: req.seed ?? 0,
        stop: req.stop ?? [],
        requestId: randomUUID(),
        messagesJson: req.messages?.length ? JSON.stringify(req.messages.map((m) => ({ role: m.role, content: m.content }))) : '',
      };
      // MLX: every other rank takes the identical request first (ranks step in lockstep).
      // Not raced against the caller's abort: once some ranks hold the request, rank 0 must get it
      // too (its agent cancels it at once), or the group falls out of step. A rank that cannot
      // take it leaves the group inconsistent: fail the instance (a reload restarts it).
      if (inst.engine === 'mlx' && inst.mlxRanks.length > 1) {
        try {
          await submitToFollowers(inst.mlxRanks.slice(1), (id) => this.#client(id), agentReq);
        } catch (err) {
          this.#fail(inst, errorMessage(err));
          throw new CoordinatorError('UNAVAILABLE', inst.error || errorMessage(err));
        }
      }
      call = client.generate({ engineId: inst.head.engineId, ...agentReq });
      const stream = call;
      ctl.signal.addEventListener('abort', () => stream.cancel(), { once: true });
      try {
        for await (const m of stream as AsyncIterable<Record<string, unknown>>) {
          if (ctl.signal.aborted) break;
          const ev = generateEventFromWire(m);
          if (ev) yield ev;
        }
      } catch (err) {
        if (ctl.signal.aborted) throw ctl.signal.reason;
        // The engine refused the request itself (e.g. a prompt longer than the context): the
        // caller's fault, not a broken stage.
        const code = (err as { code?: unknown }).code;
        if (code === 3) throw new CoordinatorError('INVALID_ARGUMENT', grpcMessage(err));
        if (code === 8) throw new CoordinatorError('RESOURCE_EXHAUSTED', grpcMessage(err));
        // The head's stream broke. Usually a stage died; give membership a moment to say which.
        const reason = await Promise.race([inst.failed, new Promise<undefined>((r) => setTimeout(r, 1000))]);
        if (reason) throw new CoordinatorError('UNAVAILABLE', reason);
        const head = this.#o.membership.registry.get(inst.head.nodeId);
        throw new CoordinatorError('UNAVAILABLE', `generation on ${head?.profile.name ?? inst.head.nodeId} failed: ${grpcMessage(err)}`);
      }
      if (ctl.signal.aborted) throw ctl.signal.reason;
    } finally {
      signal?.removeEventListener('abort', onCallerAbort);
      call?.cancel();
      release?.();
      inst.active.delete(ctl);
    }
  }

  #pick(model: string | undefined): Instance {
    if (model) {
      const i = this.#instances.get(model);
      if (!i) throw new CoordinatorError('NOT_FOUND', `no model named "${model}" (loaded: ${[...this.#instances.keys()].join(', ') || 'none'})`);
      if (i.state === 'failed') throw new CoordinatorError('UNAVAILABLE', `model "${model}" failed: ${i.error}`);
      if (i.state !== 'ready') throw new CoordinatorError('FAILED_PRECONDITION', `model "${model}" is ${i.state}`);
      return i;
    }
    const ready = [...this.#instances.values()].filter((i) => i.state === 'ready');
    if (ready.length === 1) return ready[0]!;
    if (ready.length === 0) {
      const failed = [...this.#instances.values()].find((i) => i.state === 'failed');
      if (failed) throw new CoordinatorError('UNAVAILABLE', `model "${failed.name}" failed: ${failed.error}`);
      throw new CoordinatorError('FAILED_PRECONDITION', 'no model is loaded: run `orchard load MODEL.gguf` first');
    }
    throw new CoordinatorError('INVALID_ARGUMENT', `several models are loaded (${ready.map((i) => i.name).join(', ')}): choose one with --model`);
  }

  /** Fail an instance: streams end with UNAVAILABLE naming the cause; surviving engines stop. */
  #fail(inst: Instance, reason: string): void {
    if (inst.state === 'failed' || inst.state === 'unloading') return;
    const wasReady = inst.state === 'ready';
    inst.state = 'failed';
    inst.error = reason;
    inst.markFailed(reason);
    this.#log.error({ model: inst.name, reason }, 'model instance failed');
    const err = new CoordinatorError('UNAVAILABLE', reason);
    inst.slots.failWaiting(err);
    for (const a of inst.active) a.abort(err);
    // A loading instance is cleaned up by load()'s own failure path.
    if (wasReady) void this.#stopAll(inst);
    this.emit('model', this.#status(inst));
  }

  #instancesOnNode(nodeId: string): Instance[] {
    return [...this.#instances.values()].filter((i) => i.stages.some((s) => s.nodeId === nodeId) || i.engines.some((e) => e.nodeId === nodeId));
  }

  #onMembership(c: RegistryChange): void {
    const n = c.node;
    const label = `node ${n.profile.name} (${n.nodeId})`;
    if (c.kind === 'state' && c.to !== 'up') {
      for (const i of this.#instancesOnNode(n.nodeId)) this.#fail(i, `${label} is unavailable: ${c.reason}`);
    } else if (c.kind === 'removed') {
      for (const i of this.#instancesOnNode(n.nodeId)) this.#fail(i, `${label} left the cluster: ${c.reason}`);
    } else if (c.kind === 'replaced') {
      // The agent restarted: the engines it ran for us died with its previous process.
      for (const i of this.#instancesOnNode(n.nodeId)) this.#fail(i, `${label} restarted`);
    }
    if (c.kind === 'added' || c.kind === 'replaced') void this.#cleanUpOrphans(n.nodeId);
  }

  #onAgentEvent(nodeId: string, ev: AgentEvent): void {
    if (ev.kind !== 'engine-exited' || ev.expected) return;
    for (const i of this.#instancesOnNode(nodeId)) {
      const e = i.engines.find((x) => x.engineId === ev.engineId && x.nodeId === nodeId);
      if (!e) continue;
      const node = this.#o.membership.registry.get(nodeId);
      const how = ev.signal ? `signal ${ev.signal}` : `exit code ${ev.exitCode}`;
      const last = ev.lastStderrLines.filter((l) => l.trim()).slice(-1)[0];
      const label = e.kind === 'ENGINE_KIND_RPC_SERVER' ? 'rpc-server' : e.kind === 'ENGINE_KIND_MLX_RANK' ? `MLX rank ${i.mlxRanks.find((r) => r.engineId === e.engineId)?.rank ?? '?'}` : 'llama-server';
      this.#fail(i, `${label} on node ${node?.profile.name ?? nodeId} (${nodeId}) exited (${how})${last ? `: ${last.trim()}` : ''}`);
    }
  }

  /** Stop engines of this cluster that no instance owns (left over from a previous coordinator). */
  async #cleanUpOrphans(nodeId: string): Promise<void> {
    const client = this.#o.membership.client(nodeId);
    if (!client) return;
    try {
      const d = await client.describe();
      const owned = new Set([...this.#instances.values()].flatMap((i) => i.engines.map((e) => e.engineId)));
      for (const e of d.engines) {
        if (e.engineId.startsWith(this.#prefix) && !owned.has(e.engineId)) {
          this.#log.warn({ node: d.profile.name, engineId: e.engineId }, 'stopping an engine no model owns (left by a previous coordinator)');
          await client.stopEngine(e.engineId).catch(() => {});
        }
      }
    } catch (err) {
      this.#log.debug({ nodeId, err: grpcMessage(err) }, 'orphan check failed');
    }
  }

  #status(i: Instance): ModelStatus {
    return {
      name: i.name,
      path: i.path,
      state: i.state,
      engine: i.engine,
      stages: i.stages.map((s) => ({ ...s })),
      error: i.error,
      predictedTokensPerSecond: i.predictedTokensPerSecond,
      options: i.options,
      verification: i.verification,
      loadedAtMs: i.loadedAtMs,
    };
  }

  /** Stop every engine of every instance (coordinator shutdown). */
  async close(): Promise<void> {
    await Promise.all([...this.#instances.keys()].map((n) => this.unload(n).catch(() => {})));
  }
}

export function hostOf(address: string): string {
  if (address.startsWith('[')) return address.slice(1, address.indexOf(']'));
  const i = address.lastIndexOf(':');
  return i < 0 ? address : address.slice(0, i);
}

export function grpcMessage(err: unknown): string {
  const e = err as { details?: string; message?: string };
  return e?.details || errorMessage(err);
}

function generateEventFromWire(m: Record<string, unknown>): GenerateEvent | undefined {
  if (m.event === 'token') {
    const t = (m.token ?? {}) as Record<string, unknown>;
    return { kind: 'token', text: String(t.text ?? ''), tokenIds: Array.isArray(t.tokenIds) ? t.tokenIds.map(Number) : [] };
  }
  if (m.event === 'done') {
    const d = (m.done ?? {}) as Record<string, unknown>;
    const t = (d.timings ?? {}) as Record<string, unknown>;
    return {
      kind: 'done',
      finishReason: String(d.finishReason ?? ''),
      promptTokens: Number(d.promptTokens ?? 0),
      completionTokens: Number(d.completionTokens ?? 0),
      timings: {
        promptMs: Number(t.promptMs ?? 0),
        predictedMs: Number(t.predictedMs ?? 0),
        promptTokensPerSecond: Number(t.promptTokensPerSecond ?? 0),
        predictedTokensPerSecond: Number(t.predictedTokensPerSecond ?? 0),
        firstTokenMs: Number(t.firstTokenMs ?? 0),
      },
    };
  }
  return undefined;
}

export { OrchardError };
