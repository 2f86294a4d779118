import { type GgmlType, type GgmlTypeName, ggmlType } from '../gguf/ggml-types.ts';

/**
 * Which ggml type llama.cpp's quantiser gives each tensor — a port of the parts of
 * `llama_tensor_get_type_impl` / `tensor_allows_quantization` / `tensor_type_fallback`
 * (src/llama-quant.cpp, llama.cpp as bundled by node-llama-cpp) that matter for Q4_K_M, Q8_0
 * and F16 files, so header-only presets carry the per-tensor types real files have.
 */
export type PresetQuant = 'q4_k_m' | 'q8_0' | 'f16';

/** general.file_type values (enum llama_ftype). */
export const FILE_TYPE: Record<PresetQuant, number> = { f16: 1, q8_0: 7, q4_k_m: 15 };

export interface QuantContext {
  readonly quant: PresetQuant;
  readonly layers: number;
  readonly experts: number;
  /** llama.cpp's LLM_TYPE_70B: llama arch, 80 layers, grouped-query attention (or qwen2 with 80). */
  readonly is70B: boolean;
  /** No output.weight: token_embd doubles as the output head and is quantised like it. */
  readonly tiedEmbeddings: boolean;
  readonly architecture: string;
}

type Category = 'output' | 'token_embd' | 'attn_v' | 'attn_k' | 'attn_q' | 'attn_output' | 'ffn_up' | 'ffn_gate' | 'ffn_down' | 'other';

function category(name: string): Category {
  if (name === 'output.weight') return 'output';
  if (name === 'token_embd.weight') return 'token_embd';
  if (name.includes('attn_qkv.weight') || name.includes('attn_v.weight')) return 'attn_v'; // category_is_attn_v
  if (name.includes('attn_k.weight')) return 'attn_k';
  if (name.includes('attn_q.weight')) return 'attn_q';
  if (name.includes('attn_output.weight')) return 'attn_output';
  if (name.includes('ffn_up')) return 'ffn_up';
  if (name.includes('ffn_gate')) return 'ffn_gate';
  if (name.includes('ffn_down')) return 'ffn_down';
  return 'other';
}

/** tensor_allows_quantization, for the tensor names presets use. */
function quantizable(name: string, dims: readonly number[]): boolean {
  if (dims.length < 2) return false;
  if (!name.endsWith('weight')) return false;
  if (name.includes('_norm.weight')) return false;
  if (name.includes('ffn_gate_inp.weight')) return false;
  return true;
}

/** use_more_bits: the first and last eighth of the layers and every third one in between. */
export function useMoreBits(layer: number, layers: number): boolean {
  const eighth = Math.trunc(layers / 8);
  return layer < eighth || layer >= Math.trunc((7 * layers) / 8) || (layer - eighth) % 3 === 2;
}

function layerOf(name: string): number {
  const m = /^blk\.(\d+)\./.exec(name);
  return m ? Number(m[1]) : -1;
}

/** tensor_type_fallback: rows that are not whole blocks of the target get a compatible type. */
function fallback(target: GgmlType, rowLength: number): GgmlType {
  if (rowLength % target.blockSize === 0) return target;
  const alt: Partial<Record<GgmlTypeName, GgmlTypeName>> = { Q4_K: 'Q5_0', Q5_K: 'Q5_1', Q6_K: 'Q8_0', Q2_K: 'Q4_0', Q3_K: 'Q4_0' };
  const next = ggmlType(alt[target.name] ?? target.name);
  return rowLength % next.blockSize === 0 ? next : ggmlType('F16');
}

/**
 * The type of one tensor. `sourceType` is what a conversion to GGUF stores before quantising
 * (F32 for norms, biases, router weights; F16 otherwise).
 */
export function quantizedType(ctx: QuantContext, name: string, dims: readonly number[], sourceType: GgmlTypeName): GgmlType {
  if (!quantizable(name, dims) || sourceType === 'F32') return ggmlType(sourceType);
  if (ctx.quant === 'f16') return ggmlType('F16');
  if (ctx.quant === 'q8_0') return fallback(ggmlType('Q8_0'), dims[0]!);

  // Q4_K_M
  let t: GgmlTypeName = 'Q4_K';
  const cat = category(name);
  const layer = layerOf(name);
  const rowLength = dims[0]!;
  if (cat === 'output' || (ctx.tiedEmbeddings && cat === 'token_embd')) {
    t = rowLength % 256 !== 0 || ctx.architecture === 'falcon' ? 'Q8_0' : 'Q6_K';
    return fallback(ggmlType(t), rowLength);
  }
  if (cat === 'attn_v') {
    // i_attention_wv counts attn_v-like tensors in file order: the layer index here.
    if (useMoreBits(layer, ctx.layers)) t = 'Q6_K';
    if (ctx.is70B && t === 'Q4_K') t = 'Q5_K';
    if (ctx.experts === 8) t = 'Q8_0';
  } else if (cat === 'attn_k') {
    if (ctx.experts === 8) t = 'Q8_0';
  } else if (cat === 'ffn_down') {
    if (ctx.architecture === 'falcon') {
      t = layer < Math.trunc(ctx.layers / 16) ? 'Q6_K' : useMoreBits(layer, ctx.layers) ? 'Q5_K' : 'Q4_K';
    } else if (useMoreBits(layer, ctx.layers)) {
      t = 'Q6_K';
    }
  } else if (cat === 'attn_output') {
    if (ctx.architecture !== 'falcon' && ctx.experts === 8) t = 'Q5_K';
  }
  return fallback(ggmlType(t), rowLength);
}
