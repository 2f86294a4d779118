import { UsageError } from '../errors.ts';
import type { GgmlTypeName } from '../gguf/ggml-types.ts';
import { type GgufValue, gv } from '../gguf/types.ts';
import type { GgufSpec, GgufTensorSpec } from '../gguf/writer.ts';
import { FAMILY_PRESETS, familyPresetSpec, findFamilyPreset } from './family-presets.ts';
import { FILE_TYPE, type PresetQuant, quantizedType } from './quant-mix.ts';

/**
 * Header-only GGUFs shaped like real model files: the metadata keys llama.cpp reads and every
 * tensor with its real name, shape and the per-tensor type llama.cpp's quantiser would give
 * it. No tensor data: the planner and memory math read headers only, so 405B-parameter models
 * can be planned without hundreds of gigabytes on disk.
 *
 * Shapes come from each model's published config.json (Hugging Face). Not reproduced: the
 * tokenizer arrays (tokens, merges — megabytes of strings irrelevant to memory planning; the
 * vocabulary size is in `<arch>.vocab_size` and the embedding shape) and chat templates.
 */
export interface ModelPreset {
  readonly id: string;
  /** The Hugging Face model the shape is taken from. */
  readonly source: string;
  readonly architecture: 'llama' | 'qwen2' | 'gemma2' | 'phi3';
  readonly layers: number;
  readonly dim: number;
  readonly ffn: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly vocab: number;
  readonly ctx: number;
  readonly ropeTheta: number;
  readonly rmsEps: number;
  readonly experts?: number;
  readonly expertsUsed?: number;
  readonly tiedEmbeddings?: boolean;
  /** Llama 3.1 long-context RoPE: a `rope_freqs.weight` factor tensor. */
  readonly ropeFreqs?: boolean;
  readonly slidingWindow?: number;
  readonly attnSoftcap?: number;
  readonly finalSoftcap?: number;
  readonly tokenizer: 'gpt2' | 'llama';
}

export const PRESETS: readonly ModelPreset[] = [
  {
    id: 'llama-3-8b',
    source: 'meta-llama/Meta-Llama-3-8B',
    architecture: 'llama',
    layers: 32,
    dim: 4096,
    ffn: 14336,
    heads: 32,
    kvHeads: 8,
    headDim: 128,
    vocab: 128256,
    ctx: 8192,
    ropeTheta: 500000,
    rmsEps: 1e-5,
    tokenizer: 'gpt2',
  },
  {
    id: 'llama-3-70b',
    source: 'meta-llama/Meta-Llama-3-70B',
    architecture: 'llama',
    layers: 80,
    dim: 8192,
    ffn: 28672,
    heads: 64,
    kvHeads: 8,
    headDim: 128,
    vocab: 128256,
    ctx: 8192,
    ropeTheta: 500000,
    rmsEps: 1e-5,
    tokenizer: 'gpt2',
  },
  {
    id: 'llama-3.1-405b',
    source: 'meta-llama/Llama-3.1-405B',
    architecture: 'llama',
    layers: 126,
    dim: 16384,
    ffn: 53248,
    heads: 128,
    kvHeads: 8,
    headDim: 128,
    vocab: 128256,
    ctx: 131072,
    ropeTheta: 500000,
    rmsEps: 1e-5,
    ropeFreqs: true,
    tokenizer: 'gpt2',
  },
  {
    id: 'qwen2.5-32b',
    source: 'Qwen/Qwen2.5-32B-Instruct',
    architecture: 'qwen2',
    layers: 64,
    dim: 5120,
    ffn: 27648,
    heads: 40,
    kvHeads: 8,
    headDim: 128,
    vocab: 152064,
    ctx: 32768,
    ropeTheta: 1000000,
    rmsEps: 1e-6,
    tokenizer: 'gpt2',
  },
  {
    id: 'qwen2.5-7b',
    source: 'Qwen/Qwen2.5-7B-Instruct',
    architecture: 'qwen2',
    layers: 28,
    dim: 3584,
    ffn: 18944,
    heads: 28,
    kvHeads: 4,
    headDim: 128,
    vocab: 152064,
    ctx: 32768,
    ropeTheta: 1000000,
    rmsEps: 1e-6,
    tokenizer: 'gpt2',
  },
  {
    id: 'mixtral-8x7b',
    source: 'mistralai/Mixtral-8x7B-v0.1',
    architecture: 'llama',
    layers: 32,
    dim: 4096,
    ffn: 14336,
    heads: 32,
    kvHeads: 8,
    headDim: 128,
    vocab: 32000,
    ctx: 32768,
    ropeTheta: 1000000,
    rmsEps: 1e-5,
    experts: 8,
    expertsUsed: 2,
    tokenizer: 'llama',
  },
  {
    id: 'gemma-2-27b',
    source: 'google/gemma-2-27b-it',
    architecture: 'gemma2',
    layers: 46,
    dim: 4608,
    ffn: 36864,
    heads: 32,
    kvHeads: 16,
    headDim: 128,
    vocab: 256000,
    ctx: 8192,
    ropeTheta: 10000,
    rmsEps: 1e-6,
    tiedEmbeddings: true,
    slidingWindow: 4096,
    attnSoftcap: 50,
    finalSoftcap: 30,
    tokenizer: 'llama',
  },
  {
    id: 'phi-3-mini',
    source: 'microsoft/Phi-3-mini-4k-instruct',
    architecture: 'phi3',
    layers: 32,
    dim: 3072,
    ffn: 8192,
    heads: 32,
    kvHeads: 32,
    headDim: 96,
    vocab: 32064,
    ctx: 4096,
    ropeTheta: 10000,
    rmsEps: 1e-5,
    tokenizer: 'llama',
  },
];

export const PRESET_QUANTS: readonly PresetQuant[] = ['q4_k_m', 'q8_0', 'f16'];

/** Every header-only preset id: the dense ones here and the mixture-of-experts families. */
export const PRESET_IDS: readonly string[] = [...PRESETS.map((p) => p.id), ...FAMILY_PRESETS.map((p) => p.id)];

export function findPreset(id: string): ModelPreset {
  const p = PRESETS.find((x) => x.id === id.toLowerCase());
  if (!p) throw new UsageError(`unknown model preset "${id}"; known: ${PRESET_IDS.join(', ')}`);
  return p;
}

/** What `orchard testmodel gguf --shape` reports about any preset. */
export interface PresetSummary {
  readonly id: string;
  readonly source: string;
  readonly architecture: string;
  readonly layers: number;
  readonly dim: number;
  readonly ffn: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly ctx: number;
  readonly vocab: number;
  readonly experts?: number;
  readonly expertsUsed?: number;
}

/** Any preset (dense or family) by id: its summary and header-only spec at a quantisation. */
export function anyPresetSpec(id: string, quant: PresetQuant): { summary: PresetSummary; spec: GgufSpec } {
  const f = findFamilyPreset(id);
  if (f) {
    const s = f.shape;
    const summary = { id: f.id, source: f.source, architecture: s.arch, layers: s.layers, dim: s.dim, ffn: s.ffn, heads: s.heads, kvHeads: s.kvHeads, ctx: s.ctx, vocab: s.vocab, experts: s.experts, expertsUsed: s.expertsUsed };
    return { summary, spec: familyPresetSpec(f, quant) };
  }
  const p = findPreset(id);
  return { summary: { ...p, architecture: p.architecture }, spec: presetSpec(p, quant) };
}

interface TensorShape {
  readonly name: string;
  readonly dims: readonly number[];
  /** Type the converted (unquantised) file stores: F32 for norms, biases, router, rope factors. */
  readonly source: GgmlTypeName;
}

/** Every tensor of the model, in the order llama.cpp's converter writes them. */
export function presetTensorShapes(p: ModelPreset): TensorShape[] {
  const q = p.heads * p.headDim;
  const kv = p.kvHeads * p.headDim;
  const out: TensorShape[] = [{ name: 'token_embd.weight', dims: [p.dim, p.vocab], source: 'F16' }];
  if (p.ropeFreqs) out.push({ name: 'rope_freqs.weight', dims: [p.headDim / 2], source: 'F32' });
  for (let i = 0; i < p.layers; i++) {
    const b = `blk.${i}.`;
    const t = (name: string, dims: number[], source: GgmlTypeName = 'F16') => out.push({ name: b + name, dims, source });
    t('attn_norm.weight', [p.dim], 'F32');
    if (p.architecture === 'phi3') {
      t('attn_qkv.weight', [p.dim, q + 2 * kv]);
    } else {
      t('attn_q.weight', [p.dim, q]);
      t('attn_k.weight', [p.dim, kv]);
      t('attn_v.weight', [p.dim, kv]);
      if (p.architecture === 'qwen2') {
        t('attn_q.bias', [q], 'F32');
        t('attn_k.bias', [kv], 'F32');
        t('attn_v.bias', [kv], 'F32');
      }
    }
    t('attn_output.weight', [q, p.dim]);
    if (p.architecture === 'gemma2') t('post_attention_norm.weight', [p.dim], 'F32');
    t('ffn_norm.weight', [p.dim], 'F32');
    if (p.experts) {
      t('ffn_gate_inp.weight', [p.dim, p.experts], 'F32');
      t('ffn_gate_exps.weight', [p.dim, p.ffn, p.experts]);
      t('ffn_down_exps.weight', [p.ffn, p.dim, p.experts]);
      t('ffn_up_exps.weight', [p.dim, p.ffn, p.experts]);
    } else if (p.architecture === 'phi3') {
      t('ffn_up.weight', [p.dim, 2 * p.ffn]); // gate and up fused
      t('ffn_down.weight', [p.ffn, p.dim]);
    } else {
      t('ffn_gate.weight', [p.dim, p.ffn]);
      t('ffn_up.weight', [p.dim, p.ffn]);
      t('ffn_down.weight', [p.ffn, p.dim]);
    }
    if (p.architecture === 'gemma2') t('post_ffw_norm.weight', [p.dim], 'F32');
  }
  out.push({ name: 'output_norm.weight', dims: [p.dim], source: 'F32' });
  if (!p.tiedEmbeddings) out.push({ name: 'output.weight', dims: [p.dim, p.vocab], source: 'F16' });
  return out;
}

/** The hyperparameter keys every llama.cpp architecture reads, under its own prefix. */
export function hyperparameterMetadata(
  a: string,
  s: { layers: number; ctx: number; embd: number; ffn: number; heads: number; kvHeads: number },
): Array<[string, GgufValue]> {
  return [
    [`${a}.block_count`, gv.u32(s.layers)],
    [`${a}.context_length`, gv.u32(s.ctx)],
    [`${a}.embedding_length`, gv.u32(s.embd)],
    [`${a}.feed_forward_length`, gv.u32(s.ffn)],
    [`${a}.attention.head_count`, gv.u32(s.heads)],
    [`${a}.attention.head_count_kv`, gv.u32(s.kvHeads)],
  ];
}

function presetMetadata(p: ModelPreset, quant: PresetQuant): Array<[string, GgufValue]> {
  const a = p.architecture;
  const m: Array<[string, GgufValue]> = [
    ['general.architecture', gv.str(a)],
    ['general.name', gv.str(`${p.id} (orchard header-only preset, ${quant})`)],
    ['general.basename', gv.str(p.source.split('/')[1] ?? p.id)],
    ...hyperparameterMetadata(a, { ...p, embd: p.dim }),
    [`${a}.rope.freq_base`, gv.f32(p.ropeTheta)],
    [`${a}.attention.layer_norm_rms_epsilon`, gv.f32(p.rmsEps)],
  ];
  if (p.headDim !== p.dim / p.heads || a === 'gemma2') {
    m.push([`${a}.attention.key_length`, gv.u32(p.headDim)], [`${a}.attention.value_length`, gv.u32(p.headDim)]);
  }
  m.push([`${a}.rope.dimension_count`, gv.u32(p.headDim)]);
  if (p.experts) m.push([`${a}.expert_count`, gv.u32(p.experts)], [`${a}.expert_used_count`, gv.u32(p.expertsUsed ?? 2)]);
  if (p.slidingWindow) m.push([`${a}.attention.sliding_window`, gv.u32(p.slidingWindow)]);
  if (p.attnSoftcap) m.push([`${a}.attn_logit_softcapping`, gv.f32(p.attnSoftcap)]);
  if (p.finalSoftcap) m.push([`${a}.final_logit_softcapping`, gv.f32(p.finalSoftcap)]);
  m.push(
    [`${a}.vocab_size`, gv.u32(p.vocab)],
    ['general.file_type', gv.u32(FILE_TYPE[quant])],
    ['general.quantization_version', gv.u32(2)],
    ['tokenizer.ggml.model', gv.str(p.tokenizer)],
    ['orchard.preset', gv.str(p.id)],
    ['orchard.header_only', gv.bool(true)],
  );
  return m;
}

/** The header-only GGUF spec of a preset at a quantisation (tensors carry no data). */
export function presetSpec(p: ModelPreset, quant: PresetQuant): GgufSpec {
  const ctx = {
    quant,
    layers: p.layers,
    experts: p.experts ?? 0,
    is70B: (p.architecture === 'llama' && p.layers === 80 && p.heads !== p.kvHeads) || (p.architecture === 'qwen2' && p.layers === 80),
    tiedEmbeddings: !!p.tiedEmbeddings,
    architecture: p.architecture,
  };
  const tensors: GgufTensorSpec[] = presetTensorShapes(p).map((t) => ({
    name: t.name,
    dims: t.dims,
    type: quantizedType(ctx, t.name, t.dims, t.source),
  }));
  return { metadata: presetMetadata(p, quant), tensors };
}
