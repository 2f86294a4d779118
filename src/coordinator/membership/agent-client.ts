import * as grpc from '@grpc/grpc-js';
import type { GenerateParams } from '../../shared/generation.ts';
import type { HardwareProfile, LiveStats } from '../../shared/hardware.ts';
import { liveFromWire, profileFromWire } from '../../shared/hardware-wire.ts';
import { CLUSTER_CHANNEL_OPTIONS, clusterChannelCredentials, type TlsCredentials } from '../../shared/pki/grpc-tls.ts';
import type { VerifiedPeer } from '../../shared/pki/verify.ts';
import type { LinkMeasurement } from '../../shared/placement/links.ts';
import type { LlamaServerOptions } from '../../shared/placement/llama-args.ts';
import { orchardV1 } from '../../shared/proto.ts';
import { type TensorHash, tensorHashesFromWire, tensorHashesToWire } from '../../shared/rpc-cache/known-hashes.ts';
import { type EngineInfo, type EngineKindName, engineFromWire } from './wire.ts';

/** What a node agent's Watch stream says, already converted. */
export type AgentEvent =
  | { readonly kind: 'stats'; readonly live: LiveStats }
  | { readonly kind: 'engine-started'; readonly engine: EngineInfo }
  | {
      readonly kind: 'engine-exited';
      readonly engineId: string;
      readonly engineKind: EngineKindName;
      readonly exitCode: number;
      readonly signal: string;
      readonly expected: boolean;
      readonly lastStderrLines: readonly string[];
    }
  | { readonly kind: 'profile'; readonly profile: HardwareProfile }
  | { readonly kind: 'heartbeat'; readonly runId: string };

/** The typed head request as the proto carries it (flat memory fields). */
export function llamaServerToWire(o: LlamaServerOptions): Record<string, unknown> {
  const m = o.memory;
  return {
    modelPath: o.modelPath,
    context: m.ctx,
    parallel: m.parallel,
    kvUnified: m.unified,
    cacheType: m.cacheType,
    ubatch: m.ubatch,
    flashAttention: m.flashAttention,
    rpc: o.rpc.map((t) => ({ nodeId: t.nodeId, tunnelHost: t.tunnel?.host ?? '', tunnelPort: t.tunnel?.port ?? 0, enginePort: t.enginePort })),
    devices: [...o.devices],
    tensorSplit: [...o.tensorSplit],
    gpuLayers: o.gpuLayers,
    debugLog: o.debugLog,
    tensorHashes: tensorHashesToWire(o.tensorHashes ?? []),
  };
}

/** A typed StartEngine: no argument list, no environment (the agent refuses both). */
export interface StartEngineOptions {
  readonly kind: 'ENGINE_KIND_RPC_SERVER' | 'ENGINE_KIND_LLAMA_SERVER';
  readonly engineId: string;
  readonly port?: number;
  readonly threads?: number;
  readonly devices?: readonly string[];
  readonly cacheDir?: string;
  readonly model?: string;
  readonly readyTimeoutSeconds?: number;
  /** The coordinator's cluster id: only the same owner may stop the engine. */
  readonly owner?: string;
  readonly llama?: LlamaServerOptions;
}

export interface AgentModelFile {
  readonly path: string;
  readonly sizeBytes: number;
  readonly sha256: string;
}

export interface PrepareCacheOptions {
  readonly modelSha256: string;
  readonly modelSizeBytes: number;
  readonly firstLayer: number;
  readonly lastLayer: number;
  readonly holdsOutput: boolean;
  readonly cacheDir?: string;
}

export interface PrepareCacheProgress {
  readonly tensorsDone: number;
  readonly tensorsTotal: number;
  readonly bytesDone: number;
  readonly bytesTotal: number;
}

export interface PrepareCacheDone {
  readonly cacheDir: string;
  readonly modelPath: string;
  readonly entries: number;
  readonly cachedBytes: number;
  readonly bytesWritten: number;
  readonly sentBytes: number;
  readonly seconds: number;
  /** Each cached tensor's hash as the node computed it (unfiltered: the driver keeps the stage's own). */
  readonly tensorHashes: readonly TensorHash[];
}

export interface AgentGenerateRequest extends GenerateParams {
  readonly engineId: string;
  readonly requestId: string;
}

type Wire = Record<string, unknown>;
type Unary = (req: Wire, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: Wire) => void) => grpc.ClientUnaryCall;
type ServerStream = (req: Wire, md?: grpc.Metadata, opts?: grpc.CallOptions) => grpc.ClientReadableStream<Wire>;

/**
 * A typed client of one node agent (`orchard.v1.NodeAgent`). Thin: deadlines and conversion
 * only; policy (retries, liveness) lives in node-link.ts and the runtime.
 */
export class AgentClient {
  readonly #client: grpc.Client & Record<string, unknown>;

  #peer: VerifiedPeer | undefined;

  /**
   * @param tls the coordinator's cluster credentials: mutual TLS, and the agent's certificate
   * must name a node of this cluster (`peer` then says which). There is no other way to talk to
   * an agent: one that has not joined serves nothing, and no secret is ever sent to an address
   * that could not prove membership first.
   */
  constructor(
    readonly address: string,
    tls: TlsCredentials,
  ) {
    const Ctor = orchardV1().NodeAgent!;
    const credentials = clusterChannelCredentials(tls, { role: 'node' }, (p) => {
      this.#peer = p;
    });
    this.#client = new Ctor(address, credentials, {
      ...CLUSTER_CHANNEL_OPTIONS,
      // Agents restart; reconnect quickly rather than with grpc's long default backoff.
      'grpc.initial_reconnect_backoff_ms': 200,
      'grpc.max_reconnect_backoff_ms': 2000,
      'grpc.keepalive_time_ms': 10_000,
      'grpc.keepalive_timeout_ms': 5000,
    }) as grpc.Client & Record<string, unknown>;
  }

  /** The node the agent's certificate proves it is (mutual TLS only; set once a call connected). */
  get peer(): VerifiedPeer | undefined {
    return this.#peer;
  }

  #metadata(): grpc.Metadata {
    return new grpc.Metadata();
  }

  #unary(method: string, req: Wire, timeoutMs: number): Promise<Wire> {
    const fn = (this.#client[method] as Unary).bind(this.#client);
    return new Promise((resolve, reject) => {
      fn(req, this.#metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res)));
    });
  }

  async describe(timeoutMs = 3000): Promise<{ profile: HardwareProfile; live: LiveStats | undefined; engines: EngineInfo[]; modelFiles: AgentModelFile[]; runId: string }> {
    const r = await this.#unary('describe', {}, timeoutMs);
    return {
      runId: String(r.runId ?? ''),
      profile: profileFromWire(r.profile as Wire),
      live: liveFromWire(r.live as Wire),
      engines: Array.isArray(r.engines) ? (r.engines as Wire[]).map(engineFromWire) : [],
      modelFiles: Array.isArray(r.modelFiles)
        ? (r.modelFiles as Wire[]).map((f) => ({ path: String(f.path ?? ''), sizeBytes: Number(f.sizeBytes ?? 0), sha256: String(f.sha256 ?? '') }))
        : [],
    };
  }

  /**
   * PrepareCache: the agent seeds an rpc-server tensor cache from its own copy of the model.
   * Resolves with the done message (cacheDir to pass to StartEngine); rejects with the gRPC
   * error (NOT_FOUND when the node does not hold the file, UNIMPLEMENTED on older agents).
   */
  prepareCache(req: PrepareCacheOptions, onProgress: (p: PrepareCacheProgress) => void, timeoutMs: number): Promise<PrepareCacheDone> {
    const stream = (this.#client.prepareCache as ServerStream).call(
      this.#client,
      {
        modelSha256: req.modelSha256,
        modelSizeBytes: String(req.modelSizeBytes),
        firstLayer: req.firstLayer,
        lastLayer: req.lastLayer,
        holdsOutput: req.holdsOutput,
        cacheDir: req.cacheDir ?? '',
      },
      this.#metadata(),
      { deadline: Date.now() + timeoutMs },
    );
    return new Promise((resolve, reject) => {
      let done: PrepareCacheDone | undefined;
      stream.on('data', (m: Wire) => {
        if (m.progress) {
          const p = m.progress as Wire;
          onProgress({ tensorsDone: Number(p.tensorsDone ?? 0), tensorsTotal: Number(p.tensorsTotal ?? 0), bytesDone: Number(p.bytesDone ?? 0), bytesTotal: Number(p.bytesTotal ?? 0) });
        } else if (m.done) {
          const d = m.done as Wire;
          done = {
            cacheDir: String(d.cacheDir ?? ''),
            modelPath: String(d.modelPath ?? ''),
            entries: Number(d.entries ?? 0),
            cachedBytes: Number(d.cachedBytes ?? 0),
            bytesWritten: Number(d.bytesWritten ?? 0),
            sentBytes: Number(d.sentBytes ?? 0),
            seconds: Number(d.seconds ?? 0),
            tensorHashes: tensorHashesFromWire(d.tensorHashes),
          };
        }
      });
      stream.on('error', reject);
      stream.on('end', () => (done ? resolve(done) : reject(new Error('PrepareCache ended without a result'))));
    });
  }

  watch(intervalSeconds: number, heartbeatIntervalSeconds = 0): grpc.ClientReadableStream<Wire> {
    return (this.#client.watch as ServerStream).call(this.#client, { intervalSeconds, heartbeatIntervalSeconds }, this.#metadata());
  }

  async startEngine(o: StartEngineOptions, timeoutMs: number): Promise<EngineInfo> {
    return (await this.startEngineWithLog(o, timeoutMs)).engine;
  }

  /** StartEngine, also returning the engine's startup log lines when the agent sends them. */
  async startEngineWithLog(o: StartEngineOptions, timeoutMs: number): Promise<{ engine: EngineInfo; logLines: string[]; rpcEndpoints: string[] }> {
    const r = await this.#unary(
      'startEngine',
      {
        kind: o.kind,
        engineId: o.engineId,
        port: o.port ?? 0,
        threads: o.threads ?? 0,
        devices: [...(o.devices ?? [])],
        cacheDir: o.cacheDir ?? '',
        model: o.model ?? '',
        readyTimeoutSeconds: o.readyTimeoutSeconds ?? timeoutMs / 1000,
        owner: o.owner ?? '',
        ...(o.llama ? { llama: llamaServerToWire(o.llama) } : {}),
      },
      timeoutMs,
    );
    return {
      engine: engineFromWire(r.engine as Wire),
      logLines: Array.isArray(r.startupLog) ? r.startupLog.map(String) : [],
      rpcEndpoints: Array.isArray(r.rpcEndpoints) ? r.rpcEndpoints.map(String) : [],
    };
  }

  /** StartEngine for one MLX rank (`mlx` is the MlxRankSpec, camelCase, see mlx-launch.ts). */
  async startMlxRank(
    o: { engineId: string; model: string; readyTimeoutSeconds: number; owner?: string; mlx: Record<string, unknown> },
    timeoutMs: number,
  ): Promise<{ engine: EngineInfo; logLines: string[] }> {
    const r = await this.#unary(
      'startEngine',
      { kind: 'ENGINE_KIND_MLX_RANK', engineId: o.engineId, model: o.model, readyTimeoutSeconds: o.readyTimeoutSeconds, owner: o.owner ?? '', mlx: o.mlx },
      timeoutMs,
    );
    return { engine: engineFromWire(r.engine as Wire), logLines: Array.isArray(r.startupLog) ? r.startupLog.map(String) : [] };
  }

  /** `owner`: the cluster id the engine was started with (the agent refuses anyone else's stop). */
  async stopEngine(engineId: string, owner: string, timeoutMs = 10_000): Promise<boolean> {
    const r = await this.#unary('stopEngine', { engineId, owner }, timeoutMs);
    return r.stopped === true;
  }

  /** The cluster's revoked node ids (the agent's tunnel listeners refuse them). */
  async setRevocations(nodeIds: readonly string[], timeoutMs = 5000): Promise<void> {
    await this.#unary('setRevocations', { nodeIds: [...nodeIds] }, timeoutMs);
  }

  /** Where the event bus is (the agent connects there with its own certificate). */
  async setEventBus(natsUrls: readonly string[], timeoutMs = 5000): Promise<void> {
    await this.#unary('setEventBus', { natsUrls: [...natsUrls] }, timeoutMs);
  }

  /**
   * Ask the agent to probe each peer's tunnel (one after another, ~0.2 s each on 1 GbE, bounded
   * by the probe's own caps); a failed peer comes back with its error.
   */
  async measureLinks(peers: readonly { nodeId: string; host: string; tunnelPort: number }[]): Promise<LinkMeasurement[]> {
    const r = await this.#unary('measureLinks', { peers: peers.map((p) => ({ ...p })) }, 15_000 + 25_000 * peers.length);
    const links = Array.isArray(r.links) ? (r.links as Wire[]) : [];
    return links.map((l) => ({
      from: String(l.fromNodeId ?? ''),
      to: String(l.toNodeId ?? ''),
      rttSeconds: Number(l.rttSeconds ?? 0),
      bytesPerSecond: Number(l.bytesPerSecond ?? 0),
      measuredAtSeconds: Number(l.measuredAtSeconds ?? 0),
      ...(l.error ? { error: String(l.error) } : {}),
    }));
  }

  generate(req: AgentGenerateRequest): grpc.ClientReadableStream<Wire> {
    return (this.#client.generate as ServerStream).call(this.#client, { ...req, seed: String(req.seed), stop: [...req.stop] }, this.#metadata());
  }

  close(): void {
    this.#client.close();
  }
}

/** Convert one Watch message (oneof `event`). Unknown kinds are ignored by returning undefined. */
export function agentEventFromWire(m: Wire): AgentEvent | undefined {
  switch (m.event) {
    case 'stats': {
      const live = liveFromWire(m.stats as Wire);
      return live ? { kind: 'stats', live } : undefined;
    }
    case 'engineStarted':
      return { kind: 'engine-started', engine: engineFromWire(m.engineStarted as Wire) };
    case 'engineExited': {
      const e = (m.engineExited ?? {}) as Wire;
      return {
        kind: 'engine-exited',
        engineId: String(e.engineId ?? ''),
        engineKind: (String(e.kind ?? '') || 'ENGINE_KIND_UNSPECIFIED') as EngineKindName,
        exitCode: Number(e.exitCode ?? 0),
        signal: String(e.signal ?? ''),
        expected: e.expected === true,
        lastStderrLines: Array.isArray(e.lastStderrLines) ? e.lastStderrLines.map(String) : [],
      };
    }
    case 'profileChanged':
      return { kind: 'profile', profile: profileFromWire(m.profileChanged as Wire) };
    case 'heartbeat':
      return { kind: 'heartbeat', runId: String((m.heartbeat as Wire | undefined)?.runId ?? '') };
    default:
      return undefined;
  }
}
