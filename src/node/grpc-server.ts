import { randomUUID } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { OrchardError, UsageError, errorMessage } from '../shared/errors.ts';
import type { HardwareProfile, LiveStats } from '../shared/hardware.ts';
import type { Logger } from '../shared/log.ts';
import { createGrpcServer } from '../shared/grpc-server.ts';
import { type TlsCredentials, clusterServerCredentials, requirePeers } from '../shared/pki/grpc-tls.ts';
import { IdentityId, type Role } from '../shared/pki/identity.ts';
import { orchardV1 } from '../shared/proto.ts';
import { EngineRequestError, type EngineSpec, engineSpecFromRequest } from './engine-spec.ts';
import { withRingEndpoints } from './mlx/rank-spec.ts';
import { confineEngineSpec, confinePath, type EngineRoots } from './engine-roots.ts';
import { REMOVED_FIELDS, removedStartEngineFields } from './removed-fields.ts';
import { GenerateError, generateParamsFromRequest, relayCompletion } from './generate.ts';
import { relayMlx } from './mlx/relay.ts';
import { type ModelLibrary, PrepareCacheError } from './model-library.ts';
import { EventBusUrls } from '../shared/events.ts';
import type { EngineExit, EngineInfo, EngineSupervisor } from './supervisor.ts';
import type { EngineTunnels } from './tunnel/engine-tunnels.ts';
import { liveToWire, profileToWire } from '../shared/hardware-wire.ts';
import { doneToWire, engineToWire, exitToWire, tokenToWire } from './wire.ts';

/**
 * `orchard.v1.NodeAgent` over gRPC. Thin: every handler validates its request at the edge and
 * delegates to the supervisor / generate relay; domain errors become gRPC statuses with the
 * same one-line message the CLI would print. A failing request never takes the agent down.
 */
export interface AgentState {
  /** This process's incarnation (random per start): Describe and heartbeats carry it. */
  readonly runId: string;
  profile(): HardwareProfile;
  /** Fresh enough live stats (the agent samples on demand, at most every ~200 ms). */
  live(): Promise<LiveStats>;
  readonly supervisor: EngineSupervisor;
  /** Subscribe to profile changes; returns the unsubscribe function. */
  onProfileChange(fn: (p: HardwareProfile) => void): () => void;
  /** Subscribe to the agent shutting down (Watch streams end cleanly); returns unsubscribe. */
  onShutdown(fn: () => void): () => void;
  /** Model files under --models-dir and the rpc tensor-cache seeding over them. */
  readonly models?: ModelLibrary | undefined;
  /** Where request paths may point (--models-dir, --state-dir, Orchard's cache). */
  readonly roots: EngineRoots;
  /** Engine traffic between nodes: the listener for our rpc-servers, forwarders for our heads. */
  readonly tunnels: EngineTunnels;
  /** The cluster's revoked node ids, as the coordinator last sent them (SetRevocations). */
  setRevocations?(nodeIds: readonly string[]): void;
  /** Where the event bus is (SetEventBus, validated): the agent publishes its own events there. */
  setEventBus?(natsUrls: readonly string[]): void;
}

type Status = keyof typeof grpc.status;

function toServiceError(err: unknown, log: Logger): grpc.ServiceError | Partial<grpc.StatusObject> {
  if (err instanceof EngineRequestError || err instanceof GenerateError || err instanceof PrepareCacheError) {
    return { code: grpc.status[err.code as Status], details: err.message };
  }
  if (err instanceof OrchardError) return { code: grpc.status.FAILED_PRECONDITION, details: err.message };
  log.error({ err }, 'unexpected error in a gRPC handler');
  return { code: grpc.status.INTERNAL, details: `node agent internal error: ${errorMessage(err)}` };
}

export function nodeAgentHandlers(state: AgentState, log: Logger): grpc.UntypedServiceImplementation {
  return {
    Describe: (_call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => describe(state, log, _call, cb),
    Watch: (call: grpc.ServerWritableStream<WatchRequest, unknown>) => watch(state, log, call),
    StartEngine: (call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => startEngine(state, log, call, cb),
    StopEngine: (call: grpc.ServerUnaryCall<{ engineId?: string; owner?: string }, unknown>, cb: grpc.sendUnaryData<unknown>) => stopEngine(state, log, call, cb),
    PrepareCache: (call: grpc.ServerWritableStream<Record<string, unknown>, unknown>) => prepareCache(state, log, call),
    Generate: (call: grpc.ServerWritableStream<unknown, unknown>) => generate(state, log, call),
    SetRevocations: (call: grpc.ServerUnaryCall<{ nodeIds?: unknown }, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      const ids = Array.isArray(call.request?.nodeIds) ? call.request.nodeIds.map(String) : [];
      if (ids.length > 100_000 || ids.some((id) => !IdentityId.safeParse(id).success)) {
        cb({ code: grpc.status.INVALID_ARGUMENT, details: 'node_ids must be valid node ids (at most 100000)' });
        return;
      }
      state.setRevocations?.(ids);
      cb(null, {});
    },
    MeasureLinks: (call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => measureLinks(state, log, call, cb),
    SetEventBus: (call: grpc.ServerUnaryCall<{ natsUrls?: unknown }, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      const urls = EventBusUrls.safeParse(call.request?.natsUrls);
      if (!urls.success) return cb({ code: grpc.status.INVALID_ARGUMENT, details: `nats_urls: ${urls.error.issues[0]?.message ?? 'invalid'}` });
      state.setEventBus?.(urls.data);
      cb(null, {});
    },
  };
}

const MeasureLinksRequest = z.object({
  peers: z
    .array(z.object({ nodeId: IdentityId, host: z.string().min(1).max(255), tunnelPort: z.number().int().min(1).max(65535) }))
    .max(256),
});

/** Probe each named peer's tunnel (the coordinator's list; the agent dials only node certificates of this cluster). */
function measureLinks(state: AgentState, log: Logger, call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>): void {
  const req = MeasureLinksRequest.safeParse(call.request);
  if (!req.success) {
    cb({ code: grpc.status.INVALID_ARGUMENT, details: `invalid MeasureLinks request: ${req.error.issues[0]?.message ?? ''}` });
    return;
  }
  const self = state.profile().nodeId;
  Promise.resolve()
    .then(() => state.tunnels.measureLinks(req.data.peers.map((p) => ({ nodeId: p.nodeId, tunnel: { host: p.host, port: p.tunnelPort } }))))
    .then(
      (links) =>
        cb(null, {
          links: links.map((l) => ({
            fromNodeId: self,
            toNodeId: l.peer,
            measuredAtSeconds: l.measuredAtSeconds,
            ...('sample' in l ? { rttSeconds: l.sample.rttSeconds, bytesPerSecond: l.sample.bytesPerSecond } : { error: l.error }),
          })),
        }),
      (err: unknown) => cb(toServiceError(err, log)),
    );
}

/** The hardware profile, live stats, engines and model files of this node. */
function describe(state: AgentState, log: Logger, _call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>): void {
  const { supervisor } = state;
  state.live().then(
    (live) =>
      cb(null, {
        profile: profileToWire(state.profile()),
        live: liveToWire(live),
        engines: supervisor.list().map(engineToWire),
        modelFiles: (state.models?.files() ?? []).map((f) => ({ path: f.path, sizeBytes: String(f.sizeBytes), sha256: f.sha256 })),
        runId: state.runId,
      }),
    (err: unknown) => cb(toServiceError(err, log)),
  );
}

interface WatchRequest {
  intervalSeconds?: number;
  heartbeatIntervalSeconds?: number;
}

/** A requested interval in ms: 0 = `fallback`; clamped so a client can neither flood the agent nor starve liveness. */
function clampInterval(seconds: unknown, fallback: number): number {
  const s = Number(seconds ?? 0);
  return s > 0 ? Math.min(60_000, Math.max(100, s * 1000)) : fallback;
}

/**
 * Live stats every interval, a heartbeat on its own timer, and engine and profile events as they
 * happen, until the client or the agent goes. The heartbeat needs no sampling, so a slow stats
 * sample never reads as a dead agent.
 */
function watch(state: AgentState, log: Logger, call: grpc.ServerWritableStream<WatchRequest, unknown>): void {
  const { supervisor } = state;
  const intervalMs = clampInterval(call.request?.intervalSeconds, 1000);
  const heartbeatMs = Number(call.request?.heartbeatIntervalSeconds ?? 0) > 0 ? clampInterval(call.request?.heartbeatIntervalSeconds, 0) : 0;
  let open = true;
  const send = (msg: unknown) => {
    if (open) call.write(msg);
  };
  const sendStats = () => {
    state.live().then(
      (live) => send({ stats: liveToWire(live) }),
      (err: unknown) => log.warn({ err: errorMessage(err) }, 'live stats failed'),
    );
  };
  const onStarted = (info: EngineInfo) => send({ engineStarted: engineToWire(info) });
  const onExited = (exit: EngineExit) => send({ engineExited: exitToWire(exit) });
  supervisor.on('started', onStarted);
  supervisor.on('exited', onExited);
  const offProfile = state.onProfileChange((p) => send({ profileChanged: profileToWire(p) }));
  const timer = setInterval(sendStats, intervalMs);
  const beat = heartbeatMs > 0 ? setInterval(() => send({ heartbeat: { runId: state.runId } }), heartbeatMs) : undefined;
  sendStats();
  const close = () => {
    if (!open) return;
    open = false;
    clearInterval(timer);
    clearInterval(beat);
    supervisor.off('started', onStarted);
    supervisor.off('exited', onExited);
    offProfile();
    offShutdown();
  };
  const offShutdown = state.onShutdown(() => {
    close();
    call.end();
  });
  call.on('cancelled', close);
  call.on('close', close);
  call.on('error', close);
}

/**
 * Start one engine: the typed request validated (engine-spec.ts), its paths confined to the
 * roots and the model held to the budget (engine-roots.ts) — all before anything is touched.
 */
function startEngine(state: AgentState, log: Logger, call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>): void {
  const { supervisor } = state;
  let spec: EngineSpec;
  try {
    const removed = (call.request as { [REMOVED_FIELDS]?: string[] } | null)?.[REMOVED_FIELDS] ?? [];
    if (removed.length > 0) {
      throw new EngineRequestError(
        'INVALID_ARGUMENT',
        `StartEngine has no field ${removed.join(', ')} any more: engines take typed options only (the agent builds their command line and environment)`,
      );
    }
    spec = engineSpecFromRequest(call.request);
  } catch (err) {
    cb(toServiceError(err, log));
    return;
  }
  // An engine's id is fixed before its tunnels open: they belong to it and close with it.
  if (spec.kind !== 'rpc-server' && spec.engineId === '') spec = { ...spec, engineId: `${spec.kind}-${randomUUID().slice(0, 8)}` };
  const engineId = spec.engineId;
  const tunnelled = spec.kind === 'llama-server' || (spec.mlx?.ring.length ?? 0) > 0;
  confineEngineSpec(spec, state.roots, state.profile().budgetBytes)
    .then(async (confined) => supervisor.start(await withTunnels(state.tunnels, confined)))
    .then((info) => state.tunnels.settled().then(() => info)) // the answer sends heads to it: its tunnel port must be open
    .then(
      (info) => cb(null, { engine: engineToWire(info), startupLog: [...(info.startupLog ?? [])], rpcEndpoints: rpcEndpointsOf(info) }),
      (err: unknown) => {
        log.warn({ err: errorMessage(err), kind: spec.kind }, 'StartEngine failed');
        // an engine that did not start keeps no forwarders or ports (a running or still starting
        // one with this id — the clash — keeps its own)
        const clash = err instanceof EngineRequestError && err.code === 'ALREADY_EXISTS';
        if (tunnelled && !clash && !supervisor.get(engineId)) void state.tunnels.release(engineId);
        cb(toServiceError(err, log));
      },
    );
}

/**
 * The routes an engine dials on other nodes, resolved to 127.0.0.1 endpoints by this agent (a
 * forwarder per remote target): llama-server's --rpc, an MLX ring rank's hostfile.
 */
async function withTunnels(tunnels: EngineTunnels, spec: EngineSpec): Promise<EngineSpec> {
  if (spec.kind === 'llama-server') return { ...spec, rpcEndpoints: await tunnels.endpoints(spec.engineId, spec.llama!.rpc) };
  const mlx = spec.mlx;
  if (!mlx || mlx.ring.length === 0) return spec;
  const endpoints = await tunnels.ringEndpoints(spec.engineId, mlx.rank, mlx.ring);
  try {
    return { ...spec, mlx: withRingEndpoints(mlx, endpoints) };
  } catch (err) {
    throw err instanceof UsageError ? new EngineRequestError('INVALID_ARGUMENT', err.message) : err;
  }
}

/** The --rpc endpoints in a llama-server's argv (what its log lines name its RPC devices by). */
function rpcEndpointsOf(info: EngineInfo): string[] {
  const i = info.argv.indexOf('--rpc');
  return info.kind === 'llama-server' && i >= 0 ? (info.argv[i + 1] ?? '').split(',') : [];
}

/** Stop one engine by id, for the owner that started it only. */
function stopEngine(state: AgentState, log: Logger, call: grpc.ServerUnaryCall<{ engineId?: string; owner?: string }, unknown>, cb: grpc.sendUnaryData<unknown>): void {
  const { supervisor } = state;
  const engineId = String(call.request?.engineId ?? '');
  if (engineId === '') {
    cb({ code: grpc.status.INVALID_ARGUMENT, details: 'engine_id is required' });
    return;
  }
  supervisor.stop(engineId, String(call.request?.owner ?? '')).then(
    (exit) => {
      if (!exit) cb({ code: grpc.status.NOT_FOUND, details: `no engine ${engineId} runs on this node` });
      else cb(null, { stopped: true });
    },
    (err: unknown) => cb(toServiceError(err, log)),
  );
}

/** Seed llama.cpp's RPC tensor cache from a local model file, streaming progress. */
function prepareCache(state: AgentState, log: Logger, call: grpc.ServerWritableStream<Record<string, unknown>, unknown>): void {
  const r = call.request ?? {};
  const models = state.models;
  if (!models) {
    call.emit('error', { code: grpc.status.NOT_FOUND, details: 'this node was started without --models-dir: it holds no model files' });
    return;
  }
  const abort = new AbortController();
  call.on('cancelled', () => abort.abort());
  let lastSent = 0;
  const cacheDir = String(r.cacheDir ?? '');
  (cacheDir === '' ? Promise.resolve('') : confinePath('cache_dir', cacheDir, state.roots))
    .then((confined) => seed(confined))
    .then(
      (d) => {
        call.write({
          done: {
            cacheDir: d.llamaCacheDir,
            modelPath: d.modelPath,
            entries: d.tensorsTotal,
            cachedBytes: String(d.bytesTotal),
            bytesWritten: String(d.bytesWritten),
            sentBytes: String(d.sentBytes),
            seconds: d.seconds, tensorHashes: d.hashes.map((h) => ({ ...h, bytes: String(h.bytes) })),
          },
        });
        call.end();
      },
      (err: unknown) => {
        if (abort.signal.aborted) return;
        log.warn({ err: errorMessage(err) }, 'PrepareCache failed');
        call.emit('error', toServiceError(err, log));
      },
    );

  function seed(confinedCacheDir: string) {
    return models!.prepareCache(
      {
        modelSha256: String(r.modelSha256 ?? ''),
        modelSizeBytes: Number(r.modelSizeBytes ?? 0),
        firstLayer: Number(r.firstLayer ?? 0),
        lastLayer: Number(r.lastLayer ?? 0),
        holdsOutput: r.holdsOutput === true,
        cacheDir: confinedCacheDir,
      },
      (p) => {
        // at most ~4 progress messages a second, plus the last one
        const now = Date.now();
        if (now - lastSent < 250 && p.tensorsDone !== p.tensorsTotal) return;
        lastSent = now;
        if (!abort.signal.aborted) {
          call.write({ progress: { tensorsDone: p.tensorsDone, tensorsTotal: p.tensorsTotal, bytesDone: String(p.bytesDone), bytesTotal: String(p.bytesTotal) } });
        }
      },
      abort.signal,
    );
  }
}

/** Relay one generation from a head engine (llama-server or MLX rank) as a token stream. */
function generate(state: AgentState, log: Logger, call: grpc.ServerWritableStream<unknown, unknown>): void {
  const { supervisor } = state;
  const fail = (err: unknown) => {
    const e = toServiceError(err, log);
    call.emit('error', e);
  };
  let params: ReturnType<typeof generateParamsFromRequest>;
  try {
    params = generateParamsFromRequest(call.request);
  } catch (err) {
    fail(err);
    return;
  }
  const heads = supervisor.list().filter((e) => e.kind === 'llama-server');
  const engine = params.engineId === '' && heads.length === 1 ? heads[0] : supervisor.get(params.engineId);
  if (!engine) {
    const why = params.engineId === '' ? `engine_id is required (${heads.length} head engines run here)` : `no engine ${params.engineId} runs on this node`;
    fail(new EngineRequestError('NOT_FOUND', why));
    return;
  }
  if (engine.kind === 'mlx-rank') {
    generateMlx(call, supervisor, engine, params, log);
    return;
  }
  if (engine.kind !== 'llama-server') {
    fail(new EngineRequestError('FAILED_PRECONDITION', `engine ${engine.engineId} is an ${engine.kind}; Generate needs a llama-server head`));
    return;
  }
  const rlog = log.child({ engineId: engine.engineId, requestId: params.requestId || undefined });
  streamRelay(call, rlog, log, 'generation', (signal, write) =>
    relayCompletion({ baseUrl: `http://127.0.0.1:${engine.port}`, params, signal, onToken: (chunk) => write(tokenToWire(chunk)) }).then(doneToWire),
  );
}

/** Generate on an MLX rank (see mlx/relay.ts: rank 0 streams, other ranks only take the request). */
function generateMlx(
  call: grpc.ServerWritableStream<unknown, unknown>,
  supervisor: EngineSupervisor,
  engine: EngineInfo,
  params: ReturnType<typeof generateParamsFromRequest>,
  log: Logger,
): void {
  const found = supervisor.mlxGroup(engine.engineId);
  if (!found?.spec.mlx) {
    call.emit('error', { code: grpc.status.UNAVAILABLE, details: `MLX rank ${engine.engineId} is not running (its group failed)` });
    return;
  }
  const rlog = log.child({ engineId: engine.engineId, requestId: params.requestId || undefined });
  const spec = found.spec.mlx;
  streamRelay(call, rlog, log, 'MLX generation', (signal, write) =>
    relayMlx({ group: found.group, spec, params, requestId: params.requestId, signal, onToken: (chunk) => write(tokenToWire(chunk)) }).then((done) => ({
      done: { finishReason: done.finishReason, promptTokens: done.promptTokens, completionTokens: done.completionTokens, timings: { ...done.timings } },
    })),
  );
}

/**
 * Stream one relayed generation to the call: tokens as they come, then the end. The client going
 * away (or the coordinator cancelling) aborts the relay, so the engine stops decoding a
 * generation nobody reads.
 */
function streamRelay(
  call: grpc.ServerWritableStream<unknown, unknown>,
  rlog: Logger,
  log: Logger,
  what: string,
  relay: (signal: AbortSignal, write: (msg: unknown) => void) => Promise<unknown>,
): void {
  const abort = new AbortController();
  call.on('cancelled', () => abort.abort());
  const write = (msg: unknown) => {
    if (!abort.signal.aborted) call.write(msg);
  };
  relay(abort.signal, write).then(
    (done) => {
      rlog.debug({ done }, `${what} done`);
      call.write(done);
      call.end();
    },
    (err: unknown) => {
      if (abort.signal.aborted) {
        rlog.info(`${what} cancelled by the client`);
        return;
      }
      rlog.warn({ err: errorMessage(err) }, `${what} failed`);
      call.emit('error', toServiceError(err, log));
    },
  );
}

/**
 * Before the node has joined a cluster it has no way to tell the coordinator from anyone else,
 * so it serves no method at all: every call is UNAUTHENTICATED (and names the fix).
 */
export function refuseAll(handlers: grpc.UntypedServiceImplementation): grpc.UntypedServiceImplementation {
  const out: grpc.UntypedServiceImplementation = {};
  for (const name of Object.keys(handlers)) {
    out[name] = ((call: { emit(e: string, v: unknown): void }, cb?: grpc.sendUnaryData<unknown>) => {
      const err = { code: grpc.status.UNAUTHENTICATED, details: 'this node has not joined a cluster: it serves nothing until it holds a node certificate (`orchard node --token T`)' };
      if (typeof cb === 'function') cb(err);
      else call.emit('error', err);
    }) as grpc.UntypedHandleCall;
  }
  return out;
}

/**
 * Who may call what once the node holds cluster credentials: every NodeAgent method starts,
 * stops, reads or feeds engines on this machine, so only the cluster's coordinator may call
 * them. A node certificate (another member) is PERMISSION_DENIED, anything else
 * UNAUTHENTICATED (src/shared/pki/grpc-tls.ts).
 */
export const NODE_AGENT_ROLES: readonly Role[] = ['coordinator'];

function guarded(handlers: grpc.UntypedServiceImplementation, tls: TlsCredentials | undefined): grpc.UntypedServiceImplementation {
  if (tls === undefined) return refuseAll(handlers);
  return requirePeers(handlers, () => tls.caCertPem, () => NODE_AGENT_ROLES);
}

/** The NodeAgent service definition, with StartEngine's decoder noting removed fields (removed-fields.ts). */
export function nodeAgentService(): grpc.ServiceDefinition {
  const service = orchardV1().NodeAgent!.service;
  const start = service.StartEngine!;
  const requestDeserialize = (buf: Buffer) => {
    const req = start.requestDeserialize(buf) as Record<string | symbol, unknown>;
    const removed = removedStartEngineFields(buf);
    if (removed.length > 0) req[REMOVED_FIELDS] = removed;
    return req;
  };
  return { ...service, StartEngine: { ...start, requestDeserialize } };
}

/**
 * Bind the gRPC server; `port` 0 picks one. Rejects with a one-line OrchardError when the port is
 * taken. `tls`: the node's cluster credentials (mutual TLS, coordinator role only); without them
 * every call is refused. `credentials` is returned so a renewed certificate can be swapped in
 * without a restart (`renewServerCredentials`).
 */
export async function serveNodeAgent(
  state: AgentState,
  host: string,
  port: number,
  log: Logger,
  tls?: TlsCredentials,
): Promise<{ server: grpc.Server; port: number; credentials: grpc.ServerCredentials }> {
  // grpc-js prints its own diagnostics to stderr ("E No address added …"); route them into
  // the structured log so stderr stays pino JSON and the CLI's error stays one line.
  grpc.setLogger({
    error: (...a: unknown[]) => log.debug({ grpc: a.map(String).join(' ') }, 'grpc-js'),
    info: (...a: unknown[]) => log.debug({ grpc: a.map(String).join(' ') }, 'grpc-js'),
    debug: (...a: unknown[]) => log.trace({ grpc: a.map(String).join(' ') }, 'grpc-js'),
  } as Partial<Console> as Console);
  const server = createGrpcServer();
  const handlers = nodeAgentHandlers(state, log);
  server.addService(nodeAgentService(), guarded(handlers, tls));
  const credentials = tls ? clusterServerCredentials(tls) : grpc.ServerCredentials.createInsecure();
  const addr = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  const bound = await new Promise<number>((resolve, reject) => {
    server.bindAsync(addr, credentials, (err, p) => {
      if (err) {
        const inUse = /EADDRINUSE|address already in use/i.test(err.message);
        reject(new OrchardError(inUse ? `gRPC port ${port} on ${host} is already in use` : `cannot listen on ${addr}: ${err.message}`));
      } else resolve(p);
    });
  });
  return { server, port: bound, credentials };
}
