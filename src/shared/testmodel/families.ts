import type { GgmlTypeName } from '../gguf/ggml-types.ts';
import { type GgufValue, gv } from '../gguf/types.ts';

/**
 * The tensor tables and hyperparameter keys of the mixture-of-experts (and newer dense) families
 * people split across Macs, as llama.cpp loads them: names and shapes from each family's
 * `load_arch_tensors`, keys from its `load_arch_hparams` (src/models/deepseek2.cpp,
 * glm4-moe.cpp, qwen3moe.cpp, openai-moe.cpp, llama4.cpp, mistral3.cpp in the bundled
 * llama.cpp). One table serves both the header-only presets of the real models (presets.ts) and
 * the small runnable models `orchard testmodel gguf --arch` generates (family-model.ts), so what
 * the planner is tested on is what llama.cpp really runs.
 */
export type FamilyArch = 'deepseek2' | 'glm4moe' | 'qwen3moe' | 'gpt-oss' | 'llama4' | 'mistral3';
export const FAMILY_ARCHS: readonly FamilyArch[] = ['deepseek2', 'glm4moe', 'qwen3moe', 'gpt-oss', 'llama4', 'mistral3'];

export interface FamilyShape {
  readonly arch: FamilyArch;
  readonly layers: number;
  readonly dim: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly vocab: number;
  readonly ctx: number;
  readonly ropeTheta: number;
  readonly rmsEps: number;
  /** Dense FFN width (leading/interleaved dense layers, or every layer without experts). */
  readonly ffn: number;
  /** 0 for dense models (mistral3). */
  readonly experts: number;
  readonly expertsUsed: number;
  readonly expertFfn: number;
  readonly sharedExperts: number;
  /** deepseek2 / glm4moe: the first N layers are dense (`leading_dense_block_count`). */
  readonly leadingDense?: number;
  /** llama4: every Nth layer is MoE (`interleave_moe_layer_step`). */
  readonly moeEvery?: number;
  /** deepseek2 Multi-head Latent Attention (the MLA conversion: attn_k_b / attn_v_b). */
  readonly mla?: { readonly qLoraRank: number; readonly kvLoraRank: number; readonly nopeDim: number; readonly ropeDim: number; readonly vDim: number };
  /** glm4moe multi-token-prediction blocks after the trunk (`nextn_predict_layers`). */
  readonly nextn?: number;
  /** gpt-oss sliding window (every other layer). */
  readonly slidingWindow?: number;
  /** Rotary dims when only part of the head rotates (GLM: half). */
  readonly ropeDim?: number;
}

export interface FamilyTensor {
  readonly name: string;
  readonly dims: readonly number[];
  /** What a conversion stores before quantising: F32 for norms, biases, routers, sinks. */
  readonly source: GgmlTypeName;
}

/** Whether layer il of the trunk has experts. */
export function isMoeLayer(s: FamilyShape, il: number): boolean {
  if (s.experts === 0) return false;
  if (s.moeEvery) return (il + 1) % s.moeEvery === 0;
  return il >= (s.leadingDense ?? 0);
}

function attention(s: FamilyShape, t: (name: string, dims: number[], source?: GgmlTypeName) => void): void {
  const q = s.heads * s.headDim;
  const kv = s.kvHeads * s.headDim;
  if (s.mla) {
    const m = s.mla;
    t('attn_q_a_norm.weight', [m.qLoraRank], 'F32');
    t('attn_kv_a_norm.weight', [m.kvLoraRank], 'F32');
    t('attn_q_a.weight', [s.dim, m.qLoraRank]);
    t('attn_q_b.weight', [m.qLoraRank, s.heads * (m.nopeDim + m.ropeDim)]);
    t('attn_kv_a_mqa.weight', [s.dim, m.kvLoraRank + m.ropeDim]);
    t('attn_k_b.weight', [m.nopeDim, m.kvLoraRank, s.heads]);
    t('attn_v_b.weight', [m.kvLoraRank, m.vDim, s.heads]);
    t('attn_output.weight', [s.heads * m.vDim, s.dim]);
    return;
  }
  const bias = s.arch === 'glm4moe' || s.arch === 'gpt-oss';
  t('attn_q.weight', [s.dim, q]);
  t('attn_k.weight', [s.dim, kv]);
  t('attn_v.weight', [s.dim, kv]);
  if (bias) {
    t('attn_q.bias', [q], 'F32');
    t('attn_k.bias', [kv], 'F32');
    t('attn_v.bias', [kv], 'F32');
  }
  t('attn_output.weight', [q, s.dim]);
  if (s.arch === 'gpt-oss') {
    t('attn_output.bias', [s.dim], 'F32');
    t('attn_sinks.weight', [s.heads], 'F32');
  }
  if (s.arch === 'qwen3moe' || s.arch === 'glm4moe') {
    t('attn_q_norm.weight', [s.headDim], 'F32');
    t('attn_k_norm.weight', [s.headDim], 'F32');
  }
}

function feedForward(s: FamilyShape, il: number, t: (name: string, dims: number[], source?: GgmlTypeName) => void): void {
  if (!isMoeLayer(s, il)) {
    t('ffn_gate.weight', [s.dim, s.ffn]);
    t('ffn_down.weight', [s.ffn, s.dim]);
    t('ffn_up.weight', [s.dim, s.ffn]);
    return;
  }
  const e = s.expertFfn;
  t('ffn_gate_inp.weight', [s.dim, s.experts], 'F32');
  if (s.arch === 'gpt-oss') t('ffn_gate_inp.bias', [s.experts], 'F32');
  if (s.arch === 'deepseek2' || s.arch === 'glm4moe') t('exp_probs_b.bias', [s.experts], 'F32');
  t('ffn_gate_exps.weight', [s.dim, e, s.experts]);
  t('ffn_down_exps.weight', [e, s.dim, s.experts]);
  t('ffn_up_exps.weight', [s.dim, e, s.experts]);
  if (s.arch === 'gpt-oss') {
    t('ffn_gate_exps.bias', [e, s.experts], 'F32');
    t('ffn_down_exps.bias', [s.dim, s.experts], 'F32');
    t('ffn_up_exps.bias', [e, s.experts], 'F32');
  }
  if (s.sharedExperts > 0) {
    const sh = e * s.sharedExperts;
    t('ffn_gate_shexp.weight', [s.dim, sh]);
    t('ffn_down_shexp.weight', [sh, s.dim]);
    t('ffn_up_shexp.weight', [s.dim, sh]);
  }
}

/** Every tensor of the model in the order llama.cpp's converter writes them. */
export function familyTensors(s: FamilyShape): FamilyTensor[] {
  const out: FamilyTensor[] = [{ name: 'token_embd.weight', dims: [s.dim, s.vocab], source: 'F16' }];
  const blocks = s.layers + (s.nextn ?? 0);
  for (let il = 0; il < blocks; il++) {
    const t = (name: string, dims: number[], source: GgmlTypeName = 'F16') => out.push({ name: `blk.${il}.${name}`, dims, source });
    t('attn_norm.weight', [s.dim], 'F32');
    attention(s, t);
    // glm4moe and gpt-oss norm before the FFN under the name post_attention_norm.
    if (s.arch === 'glm4moe' || s.arch === 'gpt-oss') t('post_attention_norm.weight', [s.dim], 'F32');
    else t('ffn_norm.weight', [s.dim], 'F32');
    feedForward(s, il, t);
    if (il >= s.layers) {
      t('nextn.eh_proj.weight', [2 * s.dim, s.dim]);
      t('nextn.enorm.weight', [s.dim], 'F32');
      t('nextn.hnorm.weight', [s.dim], 'F32');
      t('nextn.shared_head_norm.weight', [s.dim], 'F32');
    }
  }
  out.push({ name: 'output_norm.weight', dims: [s.dim], source: 'F32' });
  out.push({ name: 'output.weight', dims: [s.dim, s.vocab], source: 'F16' });
  return out;
}

/** The hyperparameter keys llama.cpp reads for the family (its `load_arch_hparams`). */
export function familyMetadata(s: FamilyShape): Array<[string, GgufValue]> {
  const a = s.arch;
  const m: Array<[string, GgufValue]> = [
    [`${a}.block_count`, gv.u32(s.layers + (s.nextn ?? 0))],
    [`${a}.context_length`, gv.u32(s.ctx)],
    [`${a}.embedding_length`, gv.u32(s.dim)],
    [`${a}.feed_forward_length`, gv.u32(s.ffn)],
    [`${a}.attention.head_count`, gv.u32(s.heads)],
    [`${a}.rope.freq_base`, gv.f32(s.ropeTheta)],
    [`${a}.attention.layer_norm_rms_epsilon`, gv.f32(s.rmsEps)],
    [`${a}.vocab_size`, gv.u32(s.vocab)],
  ];
  if (s.mla) {
    // The MLA conversion (convert_hf_to_gguf.py DeepseekV2Model): one KV "head" holding the
    // latent + rope key; key/value_length_mla keep the per-head q/k and v widths.
    const x = s.mla;
    m.push(
      [`${a}.attention.head_count_kv`, gv.u32(1)],
      [`${a}.attention.key_length`, gv.u32(x.kvLoraRank + x.ropeDim)],
      [`${a}.attention.value_length`, gv.u32(x.kvLoraRank)],
      [`${a}.attention.key_length_mla`, gv.u32(x.nopeDim + x.ropeDim)],
      [`${a}.attention.value_length_mla`, gv.u32(x.vDim)],
      [`${a}.attention.q_lora_rank`, gv.u32(x.qLoraRank)],
      [`${a}.attention.kv_lora_rank`, gv.u32(x.kvLoraRank)],
      [`${a}.rope.dimension_count`, gv.u32(x.ropeDim)],
    );
  } else {
    m.push(
      [`${a}.attention.head_count_kv`, gv.u32(s.kvHeads)],
      [`${a}.attention.key_length`, gv.u32(s.headDim)],
      [`${a}.attention.value_length`, gv.u32(s.headDim)],
      [`${a}.rope.dimension_count`, gv.u32(s.ropeDim ?? s.headDim)],
    );
  }
  if (s.experts > 0) {
    m.push(
      [`${a}.expert_count`, gv.u32(s.experts)],
      [`${a}.expert_used_count`, gv.u32(s.expertsUsed)],
      [`${a}.expert_feed_forward_length`, gv.u32(s.expertFfn)],
    );
    if (a === 'deepseek2' || a === 'glm4moe') {
      m.push(
        [`${a}.expert_shared_count`, gv.u32(s.sharedExperts)],
        [`${a}.leading_dense_block_count`, gv.u32(s.leadingDense ?? 0)],
        [`${a}.expert_weights_norm`, gv.bool(true)],
        [`${a}.expert_weights_scale`, gv.f32(a === 'deepseek2' ? 2.5 : 1)],
        // LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID (DeepSeek V3, Kimi K2, GLM-4.5+).
        [`${a}.expert_gating_func`, gv.u32(2)],
      );
    }
    if (a === 'llama4') m.push([`${a}.interleave_moe_layer_step`, gv.u32(s.moeEvery ?? 1)]);
  }
  if (s.nextn) m.push([`${a}.nextn_predict_layers`, gv.u32(s.nextn)]);
  if (s.slidingWindow) m.push([`${a}.attention.sliding_window`, gv.u32(s.slidingWindow)]);
  return m;
}
