import type { LayerProfile } from '../model/profile.ts';
import type { MemoryModel } from './stage.ts';

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
  /** f32 vectors of width n_embd alive at the peak. */
  embdVectors: 4,
  /** f32 vectors of width n_ff alive at the peak. */
  ffnVectors: 2,
};

function layerPeak(mm: MemoryModel, layer: LayerProfile, tokens: number, nKv: number): number {
  const p = mm.profile;
  const ffnWidth = p.moe ? (p.ffn || p.embd) * p.moe.expertsUsed : p.ffn || 4 * p.embd;
  const vectors = CALIBRATION.embdVectors * p.embd + CALIBRATION.ffnVectors * ffnWidth;
  let bytes = 4 * tokens * vectors;
  if (!mm.options.flashAttention) bytes = Math.max(bytes, 4 * tokens * nKv * p.heads + 4 * tokens * 2 * p.embd);
  // The KQ mask (f16 with FA, f32 without), one per attention kind present.
  bytes += tokens * nKv * (mm.options.flashAttention ? 2 : 4);
  void layer;
  return bytes;
}

function reserveTokens(mm: MemoryModel): number {
  return Math.min(mm.geometry.nCtx, mm.options.ubatch);
}

/** Compute buffer of a device holding `layers` (and the output layer when `holdsOutput`). */
export function computeBufferBytes(mm: MemoryModel, layers: readonly LayerProfile[], holdsOutput: boolean): number {
  const tokens = reserveTokens(mm);
  let peak = 0;
  for (const l of layers) {
    const nKv = l.swa ? mm.geometry.cellsSwa * mm.geometry.streams : mm.geometry.cellsFull * mm.geometry.streams;
    peak = Math.max(peak, layerPeak(mm, l, tokens, nKv));
  }
  if (holdsOutput) peak = Math.max(peak, 4 * tokens * (mm.profile.vocab + 2 * mm.profile.embd));
  return peak;
}

/** The head process's CPU compute buffer: token embedding lookup output and graph inputs. */
export function hostComputeBufferBytes(mm: MemoryModel): number {
  const tokens = reserveTokens(mm);
  return 4 * tokens * mm.profile.embd;
}
