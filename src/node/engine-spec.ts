import { isIP } from 'node:net';
import { isAbsolute } from 'node:path';
import { z } from 'zod';
import { UsageError } from '../shared/errors.ts';
import { type MlxRankSpec, mlxRankSpecFromRequest, sameMlxRank } from './mlx/rank-spec.ts';

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

export interface EngineSpec {
  readonly kind: EngineKind;
  /** Empty when the caller lets the agent pick. */
  readonly engineId: string;
  readonly bindHost: string;
  /** 0 = the agent picks a free port. */
  readonly port: number;
  readonly threads: number;
  readonly devices: readonly string[];
  readonly cacheDir: string;
  readonly args: readonly string[];
  readonly model: string;
  readonly readyTimeoutMs: number;
  readonly env: Readonly<Record<string, string>>;
  /** mlx-rank only: the rank, its group's launch and the model directory. */
  readonly mlx?: MlxRankSpec | undefined;
}

/** A request the agent refuses; `code` is the gRPC status name the server answers with. */
export class EngineRequestError extends Error {
  override readonly name = 'EngineRequestError';
  constructor(
    readonly code: 'INVALID_ARGUMENT' | 'UNIMPLEMENTED' | 'NOT_FOUND' | 'ALREADY_EXISTS' | 'FAILED_PRECONDITION' | 'DEADLINE_EXCEEDED',
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

// llama-server's network surface is owned by the agent: it always listens on loopback (the
// coordinator reaches tokens through the agent's Generate stream, never directly).
const RESERVED_LLAMA_SERVER_FLAGS = new Set(['--host', '--port', '--api-key', '--api-key-file', '--path', '--reuse-port']);

// Flags that make llama-server write files chosen by the caller: the control plane must not be
// a way to write arbitrary paths on a node. (The agent already captures the engine's stderr.)
const FILE_WRITING_LLAMA_SERVER_FLAGS = new Set(['--log-file', '--slot-save-path']);

const ENGINE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const DEVICE = /^[A-Za-z0-9][A-Za-z0-9_:.-]{0,63}$/;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;

/** The proto-loader shape of StartEngineRequest (longs as strings, enums as names). */
export const startEngineRequestSchema = z.object({
  kind: z.string().default('ENGINE_KIND_UNSPECIFIED'),
  engineId: z.string().default(''),
  bindHost: z.string().default(''),
  port: z.number().int().default(0),
  threads: z.number().int().default(0),
  devices: z.array(z.string()).default([]),
  cacheDir: z.string().default(''),
  args: z.array(z.string()).default([]),
  model: z.string().default(''),
  readyTimeoutSeconds: z.number().default(0),
  env: z.record(z.string(), z.string()).default({}),
  mlx: z.unknown().optional(),
});
export type StartEngineRequest = z.input<typeof startEngineRequestSchema>;

/** Validate a StartEngine request into an EngineSpec, or throw EngineRequestError. */
export function engineSpecFromRequest(raw: unknown): EngineSpec {
  const parsed = startEngineRequestSchema.safeParse(raw ?? {});
  if (!parsed.success) throw new EngineRequestError('INVALID_ARGUMENT', `malformed StartEngine request: ${parsed.error.issues[0]?.message}`);
  const req = parsed.data;

  const kind = ENGINE_KIND_FROM_PROTO[req.kind];
  if (!kind) {
    throw new EngineRequestError('INVALID_ARGUMENT', `unknown engine kind "${req.kind}": use ENGINE_KIND_RPC_SERVER, ENGINE_KIND_LLAMA_SERVER or ENGINE_KIND_MLX_RANK`);
  }
  if (kind === 'mlx-rank') return mlxEngineSpec(req);
  if (req.engineId !== '' && !ENGINE_ID.test(req.engineId)) {
    throw new EngineRequestError('INVALID_ARGUMENT', `invalid engine_id "${req.engineId}": 1–64 of A-Z a-z 0-9 . _ -`);
  }
  if (req.port < 0 || req.port > 65535) throw new EngineRequestError('INVALID_ARGUMENT', `invalid port ${req.port}: 0–65535 (0 = pick a free port)`);
  if (req.threads < 0 || req.threads > 1024) throw new EngineRequestError('INVALID_ARGUMENT', `invalid threads ${req.threads}`);

  let bindHost = req.bindHost.trim();
  if (kind === 'llama-server') {
    if (bindHost !== '' && bindHost !== '127.0.0.1') {
      throw new EngineRequestError('INVALID_ARGUMENT', `llama-server always binds 127.0.0.1; bind_host "${bindHost}" is not allowed`);
    }
    bindHost = '127.0.0.1';
  } else {
    // Loopback unless the caller names an address: the RPC protocol is unauthenticated.
    if (bindHost === '') bindHost = '127.0.0.1';
    if (isIP(bindHost) === 0) throw new EngineRequestError('INVALID_ARGUMENT', `invalid bind_host "${bindHost}": give an IP address`);
  }

  for (const d of req.devices) {
    if (!DEVICE.test(d)) throw new EngineRequestError('INVALID_ARGUMENT', `invalid device "${d}"`);
  }
  if (kind === 'llama-server' && req.devices.length > 0) {
    throw new EngineRequestError('INVALID_ARGUMENT', 'devices apply to rpc-server; pass --device in args for llama-server');
  }
  if (req.cacheDir !== '') {
    if (kind !== 'rpc-server') throw new EngineRequestError('INVALID_ARGUMENT', 'cache_dir applies to rpc-server only');
    if (!isAbsolute(req.cacheDir)) throw new EngineRequestError('INVALID_ARGUMENT', `cache_dir must be an absolute path, got "${req.cacheDir}"`);
  }
  if (kind === 'rpc-server' && req.args.length > 0) {
    throw new EngineRequestError('INVALID_ARGUMENT', 'args apply to llama-server only; rpc-server is configured by bind_host, port, threads, devices, cache_dir');
  }
  for (const a of req.args) {
    const flag = a.split('=', 1)[0]!;
    if (RESERVED_LLAMA_SERVER_FLAGS.has(flag)) {
      throw new EngineRequestError('INVALID_ARGUMENT', `llama-server argument ${flag} is set by the agent (it binds 127.0.0.1 on a port it picks)`);
    }
    if (FILE_WRITING_LLAMA_SERVER_FLAGS.has(flag)) {
      throw new EngineRequestError('INVALID_ARGUMENT', `llama-server argument ${flag} writes files on the node and is not allowed through the agent`);
    }
    if (a.includes('\0')) throw new EngineRequestError('INVALID_ARGUMENT', 'arguments must not contain NUL bytes');
  }
  for (const name of Object.keys(req.env)) {
    if (!ENV_NAME.test(name)) throw new EngineRequestError('INVALID_ARGUMENT', `invalid environment variable name "${name}"`);
  }
  if (!Number.isFinite(req.readyTimeoutSeconds) || req.readyTimeoutSeconds < 0) {
    throw new EngineRequestError('INVALID_ARGUMENT', `invalid ready_timeout_seconds ${req.readyTimeoutSeconds}`);
  }
  const readyTimeoutMs =
    req.readyTimeoutSeconds === 0 ? DEFAULT_READY_TIMEOUT_MS[kind] : Math.min(MAX_READY_TIMEOUT_MS, Math.round(req.readyTimeoutSeconds * 1000));

  return {
    kind,
    engineId: req.engineId,
    bindHost,
    port: req.port,
    threads: req.threads,
    devices: req.devices,
    cacheDir: req.cacheDir,
    args: req.args,
    model: req.model,
    readyTimeoutMs,
    env: req.env,
  };
}

/** An MLX rank: only engine_id, model, ready_timeout_seconds, env and the mlx field apply. */
function mlxEngineSpec(req: z.output<typeof startEngineRequestSchema>): EngineSpec {
  if (req.engineId !== '' && !ENGINE_ID.test(req.engineId)) {
    throw new EngineRequestError('INVALID_ARGUMENT', `invalid engine_id "${req.engineId}": 1–64 of A-Z a-z 0-9 . _ -`);
  }
  if (req.args.length > 0 || req.devices.length > 0 || req.cacheDir !== '' || req.port !== 0 || req.bindHost !== '') {
    throw new EngineRequestError('INVALID_ARGUMENT', 'an MLX rank is configured by the mlx field only (no args, devices, cache_dir, port or bind_host)');
  }
  for (const name of Object.keys(req.env)) {
    if (!ENV_NAME.test(name)) throw new EngineRequestError('INVALID_ARGUMENT', `invalid environment variable name "${name}"`);
    // The distributed set-up is the agent's job, from the mlx field; a stray one would break it.
    if (name.startsWith('MLX_')) throw new EngineRequestError('INVALID_ARGUMENT', `environment variable ${name} is set by the agent from the mlx field`);
  }
  if (!Number.isFinite(req.readyTimeoutSeconds) || req.readyTimeoutSeconds < 0) {
    throw new EngineRequestError('INVALID_ARGUMENT', `invalid ready_timeout_seconds ${req.readyTimeoutSeconds}`);
  }
  let mlx: MlxRankSpec;
  try {
    mlx = mlxRankSpecFromRequest(req.mlx);
  } catch (err) {
    if (err instanceof UsageError) throw new EngineRequestError('INVALID_ARGUMENT', err.message);
    throw err;
  }
  const readyTimeoutMs =
    req.readyTimeoutSeconds === 0 ? DEFAULT_READY_TIMEOUT_MS['mlx-rank'] : Math.min(MAX_READY_TIMEOUT_MS, Math.round(req.readyTimeoutSeconds * 1000));
  return {
    kind: 'mlx-rank',
    engineId: req.engineId,
    bindHost: '',
    port: 0,
    threads: req.threads,
    devices: [],
    cacheDir: '',
    args: [],
    model: req.model,
    readyTimeoutMs,
    env: req.env,
    mlx,
  };
}

export interface EngineBinaries {
  readonly llamaServer: string;
  readonly rpcServer: string;
}

export interface EngineCommand {
  readonly file: string;
  readonly argv: readonly string[];
  /** Added to the agent's environment. */
  readonly env: Readonly<Record<string, string>>;
}

/** The exact command line for `spec` listening on `port` (already resolved, never 0). */
export function engineCommand(spec: EngineSpec, port: number, bins: EngineBinaries): EngineCommand {
  if (spec.kind === 'rpc-server') {
    const argv = ['-H', spec.bindHost, '-p', String(port)];
    if (spec.threads > 0) argv.push('-t', String(spec.threads));
    if (spec.devices.length > 0) argv.push('-d', spec.devices.join(','));
    // rpc-server keeps its tensor cache in $LLAMA_CACHE/rpc/; -c turns it on.
    if (spec.cacheDir !== '') argv.push('-c');
    const env = spec.cacheDir !== '' ? { ...spec.env, LLAMA_CACHE: spec.cacheDir } : { ...spec.env };
    return { file: bins.rpcServer, argv, env };
  }
  const argv = [...spec.args];
  if (spec.threads > 0 && !spec.args.some((a) => a === '-t' || a === '--threads' || a.startsWith('--threads='))) {
    argv.push('--threads', String(spec.threads));
  }
  argv.push('--host', '127.0.0.1', '--port', String(port));
  return { file: bins.llamaServer, argv, env: { ...spec.env } };
}

/** Where to knock to see whether the engine accepts connections. */
export function readinessHost(bindHost: string): string {
  if (bindHost === '0.0.0.0') return '127.0.0.1';
  if (bindHost === '::') return '::1';
  return bindHost;
}

/** Same request twice (a retry) → same engine; used for StartEngine idempotency. */
export function sameEngineRequest(a: EngineSpec, b: EngineSpec): boolean {
  return (
    a.kind === b.kind &&
    a.bindHost === b.bindHost &&
    (b.port === 0 || a.port === b.port) &&
    a.threads === b.threads &&
    a.cacheDir === b.cacheDir &&
    a.model === b.model &&
    a.devices.join('\0') === b.devices.join('\0') &&
    a.args.join('\0') === b.args.join('\0') &&
    (a.mlx === undefined || b.mlx === undefined ? a.mlx === b.mlx : sameMlxRank(a.mlx, b.mlx))
  );
}
