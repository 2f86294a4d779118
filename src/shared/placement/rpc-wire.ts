import { ggmlType, rowBytes } from '../gguf/ggml-types.ts';
import type { CacheType } from '../memory/kv.ts';
import type { LayerProfile, ModelProfile } from '../model/profile.ts';

/**
 * What crosses a llama.cpp RPC boundary besides the activations, from the source of the engine
 * `orchard setup` builds (llama.cpp de3ff81: ggml/src/ggml-rpc/ggml-rpc.cpp, src/llama-graph.cpp,
 * src/llama-kv-cache.cpp, tools/server/server-context.cpp) and checked byte for byte with
 * `GGML_RPC_DEBUG=1` rpc-servers and per-link `tc -s` counters on bench:lan's 20 Mbit/s link
 * (bench/README.md, bench:lan). Every worker stage gets, from the head:
 *
 * - **Inputs per ubatch** besides the activations: the attention mask (`attn_inp_kq_mask`,
 *   n_kv × tokens, f16 with flash attention, else f32; n_kv = the used cells padded to 256,
 *   llama-kv-cache.cpp `get_n_kv`), the positions (i32) and the K and V cell indices for
 *   `set_rows` (i64 each): 20 bytes per token.
 * - **The compute graph** whenever its shape changes (`RPC_CMD_GRAPH_COMPUTE`; an unchanged one is
 *   re-run by `RPC_CMD_GRAPH_RECOMPUTE`, a few bytes): `serialize_graph` sends 8 bytes per node
 *   and `sizeof(rpc_tensor)` = 296 (packed) per distinct tensor. A prompt's ubatch has another
 *   shape than the decode step before it, and ubatches of other (tokens, n_kv) than the previous
 *   one are new graphs too (llama-graph.cpp `can_reuse`).
 * - **The prompt-cache save** before a fresh prompt: llama-server (`--cache-ram`, on by default,
 *   8 GiB) copies the slot's previous sequence to host RAM when a new prompt keeps less than half
 *   of it (server-context.cpp `get_available_slot` → `prompt_save` → `llama_state_seq_get_data`):
 *   every layer's K and V cells of that sequence, one `get_tensor` round trip each for K and V,
 *   worker → head over the network — and without flash attention V is transposed, one round
 *   trip per V row (llama-kv-cache.cpp `state_write_data`). Measured: 2.2 s of the 20 Mbit/s
 *   link's TTFT, outside llama-server's own prompt time.
 */

/** Bytes of the per-token inputs besides activations and mask: positions (i32) + K and V cell indices (i64). */
export const RPC_INPUT_BYTES_PER_TOKEN = 4 + 8 + 8;

/** sizeof(rpc_tensor) in ggml-rpc.cpp (#pragma pack(1)): what `serialize_graph` sends per tensor. */
export const RPC_TENSOR_BYTES = 296;

/**
 * Graph nodes and distinct tensors per transformer layer of llama.cpp's dense llama graph, and
 * the graph's own input tensors (embeddings, positions, mask, K and V indices). Counted from the
 * rpc-servers' `graph_compute` lines (GGML_RPC_DEBUG=1) for worker stages of 10, 17 and 24
 * layers of bench:lan's model: flash attention 31 nodes / 42 tensors per layer (310/425, 527/719,
 * 744/1013), without it 36 / 47 (360/475, 612/804), + 5 input tensors, + 0 nodes. Architectures
 * with more ops per layer (MoE routing) send more: not measured, costed with these counts.
 */
export const GRAPH_PER_LAYER = { flash: { nodes: 31, tensors: 42 }, plain: { nodes: 36, tensors: 47 } } as const;
export const GRAPH_INPUT_TENSORS = 5;
/** The message's own header: device and n_nodes (u32 each) and n_tensors (u32). */
const GRAPH_HEADER_BYTES = 12;

/** The cells the mask spans: used cells padded to 256 (at least 256), at most the cache's cells. */
export function maskCells(usedCells: number, cacheCells: number): number {
  return Math.min(cacheCells, Math.max(256, Math.ceil(usedCells / 256) * 256));
}

/** Bytes of the attention mask for `tokens` new tokens over `nKv` cells (one mask per attention kind). */
export function maskBytes(tokens: number, nKv: number, flashAttention: boolean): number {
  return tokens * nKv * (flashAttention ? 2 : 4);
}

/** The (tokens, n_kv) of each ubatch of a fresh prompt of `promptTokens` (the cache emptied first). */
export function ubatchShapes(promptTokens: number, ubatch: number, cacheCells: number): { tokens: number; nKv: number }[] {
  const shapes: { tokens: number; nKv: number }[] = [];
  for (let start = 0; start < promptTokens; start += ubatch) {
    const tokens = Math.min(ubatch, promptTokens - start);
    shapes.push({ tokens, nKv: maskCells(start + tokens, cacheCells) });
  }
  return shapes;
}

/** Graphs a prompt makes the head send: its first ubatch's, then each ubatch whose shape differs from the one before. */
export function newGraphs(shapes: readonly { tokens: number; nKv: number }[]): number {
  return shapes.filter((s, i) => i === 0 || s.tokens !== shapes[i - 1]!.tokens || s.nKv !== shapes[i - 1]!.nKv).length;
}

/** Bytes of one serialized graph of a worker stage: the per-stage part (header, input tensors) and the part per layer. */
export function graphBytes(flashAttention: boolean): { perStage: number; perLayer: number } {
  const g = flashAttention ? GRAPH_PER_LAYER.flash : GRAPH_PER_LAYER.plain;
  return { perStage: GRAPH_HEADER_BYTES + GRAPH_INPUT_TENSORS * RPC_TENSOR_BYTES, perLayer: 8 * g.nodes + RPC_TENSOR_BYTES * g.tensors };
}

export interface WireOptions {
  readonly flashAttention: boolean;
  readonly cacheType: CacheType;
  readonly ubatch: number;
}

/**
 * Head → worker bytes of a fresh prompt that do not depend on the stage's layers: each ubatch's
 * masks (one per attention kind the model has: full, and sliding-window when it has SWA layers,
 * whose cache is `swaCells`) and per-token inputs, and the per-stage part of every new graph.
 */
export function promptInputBytes(profile: Pick<ModelProfile, 'swa'>, promptTokens: number, cells: { full: number; swa: number }, o: WireOptions): number {
  const shapes = ubatchShapes(promptTokens, o.ubatch, cells.full);
  let bytes = RPC_INPUT_BYTES_PER_TOKEN * promptTokens + newGraphs(shapes) * graphBytes(o.flashAttention).perStage;
  for (const s of shapes) bytes += maskBytes(s.tokens, s.nKv, o.flashAttention);
  if (profile.swa) for (const s of ubatchShapes(promptTokens, o.ubatch, cells.swa)) bytes += maskBytes(s.tokens, s.nKv, o.flashAttention);
  return bytes;
}

/** Head → worker bytes per decoded token besides its activations: the mask over `usedCells` and the per-token inputs. */
export function decodeInputBytes(profile: Pick<ModelProfile, 'swa'>, usedCells: number, cells: { full: number; swa: number }, flashAttention: boolean): number {
  const swa = profile.swa ? maskBytes(1, maskCells(Math.min(usedCells, cells.swa), cells.swa), flashAttention) : 0;
  return RPC_INPUT_BYTES_PER_TOKEN + maskBytes(1, maskCells(usedCells, cells.full), flashAttention) + swa;
}

/** The prompt-cache save of one layer holding `savedCells` cells: bytes worker → head and get_tensor round trips. */
export function layerSave(layer: LayerProfile, savedCells: number, cells: { full: number; swa: number }, o: Pick<WireOptions, 'flashAttention' | 'cacheType'>): { bytes: number; roundTrips: number } {
  if (layer.kEmbdGqa === 0 || savedCells <= 0) return { bytes: 0, roundTrips: 0 };
  const n = Math.min(savedCells, layer.swa ? cells.swa : cells.full);
  const t = ggmlType(o.cacheType);
  const bytes = n * (rowBytes(t, layer.kEmbdGqa) + rowBytes(t, layer.vEmbdGqa));
  return { bytes, roundTrips: 1 + (o.flashAttention ? 1 : layer.vEmbdGqa) };
}
