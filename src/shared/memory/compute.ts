import type { LayerProfile } from '../model/profile.ts';
import type { MemoryModel } from './memory-model.ts';

/**
 * Compute-buffer estimate per device, derived from how llama.cpp reserves it
 * (`llama_context::sched_reserve`): it builds the worst-case prompt graph — n_tokens =
 * min(n_ctx, n_ubatch) tokens attending to the whole KV cache (n_kv = cache size) with
 * n_outputs = n_tokens logits — and ggml-alloc sizes each backend's buffer to the peak of the
 * live f32 activations of the nodes scheduled on it (freed tensors are reused). Layers run one
 * after another, so the peak does not grow with the number of layers on a device; it is set by
 * the widest layer:
 *
 * - FFN: the residual stream and normed input (n_embd each) stay alive while gate and up
 *   (n_ff each) are computed → ~T·(A·n_embd + B·n_ff)·4 bytes; MoE layers route T tokens through
 *   n_expert_used experts, so their gate/up are n_ff_exp × n_expert_used wide.
 * - Attention without flash attention materialises KQ = n_kv × T × n_head f32 (softmax in place);
 *   with flash attention only the output and the f16 mask (T × n_kv) remain.
 * - The device holding the output layer also holds the logits T × n_vocab f32 and the normed
 *   final hidden state.
 * - Tensors crossing from another backend (the hidden state, positions, mask) are copied into
 *   this device's buffer.
 *
 * The coefficients A, B were calibrated against llama-server's reported `compute buffer size`
 * (bench/memory.ts); the structure is from the source, the constants are measured.
 */
export const CALIBRATION = {
  /** f32 vectors of width n_embd alive at the peak (f16 KV cache). */
  embdVectors: 3,
  /** One fewer with a quantized KV cache (measured: −T·n_embd·4 bytes on every device). */
  embdVectorsQuantizedCache: 2,
  /** f32 vectors of width n_ff alive at the peak: gate, up and their product. */
  ffnVectors: 3,
};

/**
 * GGML_SCHED_MAX_COPIES: with pipeline parallelism (llama_context: more than one device, all
 * layers offloaded, every device async + events — true for RPC and Metal) the scheduler keeps 4
 * copies of every split's inputs, so each device holds 4 copies of the hidden state it receives
 * and of the KQ mask.
 */
export const SCHED_COPIES = 4;

function ffnWidth(mm: MemoryModel, layer: LayerProfile): number {
  const p = mm.profile;
  if (!p.moe || !layer.routedExperts) return p.ffn || 4 * p.embd;
  // MoE layer: T tokens × (n_expert_used routed + shared) experts through n_ff_exp-wide gate/up.
  // Leading dense layers (deepseek2, glm4moe) and interleaved ones (llama4) use the dense n_ff.
  const expertFfn = p.moe.expertFfn || p.ffn || p.embd;
  return expertFfn * (p.moe.expertsUsed + p.moe.shared);
}

function quantizedCache(mm: MemoryModel): boolean {
  return mm.options.cacheType !== 'f16' && mm.options.cacheType !== 'f32' && mm.options.cacheType !== 'bf16';
}

function layerPeak(mm: MemoryModel, layer: LayerProfile, tokens: number, nKv: number, copies: number, finalLayer: boolean): number {
  const p = mm.profile;
  const embdVectors = quantizedCache(mm) ? CALIBRATION.embdVectorsQuantizedCache : CALIBRATION.embdVectors;
  // The final layer keeps only the output rows (ggml_get_rows on inp_out_ids) before its FFN, so
  // its FFN runs on n_outputs tokens, not T: only the attention-side vectors remain (measured:
  // a device holding just the last layer + output reports 3 n_embd vectors, no n_ff ones).
  const ffnTokens = finalLayer ? Math.min(tokens, mm.options.parallel) : tokens;
  let bytes = 4 * tokens * CALIBRATION.embdVectors * p.embd;
  bytes = Math.max(bytes, 4 * tokens * embdVectors * p.embd + 4 * ffnTokens * CALIBRATION.ffnVectors * ffnWidth(mm, layer));
  // Without flash attention KQ (n_kv × T × n_head, f32) is materialised; structure from the
  // source, not calibrated here (Orchard always runs llama-server with -fa on).
  if (!mm.options.flashAttention) bytes = Math.max(bytes, 4 * tokens * nKv * p.heads + 4 * tokens * 2 * p.embd);
  // Hidden state received from the previous device, one per copy.
  if (copies > 1) bytes += copies * 4 * tokens * p.embd;
  return bytes;
}

/**
 * KQ mask: f16 with FA, f32 without; one per scheduler copy. Its size is T × n_kv where n_kv is
 * the cells of ONE stream (non-unified caches split the T tokens across streams).
 */
function maskBytes(mm: MemoryModel, tokens: number, nKv: number, copies: number): number {
  return copies * tokens * nKv * (mm.options.flashAttention ? 2 : 4);
}

function reserveTokens(mm: MemoryModel): number {
  return Math.min(mm.geometry.nCtx, mm.options.ubatch);
}

/**
 * Compute buffer of a device holding `layers` (and the output layer when `holdsOutput`).
 * `pipeline`: the model is split over more than one device.
 */
export function computeBufferBytes(mm: MemoryModel, layers: readonly LayerProfile[], holdsOutput: boolean, pipeline: boolean): number {
  const tokens = reserveTokens(mm);
  const copies = pipeline ? SCHED_COPIES : 1;
  let peak = 0;
  // Layers of the same kind (attention window × dense/MoE FFN) peak alike: price each kind once.
  const seen = new Set<string>();
  let masks = 0;
  const finalIndex = mm.profile.layerCount - 1;
  for (const l of layers) {
    const final = l.index === finalIndex;
    const kind = `${l.swa}/${l.routedExperts}`;
    if (!final) {
      if (seen.has(kind)) continue;
      seen.add(kind);
    }
    const nKv = l.swa ? mm.geometry.cellsSwa : mm.geometry.cellsFull;
    peak = Math.max(peak, layerPeak(mm, l, tokens, nKv, copies, final));
  }
  // KQ masks are graph inputs, alive for the whole graph: one per kind of layer the device holds
  // (full attention; sliding/chunked attention has its own mask over its own cells — measured on
  // llama4 and gpt-oss, bench/memory.ts), each once per scheduler copy.
  if (layers.some((l) => !l.swa)) masks += maskBytes(mm, tokens, mm.geometry.cellsFull, copies);
  if (layers.some((l) => l.swa)) masks += maskBytes(mm, tokens, mm.geometry.cellsSwa, copies);
  peak += masks;
  // Logits: llama-server reserves n_outputs = min(n_ubatch, n_outputs_max) rows, and sets
  // n_outputs_max to its slot count.
  if (holdsOutput) peak += 4 * Math.min(tokens, mm.options.parallel) * mm.profile.vocab;
  return peak;
}

/**
 * The head process's CPU compute buffer: the token_embd lookup output and the graph inputs built
 * on the CPU — two T × n_embd f32 tensors and the KQ mask (T × n_kv), one mask per scheduler copy.
 * Fitted on bench/memory.ts host rows: exact to ~0.2 MiB over 36 runs.
 */
export function hostComputeBufferBytes(mm: MemoryModel, pipeline: boolean): number {
  const tokens = reserveTokens(mm);
  const copies = pipeline ? SCHED_COPIES : 1;
  // Both masks are built on the CPU when the model has sliding/chunked layers (llama4, gpt-oss).
  const swaMask = mm.profile.layers.some((l) => l.swa) ? maskBytes(mm, tokens, mm.geometry.cellsSwa, copies) : 0;
  return 2 * 4 * tokens * mm.profile.embd + maskBytes(mm, tokens, mm.geometry.cellsFull, copies) + swaMask;
}
