import { ggmlType } from '../gguf/ggml-types.ts';
import { type GgufValue, gv } from '../gguf/types.ts';
import type { GgufSpec, GgufTensorSpec } from '../gguf/writer.ts';
import { type FamilyShape, familyMetadata, familyTensors } from './families.ts';
import { FILE_TYPE, type PresetQuant, quantizedType } from './quant-mix.ts';

/**
 * The big mixture-of-experts models people split across Macs, shaped from each model's published
 * config.json (Hugging Face) into llama.cpp's tensor table (families.ts).
 */
export interface FamilyPreset {
  readonly id: string;
  readonly source: string;
  readonly shape: FamilyShape;
  readonly tokenizer: 'gpt2' | 'llama';
}

/** DeepSeek V3 / R1 and Kimi K2 share the architecture (deepseek_v3 → llama.cpp deepseek2). */
const deepseekV3 = {
  arch: 'deepseek2',
  layers: 61,
  dim: 7168,
  heads: 128,
  kvHeads: 128,
  headDim: 192,
  vocab: 129280,
  ctx: 163840,
  ropeTheta: 10000,
  rmsEps: 1e-6,
  ffn: 18432,
  experts: 256,
  expertsUsed: 8,
  expertFfn: 2048,
  sharedExperts: 1,
  leadingDense: 3,
  mla: { qLoraRank: 1536, kvLoraRank: 512, nopeDim: 128, ropeDim: 64, vDim: 128 },
} as const satisfies FamilyShape;

export const FAMILY_PRESETS: readonly FamilyPreset[] = [
  { id: 'deepseek-v3', source: 'deepseek-ai/DeepSeek-V3', shape: deepseekV3, tokenizer: 'gpt2' },
  {
    id: 'kimi-k2',
    source: 'moonshotai/Kimi-K2-Instruct',
    shape: { ...deepseekV3, heads: 64, vocab: 163840, ctx: 131072, ropeTheta: 50000, experts: 384, leadingDense: 1 },
    tokenizer: 'gpt2',
  },
  {
    id: 'glm-4.6',
    source: 'zai-org/GLM-4.6',
    shape: {
      arch: 'glm4moe',
      layers: 92,
      nextn: 1,
      dim: 5120,
      heads: 96,
      kvHeads: 8,
      headDim: 128,
      ropeDim: 64,
      vocab: 151552,
      ctx: 202752,
      ropeTheta: 1000000,
      rmsEps: 1e-5,
      ffn: 12288,
      experts: 160,
      expertsUsed: 8,
      expertFfn: 1536,
      sharedExperts: 1,
      leadingDense: 3,
    },
    tokenizer: 'gpt2',
  },
  {
    id: 'qwen3-235b-a22b',
    source: 'Qwen/Qwen3-235B-A22B',
    shape: {
      arch: 'qwen3moe',
      layers: 94,
      dim: 4096,
      heads: 64,
      kvHeads: 4,
      headDim: 128,
      vocab: 151936,
      ctx: 40960,
      ropeTheta: 1000000,
      rmsEps: 1e-6,
      ffn: 12288,
      experts: 128,
      expertsUsed: 8,
      expertFfn: 1536,
      sharedExperts: 0,
    },
    tokenizer: 'gpt2',
  },
  {
    id: 'gpt-oss-120b',
    source: 'openai/gpt-oss-120b',
    shape: {
      arch: 'gpt-oss',
      layers: 36,
      dim: 2880,
      heads: 64,
      kvHeads: 8,
      headDim: 64,
      vocab: 201088,
      ctx: 131072,
      ropeTheta: 150000,
      rmsEps: 1e-5,
      ffn: 2880,
      experts: 128,
      expertsUsed: 4,
      expertFfn: 2880,
      sharedExperts: 0,
      slidingWindow: 128,
    },
    tokenizer: 'gpt2',
  },
];

/** The header-only GGUF spec of a family preset at a quantisation (tensors carry no data). */
export function familyPresetSpec(p: FamilyPreset, quant: PresetQuant): GgufSpec {
  const s = p.shape;
  const ctx = { quant, layers: s.layers, experts: s.experts, is70B: false, tiedEmbeddings: false, architecture: s.arch };
  const tensors: GgufTensorSpec[] = familyTensors(s).map((t) => ({
    name: t.name,
    dims: t.dims,
    // gpt-oss is published with its expert weights already in MXFP4 (ggml-org/gpt-oss-120b-GGUF);
    // every other tensor follows the requested quantisation.
    type: s.arch === 'gpt-oss' && t.name.endsWith('_exps.weight') ? ggmlType('MXFP4') : quantizedType(ctx, t.name, t.dims, t.source),
  }));
  const metadata: Array<[string, GgufValue]> = [
    ['general.architecture', gv.str(s.arch)],
    ['general.name', gv.str(`${p.id} (orchard header-only preset, ${quant})`)],
    ['general.basename', gv.str(p.source.split('/')[1] ?? p.id)],
    ...familyMetadata(s),
    ['general.file_type', gv.u32(FILE_TYPE[quant])],
    ['general.quantization_version', gv.u32(2)],
    ['tokenizer.ggml.model', gv.str(p.tokenizer)],
    ['orchard.preset', gv.str(p.id)],
    ['orchard.header_only', gv.bool(true)],
  ];
  return { metadata, tensors };
}

export function findFamilyPreset(id: string): FamilyPreset | undefined {
  return FAMILY_PRESETS.find((x) => x.id === id.toLowerCase());
}
