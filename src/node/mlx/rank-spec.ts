import { isAbsolute } from 'node:path';
import { z } from 'zod';
import { UsageError } from '../../shared/errors.ts';
import type { GenerateParams } from '../../shared/generation.ts';
import type { RpcTarget } from '../../shared/placement/llama-args.ts';
import { rpcTargetSchema } from '../rpc-target.ts';
import { launchFiles, type MlxLaunch, type MlxMode } from './launch.ts';
import type { MlxRequest } from './protocol.ts';

/**
 * An `ENGINE_KIND_MLX_RANK` StartEngine request, checked once at the agent's gRPC edge. Pure.
 */
export interface MlxRankSpec {
  readonly modelDir: string;
  readonly rank: number;
  readonly worldSize: number;
  readonly mode: MlxMode;
  /**
   * Ring: one target per rank, rank order (proto `ring_ranks`); `ring[rank]` is this rank on this
   * node. Empty for JACCL and a single process.
   */
  readonly ring: readonly RpcTarget[];
  /**
   * undefined for a single process (world size 1) — and for a ring until the agent resolved the
   * ring's routes into this rank's hostfile (`withRingEndpoints`): a ring rank never starts without.
   */
  readonly launch: MlxLaunch | undefined;
  /** Pipeline: layers per plan stage, first layers first; empty = even split. */
  readonly split: readonly number[];
  /** Cap for a Generate that asks for "until stop" (max_tokens 0). */
  readonly maxTokens: number;
  readonly stallTimeoutMs: number;
  readonly returnWhenStarting: boolean;
}

export const DEFAULT_MLX_MAX_TOKENS = 4096;
export const DEFAULT_MLX_STALL_TIMEOUT_MS = 30_000;

export const mlxRankRequestSchema = z.object({
  modelDir: z.string().default(''),
  rank: z.number().int().default(0),
  worldSize: z.number().int().default(0),
  backend: z.string().default(''),
  ringRanks: z.array(rpcTargetSchema('mlx.ring_ranks[]')).max(64).default([]),
  jacclDevices: z.array(z.object({ devices: z.array(z.string()).default([]) })).default([]),
  jacclCoordinator: z.string().default(''),
  split: z.array(z.number().int()).default([]),
  mode: z.string().default(''),
  maxTokens: z.number().int().default(0),
  stallTimeoutSeconds: z.number().default(0),
  returnWhenStarting: z.boolean().default(false),
});

/** Validate the `mlx` field of a StartEngine request; throws UsageError with a one-line reason. */
export function mlxRankSpecFromRequest(raw: unknown): MlxRankSpec {
  if (raw === null || raw === undefined) throw new UsageError('ENGINE_KIND_MLX_RANK needs the mlx field (model_dir, rank, world_size, …)');
  const parsed = mlxRankRequestSchema.safeParse(raw);
  if (!parsed.success) throw new UsageError(`malformed mlx rank spec: ${parsed.error.issues[0]?.message}`);
  const r = parsed.data;
  if (r.modelDir === '' || !isAbsolute(r.modelDir)) throw new UsageError(`mlx.model_dir must be an absolute path, got "${r.modelDir}"`);
  if (r.modelDir.includes('\0')) throw new UsageError('mlx.model_dir must not contain NUL bytes');
  const worldSize = r.worldSize === 0 ? 1 : r.worldSize;
  if (worldSize < 1 || worldSize > 64) throw new UsageError(`mlx.world_size ${worldSize} is outside 1..64`);
  if (r.rank < 0 || r.rank >= worldSize) throw new UsageError(`mlx.rank ${r.rank} is outside 0..${worldSize - 1}`);
  const mode = (r.mode === '' ? (worldSize === 1 ? 'single' : 'pipeline') : r.mode) as MlxMode;
  if (!['single', 'pipeline', 'tensor'].includes(mode)) throw new UsageError(`mlx.mode "${r.mode}": pipeline, tensor or single`);
  if (mode === 'single' && worldSize !== 1) throw new UsageError(`mlx.mode single needs world_size 1, got ${worldSize}`);
  let launch: MlxLaunch | undefined;
  let ring: RpcTarget[] = [];
  if (worldSize > 1) {
    if (r.backend === 'ring') {
      if (r.ringRanks.length !== worldSize) throw new UsageError(`ring needs ${worldSize} ring_ranks (one per rank), got ${r.ringRanks.length}`);
      ring = r.ringRanks;
      ringPortsDistinct(ring);
    } else if (r.backend === 'jaccl') {
      // proto has no null inside a repeated string: "" marks the diagonal on the wire.
      const devices = r.jacclDevices.map((row, i) => row.devices.map((d, j) => (i === j && d === '' ? null : d)));
      if (devices.length !== worldSize) throw new UsageError(`jaccl needs a ${worldSize}×${worldSize} device matrix, got ${devices.length} rows`);
      launch = { backend: 'jaccl', devices, coordinator: r.jacclCoordinator };
    } else {
      throw new UsageError(`mlx.backend "${r.backend}": ring or jaccl (world_size ${worldSize})`);
    }
    if (launch) launchFiles(launch); // validates the matrix (null diagonal) and the coordinator address
  } else if (r.backend !== '' || r.ringRanks.length > 0) {
    throw new UsageError('a single MLX process (world_size 1) takes no backend or ring_ranks');
  }
  if (r.split.length > 0) {
    if (mode !== 'pipeline') throw new UsageError('mlx.split applies to pipeline mode only');
    if (r.split.length !== worldSize || r.split.some((n) => n < 1)) {
      throw new UsageError(`mlx.split needs ${worldSize} positive layer counts, got [${r.split.join(',')}]`);
    }
  }
  if (r.maxTokens < 0 || r.maxTokens > 1_000_000) throw new UsageError(`mlx.max_tokens ${r.maxTokens} is outside 0..1000000`);
  if (!Number.isFinite(r.stallTimeoutSeconds) || r.stallTimeoutSeconds < 0 || r.stallTimeoutSeconds > 3600) {
    throw new UsageError(`mlx.stall_timeout_seconds ${r.stallTimeoutSeconds} is outside 0..3600`);
  }
  return {
    modelDir: r.modelDir,
    rank: r.rank,
    worldSize,
    mode,
    ring,
    launch,
    split: r.split,
    maxTokens: r.maxTokens || DEFAULT_MLX_MAX_TOKENS,
    stallTimeoutMs: r.stallTimeoutSeconds > 0 ? Math.round(r.stallTimeoutSeconds * 1000) : DEFAULT_MLX_STALL_TIMEOUT_MS,
    returnWhenStarting: r.returnWhenStarting,
  };
}

/** Two ranks of one node cannot share a ring port on its 127.0.0.1. */
function ringPortsDistinct(ring: readonly RpcTarget[]): void {
  const seen = new Set<string>();
  ring.forEach((t, rank) => {
    const key = `${t.nodeId}\0${t.enginePort}`;
    if (seen.has(key)) throw new UsageError(`mlx.ring_ranks[${rank}]: port ${t.enginePort} on node ${t.nodeId} is used twice`);
    seen.add(key);
  });
}

/**
 * Pure: the ring rank with its hostfile filled in. `endpoints` are the agent's 127.0.0.1 routes
 * for `spec.ring`, in rank order (engine-tunnels.ts): this rank's own entry must be its ring port
 * — that is where it binds, loopback only — and every other entry is a port on this machine's
 * loopback (a same-node rank, or the forwarder to another node's tunnel).
 */
export function withRingEndpoints(spec: MlxRankSpec, endpoints: readonly string[]): MlxRankSpec {
  if (spec.ring.length === 0) throw new UsageError(`MLX rank ${spec.rank} has no ring to resolve`);
  if (endpoints.length !== spec.ring.length) throw new UsageError(`ring of ${spec.ring.length} ranks got ${endpoints.length} endpoints`);
  const own = `127.0.0.1:${spec.ring[spec.rank]!.enginePort}`;
  if (endpoints[spec.rank] !== own) throw new UsageError(`ring rank ${spec.rank} must bind ${own}, not ${endpoints[spec.rank]}`);
  endpoints.forEach((ep, rank) => {
    if (!/^127\.0\.0\.1:\d+$/.test(ep)) throw new UsageError(`ring rank ${rank}: "${ep}" is not on this machine's loopback`);
  });
  const launch: MlxLaunch = { backend: 'ring', endpoints: endpoints.map((ep) => [ep]) };
  launchFiles(launch); // literal IPv4, valid ports, no endpoint twice
  return { ...spec, launch };
}

/** Same launch twice (a retry, or the second "wait for ready" call) → the same rank. */
export function sameMlxRank(a: MlxRankSpec, b: MlxRankSpec): boolean {
  const strip = (s: MlxRankSpec) => JSON.stringify({ ...s, returnWhenStarting: false });
  return strip(a) === strip(b);
}

/** The port this rank listens on (ring), for reports; 0 when it has none of its own. */
export function mlxRankPort(spec: MlxRankSpec): number {
  return spec.ring[spec.rank]?.enginePort ?? 0;
}

/**
 * The Generate request every agent of a group turns into the same worker request, byte for byte
 * (ranks check a digest of it): so only fields every agent receives identically may go in.
 * llama.cpp semantics of the Generate fields: max_tokens 0 = until stop (capped here), top_p 0 =
 * engine default (1), temperature 0 = greedy.
 */
export function mlxRequestOf(
  p: Pick<GenerateParams, 'prompt' | 'messagesJson' | 'continueTokenIds' | 'maxTokens' | 'temperature' | 'topP' | 'seed' | 'logprobs' | 'topLogprobs'>,
  requestId: string,
  maxTokensCap: number,
): MlxRequest {
  const req: MlxRequest = {
    id: requestId,
    maxTokens: p.maxTokens > 0 ? Math.min(p.maxTokens, maxTokensCap) : maxTokensCap,
    temperature: p.temperature,
    topP: p.topP > 0 ? p.topP : 1,
    seed: p.seed,
  };
  if (p.messagesJson) req.messages = JSON.parse(p.messagesJson) as { role: string; content: string }[];
  else req.prompt = p.prompt;
  if (p.continueTokenIds?.length) req.continueTokens = [...p.continueTokenIds];
  // At least one: the worker reports the chosen token's logprob with its top list (trimmed by the relay).
  if (p.logprobs) req.logprobs = Math.max(1, p.topLogprobs ?? 0);
  return req;
}

/**
 * Stop strings for MLX (the worker has none): text is held back while it could still be the
 * start of a stop string, and cut at the first one found. Pure; one instance per request.
 */
export class StopScanner {
  private held = '';
  private readonly longest: number;

  constructor(private readonly stops: readonly string[]) {
    this.longest = Math.max(0, ...stops.map((s) => s.length));
  }

  /** Feed the next text; returns what may be released now and whether a stop string was hit. */
  push(text: string): { release: string; stopped: boolean } {
    if (this.stops.length === 0) return { release: text, stopped: false };
    this.held += text;
    let cut = -1;
    for (const s of this.stops) {
      if (s === '') continue;
      const i = this.held.indexOf(s);
      if (i >= 0 && (cut < 0 || i < cut)) cut = i;
    }
    if (cut >= 0) {
      const release = this.held.slice(0, cut);
      this.held = '';
      return { release, stopped: true };
    }
    // Keep the longest tail that is a proper prefix of some stop string.
    let keep = 0;
    for (let k = Math.min(this.longest - 1, this.held.length); k > 0; k--) {
      const tail = this.held.slice(this.held.length - k);
      if (this.stops.some((s) => s.startsWith(tail))) {
        keep = k;
        break;
      }
    }
    const release = this.held.slice(0, this.held.length - keep);
    this.held = this.held.slice(this.held.length - keep);
    return { release, stopped: false };
  }

  /** At the end of the generation: whatever is still held back. */
  flush(): string {
    const rest = this.held;
    this.held = '';
    return rest;
  }
}
