import { stat } from 'node:fs/promises';
import { UsageError } from '../../../shared/errors.ts';
import { CoordinatorError } from '../../errors.ts';
import type { StartEngineOptions } from '../../membership/agent-client.ts';
import type { NodeEntry } from '../../membership/registry.ts';
import { engineEndpoint } from '../../membership/wire.ts';
import {
  type AdoptedEngines,
  type Cluster,
  clientOf,
  type EngineDriver,
  type EngineGroup,
  type EngineRequest,
  type EngineStream,
  grpcMessage,
  headStream,
  type InstanceSpec,
  type LoadContext,
  RosterGroup,
} from '../driver.ts';
import type { RpcTarget } from '../../../shared/placement/llama-args.ts';
import { hashesOfStage, type TensorHash } from '../../../shared/rpc-cache/known-hashes.ts';
import { memoryOptionsOf } from '../planner-adapter.ts';
import type { LoadOptions } from '../types.ts';
import { headLayout, headThreads, type LayoutStage } from './layout.ts';
import { defaultModelHashDir, ModelIdentity, seedStageCache } from './tensor-cache.ts';
import { type PlannedDevice, parseEngineLog, type VerifyResult, verifyEngineReport } from './verify.ts';

/**
 * llama.cpp over RPC: one ggml-rpc-server per worker stage (pre-seeded from the node's own copy
 * of the model when it has one, tensor-cache.ts), then llama-server on the head stage's node with
 * `--rpc` and arguments pinning every layer range (layout.ts), then the engine's own start-up log
 * checked against the plan (verify.ts). A lost stage cannot be recovered by llama.cpp: any engine
 * exit is reported as gone. Stop: the head first (it holds connections to the workers), then the
 * rpc-servers.
 */
export interface LlamaDriverOptions {
  /** llama-server readiness timeout (model load incl. pushing weights over RPC). */
  readonly headReadyTimeoutMs?: number | undefined;
  /** Extra llama-server arguments for every load (e.g. `-t 1` in tests). */
  readonly extraHeadArgs?: readonly string[] | undefined;
  /** Threads for each rpc-server (0 = its default). */
  readonly rpcThreads?: number | undefined;
  /** Pre-seed each rpc-server's tensor cache (default on; false sends every weight over the network). */
  readonly tensorCache?: boolean | undefined;
  /** Where the coordinator caches model files' SHA-256 (default ~/.cache/orchard). */
  readonly modelHashDir?: string | undefined;
  /** Start llama-server with -lv 5 (every layer's device in its log); default ORCHARD_ENGINE_DEBUG_LOG=1. */
  readonly engineDebugLog?: boolean | undefined;
}

export class LlamaDriver implements EngineDriver {
  readonly family = 'llama';
  readonly stageNoun = 'stage(s)';

  constructor(
    private readonly cluster: Cluster,
    private readonly o: LlamaDriverOptions,
  ) {}

  fitOptions(options: LoadOptions): LoadOptions {
    // llama.cpp RPC splits by layer ranges only (one device per range, activations passed on).
    if (options.parallelism === 'tensor') throw new UsageError('--parallelism tensor is for MLX models; llama.cpp RPC splits a GGUF as a pipeline of layer ranges');
    if (options.allowUntunnelledRdma) throw new UsageError('--allow-untunnelled-rdma is for MLX models (JACCL); llama.cpp RPC always crosses the TLS tunnels');
    return options;
  }

  group(spec: InstanceSpec): EngineGroup {
    return new LlamaGroup(this.cluster, this.o, spec);
  }
}

class LlamaGroup extends RosterGroup implements EngineGroup {
  #devices: PlannedDevice[] = [];
  #headLog: string[] = [];
  /** Of each pre-seeded stage, the hashes its node computed for that stage's tensors: the head's engine offers them without re-hashing. */
  #knownHashes: TensorHash[] = [];
  verification: VerifyResult | undefined;

  constructor(
    private readonly cluster: Cluster,
    private readonly o: LlamaDriverOptions,
    private readonly spec: InstanceSpec,
  ) {
    super(cluster, spec);
  }

  async start(load: LoadContext): Promise<void> {
    const last = load.plan.stages.length - 1;
    const headNode = load.nodes[last]!;
    const headHasGpu = headNode.profile.os === 'macos';
    this.#knownHashes = [];
    // 1. rpc-servers: every worker stage, plus the head's own stage on a CPU-only head.
    load.progress('starting-workers', `starting ${headHasGpu ? last : last + 1} rpc-server(s)`);
    const targets = await this.#startRpcServers(load, headHasGpu);
    load.assertLoading();
    // 2. llama-server on the head node, pinned to the plan.
    const layoutStages: LayoutStage[] = load.plan.stages.map((s) => ({
      nodeId: s.nodeId,
      nodeName: s.nodeName,
      firstLayer: s.firstLayer,
      lastLayer: s.lastLayer,
      predicted: s.device,
      budgetBytes: s.budgetBytes,
    }));
    const layout = headLayout(layoutStages, targets, {
      modelPath: this.spec.path,
      nLayer: load.plan.nLayer,
      memory: memoryOptionsOf(this.spec.options),
      headHasGpu,
      debugLog: this.o.engineDebugLog ?? process.env.ORCHARD_ENGINE_DEBUG_LOG === '1',
    });
    let threads: number;
    try {
      threads = headThreads(this.o.extraHeadArgs);
    } catch (err) {
      throw new CoordinatorError('INVALID_ARGUMENT', grpcMessage(err));
    }
    const l = layout.llama;
    const via = (t: RpcTarget) => (t.nodeId === headNode.nodeId ? `local:${t.enginePort}` : `${nodeName(load, t.nodeId)} via tunnel`);
    load.progress('starting-head', `starting llama-server on ${headNode.profile.name}: rpc ${l.rpc.map(via).join(',') || '-'}, devices ${l.devices.join(',')}, split ${l.tensorSplit.join(',')}`);
    const headTimeout = this.o.headReadyTimeoutMs ?? 600_000;
    const ticker = setInterval(() => load.progress('starting-head', `loading weights (${Math.round(load.elapsedSeconds())} s)`), 2000);
    try {
      const head = await this.#startEngine(
        headNode,
        {
          kind: 'ENGINE_KIND_LLAMA_SERVER',
          engineId: `${this.spec.engineIdPrefix}-head`,
          llama: { ...layout.llama, tensorHashes: this.#knownHashes },
          threads,
          model: this.spec.name,
          owner: this.spec.owner,
          readyTimeoutSeconds: headTimeout / 1000,
        },
        headTimeout + 10_000,
      );
      this.#headLog = head.logLines;
      this.#devices = layout.devices(head.rpcEndpoints);
    } finally {
      clearInterval(ticker);
    }
    load.assertLoading();
  }

  /**
   * Each stage's rpc-server as a typed target in stage order (undefined for a GPU head, which has
   * no rpc-server): the node, its tunnel listener (from its profile; the host is the address its
   * agent answers at) and the engine's loopback port. The head agent decides the route.
   */
  async #startRpcServers(load: LoadContext, headHasGpu: boolean): Promise<(RpcTarget | undefined)[]> {
    const { plan, nodes } = load;
    const last = plan.stages.length - 1;
    const identity = new ModelIdentity(this.spec.path, this.o.modelHashDir ?? defaultModelHashDir());
    // The planner already read this file; -1 (no pre-seeding) if it is not readable here.
    const modelSize = await stat(this.spec.path).then((st) => st.size, () => -1);
    return Promise.all(
      plan.stages.map(async (s, i) => {
        if (i === last && headHasGpu) return undefined;
        const node = nodes[i]!;
        const seeded =
          this.o.tensorCache === false || modelSize < 0
            ? undefined
            : await seedStageCache({
                client: clientOf(this.cluster, node.nodeId),
                nodeName: node.profile.name,
                model: identity,
                modelSizeBytes: modelSize,
                stage: { firstLayer: s.firstLayer, lastLayer: s.lastLayer, holdsOutput: i === last },
                log: this.cluster.log,
                onProgress: (m) => load.progress('starting-workers', m),
              });
        load.assertLoading();
        if (seeded) this.#knownHashes.push(...hashesOfStage(seeded.tensorHashes, { firstLayer: s.firstLayer, lastLayer: s.lastLayer, holdsOutput: i === last }));
        const { engine } = await this.#startEngine(
          node,
          {
            kind: 'ENGINE_KIND_RPC_SERVER',
            engineId: `${this.spec.engineIdPrefix}-s${i}-rpc`,
            owner: this.spec.owner,
            ...(seeded ? { cacheDir: seeded.cacheDir } : {}),
            threads: this.o.rpcThreads ?? 0,
            model: this.spec.name,
            readyTimeoutSeconds: 60,
          },
          90_000,
        );
        // Where the stage listens on its node; other nodes reach it through that node's tunnel.
        this.endpoints[i] = engineEndpoint(engine);
        const tunnelPort = node.profile.tunnelPort;
        const target: RpcTarget = { nodeId: node.nodeId, enginePort: engine.port, ...(tunnelPort ? { tunnel: { host: hostOf(node.address), port: tunnelPort } } : {}) };
        return target;
      }),
    );
  }

  /** Start an engine, recorded before the call: if the call times out after the agent started it, clean-up still stops it. */
  async #startEngine(node: NodeEntry, o: StartEngineOptions, timeoutMs: number) {
    const client = clientOf(this.cluster, node.nodeId);
    const head = o.kind === 'ENGINE_KIND_LLAMA_SERVER';
    const label = head ? 'llama-server' : 'rpc-server';
    this.roster.record({ nodeId: node.nodeId, engineId: o.engineId, label }, head);
    try {
      return await client.startEngineWithLog(o, timeoutMs);
    } catch (err) {
      throw new CoordinatorError('UNAVAILABLE', `starting ${label} on ${node.profile.name} failed: ${grpcMessage(err)}`);
    }
  }

  /** 3. What llama-server says it did (devices, layer ranges, buffer sizes) against the plan. */
  verify(load: LoadContext): void {
    load.progress('verifying', 'checking the engine’s device assignment against the plan', load.bytesTotal);
    const v = verifyEngineReport(parseEngineLog(this.#headLog), this.#devices, load.plan.nLayer, load.plan.layerKvBytes);
    this.verification = v;
    for (const d of v.devices) {
      this.cluster.log.info(
        { model: this.spec.name, device: d.device, node: d.nodeName, planned: d.plannedLayers, actual: d.actualLayers, predicted: d.predicted, bytes: d.actual },
        'stage verification',
      );
    }
    if (!v.ok) throw new CoordinatorError('INTERNAL', `the engine does not match the plan: ${v.problems.join('; ')}`);
  }

  async generate(req: EngineRequest): Promise<EngineStream> {
    const head = this.roster.head;
    if (!head) throw new CoordinatorError('UNAVAILABLE', `model "${this.spec.name}" is not ready`);
    return headStream(clientOf(this.cluster, head.nodeId), head.engineId, req);
  }

  stop(): Promise<void> {
    return this.roster.stop((e) => e === this.roster.head);
  }

  override adopt(a: AdoptedEngines): void {
    super.adopt(a);
    this.verification = a.verification as VerifyResult | undefined;
  }
}

function nodeName(load: LoadContext, nodeId: string): string {
  return load.nodes.find((n) => n.nodeId === nodeId)?.profile.name ?? nodeId;
}

export function hostOf(address: string): string {
  if (address.startsWith('[')) return address.slice(1, address.indexOf(']'));
  const i = address.lastIndexOf(':');
  return i < 0 ? address : address.slice(0, i);
}
