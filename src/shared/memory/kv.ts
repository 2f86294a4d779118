import { ggmlType, rowBytes } from '../gguf/ggml-types.ts';
import type { LayerProfile, ModelProfile } from '../model/profile.ts';

/**
 * KV cache geometry exactly as this llama.cpp allocates it.
 *
 * - `llama_context`: n_ctx = GGML_PAD(n_ctx, 256). Unified cache: one stream of n_ctx cells.
 *   Non-unified: n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256) cells per stream, n_seq_max streams.
 * - `llama_kv_cache`: per layer one K tensor [n_embd_k_gqa, kv_size, n_stream] of type_k and one
 *   V tensor [n_embd_v_gqa, kv_size, n_stream] of type_v, on the layer's device.
 * - `llama_kv_cache_iswa`: SWA layers get GGML_PAD(min(kv_size, n_swa·(unified ? n_seq : 1) +
 *   n_ubatch), 256) cells.
 * - llama-server with `-np` unset picks 4 slots and a unified cache (server.cpp).
 */
export type CacheType = 'f16' | 'q8_0' | 'q4_0' | 'f32' | 'bf16';
export const CACHE_TYPES: readonly CacheType[] = ['f16', 'q8_0', 'q4_0', 'f32', 'bf16'];

export interface KvOptions {
  /** `-c`: total KV cells requested (llama.cpp semantics, shared by all slots when unified). */
  readonly ctx: number;
  readonly cacheTypeK: CacheType;
  readonly cacheTypeV: CacheType;
  /** `-np`: parallel sequences (server slots). */
  readonly parallel: number;
  readonly unified: boolean;
  /** `-ub`: physical batch size (default 512). */
  readonly ubatch: number;
}

export interface KvGeometry {
  /** n_ctx after llama.cpp's padding/rounding. */
  readonly nCtx: number;
  readonly cellsFull: number;
  readonly cellsSwa: number;
  readonly streams: number;
}

export const pad = (n: number, to: number): number => Math.ceil(n / to) * to;

export function kvGeometry(profile: Pick<ModelProfile, 'swa'>, o: KvOptions): KvGeometry {
  let nCtx = pad(o.ctx, 256);
  let cells = nCtx;
  let streams = 1;
  if (!o.unified) {
    cells = pad(Math.floor(nCtx / o.parallel), 256);
    nCtx = cells * o.parallel;
    streams = o.parallel;
  }
  const window = profile.swa?.window ?? 0;
  const cellsSwa = window > 0 ? pad(Math.min(cells, window * (o.unified ? o.parallel : 1) + o.ubatch), 256) : cells;
  return { nCtx, cellsFull: cells, cellsSwa, streams };
}

/** KV bytes of one layer. */
export function layerKvBytes(layer: LayerProfile, g: KvGeometry, o: Pick<KvOptions, 'cacheTypeK' | 'cacheTypeV'>): number {
  if (layer.kEmbdGqa === 0) return 0;
  const cells = (layer.swa ? g.cellsSwa : g.cellsFull) * g.streams;
  return (rowBytes(ggmlType(o.cacheTypeK), layer.kEmbdGqa) + rowBytes(ggmlType(o.cacheTypeV), layer.vEmbdGqa)) * cells;
}
