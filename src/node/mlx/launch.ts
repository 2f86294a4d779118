import { isIPv4 } from 'node:net';
import { UsageError } from '../../shared/errors.ts';
import type { MlxMode } from '../../shared/memory/mlx.ts';

/**
 * How the ranks of one MLX model instance find each other — the pure part of what `mlx.launch`
 * does, so an agent can start its local ranks itself (no ssh). See notes/mlx-distributed.md.
 *
 * ring : TCP; every rank listens on the "ip:port" strings of its hostfile entry.
 * jaccl: RDMA over Thunderbolt 5 (macOS ≥ 26.2); an N×N matrix of RDMA device names (null on the
 *        diagonal) and rank 0's coordinator address. It cannot run on Linux CI; only the
 *        environment generation here is tested.
 */
export type MlxLaunch =
  | { backend: 'ring'; endpoints: string[][] }
  | { backend: 'jaccl'; devices: (string | null)[][]; coordinator: string; ring?: boolean };

// The layout names are the memory model's (src/shared/memory/mlx.ts): one concept, one name.
export type { MlxMode };

function checkEndpoint(ep: string, what: string): void {
  const i = ep.lastIndexOf(':');
  const host = ep.slice(0, i);
  const port = Number(ep.slice(i + 1));
  // The ring backend parses literal IPv4 only: no names (not even localhost), no IPv6.
  if (i <= 0 || !isIPv4(host)) throw new UsageError(`${what}: "${ep}" is not a literal IPv4 "ip:port"`);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UsageError(`${what}: bad port in "${ep}"`);
}

export function launchSize(launch: MlxLaunch): number {
  return launch.backend === 'ring' ? launch.endpoints.length : launch.devices.length;
}

/** The MLX_HOSTFILE content for a ring: JSON array, one entry per rank, in rank order. */
export function ringHostfile(endpoints: string[][]): string {
  // A single-entry ring is a misconfiguration in MLX: one rank runs with no distributed env.
  if (endpoints.length < 2) throw new UsageError(`a ring needs at least 2 ranks, got ${endpoints.length}`);
  const seen = new Set<string>();
  endpoints.forEach((eps, rank) => {
    if (eps.length === 0) throw new UsageError(`ring rank ${rank} has no endpoint`);
    for (const ep of eps) {
      checkEndpoint(ep, `ring rank ${rank}`);
      if (seen.has(ep)) throw new UsageError(`ring endpoint ${ep} is used twice`);
      seen.add(ep);
    }
  });
  return `${JSON.stringify(endpoints)}\n`;
}

/** The MLX_IBV_DEVICES content for JACCL: N×N, null exactly on the diagonal. */
export function jacclDevicesFile(devices: (string | null)[][]): string {
  const n = devices.length;
  if (n < 2) throw new UsageError(`JACCL needs at least 2 ranks, got ${n}`);
  devices.forEach((row, i) => {
    if (row.length !== n) throw new UsageError(`JACCL device matrix row ${i} has ${row.length} entries, expected ${n}`);
    row.forEach((d, j) => {
      if (i === j && d !== null) throw new UsageError(`JACCL device matrix diagonal [${i}][${i}] must be null`);
      if (i !== j && (typeof d !== 'string' || d === '')) {
        throw new UsageError(`JACCL device matrix [${i}][${j}] needs an RDMA device name (rank ${i} → ${j})`);
      }
    });
  });
  return `${JSON.stringify(devices)}\n`;
}

/** Files a rank needs on disk, by the env var that will point at them. */
export interface RankFiles {
  MLX_HOSTFILE?: string;
  MLX_IBV_DEVICES?: string;
}

/** File contents to write for a launch (the same for every rank of it). */
export function launchFiles(launch: MlxLaunch): { name: keyof RankFiles; content: string } {
  return launch.backend === 'ring'
    ? { name: 'MLX_HOSTFILE', content: ringHostfile(launch.endpoints) }
    : { name: 'MLX_IBV_DEVICES', content: jacclDevicesFile(launch.devices) };
}

/**
 * The environment of rank `rank`, given where the launch file was written. Exactly the variables
 * `mlx.launch` would export; for a single rank, none at all (MLX then runs a group of one).
 */
export function rankEnv(launch: MlxLaunch | undefined, rank: number, filePath?: string): Record<string, string> {
  if (!launch) {
    if (rank !== 0) throw new UsageError(`a single-process MLX run has only rank 0, not ${rank}`);
    return {};
  }
  const size = launchSize(launch);
  if (!Number.isInteger(rank) || rank < 0 || rank >= size) throw new UsageError(`rank ${rank} is outside 0..${size - 1}`);
  if (!filePath) throw new UsageError(`rank ${rank} needs the path of its ${launch.backend} launch file`);
  if (launch.backend === 'ring') return { MLX_RANK: String(rank), MLX_HOSTFILE: filePath };
  checkEndpoint(launch.coordinator, 'JACCL coordinator');
  const env: Record<string, string> = {
    MLX_RANK: String(rank),
    MLX_IBV_DEVICES: filePath,
    MLX_JACCL_COORDINATOR: launch.coordinator,
  };
  if (launch.ring) env.MLX_JACCL_RING = '1';
  return env;
}

/** Which rank runs plan stage `stage` of `size` (mlx-lm's order: rank 0 runs the last layers). */
export function rankOfStage(stage: number, size: number): number {
  if (!Number.isInteger(stage) || stage < 0 || stage >= size) throw new UsageError(`stage ${stage} is outside 0..${size - 1}`);
  return size - 1 - stage;
}

/** Layer counts per stage for an even split, the first stages taking the remainder. */
export function evenSplit(layers: number, ranks: number): number[] {
  if (ranks < 1 || layers < ranks) throw new UsageError(`cannot split ${layers} layers over ${ranks} ranks`);
  const base = Math.floor(layers / ranks);
  const extra = layers % ranks;
  return Array.from({ length: ranks }, (_, r) => base + (r < extra ? 1 : 0));
}

/**
 * Layer counts per stage from a plan's stage ranges, in plan order (first layers first; the
 * worker runs stage s on rank N-1-s, so the plan's head stage is rank 0). Ranges must be
 * contiguous from 0 and cover every layer.
 */
export function splitFromRanges(ranges: readonly { start: number; end: number }[], layers: number): number[] {
  let next = 0;
  const split = ranges.map((r, i) => {
    if (r.start !== next || r.end <= r.start) {
      throw new UsageError(`stage ${i} range ${r.start}..${r.end} does not continue at layer ${next}`);
    }
    next = r.end;
    return r.end - r.start;
  });
  if (next !== layers) throw new UsageError(`stages cover ${next} of ${layers} layers`);
  return split;
}

export interface WorkerArgs {
  model: string;
  mode: MlxMode;
  /** Layers per stage (pipeline only), plan order: first layers first. */
  split?: number[];
  backend?: 'ring' | 'jaccl';
}

export function workerArgs(a: WorkerArgs): string[] {
  const args = ['--model', a.model, '--mode', a.mode];
  if (a.split && a.mode === 'pipeline') args.push('--split', a.split.join(','));
  if (a.backend) args.push('--backend', a.backend);
  return args;
}
