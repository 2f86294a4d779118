import { UsageError } from '../errors.ts';
import type { GgufSpec, GgufTensorSpec } from '../gguf/writer.ts';
import { type GgufValue, gv } from '../gguf/types.ts';
import { Prng } from './prng.ts';
import { type TestModelType, encodeValues } from './quantize.ts';

/**
 * A small llama-architecture model with seeded random weights: the test model every engine test
 * runs. Pure: the same shape, seed and vocabulary give the same bytes on every machine.
 *
 * Weight recipe (chosen so greedy decoding is varied, not one token repeated — a model that
 * repeats itself makes "distributed output = single-node output" a weak oracle):
 *  - projections: uniform with standard deviation 1/sqrt(fan_in); the two that write into the
 *    residual stream (attn_output, ffn_down) are scaled down further by 1/sqrt(2·layers)
 *    (GPT-2's residual scaling), so all layers together add about as much as the token
 *    embedding. Without it, deep models' residual streams are dominated by near-uniform
 *    attention averages that change slowly from step to step, and greedy decoding gets stuck:
 *    measured with llama-server on a 16-layer dim-1024 model, 21 distinct tokens of 32 and a
 *    run of 12 identical ones before; 32 of 32 (and 62–64 of 64) after. The default model and
 *    its q8_0/f32 variants give 31–32 of 32 on three prompts, and the same last token in
 *    different contexts leads to different continuations (the model is not a bigram table);
 *  - token embeddings: standard deviation 1; norms: 1 ± 0.1;
 *  - output head: 1/sqrt(dim) for ordinary tokens, and all-zero rows for unknown/control/unused
 *    tokens (BOS, EOS, …): their logit is then exactly 0 while the best ordinary token's is
 *    several standard deviations up, so greedy decoding never stops early on a random EOS.
 * Each tensor draws from its own stream (seed, tensor name), so changing the layer count leaves
 * the other tensors' values unchanged.
 */
export interface LlamaTestShape {
  readonly layers: number;
  readonly dim: number;
  readonly ffn: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly ctx: number;
  readonly type: TestModelType;
  readonly seed: number;
}

export const DEFAULT_LLAMA_TEST_SHAPE: LlamaTestShape = {
  layers: 8,
  dim: 256,
  ffn: 768,
  heads: 8,
  kvHeads: 4,
  ctx: 2048,
  type: 'f16',
  seed: 1,
};

export interface TestVocab {
  readonly metadata: ReadonlyMap<string, GgufValue>;
  readonly size: number;
  readonly tokenTypes: readonly number[];
}

/** llama_ftype values llama.cpp writes in general.file_type. */
export const FILE_TYPE: Record<TestModelType, number> = { f32: 0, f16: 1, q8_0: 7 };
export const GGML_NAME = { f32: 'F32', f16: 'F16', q8_0: 'Q8_0' } as const;
/** Token types whose output row is zeroed: unknown (2), control (3), unused (5). */
export const SILENT_TOKEN_TYPES = new Set([2, 3, 5]);
/** Elements generated per chunk: bounds memory whatever the model size. */
const CHUNK_ELEMENTS = 1 << 16;

/** Throws a UsageError naming the first thing llama.cpp (or the quantiser) would refuse. */
export function validateLlamaShape(s: LlamaTestShape): void {
  const positive: Array<[keyof LlamaTestShape, number]> = [
    ['layers', s.layers],
    ['dim', s.dim],
    ['ffn', s.ffn],
    ['heads', s.heads],
    ['kvHeads', s.kvHeads],
    ['ctx', s.ctx],
  ];
  for (const [k, v] of positive) {
    if (!Number.isSafeInteger(v) || v < 1) throw new UsageError(`${flag(k)} must be a positive integer, got ${v}`);
  }
  if (!Number.isSafeInteger(s.seed) || s.seed < 0 || s.seed > 0xffffffff) {
    throw new UsageError(`--seed must be an integer in 0..4294967295, got ${s.seed}`);
  }
  if (s.dim % s.heads !== 0) throw new UsageError(`--dim ${s.dim} is not divisible by --heads ${s.heads}`);
  if (s.heads % s.kvHeads !== 0) throw new UsageError(`--heads ${s.heads} is not divisible by --kv-heads ${s.kvHeads}`);
  if ((s.dim / s.heads) % 2 !== 0) throw new UsageError(`head size ${s.dim / s.heads} (dim/heads) must be even for RoPE`);
  if (s.type === 'q8_0') {
    for (const [k, v] of [['dim', s.dim], ['ffn', s.ffn]] as const) {
      if (v % 32 !== 0) throw new UsageError(`${flag(k)} ${v} must be a multiple of 32 for q8_0`);
    }
    if (((s.dim / s.heads) * s.kvHeads) % 32 !== 0) {
      throw new UsageError(`K/V width ${(s.dim / s.heads) * s.kvHeads} (dim/heads × kv-heads) must be a multiple of 32 for q8_0`);
    }
  }
}

function flag(k: string): string {
  return `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
}

export interface Recipe {
  readonly name: string;
  readonly dims: readonly number[];
  readonly type: TestModelType;
  readonly std: number;
  readonly mean?: number;
  /** Rows (dims[1] index) forced to zero. */
  readonly zeroRows?: ReadonlySet<number>;
}

export function tensorData(r: Recipe, seed: number): () => Iterable<Uint8Array> {
  return function* () {
    const rowLength = r.dims[0]!;
    const rows = r.dims.slice(1).reduce((a, b) => a * b, 1);
    const rowsPerChunk = Math.max(1, Math.floor(CHUNK_ELEMENTS / rowLength));
    const prng = new Prng(seed, r.name);
    const row = new Float32Array(rowLength);
    for (let start = 0; start < rows; start += rowsPerChunk) {
      const n = Math.min(rowsPerChunk, rows - start);
      const chunk = new Float32Array(n * rowLength);
      for (let i = 0; i < n; i++) {
        // Draw even for zeroed rows so the other rows do not depend on which rows are silent.
        prng.fillUniform(row, r.std, r.mean ?? 0);
        if (!r.zeroRows?.has(start + i)) chunk.set(row, i * rowLength);
      }
      yield encodeValues(r.type, chunk);
    }
  };
}

/** The GGUF spec (metadata + streamed tensors) of a seeded llama test model. */
export function llamaTestModelSpec(shape: LlamaTestShape, vocab: TestVocab): GgufSpec {
  validateLlamaShape(shape);
  const { layers, dim, ffn, heads, kvHeads, ctx, type, seed } = shape;
  const headDim = dim / heads;
  const kvDim = headDim * kvHeads;
  const silent = new Set<number>();
  vocab.tokenTypes.forEach((t, i) => {
    if (SILENT_TOKEN_TYPES.has(t)) silent.add(i);
  });

  const residual = 1 / Math.sqrt(2 * layers);
  const recipes: Recipe[] = [{ name: 'token_embd.weight', dims: [dim, vocab.size], type, std: 1 }];
  for (let i = 0; i < layers; i++) {
    const p = `blk.${i}.`;
    recipes.push(
      { name: `${p}attn_norm.weight`, dims: [dim], type: 'f32', std: 0.1, mean: 1 },
      { name: `${p}attn_q.weight`, dims: [dim, dim], type, std: 1 / Math.sqrt(dim) },
      { name: `${p}attn_k.weight`, dims: [dim, kvDim], type, std: 1 / Math.sqrt(dim) },
      { name: `${p}attn_v.weight`, dims: [dim, kvDim], type, std: 1 / Math.sqrt(dim) },
      { name: `${p}attn_output.weight`, dims: [dim, dim], type, std: residual / Math.sqrt(dim) },
      { name: `${p}ffn_norm.weight`, dims: [dim], type: 'f32', std: 0.1, mean: 1 },
      { name: `${p}ffn_gate.weight`, dims: [dim, ffn], type, std: 1 / Math.sqrt(dim) },
      { name: `${p}ffn_up.weight`, dims: [dim, ffn], type, std: 1 / Math.sqrt(dim) },
      { name: `${p}ffn_down.weight`, dims: [ffn, dim], type, std: residual / Math.sqrt(ffn) },
    );
  }
  recipes.push(
    { name: 'output_norm.weight', dims: [dim], type: 'f32', std: 0.1, mean: 1 },
    { name: 'output.weight', dims: [dim, vocab.size], type, std: 1 / Math.sqrt(dim), zeroRows: silent },
  );

  const metadata: Array<[string, GgufValue]> = [
    ['general.architecture', gv.str('llama')],
    ['general.name', gv.str(`orchard-test-llama-${layers}x${dim}-${type}-seed${seed}`)],
    ['llama.block_count', gv.u32(layers)],
    ['llama.context_length', gv.u32(ctx)],
    ['llama.embedding_length', gv.u32(dim)],
    ['llama.feed_forward_length', gv.u32(ffn)],
    ['llama.attention.head_count', gv.u32(heads)],
    ['llama.attention.head_count_kv', gv.u32(kvHeads)],
    ['llama.rope.freq_base', gv.f32(10000)],
    ['llama.attention.layer_norm_rms_epsilon', gv.f32(1e-5)],
    ['general.file_type', gv.u32(FILE_TYPE[type])],
    ['llama.vocab_size', gv.u32(vocab.size)],
    ['llama.rope.dimension_count', gv.u32(headDim)],
    ...vocab.metadata,
    ['general.quantization_version', gv.u32(2)],
    ['orchard.testmodel.seed', gv.u32(seed)],
  ];

  const tensors: GgufTensorSpec[] = recipes.map((r) => ({
    name: r.name,
    dims: r.dims,
    type: GGML_NAME[r.type],
    data: tensorData(r, seed),
  }));
  return { metadata, tensors };
}

/** Total number of weights (elements of every tensor). */
export function parameterCount(spec: Pick<GgufSpec, 'tensors'>): number {
  let n = 0;
  for (const t of spec.tensors) n += t.dims.reduce((a, b) => a * b, 1);
  return n;
}
