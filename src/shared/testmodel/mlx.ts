import { open, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { UsageError } from '../errors.ts';
import type { ModelPreset } from './presets.ts';

/**
 * Header-only MLX model directories shaped like real mlx-lm checkpoints: config.json and one
 * `model.safetensors` whose header names every tensor with its real shape (and, quantized, the
 * packed U32 weight plus its scales and biases). The data section is a sparse hole, so a
 * 70B-shaped directory takes a few kilobytes of disk and the planner, which reads headers only,
 * plans it like the real thing.
 */
export interface MlxHeaderOnlyOptions {
  /** mlx-lm affine quantization; without it the weights are bf16. */
  readonly quantization?: { readonly bits: number; readonly groupSize: number };
}

interface TensorDecl {
  readonly name: string;
  readonly dtype: 'BF16' | 'U32';
  readonly shape: readonly number[];
}

const DTYPE_BYTES = { BF16: 2, U32: 4 } as const;

function mlxTensors(p: ModelPreset, o: MlxHeaderOnlyOptions): TensorDecl[] {
  const q = o.quantization;
  const linear = (name: string, out: number, inp: number): TensorDecl[] =>
    q
      ? [
          { name: `${name}.weight`, dtype: 'U32', shape: [out, (inp * q.bits) / 32] },
          { name: `${name}.scales`, dtype: 'BF16', shape: [out, inp / q.groupSize] },
          { name: `${name}.biases`, dtype: 'BF16', shape: [out, inp / q.groupSize] },
        ]
      : [{ name: `${name}.weight`, dtype: 'BF16', shape: [out, inp] }];
  const kv = p.kvHeads * p.headDim;
  const t: TensorDecl[] = [...linear('model.embed_tokens', p.vocab, p.dim)];
  for (let l = 0; l < p.layers; l++) {
    const b = `model.layers.${l}`;
    t.push(
      ...linear(`${b}.self_attn.q_proj`, p.heads * p.headDim, p.dim),
      ...linear(`${b}.self_attn.k_proj`, kv, p.dim),
      ...linear(`${b}.self_attn.v_proj`, kv, p.dim),
      ...linear(`${b}.self_attn.o_proj`, p.dim, p.heads * p.headDim),
      ...linear(`${b}.mlp.gate_proj`, p.ffn, p.dim),
      ...linear(`${b}.mlp.up_proj`, p.ffn, p.dim),
      ...linear(`${b}.mlp.down_proj`, p.dim, p.ffn),
      { name: `${b}.input_layernorm.weight`, dtype: 'BF16', shape: [p.dim] },
      { name: `${b}.post_attention_layernorm.weight`, dtype: 'BF16', shape: [p.dim] },
    );
  }
  t.push({ name: 'model.norm.weight', dtype: 'BF16', shape: [p.dim] });
  if (!p.tiedEmbeddings) t.push(...linear('lm_head', p.vocab, p.dim));
  return t;
}

/** Write `dir`/config.json and a sparse `dir`/model.safetensors for a llama-family preset. */
export async function writeMlxHeaderOnly(dir: string, p: ModelPreset, o: MlxHeaderOnlyOptions = {}): Promise<void> {
  if (p.architecture !== 'llama' || p.experts) throw new UsageError(`MLX header-only models are llama-shaped dense models; ${p.id} is not`);
  const config = {
    model_type: 'llama',
    hidden_size: p.dim,
    num_hidden_layers: p.layers,
    num_attention_heads: p.heads,
    num_key_value_heads: p.kvHeads,
    head_dim: p.headDim,
    intermediate_size: p.ffn,
    vocab_size: p.vocab,
    max_position_embeddings: p.ctx,
    rope_theta: p.ropeTheta,
    rms_norm_eps: p.rmsEps,
    tie_word_embeddings: p.tiedEmbeddings ?? false,
    ...(o.quantization ? { quantization: { bits: o.quantization.bits, group_size: o.quantization.groupSize } } : {}),
  };
  const json: Record<string, unknown> = { __metadata__: { format: 'mlx' } };
  let offset = 0;
  for (const t of mlxTensors(p, o)) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[t.dtype];
    json[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  // safetensors pads the header with spaces so the data starts 8-byte aligned.
  const text = JSON.stringify(json);
  const body = Buffer.from(text.padEnd(Math.ceil(text.length / 8) * 8, ' '));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(body.length));
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
  const fh = await open(join(dir, 'model.safetensors'), 'w');
  try {
    await fh.write(Buffer.concat([length, body]));
    await fh.truncate(8 + body.length + offset);
  } finally {
    await fh.close();
  }
}
