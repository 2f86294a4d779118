import type { MlxModelProfile } from '../model/mlx-profile.ts';

/**
 * What one MLX rank holds, in the terms MLX's own allocator counts (mx.get_active_memory /
 * mx.get_peak_memory): weights after the load, and at the peak of a request the KV cache plus
 * the transient activations of the widest step. The Python process itself (interpreter,
 * libraries) is outside MLX's counters and outside these figures.
 *
 * Rules, from mlx-lm 0.32 (models/cache.py, generate.py) and Orchard's worker (mlx_worker.py):
 * - Pipeline: a rank holds its layer range plus the embedding, final norm and untied lm_head
 *   (mlx-lm builds the whole model; the worker only drops other ranks' layers). Tied models hold
 *   the embedding once (the head is `embed_tokens.as_linear`).
 * - Tensor: every rank holds every layer's replicated tensors whole and 1/ranks of the rest
 *   (`shard()`), attention heads and KV heads divided by the rank count; embedding and head whole.
 * - KVCache grows in steps of 256 positions: a feed of c tokens that does not fit appends
 *   ⌈c/256⌉·256 slots (after trimming a partly used buffer), K and V in the activation dtype.
 * - generate_step prefills prompt − 1 tokens in chunks of ≤ 2048, evaluating only the caches, then
 *   feeds the last prompt token and one token per generated token (it runs one step ahead).
 * - Transient activations peak inside one layer (layers run one after another): attention
 *   without a fused kernel on the CPU materialises the scores and their softmax, heads × c × S
 *   each; the MLP holds gate, up and their product (c × ffn); the residual stream and normed
 *   input stay alive throughout. MoE layers route c tokens through k experts each. A pipeline
 *   rank's all_gather holds ranks × c hidden states.
 */

export type MlxMode = 'single' | 'pipeline' | 'tensor';

export interface MlxRankLayout {
  readonly mode: MlxMode;
  readonly ranks: number;
  /** Layers this rank runs, inclusive (tensor and single: all of them). */
  readonly firstLayer: number;
  readonly lastLayer: number;
}

export interface MlxRequestShape {
  readonly promptTokens: number;
  /** Tokens generated (the worker feeds each one back, the last one included). */
  readonly generatedTokens: number;
}

export interface MlxRankBytes {
  readonly weights: number;
  readonly kv: number;
  readonly transient: number;
  /** weights + kv + transient: what mx.get_peak_memory() should say after the request. */
  readonly peak: number;
}

/** mlx-lm's KVCache.step and generate_step's prefill_step_size. */
export const KV_STEP = 256;
export const PREFILL_CHUNK = 2048;

/** Token counts generate_step feeds through the model, in order. */
export function feeds(req: MlxRequestShape): number[] {
  const out: number[] = [];
  for (let left = req.promptTokens - 1; left > 0; left -= PREFILL_CHUNK) out.push(Math.min(PREFILL_CHUNK, left));
  out.push(1);
  for (let i = 0; i < req.generatedTokens; i++) out.push(1);
  return out;
}

/** KVCache slots after the feeds, and the slots of the buffer the last growth replaced. */
export function kvSlots(sizes: readonly number[]): { slots: number; replaced: number } {
  let slots = 0;
  let offset = 0;
  let replaced = 0;
  for (const c of sizes) {
    if (slots === 0 || offset + c > slots) {
      replaced = slots;
      if (slots > 0 && offset % KV_STEP !== 0) slots = offset;
      slots += Math.ceil(c / KV_STEP) * KV_STEP;
    }
    offset += c;
  }
  return { slots, replaced };
}

/** Weight bytes one rank holds after the load. */
export function mlxRankWeights(p: MlxModelProfile, l: MlxRankLayout): number {
  const outside = p.tokenEmbdBytes + p.outputNormBytes + (p.outputTied ? 0 : p.outputBytes) + p.otherBytes;
  let layers = 0;
  for (let il = l.firstLayer; il <= l.lastLayer; il++) {
    const w = p.layers[il]!.weightBytes;
    if (l.mode !== 'tensor') layers += w;
    else {
      const whole = p.mlx.replicatedLayerBytes[il] ?? 0;
      layers += whole + (w - whole) / l.ranks;
    }
  }
  return outside + layers;
}

/** Peak transient bytes of one layer processing `c` tokens against `s` cached positions. */
function layerTransient(p: MlxModelProfile, l: MlxRankLayout, shard: number, c: number, s: number): number {
  const heads = p.heads / shard;
  const kvWidth = (p.layers[0]!.kEmbdGqa + p.layers[0]!.vEmbdGqa) / shard;
  // Residual stream + normed input; a pipeline rank also all_gathers its last layer's output.
  const residual = 2 * c * p.embd + (l.mode === 'pipeline' ? l.ranks * c * p.embd : 0);
  const attention = 2 * heads * c * s + c * (p.heads * p.headDimK) / shard + c * kvWidth + c * p.embd;
  const ffnWidth = p.moe ? (p.moe.expertsUsed * (p.moe.expertFfn || p.ffn)) / shard + p.moe.experts : p.ffn / shard;
  const mlp = 3 * c * ffnWidth + c * p.embd;
  return (residual + Math.max(attention, mlp)) * p.mlx.activationBytes;
}

/** Weights, KV cache and transient peak of one rank for one request (see the rules above). */
export function mlxRankBytes(p: MlxModelProfile, l: MlxRankLayout, req: MlxRequestShape): MlxRankBytes {
  const weights = mlxRankWeights(p, l);
  const shard = l.mode === 'tensor' ? l.ranks : 1;
  const sizes = feeds(req);
  const { slots, replaced } = kvSlots(sizes);
  const perSlot = (p.layers[0]!.kEmbdGqa + p.layers[0]!.vEmbdGqa) * p.mlx.activationBytes / shard;
  const local = l.lastLayer - l.firstLayer + 1;
  const kv = local * slots * perSlot;
  // Peak transient: the widest feed (the first prefill chunk attends to itself; later chunks to
  // everything before) or, at the last growth, one layer's old buffer beside its new one.
  let transient = replaced * perSlot;
  let seen = 0;
  for (const [i, c] of sizes.entries()) {
    seen += c;
    // A run of one-token steps peaks at its last (more cached positions): the others are skipped,
    // so budgeting a long context stays cheap.
    if (c === 1 && sizes[i + 1] === 1) continue;
    transient = Math.max(transient, layerTransient(p, l, shard, c, seen));
  }
  // The last step also holds the logits and their log-softmax (vocab floats each).
  transient = Math.max(transient, 2 * p.vocab * p.mlx.activationBytes);
  return { weights, kv, transient, peak: weights + kv + transient };
}

/**
 * What an MLX rank process costs beyond MLX's own counters (the figures above): the interpreter
 * with mlx and mlx-lm imported measured 72 MiB RSS here (Linux, mlx 0.32.4, CPU backend); the
 * tokenizer and, on a Mac, the Metal context add to it and cannot be measured here, so this is a
 * deliberately generous round figure, as llama.cpp's WORKER_OVERHEAD_BYTES is.
 */
export const MLX_RANK_OVERHEAD_BYTES = 256 * 2 ** 20;

/**
 * The requests a plan budgets a rank for, `ctx` tokens fed in all. The KV cache depends only on
 * the tokens fed (prefill chunks are multiples of the 256-slot step, and one token at a time fills
 * a buffer before it grows), so every split of ctx ends with the same slots; the transient peak
 * grows with the prompt (a longer prefill chunk against more cached positions), so the all-prompt
 * request bounds it, and the all-generated one has the largest replaced buffer at its last growth.
 * The unit tests check the bound against every split.
 */
export function budgetRequests(ctx: number): MlxRequestShape[] {
  return [
    { promptTokens: ctx, generatedTokens: 0 },
    { promptTokens: 1, generatedTokens: Math.max(0, ctx - 1) },
  ];
}

/** A rank's bytes at the largest peak of the budgeted requests (budgetRequests). */
export function mlxRankBudget(p: MlxModelProfile, l: MlxRankLayout, ctx: number): MlxRankBytes {
  return budgetRequests(ctx)
    .map((req) => mlxRankBytes(p, l, req))
    .reduce((a, b) => (b.peak > a.peak ? b : a));
}
