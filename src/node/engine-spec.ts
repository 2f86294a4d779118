import { isAbsolute } from 'node:path';
import { z } from 'zod';
import { UsageError } from '../shared/errors.ts';
import type { CacheType } from '../shared/memory/kv.ts';
import type { MemoryOptions } from '../shared/memory/stage.ts';
import type { LlamaServerOptions } from '../shared/placement/llama-args.ts';
import { llamaMemoryArgs } from '../shared/placement/llama-args.ts';
import { rpcCacheMinSizeEnv } from '../shared/rpc-cache/plan.ts';
import { knownHashesFileText, TENSOR_HASH_RE, TENSOR_NAME_RE } from '../shared/rpc-cache/known-hashes.ts';
import { unixEndpoint } from './engine-sockets.ts';
import { type MlxRankSpec, mlxRankSpecFromRequest, sameMlxRank } from './mlx/rank-spec.ts';
import { rpcTargetSchema } from './rpc-target.ts';

/**
 * What an engine is, checked once at the gRPC edge, and the exact command line that runs it.
 * Pure: no I/O here, so every rule is unit-tested.
 */

export type EngineKind = 'rpc-server' | 'llama-server' | 'mlx-rank';

/** proto enum name ↔ the short name used in logs, metrics labels and the README. */
export const ENGINE_KIND_FROM_PROTO: Readonly<Record<string, EngineKind>> = {
  ENGINE_KIND_RPC_SERVER: 'rpc-server',
  ENGINE_KIND_LLAMA_SERVER: 'llama-server',
  ENGINE_KIND_MLX_RANK: 'mlx-rank',
};
export const ENGINE_KIND_TO_PROTO: Readonly<Record<EngineKind, string>> = {
  'rpc-server': 'ENGINE_KIND_RPC_SERVER',
  'llama-server': 'ENGINE_KIND_LLAMA_SERVER',
  'mlx-rank': 'ENGINE_KIND_MLX_RANK',
};

/** Every engine listens here: engine protocols are unauthenticated (ggml-rpc must never face a network). */
export const ENGINE_HOST = '127.0.0.1';

export interface EngineSpec {
  readonly kind: EngineKind;
  /** Empty when the caller lets the agent pick. */
  readonly engineId: string;
  /** 0 = the agent picks a free port. */
  readonly port: number;
  readonly threads: number;
  /** rpc-server backend devices (-d). */
  readonly devices: readonly string[];
  /** rpc-server tensor cache (LLAMA_CACHE); '' = none. Confined to the agent's roots before start. */
  readonly cacheDir: string;
  readonly model: string;
  readonly readyTimeoutMs: number;
  /** Who started it (the coordinator's cluster id); StopEngine must name the same. */
  readonly owner: string;
  /** llama-server only. */
  readonly llama?: LlamaServerOptions | undefined;
  /** mlx-rank only: the rank, its group's launch and the model directory. */
  readonly mlx?: MlxRankSpec | undefined;
  /**
   * llama-server only, set by the agent (never by a caller): the 127.0.0.1 endpoint llama-server
   * dials for each `llama.rpc` target, in order (src/node/tunnel/engine-tunnels.ts).
   */
  readonly rpcEndpoints?: readonly string[] | undefined;
}

/** A request the agent refuses; `code` is the gRPC status name the server answers with. */
export class EngineRequestError extends Error {
  override readonly name = 'EngineRequestError';
  constructor(
    readonly code:
      | 'INVALID_ARGUMENT'
      | 'UNIMPLEMENTED'
      | 'NOT_FOUND'
      | 'ALREADY_EXISTS'
      | 'FAILED_PRECONDITION'
      | 'DEADLINE_EXCEEDED'
      | 'PERMISSION_DENIED',
    message: string,
  ) {
    super(message);
  }
}

// rpc-server loads whole layers and may need minutes over a slow link only on the head side;
// it accepts connections right after start, so a short default suffices. llama-server loads
// the model (possibly pushing weights to remote RPC workers) before /health turns 200.
export const DEFAULT_READY_TIMEOUT_MS: Readonly<Record<EngineKind, number>> = {
  'rpc-server': 30_000,
  'llama-server': 600_000,
  // Imports + loading the weights + the ring handshake of every rank.
  'mlx-rank': 300_000,
};
const MAX_READY_TIMEOUT_MS = 3_600_000;

const ENGINE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const DEVICE = /^[A-Za-z0-9][A-Za-z0-9_:.-]{0,63}$/;
const OWNER = /^[A-Za-z0-9._-]{0,128}$/;
const CACHE_TYPES = ['f32', 'f16', 'bf16', 'q8_0', 'q4_0', 'q4_1', 'iq4_nl', 'q5_0', 'q5_1'] as const;

const llamaOptionsSchema = z
  .object({
    modelPath: z.string().min(1, 'llama.model_path is required'),
    context: z.number().int().min(1).max(4_194_304),
    parallel: z.number().int().min(0).max(256).default(1),
    kvUnified: z.boolean().default(false),
    cacheType: z.enum(CACHE_TYPES).default('f16'),
    ubatch: z.number().int().min(0).max(65_536).default(512),
    flashAttention: z.boolean().default(false),
    rpc: z.array(rpcTargetSchema('llama.rpc[]')).max(64).default([]),
    devices: z.array(z.string().regex(DEVICE, 'invalid llama.devices name')).max(65).default([]),
    tensorSplit: z.array(z.number().int().min(0).max(100_000)).max(65).default([]),
    gpuLayers: z.number().int().min(0).max(100_000).default(0),
    debugLog: z.boolean().default(false),
    tensorHashes: z
      .array(
        z
          .object({
            name: z.string().regex(TENSOR_NAME_RE, 'invalid llama.tensor_hashes name'),
            bytes: z.coerce.number().int().positive(),
            hash: z.string().regex(TENSOR_HASH_RE, 'llama.tensor_hashes hash must be 16 lowercase hex digits'),
          })
          .strict(),
      )
      .max(1_000_000)
      .default([]),
  })
  .strict();

/**
 * The proto-loader shape of StartEngineRequest (longs as strings, enums as names). Strict: a
 * field this agent does not know (an old client's `args`/`env`) is refused, never ignored.
 */
export const startEngineRequestSchema = z
  .object({
    kind: z.string().default('ENGINE_KIND_UNSPECIFIED'),
    engineId: z.string().regex(ENGINE_ID, 'invalid engine_id: 1–64 of A-Z a-z 0-9 . _ -').or(z.literal('')).default(''),
    port: z.number().int().min(0).max(65535).default(0),
    threads: z.number().int().min(0).max(1024).default(0),
    devices: z.array(z.string().regex(DEVICE, 'invalid device name')).max(64).default([]),
    cacheDir: z.string().default(''),
    model: z.string().max(256).default(''),
    readyTimeoutSeconds: z.number().finite().min(0).default(0),
    owner: z.string().regex(OWNER, 'invalid owner').default(''),
    llama: llamaOptionsSchema.nullish(),
    mlx: z.unknown().optional(),
  })
  .strict();
export type StartEngineRequest = z.input<typeof startEngineRequestSchema>;

function refuse(message: string): never {
  throw new EngineRequestError('INVALID_ARGUMENT', message);
}

/** An absolute path without NUL; where it resolves is checked against the roots later (engine-roots.ts). */
function checkPath(what: string, p: string): void {
  if (p.includes('\0')) refuse(`${what} must not contain NUL bytes`);
  if (!isAbsolute(p)) refuse(`${what} must be an absolute path, got "${p}"`);
}

/** Validate a StartEngine request into an EngineSpec, or throw EngineRequestError. Pure. */
export function engineSpecFromRequest(raw: unknown): EngineSpec {
  const parsed = startEngineRequestSchema.safeParse(stripUnset(raw));
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    if (issue?.code === 'unrecognized_keys') {
      const where = issue.path.length > 0 ? ` in ${issue.path.join('.')}` : '';
      refuse(`StartEngine has no field ${issue.keys.join(', ')}${where}: engines take typed options only (the agent builds their command line and environment)`);
    }
    refuse(`invalid StartEngine request: ${issue?.path.join('.') || 'request'}: ${issue?.message}`);
  }
  const req = parsed.data;
  const kind = ENGINE_KIND_FROM_PROTO[req.kind];
  if (!kind) refuse(`unknown engine kind "${req.kind}": use ENGINE_KIND_RPC_SERVER, ENGINE_KIND_LLAMA_SERVER or ENGINE_KIND_MLX_RANK`);
  const readyTimeoutMs =
    req.readyTimeoutSeconds === 0 ? DEFAULT_READY_TIMEOUT_MS[kind] : Math.min(MAX_READY_TIMEOUT_MS, Math.round(req.readyTimeoutSeconds * 1000));
  const base = { kind, engineId: req.engineId, port: req.port, threads: req.threads, model: req.model, readyTimeoutMs, owner: req.owner };
  if (kind !== 'llama-server' && req.llama) refuse('the llama field applies to ENGINE_KIND_LLAMA_SERVER only');
  if (kind !== 'mlx-rank' && req.mlx !== undefined && req.mlx !== null) refuse('the mlx field applies to ENGINE_KIND_MLX_RANK only');
  if (kind !== 'rpc-server' && (req.devices.length > 0 || req.cacheDir !== '')) refuse('devices and cache_dir apply to rpc-server only');
  if (kind === 'rpc-server') {
    if (req.cacheDir !== '') checkPath('cache_dir', req.cacheDir);
    return { ...base, devices: req.devices, cacheDir: req.cacheDir };
  }
  if (kind === 'llama-server') {
    const l = req.llama ?? refuse('ENGINE_KIND_LLAMA_SERVER needs the llama field (model_path, context, …)');
    checkPath('llama.model_path', l.modelPath);
    if (l.tensorSplit.length !== 0 && l.tensorSplit.length !== l.devices.length) refuse('llama.tensor_split needs one entry per llama.devices entry');
    const memory: MemoryOptions = { ctx: l.context, parallel: l.parallel, unified: l.kvUnified, cacheType: l.cacheType as CacheType, ubatch: l.ubatch, flashAttention: l.flashAttention };
    const llama = { modelPath: l.modelPath, memory, rpc: l.rpc, devices: l.devices, tensorSplit: l.tensorSplit, gpuLayers: l.gpuLayers, debugLog: l.debugLog, tensorHashes: l.tensorHashes };
    return { ...base, devices: [], cacheDir: '', llama };
  }
  if (req.port !== 0) refuse('an MLX rank is configured by the mlx field only (no port)');
  let mlx: MlxRankSpec;
  try {
    mlx = mlxRankSpecFromRequest(req.mlx);
  } catch (err) {
    if (err instanceof UsageError) refuse(err.message);
    throw err;
  }
  checkPath('mlx.model_dir', mlx.modelDir);
  // A ring rank binds ENGINE_HOST:ring_ranks[rank].engine_port (withRingEndpoints): there is no
  // address in the request it could listen on instead.
  return { ...base, devices: [], cacheDir: '', mlx };
}

/** proto-loader sends unset message fields as null; zod's strict object treats them as absent. */
function stripUnset(raw: unknown): unknown {
  if (raw === null || typeof raw !== 'object') return raw ?? {};
  return Object.fromEntries(Object.entries(raw).filter(([, v]) => v !== null && v !== undefined));
}

export interface EngineBinaries {
  readonly llamaServer: string;
  readonly rpcServer: string;
}

export interface EngineCommand {
  readonly file: string;
  readonly argv: readonly string[];
  /** The engine's whole environment: the allow-list below from the agent's own, plus the agent's settings. */
  readonly env: Readonly<Record<string, string>>;
  /** A head's known tensor hashes (file text): spawnEngine writes them to a private file and names it in TENSOR_HASHES_ENV. */
  readonly knownHashes?: string;
}

// What an engine may inherit from the agent's environment. Nothing that loads code (LD_PRELOAD,
// DYLD_*, PYTHON*), nothing that changes where llama.cpp reads or writes (LLAMA_ARG_*).
const INHERITED_ENV = /^(PATH|HOME|USER|LOGNAME|LANG|LC_[A-Z]+|TMPDIR|TZ|TERM)$/;

/** The allow-listed part of `from` (the agent's environment), plus `set`. */
export function engineEnv(from: NodeJS.ProcessEnv, set: Readonly<Record<string, string>> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(from)) if (v !== undefined && INHERITED_ENV.test(k)) env[k] = v;
  return { ...env, ...set };
}

/**
 * The exact command line for `spec` on `port` (already resolved, never 0). An rpc-server listens
 * only on `rpcSocket`, its Unix-domain socket in the agent's private socket directory
 * (engine-sockets.ts; engine patch ggml-rpc-unix-socket): the port is its identity, not bound.
 */
export function engineCommand(spec: EngineSpec, port: number, bins: EngineBinaries, agentEnv: NodeJS.ProcessEnv = process.env, rpcSocket?: string): EngineCommand {
  if (spec.kind === 'rpc-server') {
    if (rpcSocket === undefined) throw new Error('an rpc-server needs its socket path');
    const argv = ['-H', unixEndpoint(rpcSocket)];
    if (spec.threads > 0) argv.push('-t', String(spec.threads));
    if (spec.devices.length > 0) argv.push('-d', spec.devices.join(','));
    // rpc-server keeps its tensor cache in $LLAMA_CACHE/rpc/; -c turns it on.
    if (spec.cacheDir !== '') argv.push('-c');
    return { file: bins.rpcServer, argv, env: engineEnv(agentEnv, spec.cacheDir !== '' ? { LLAMA_CACHE: spec.cacheDir } : {}) };
  }
  const argv = llamaServerArgs(spec.llama!, spec.rpcEndpoints ?? []);
  if (spec.threads > 0) argv.push('--threads', String(spec.threads));
  argv.push('--host', ENGINE_HOST, '--port', String(port));
  // The head is the RPC client that decides which weights to offer by hash: the same threshold the agents pre-seed with.
  const rpc = (spec.rpcEndpoints ?? []).length > 0;
  const rpcEnv = rpc ? rpcCacheMinSizeEnv() : {};
  const hashes = rpc ? (spec.llama!.tensorHashes ?? []) : [];
  return { file: bins.llamaServer, argv, env: engineEnv(agentEnv, rpcEnv), ...(hashes.length > 0 ? { knownHashes: knownHashesFileText(hashes) } : {}) };
}

/**
 * llama-server's arguments from the typed options and the loopback endpoints the agent resolved
 * for its rpc targets (direct or a tunnel forwarder): the model, the numerics the memory math assumed
 * (llamaMemoryArgs, shared with the tests' oracle), then the layer pinning.
 */
export function llamaServerArgs(l: LlamaServerOptions, rpcEndpoints: readonly string[]): string[] {
  if (rpcEndpoints.length !== l.rpc.length) throw new Error(`${l.rpc.length} rpc target(s) but ${rpcEndpoints.length} endpoint(s)`);
  const argv = ['-m', l.modelPath, ...llamaMemoryArgs(l.memory)];
  // --rpc registers the RPC devices while arguments are parsed, so it must precede --device.
  if (rpcEndpoints.length > 0) argv.push('--rpc', rpcEndpoints.join(','));
  if (l.devices.length > 0) argv.push('--device', l.devices.join(','), '--split-mode', 'layer');
  argv.push('-ngl', String(l.gpuLayers));
  if (l.tensorSplit.length > 0) argv.push('--tensor-split', l.tensorSplit.join(','));
  // llama.cpp's INFO lines (devices, buffer sizes) need -lv 4; DEBUG (5) adds every layer's device.
  argv.push('--metrics', '--no-webui', '-lv', l.debugLog ? '5' : '4');
  return argv;
}

/** Same request twice (a retry) → same engine; used for StartEngine idempotency. */
export function sameEngineRequest(a: EngineSpec, b: EngineSpec): boolean {
  return (
    a.kind === b.kind &&
    (b.port === 0 || a.port === b.port) &&
    a.threads === b.threads &&
    a.cacheDir === b.cacheDir &&
    a.model === b.model &&
    a.owner === b.owner &&
    a.devices.join('\0') === b.devices.join('\0') &&
    JSON.stringify(a.llama ?? null) === JSON.stringify(b.llama ?? null) &&
    (a.mlx === undefined || b.mlx === undefined ? a.mlx === b.mlx : sameMlxRank(a.mlx, b.mlx))
  );
}
