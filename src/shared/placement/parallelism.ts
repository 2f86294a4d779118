import { UsageError } from '../errors.ts';
import type { ModelProfile } from '../model/profile.ts';
import type { LinkCost } from './links.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from './types.ts';

/**
 * How an MLX model is spread over its ranks. Pipeline: each rank holds a contiguous layer range
 * and a token crosses each boundary once (ranks − 1 hops per token). Tensor: every rank holds
 * 1/ranks of every layer and the ranks all-reduce twice per layer per token (mlx-lm
 * `model.shard`: after attention and after the MLP) — it reads each rank's share of the weights
 * in parallel, but pays 2 × layers link round trips per token, so it only pays off on
 * low-latency links (Thunderbolt RDMA), never on a LAN.
 */
export const PARALLELISMS = ['pipeline', 'tensor', 'auto'] as const;
export type Parallelism = (typeof PARALLELISMS)[number];

export function parseParallelism(s: string | undefined): Parallelism {
  const v = (s ?? '').trim() || 'auto';
  if (!(PARALLELISMS as readonly string[]).includes(v)) throw new UsageError(`invalid parallelism "${s}": pipeline, tensor or auto`);
  return v as Parallelism;
}

export interface ParallelismInput {
  readonly requested: Parallelism;
  readonly ranks: number;
  readonly profile: Pick<ModelProfile, 'heads' | 'kvHeads' | 'moe' | 'ffn' | 'layerCount' | 'embd'>;
  /** Weight + KV bytes one token reads (planner: Σ stage readBytesPerToken). */
  readonly readBytesPerToken: number;
  /** The slowest rank's memory bandwidth. */
  readonly bandwidthBytesPerSecond: number;
  /** One link round trip between ranks (the planner's hop cost). */
  readonly linkSeconds: number;
  /**
   * Where linkSeconds comes from, said in the reason: "measured …" when the cluster measured its
   * links, else "assumed …" (the backend's figure).
   */
  readonly linkSource: string;
  /** Link throughput for the all-reduce payloads. */
  readonly linkBytesPerSecond: number;
  /** Nodes whose budget cannot hold a tensor rank (stage-memory.ts mlxTensorFit), said as why. */
  readonly overBudget?: readonly string[];
}

export interface ParallelismChoice {
  readonly mode: 'pipeline' | 'tensor';
  readonly reason: string;
}

/** How MLX ranks reach each other: a TCP ring through the tunnels, JACCL over Thunderbolt RDMA, or one process. */
export type MlxBackend = 'ring' | 'jaccl' | 'none';

/** The link figures an all-reduce is charged with, and where they come from (said in the reason). */
export type AllReduceLink = Pick<ParallelismInput, 'linkSeconds' | 'linkBytesPerSecond' | 'linkSource'>;

/**
 * Assumed figures where nothing is measured. JACCL over Thunderbolt 5 RDMA: a few µs and ~80 Gb/s
 * (Apple's published figures; its links bypass the tunnels the agents probe, so never measured
 * here); the TCP ring: the planner's hop cost and a 10 GbE LAN.
 */
const ASSUMED: Record<Exclude<MlxBackend, 'none'>, AllReduceLink> = {
  jaccl: { linkSeconds: 10e-6, linkBytesPerSecond: 10e9, linkSource: "assumed: JACCL over Thunderbolt RDMA, Apple's published figure (its links bypass the probed tunnels)" },
  ring: { linkSeconds: DEFAULT_PLACEMENT_OPTIONS.hopSeconds, linkBytesPerSecond: 1.25e9, linkSource: "assumed: the planner's hop cost for a TCP ring" },
};

/** One link of the ring between neighbouring ranks, with what the agents measured of it. */
export interface RingLink {
  readonly from: string;
  readonly to: string;
  readonly measured: LinkCost | undefined;
}

/**
 * The link tensor parallel would all-reduce over. The TCP ring runs through the tunnels the
 * agents probe, and every all-reduce step waits for its slowest link: the longest measured round
 * trip and the lowest measured throughput of the ring's links. A ring link not measured yet
 * falls back to the assumed figure and the reason names it, so a guess never passes as a
 * measurement.
 */
export function allReduceLink(backend: MlxBackend, ring: readonly RingLink[]): AllReduceLink {
  if (backend === 'none') return { linkSeconds: 0, linkBytesPerSecond: Number.POSITIVE_INFINITY, linkSource: 'one host' };
  if (backend === 'jaccl') return ASSUMED.jaccl;
  const missing = ring.filter((l) => !l.measured);
  if (ring.length === 0 || missing.length > 0) {
    return { ...ASSUMED.ring, linkSource: `${ASSUMED.ring.linkSource}; not measured yet: ${missing.map((l) => `${l.from}↔${l.to}`).join(', ') || 'no ring links'}` };
  }
  const slowest = ring.reduce((a, b) => (b.measured!.rttSeconds > a.measured!.rttSeconds ? b : a));
  const linkBytesPerSecond = Math.min(...ring.map((l) => l.measured!.bytesPerSecond));
  const rate = `${(linkBytesPerSecond / 1e6).toFixed(0)} MB/s`;
  return { linkSeconds: slowest.measured!.rttSeconds, linkBytesPerSecond, linkSource: `measured: slowest ring link ${slowest.from}↔${slowest.to}, ${rate} lowest throughput` };
}

/** The ring links of ranks on `nodes` (rank order): each to the next, the last back to the first. */
export function ringLinks(nodes: readonly string[], measured: (a: string, b: string) => LinkCost | undefined): RingLink[] {
  if (nodes.length < 2) return [];
  const pairs = nodes.length === 2 ? [[nodes[0]!, nodes[1]!]] : nodes.map((a, i) => [a, nodes[(i + 1) % nodes.length]!]);
  return pairs.map(([from, to]) => ({ from: from!, to: to!, measured: measured(from!, to!) }));
}

/** What tensor parallel over `ranks` needs that this model breaks (mlx-lm shards these evenly). */
export function tensorDivisibility(p: ParallelismInput['profile'], ranks: number): string[] {
  const out: string[] = [];
  if (p.heads % ranks !== 0) out.push(`${p.heads} attention heads are not divisible by ${ranks} ranks`);
  const kv = Math.max(...p.kvHeads);
  if (kv % ranks !== 0) out.push(`${kv} KV heads are not divisible by ${ranks} ranks`);
  if (p.moe && p.moe.experts % ranks !== 0) out.push(`${p.moe.experts} experts are not divisible by ${ranks} ranks`);
  if (p.ffn > 0 && p.ffn % ranks !== 0) out.push(`intermediate size ${p.ffn} is not divisible by ${ranks} ranks`);
  return out;
}

/**
 * Bytes one rank sends per decoded token under tensor parallel: two all-reduces of the hidden
 * state (f32 here; bf16 models send half) per layer, each its ring share 2(n−1)/n.
 */
export function allReduceBytesPerToken(p: ParallelismInput['profile'], ranks: number): number {
  return 2 * p.layerCount * 4 * p.embd * ((2 * (ranks - 1)) / ranks);
}

/** Predicted seconds per decoded token under each layout (bandwidth-bound decode). */
export function parallelismCosts(i: ParallelismInput): { pipeline: number; tensor: number } {
  const n = i.ranks;
  const read = i.readBytesPerToken / i.bandwidthBytesPerSecond;
  // Each all-reduce is a link round trip plus its payload.
  const tensor = read / n + 2 * i.profile.layerCount * i.linkSeconds + allReduceBytesPerToken(i.profile, n) / i.linkBytesPerSecond;
  const pipeline = read + (n - 1) * i.linkSeconds;
  return { pipeline, tensor };
}

const ms = (s: number) => `${(s * 1000).toFixed(2)} ms`;

/** Pipeline or tensor for these ranks: the request if it is possible, else a refusal naming why. */
export function chooseParallelism(i: ParallelismInput): ParallelismChoice {
  if (i.ranks <= 1) return { mode: 'pipeline', reason: 'one rank: nothing to split' };
  const broken = [...tensorDivisibility(i.profile, i.ranks), ...(i.overBudget ?? [])];
  if (i.requested === 'pipeline') return { mode: 'pipeline', reason: 'pipeline requested' };
  if (i.requested === 'tensor') {
    if (broken.length > 0) throw new UsageError(`tensor parallel over ${i.ranks} ranks is impossible: ${broken.join('; ')} (use --parallelism pipeline)`);
    return { mode: 'tensor', reason: 'tensor requested' };
  }
  if (broken.length > 0) return { mode: 'pipeline', reason: `auto: pipeline, tensor parallel is impossible (${broken.join('; ')})` };
  const c = parallelismCosts(i);
  const kib = (allReduceBytesPerToken(i.profile, i.ranks) / 1024).toFixed(1);
  const why = `predicted ${ms(c.pipeline)}/token pipeline vs ${ms(c.tensor)}/token tensor (${2 * i.profile.layerCount} all-reduces, ${kib} KiB per token, at ${ms(i.linkSeconds)} per link round trip, ${i.linkSource})`;
  return c.tensor < c.pipeline ? { mode: 'tensor', reason: `auto: tensor, ${why}` } : { mode: 'pipeline', reason: `auto: pipeline, ${why}` };
}
