import { ggmlTypeByName } from '../gguf/ggml-types.ts';
import { kvGeometry } from '../memory/kv.ts';
import type { ModelProfile } from '../model/profile.ts';
import { decodeInputBytes, graphBytes, layerSave, newGraphs, promptInputBytes, ubatchShapes } from './rpc-wire.ts';
import type { EngineFamily, PlacementNode, PlacementOptions } from './types.ts';

export type { EngineFamily } from './types.ts';

/**
 * The cost model's calibration constants and per-token work, in one place so the planner, the
 * baselines, `orchard plan` and the agent's self-measurement agree on what "bandwidth" and
 * "compute" mean.
 *
 * Decode (batch 1) is memory-bound: a token reads every active weight once, so a stage costs
 * bytes ÷ *effective* bandwidth. Prefill is compute-bound: a prompt of P tokens costs
 * P × FLOPs per token ÷ compute throughput. A stage boundary costs its latency plus the
 * activations that cross it ÷ link throughput (decode: one row of `embd` f32 values per token;
 * prefill: P rows, in ⌈P ÷ ubatch⌉ round trips) plus what else llama.cpp RPC sends (rpc-wire.ts:
 * masks, graphs, and before a fresh prompt the previous request's KV for llama-server's prompt
 * cache).
 */

/**
 * Fraction of the chip table's (spec) bandwidth that decode achieves, per engine, when the node
 * has not measured itself. Derived from published decode figures (tokens/s × bytes per token ÷
 * spec bandwidth):
 * - llama.cpp Metal, LLaMA-2 7B Q4_0 (3.56 GiB) tg128, llama.cpp discussion #4167 ("Performance
 *   of llama.cpp on Apple Silicon M-series"): M1 Max 400 GB/s ≈ 61 tok/s → 0.58; M2 Ultra 800 GB/s
 *   ≈ 94 tok/s → 0.48; M3 Max 400 GB/s ≈ 66 tok/s → 0.63; M4 Max 546 GB/s ≈ 83 tok/s → 0.58.
 * - 70B Q4_K_M (~40 GB) at "~10–14 tok/s" on an M2 Ultra (800 GB/s) and an M4 Max (546 GB/s)
 *   (project seeds, /work/shared/seeds "Tok/s expectations"): 0.50–0.70 and 0.73–1.0.
 * - "Real-world numbers hit 60-80% of theoretical" (seeds, "The Bandwidth Bottleneck").
 * llama.cpp: 0.6 (the middle of these). MLX decodes 20–50 % faster than llama.cpp on small
 * models (arXiv 2511.05502: ~230 vs ~150 tok/s) but converges on large bandwidth-bound ones;
 * 0.7 is a conservative midpoint. A node's own measurement (`orchard node --calibrate`) replaces
 * both.
 */
export const DECODE_EFFICIENCY: Readonly<Record<EngineFamily, number>> = { 'llama.cpp': 0.6, mlx: 0.7 };

/**
 * Prefill FLOP/s per Apple GPU core achieved by llama.cpp Metal, from the same discussion #4167
 * (LLaMA-2 7B Q4_0, pp512; 2 × 6.74e9 FLOPs per token): M1 Max 32 cores ≈ 530 tok/s → 0.22 TFLOP/s
 * per core; M2 Ultra 76 cores ≈ 1238 tok/s → 0.22; M3 Max 40 cores ≈ 760 tok/s → 0.26.
 */
export const PREFILL_FLOPS_PER_GPU_CORE = 0.22e12;

/**
 * Without GPU cores or a measurement: prefill FLOP/s per byte/s of effective decode bandwidth.
 * The Apple figures above give ~20 FLOP per spec byte (M2 Ultra 16.6 TFLOP/s ÷ 800 GB/s) ≈ 33 per
 * effective byte; used only until the node measures itself.
 */
export const PREFILL_FLOPS_PER_BANDWIDTH_BYTE = 33;

/** Activations cross stage boundaries as f32 (llama.cpp RPC and MLX pipeline both). */
export const ACTIVATION_BYTES_PER_VALUE = 4;

/** Effective decode bandwidth: measured when the node has measured this engine, else spec × efficiency. */
export function effectiveBandwidth(specBytesPerSecond: number, engine: EngineFamily, measured?: number): number {
  return measured !== undefined && measured > 0 ? measured : specBytesPerSecond * DECODE_EFFICIENCY[engine];
}

/** Prefill compute: measured, else from GPU cores, else from the effective bandwidth. */
export function defaultPrefillFlops(effectiveBytesPerSecond: number, gpuCores = 0): number {
  return gpuCores > 0 ? gpuCores * PREFILL_FLOPS_PER_GPU_CORE : effectiveBytesPerSecond * PREFILL_FLOPS_PER_BANDWIDTH_BYTE;
}

/**
 * Bytes one weight takes in the model's dominant type: ggml block geometry for GGUF types,
 * mlx-lm's affine quantisation (bits + an f16 scale and bias per group) for "Q4g64", else 2.
 */
export function bytesPerWeight(weightType: string): number {
  const t = ggmlTypeByName(weightType);
  if (t) return t.bytesPerBlock / t.blockSize;
  const mlx = /Q(\d+)g(\d+)$/.exec(weightType);
  if (mlx) return (Number(mlx[1]) + 32 / Number(mlx[2])) / 8;
  return 2;
}

/**
 * FLOPs one prompt token costs in each layer when the prompt has `promptTokens` tokens:
 * 2 per active weight (weights read per token ÷ bytes per weight — MoE layers count only routed
 * experts, as readBytesPerToken does) plus attention over on average (P + 1) ÷ 2 earlier tokens
 * (Q·K and A·V: 2 × heads × (headDimK + headDimV) per position; a sliding window caps it).
 */
export function layerPrefillFlops(profile: ModelProfile, promptTokens: number): number[] {
  const bpw = bytesPerWeight(profile.weightType);
  const attention = layerAttentionFlops(profile, (promptTokens + 1) / 2);
  return profile.layers.map((l, i) => (2 * l.readBytesPerToken) / bpw + attention[i]!);
}

/**
 * Attention FLOPs of one token in each layer when it attends to `contextTokens` positions: Q·K and
 * A·V, 2 × heads × (headDimK + headDimV) per position; a sliding-window layer attends to at most
 * its window.
 */
export function layerAttentionFlops(profile: ModelProfile, contextTokens: number): number[] {
  const perPosition = 2 * profile.heads * (profile.headDimK + profile.headDimV);
  return profile.layers.map((l) => perPosition * (l.swa && profile.swa ? Math.min(contextTokens, profile.swa.window) : contextTokens));
}

/** Attention FLOPs of one token over `contextTokens` positions, every layer together. */
export function attentionFlopsPerToken(profile: ModelProfile, contextTokens: number): number {
  return layerAttentionFlops(profile, contextTokens).reduce((a, b) => a + b, 0);
}

/** Attention FLOPs of one decoded token in each layer at the options' decode context (decodeContextTokens). */
export function layerDecodeAttentionFlops(profile: ModelProfile, o: PlacementOptions): number[] {
  return layerAttentionFlops(profile, decodeContextTokens(o, cacheCells(profile, o).full));
}

/**
 * Positions a decoded token attends to on average. With a prompt (options.promptTokens: what
 * `orchard plan --prompt-tokens` and bench:lan price) the request's own: a token at position p
 * attends to p + 1 positions, and a request of P prompt tokens decodes positions P … P + n − 1,
 * so P + (n + 1) ÷ 2 with n = outputTokens. Without one, `kvFill` of a stream's cells (the
 * planner's long-standing assumption for the KV a token reads).
 */
export function decodeContextTokens(o: Pick<PlacementOptions, 'promptTokens' | 'outputTokens' | 'kvFill'>, streamCells: number): number {
  if (o.promptTokens > 0) return Math.min(streamCells, o.promptTokens + (Math.max(1, o.outputTokens) + 1) / 2);
  return o.kvFill * streamCells;
}

/**
 * Seconds per FLOP of decode attention on node `n`: its measured rate's inverse (the calibration's
 * short- and long-context windows), else 0 — a node that has not measured it pays for attention
 * only as the KV bytes its reads count, as before the measurement existed. On a CPU engine
 * attention in decode is far slower than its bytes (bench/README.md, bench:decode-depth: a
 * 36-layer token at 141 positions 13 % slower than at 29); on Metal it is closer to its KV bytes,
 * which the bandwidth already prices.
 */
export function decodeAttentionSecondsPerFlop(n: PlacementNode): number {
  const r = n.decodeAttentionFlopsPerSecond;
  return r !== undefined && r > 0 ? 1 / r : 0;
}

/** FLOPs of the head's output projection for the one position whose logits prefill needs. */
export function headPrefillFlops(profile: ModelProfile): number {
  return 2 * profile.embd * profile.vocab;
}

/** Bytes that cross one stage boundary: per decoded token, and for a whole prompt. */
export function activationBytes(profile: ModelProfile, tokens: number): number {
  return tokens * profile.embd * ACTIVATION_BYTES_PER_VALUE;
}

/** Seconds per token node `n` pays as the head whatever it reads: its measurement, else the options' assumption. */
export function headFixedSeconds(n: PlacementNode, o: PlacementOptions): number {
  return n.decodeFixedSecondsPerToken ?? o.headOverheadSeconds;
}

export function prefillFlopsOf(n: PlacementNode): number {
  return n.prefillFlopsPerSecond ?? defaultPrefillFlops(n.bandwidthBytesPerSecond);
}

/**
 * The link a worker stage's boundary crosses: its measured link to `head` when there is one, else
 * the node's or the options' assumed figures. A llama.cpp round trip is the link's plus what the
 * engine tunnel and the split cost beyond it (boundaryOverheadOf); an MLX rank's activations go
 * straight over the ring, through no tunnel.
 */
export function linkOf(n: PlacementNode, o: PlacementOptions, head?: string): { rttSeconds: number; bytesPerSecond: number } {
  const measured = head === undefined ? undefined : n.links?.[head];
  const overhead = sendsRpcInputs(o) ? boundaryOverheadOf(n, o) : 0;
  return { rttSeconds: (measured?.rttSeconds ?? n.hopSeconds ?? o.hopSeconds) + overhead, bytesPerSecond: measured?.bytesPerSecond ?? n.linkBytesPerSecond ?? o.linkBytesPerSecond };
}

/** KV cells per stream of the full and the sliding-window caches. */
function cacheCells(profile: ModelProfile, o: PlacementOptions): { full: number; swa: number } {
  const g = kvGeometry(profile, { ctx: o.ctx, cacheTypeK: o.cacheType, cacheTypeV: o.cacheType, parallel: o.parallel, unified: o.unified, ubatch: o.ubatch });
  return { full: g.cellsFull, swa: g.cellsSwa };
}

/** llama.cpp RPC sends a worker more than its activations (rpc-wire.ts); an MLX rank gets the activations alone. */
const sendsRpcInputs = (o: PlacementOptions): boolean => o.engine !== 'mlx';

/** Seconds a llama.cpp boundary whose worker is `n` costs per round trip beyond the link's round trip: its measurement, else the options' assumption. */
export function boundaryOverheadOf(n: PlacementNode, o: PlacementOptions): number {
  return n.boundaryOverheadSeconds ?? o.boundaryOverheadSeconds;
}

/**
 * Seconds the boundary after a worker stage on `n` adds: per decoded token (one round trip + its
 * activation row crossing `activationCrossings` times + llama.cpp's mask and per-token inputs,
 * rpc-wire.ts) and for the whole prompt (one round trip per ubatch + P rows + every ubatch's
 * inputs and the per-stage part of each new graph). The link is n's measured link to `head` when
 * there is one, else the node's or the options' assumed figures. What grows with the stage's
 * layers (graph, prompt-cache save) is in layerWire.
 */
export function boundarySeconds(profile: ModelProfile, n: PlacementNode, o: PlacementOptions, head?: string): { decode: number; prefill: number } {
  const { rttSeconds: hop, bytesPerSecond: link } = linkOf(n, o, head);
  const P = o.promptTokens;
  const x = o.activationCrossings;
  const rpc = sendsRpcInputs(o);
  const cells = rpc ? cacheCells(profile, o) : { full: 0, swa: 0 };
  const decodeInputs = rpc ? decodeInputBytes(profile, o.kvFill * cells.full, cells, o.flashAttention) : 0;
  const promptInputs = rpc && P > 0 ? promptInputBytes(profile, P, cells, o) : 0;
  return {
    decode: hop + (x * activationBytes(profile, 1) + decodeInputs) / link,
    prefill: P > 0 ? Math.ceil(P / o.ubatch) * hop + (x * activationBytes(profile, P) + promptInputs) / link : 0,
  };
}

/**
 * Per layer, what a worker stage holding it adds to a fresh prompt over its link to the head
 * (rpc-wire.ts; all zero for MLX ranks and without a prompt): `chainBytes`, the layer's part of
 * every new graph (sent before the stage computes: in the pipeline chain), and the prompt-cache
 * save — `saveBytes` and `saveRoundTrips` — of the slot's previous request, done before the prompt
 * starts, only with `hostPromptCache` (Orchard's engines run without it). That request is taken to be like this one: `promptTokens + outputTokens − 1` cells
 * (the last sampled token is never decoded), as in a stream of fresh prompts of one size.
 */
export interface LayerWire {
  readonly chainBytes: readonly number[];
  readonly saveBytes: readonly number[];
  readonly saveRoundTrips: readonly number[];
}

export function layerWire(profile: ModelProfile, o: PlacementOptions): LayerWire {
  const P = o.promptTokens;
  if (P <= 0 || !sendsRpcInputs(o)) {
    const zero = profile.layers.map(() => 0);
    return { chainBytes: zero, saveBytes: zero, saveRoundTrips: zero };
  }
  const cells = cacheCells(profile, o);
  const graphs = newGraphs(ubatchShapes(P, o.ubatch, cells.full));
  const perLayer = graphBytes(o.flashAttention).perLayer;
  const saved = profile.layers.map((l) => (o.hostPromptCache ? layerSave(l, P + o.outputTokens - 1, cells, o) : { bytes: 0, roundTrips: 0 }));
  return { chainBytes: profile.layers.map(() => graphs * perLayer), saveBytes: saved.map((s) => s.bytes), saveRoundTrips: saved.map((s) => s.roundTrips) };
}

/**
 * Bytes a fresh prompt moves across the boundary of a worker stage holding layers first…last,
 * each way, as boundarySeconds and layerWire charge them (llama.cpp: the activations cross once
 * each way): for checking the model against a link's own counters (bench:lan).
 */
export function promptBoundaryBytes(profile: ModelProfile, o: PlacementOptions, first: number, last: number): { toWorker: number; toHead: number } {
  const w = layerWire(profile, o);
  const sum = (xs: readonly number[]) => xs.slice(first, last + 1).reduce((t, x) => t + x, 0);
  const inputs = sendsRpcInputs(o) && o.promptTokens > 0 ? promptInputBytes(profile, o.promptTokens, cacheCells(profile, o), o) : 0;
  const rows = activationBytes(profile, o.promptTokens);
  return { toWorker: rows + inputs + sum(w.chainBytes), toHead: rows + sum(w.saveBytes) };
}

/** Seconds of a worker stage's layer wire (sums of LayerWire over its layers) on its link: in the chain, and the save before the prompt. */
export function stageWireSeconds(w: { chainBytes: number; saveBytes: number; saveRoundTrips: number }, link: { rttSeconds: number; bytesPerSecond: number }): { chain: number; save: number } {
  return { chain: w.chainBytes / link.bytesPerSecond, save: w.saveBytes / link.bytesPerSecond + w.saveRoundTrips * link.rttSeconds };
}

/**
 * Seconds to prefill a prompt of `ubatches` ubatches through the pipeline, from each stage's
 * compute for the whole prompt (pipeline order, the head's stage last; `headOnceSeconds` of the
 * last one is the head's work done once, after the last ubatch: the last position's logits) and
 * each boundary's prefill cost (boundarySeconds().prefill, all ubatches).
 *
 * llama.cpp processes a prompt in ubatches (llama-context.cpp `decode`: one `process_ubatch` per
 * ubatch, no synchronisation between them) and, with every device async and event-capable (RPC
 * and Metal are: ggml-rpc.cpp device props, ggml-metal.cpp), enables pipeline parallelism
 * (llama-context.cpp "pipeline parallelism enabled", 4 input copies). Its scheduler
 * (ggml-backend.cpp `ggml_backend_sched_compute_splits`) walks one ubatch's splits in order on
 * the head's thread and, because RPC servers cannot copy tensors between each other
 * asynchronously, synchronises with each stage before copying its output to the next (get, then
 * set). So ubatch i + 1 runs through stages 1…S−1 and their boundaries (the chain A) while the
 * last stage computes ubatch i (c): T = A + c + (U − 1) · max(A, c). Stages before the last never
 * overlap one another — measured (bench/split-prefill.ts, 960 tokens in 8 ubatches on loopback):
 * 2 stages 0.63× and 3 stages 0.76× of one stage, where a full pipeline would give 0.56× and
 * 0.42×. One ubatch (U = 1) is the plain sum. `pipelined` false (MLX ranks) is the plain sum too.
 */
export function prefillSeconds(stageSeconds: readonly number[], boundaryPrefillSeconds: readonly number[], ubatches: number, headOnceSeconds: number, pipelined: boolean): number {
  const sum = (xs: readonly number[]) => xs.reduce((t, x) => t + x, 0);
  const last = stageSeconds.at(-1) ?? 0;
  const chain = sum(stageSeconds) - last + sum(boundaryPrefillSeconds);
  return (pipelined ? pipelineSeconds(chain, last - headOnceSeconds, ubatches) : chain + last - headOnceSeconds) + headOnceSeconds;
}

/** The overlap of prefillSeconds: a chain and a last stage of whole-prompt seconds, in U ubatches. */
export function pipelineSeconds(chainSeconds: number, lastSeconds: number, ubatches: number): number {
  const U = Math.max(1, ubatches);
  return (chainSeconds + lastSeconds + (U - 1) * Math.max(chainSeconds, lastSeconds)) / U;
}

/**
 * decode: seconds per token; ttft: time to first token (decode speed breaks near-ties); balanced:
 * a whole request, TTFT + outputTokens × seconds per token. Without a prompt only decode is known.
 */
export function objectiveWeights(o: PlacementOptions): { wd: number; wt: number } {
  if (o.promptTokens <= 0 || o.objective === 'decode') return { wd: 1, wt: 0 };
  if (o.objective === 'ttft') return { wd: 1e-3, wt: 1 };
  return { wd: o.outputTokens, wt: 1 };
}

/** What a node measured of its own engine (`orchard node --calibrate`). */
export interface Calibration {
  readonly engine: EngineFamily;
  /**
   * FLOP/s of attention in decode (PlacementNode decodeAttentionFlopsPerSecond): the deep model's
   * windows at CALIBRATION_PROMPT_TOKENS against its short-context windows (calibrate.ts decodeAttentionRate);
   * absent when the longer context's step was within its windows' scatter (decode-fit.ts).
   */
  readonly decodeAttentionFlopsPerSecond?: number;
  /** Positions the deep model's windows attended to on average (the context the bandwidth was taken at, without its attention). */
  readonly decodeContextTokens?: number;
  /** The deep model's short-context windows (calibrate.ts SHORT_PROMPT_TOKENS). */
  readonly shortContext?: { readonly promptTokens: number; readonly decodeTokensPerSecond: number; readonly decodeSpread: number };
  /**
   * Bytes the planner counts per decoded token ÷ (measured seconds per token −
   * decodeFixedSecondsPerToken): the slope of the two-depth fit (decode-fit.ts).
   */
  readonly effectiveBandwidthBytesPerSecond: number;
  /**
   * Seconds per decoded token the engine pays whatever the bytes it reads (llama-server's
   * sampling and HTTP, the graph's launch and its RPC round trips to the local rpc-server): the
   * intercept of the two-depth fit, or, for a one-depth measurement on another model (the demo's),
   * the machine's own calibration's. The planner charges it at the head (PlacementNode).
   */
  readonly decodeFixedSecondsPerToken: number;
  /**
   * Seconds a tunnelled stage boundary costs per decoded token beyond the link probe's round trip
   * (PlacementNode boundaryOverheadSeconds): the same model split in two with the first stage
   * behind a loopback engine tunnel, minus it on one rpc-server, minus the probe's round trip over
   * that tunnel (never below 0); or, for a one-depth measurement on another model, the machine's
   * own calibration's. Absent where it was not measured (macOS: the calibration engine runs no
   * rpc-servers there).
   */
  readonly boundaryOverheadSeconds?: number;
  /**
   * What boundaryOverheadSeconds was measured from: layers, both decode rates as the windows ran
   * (their waits for a core left in: a boundary's cost is mostly those waits) and the fraction of
   * each window spent waiting, the tunnelled rate's spread, and the probe's round trip.
   */
  readonly boundary?: {
    readonly layers: number;
    readonly decodeTokensPerSecond: number;
    readonly waitedFraction: number;
    readonly tunnelledDecodeTokensPerSecond: number;
    readonly tunnelledWaitedFraction: number;
    readonly tunnelledDecodeSpread: number;
    readonly probeRttSeconds: number;
  };
  /** The depths measured: layers, bytes the planner counts per token, decode rate and spread of each (the first is the record's own model). */
  readonly depths: readonly { readonly layers: number; readonly readBytesPerToken: number; readonly decodeTokensPerSecond: number; readonly decodeSpread: number; readonly decodeContextTokens?: number }[];
  /** layerPrefillFlops × prompt tokens ÷ measured prompt seconds. */
  readonly prefillFlopsPerSecond: number;
  readonly threads: number;
  /** The engine build measured ("v0.5.0+de3ff815ea7d-…"); a different build measures again. */
  readonly engineBuild: string;
  readonly measuredAtSeconds: number;
  readonly decodeTokensPerSecond: number;
  readonly promptTokensPerSecond: number;
  readonly modelBytes: number;
  /** Decode windows measured, their length in decoded tokens, and ±their spread around the median (calibration.ts). */
  readonly windows: number;
  readonly decodeTokensPerWindow: number;
  readonly decodeSpread: number;
  /** Cores' worth of CPU other processes used during the windows, on a machine of `cores` cores. */
  readonly competingCores: number;
  /** Median fraction of a window the engine waited for a core others held; the rates above are without those waits (calibration.ts uncontendedRate). */
  readonly waitedFraction: number;
  readonly cores: number;
  readonly loadAverage1m: number;
}

/**
 * Turn an engine's reported rates on a known model into the cost model's two node numbers, with
 * the planner's own byte and FLOP accounting, so that the planner's prediction for that model on
 * that node reproduces the measurement (the rest is how well bytes and FLOPs extrapolate).
 * `readBytesPerToken` is what the planner counts for one decoded token of the measured model
 * (every layer's reads including the KV share, plus the head's); `decodeFixedSecondsPerToken` the
 * part of a token's seconds that is not reading (the two-depth fit's intercept, else the
 * planner's assumed head overhead), which the planner charges back at the head.
 */
export function calibrationRates(
  profile: ModelProfile,
  measured: { readonly decodeTokensPerSecond: number; readonly promptTokensPerSecond: number; readonly promptTokens: number; readonly readBytesPerToken: number },
  decodeFixedSecondsPerToken: number,
): { effectiveBandwidthBytesPerSecond: number; prefillFlopsPerSecond: number } {
  const perToken = 1 / measured.decodeTokensPerSecond - decodeFixedSecondsPerToken;
  if (!(perToken > 0)) throw new Error(`decode rate ${measured.decodeTokensPerSecond} tok/s leaves no time for reading weights`);
  const flopsPerToken = layerPrefillFlops(profile, measured.promptTokens).reduce((a, b) => a + b, 0);
  const promptFlops = flopsPerToken * measured.promptTokens + headPrefillFlops(profile);
  return {
    effectiveBandwidthBytesPerSecond: measured.readBytesPerToken / perToken,
    prefillFlopsPerSecond: (promptFlops * measured.promptTokensPerSecond) / measured.promptTokens,
  };
}
