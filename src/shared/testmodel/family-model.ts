import { UsageError } from '../errors.ts';
import { type GgufValue, gv } from '../gguf/types.ts';
import type { GgufSpec, GgufTensorSpec } from '../gguf/writer.ts';
import { FAMILY_ARCHS, type FamilyArch, type FamilyShape, familyMetadata, familyTensors } from './families.ts';
import { FILE_TYPE, GGML_NAME, type Recipe, SILENT_TOKEN_TYPES, type TestVocab, tensorData } from './llama.ts';
import type { TestModelType } from './quantize.ts';

/**
 * Small runnable models of the families in families.ts (`orchard testmodel gguf --arch`): the
 * real tensor table and keys at toy sizes, seeded random weights drawn like the llama test model
 * (llama.ts: 1/sqrt(fan_in) projections, residual writers scaled by 1/sqrt(2·layers), norms
 * 1 ± 0.1, silent tokens' output rows zero), so llama.cpp loads them and greedy decoding is varied.
 * Sizes keep every row a whole number of q8_0 blocks and the routers wide enough that experts
 * really differ per token.
 */
const BASE = { layers: 4, dim: 256, heads: 8, kvHeads: 4, headDim: 32, ctx: 2048, ropeTheta: 10000, rmsEps: 1e-5, ffn: 512 } as const;
const MOE = { experts: 8, expertsUsed: 2, expertFfn: 128 } as const;

export function familyTestShape(arch: FamilyArch, layers: number = BASE.layers, vocab = 0): FamilyShape {
  const base = { ...BASE, layers, vocab };
  switch (arch) {
    case 'deepseek2':
      return { ...base, ...MOE, arch, sharedExperts: 1, leadingDense: 1, mla: { qLoraRank: 128, kvLoraRank: 64, nopeDim: 32, ropeDim: 32, vDim: 32 } };
    case 'glm4moe':
      return { ...base, ...MOE, arch, sharedExperts: 1, leadingDense: 1, ropeDim: BASE.headDim / 2 };
    case 'qwen3moe':
      return { ...base, ...MOE, arch, sharedExperts: 0 };
    case 'gpt-oss':
      return { ...base, ...MOE, arch, sharedExperts: 0, expertFfn: 256, slidingWindow: 64 };
    case 'llama4':
      return { ...base, ...MOE, arch, sharedExperts: 1, moeEvery: 2 };
    case 'mistral3':
      return { ...base, arch, experts: 0, expertsUsed: 0, expertFfn: 0, sharedExperts: 0 };
  }
}

export function parseFamilyArch(a: string): FamilyArch {
  const found = FAMILY_ARCHS.find((x) => x === a);
  if (!found) throw new UsageError(`unknown --arch "${a}"; generated families: ${FAMILY_ARCHS.join(', ')}`);
  return found;
}

const RESIDUAL_WRITERS = /(attn_output|ffn_down|ffn_down_exps|ffn_down_shexp)\.weight$/;

function recipeOf(name: string, dims: readonly number[], layers: number, type: TestModelType, silent: ReadonlySet<number>): Recipe {
  const oneD = dims.length === 1;
  if (name.endsWith('norm.weight')) return { name, dims, type: 'f32', std: 0.1, mean: 1 };
  // Biases, the expert-selection bias and the attention sinks start near zero, as trained ones sit.
  if (name.endsWith('.bias') || name.endsWith('attn_sinks.weight')) return { name, dims, type: 'f32', std: 0.02 };
  const fanIn = dims[0]!;
  let std = 1 / Math.sqrt(fanIn);
  if (RESIDUAL_WRITERS.test(name)) std /= Math.sqrt(2 * layers);
  if (name === 'token_embd.weight') std = 1;
  // The router stays f32 like converted files; it is wider-spread so routing varies by token.
  if (name.endsWith('ffn_gate_inp.weight')) return { name, dims, type: 'f32', std: 4 / Math.sqrt(fanIn) };
  return { name, dims, type: oneD ? 'f32' : type, std, ...(name === 'output.weight' ? { zeroRows: silent } : {}) };
}

/** The GGUF spec (metadata + streamed tensors) of a seeded runnable model of a family. */
export function familyTestModelSpec(shape: FamilyShape, vocab: TestVocab, type: TestModelType, seed: number): GgufSpec {
  const s = { ...shape, vocab: vocab.size };
  const silent = new Set<number>();
  vocab.tokenTypes.forEach((t, i) => {
    if (SILENT_TOKEN_TYPES.has(t)) silent.add(i);
  });
  const tensors: GgufTensorSpec[] = familyTensors(s).map((t) => {
    const r = recipeOf(t.name, t.dims, s.layers, type, silent);
    return { name: t.name, dims: t.dims, type: GGML_NAME[r.type], data: tensorData(r, seed) };
  });
  const metadata: Array<[string, GgufValue]> = [
    ['general.architecture', gv.str(s.arch)],
    ['general.name', gv.str(`orchard-test-${s.arch}-${s.layers}x${s.dim}-${type}-seed${seed}`)],
    ...familyMetadata(s),
    ['general.file_type', gv.u32(FILE_TYPE[type])],
    ...vocab.metadata,
    ['general.quantization_version', gv.u32(2)],
    ['orchard.testmodel.seed', gv.u32(seed)],
  ];
  return { metadata, tensors };
}
