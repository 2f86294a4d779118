import { describe, expect, it } from 'vitest';
import { UsageError } from '../../src/shared/errors.ts';
import { memoryModel, stageBytes, DEFAULT_MEMORY_OPTIONS } from '../../src/shared/memory/stage.ts';
import { mlxModelProfile, parseSafetensorsHeader } from '../../src/shared/model/mlx-profile.ts';

const SIZE: Record<string, number> = { F32: 4, F16: 2, BF16: 2, U32: 4 };

/** A safetensors header (length prefix + JSON) for tensors laid out back to back. */
function header(tensors: { name: string; dtype: string; shape: number[] }[], extra: Record<string, unknown> = {}): Uint8Array {
  let off = 0;
  const json: Record<string, unknown> = { __metadata__: { format: 'mlx' }, ...extra };
  for (const t of tensors) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * (SIZE[t.dtype] ?? 1);
    json[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [off, off + bytes] };
    off += bytes;
  }
  const body = new TextEncoder().encode(JSON.stringify(json));
  const out = new Uint8Array(8 + body.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(body.length), true);
  out.set(body, 8);
  return out;
}

const H = 64;
const V = 258;
const I = 128;

function llamaTensors(layers: number, opts: { tied?: boolean; kvHeads?: number; quant?: { bits: number; group: number } } = {}) {
  const kv = (opts.kvHeads ?? 4) * (H / 4);
  const linear = (name: string, out: number, inp: number) =>
    opts.quant
      ? [
          { name: `${name}.weight`, dtype: 'U32', shape: [out, (inp * opts.quant.bits) / 32] },
          { name: `${name}.scales`, dtype: 'F16', shape: [out, inp / opts.quant.group] },
          { name: `${name}.biases`, dtype: 'F16', shape: [out, inp / opts.quant.group] },
        ]
      : [{ name: `${name}.weight`, dtype: 'F32', shape: [out, inp] }];
  const t: { name: string; dtype: string; shape: number[] }[] = [...linear('model.embed_tokens', V, H)];
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}`;
    t.push(
      ...linear(`${p}.self_attn.q_proj`, H, H),
      ...linear(`${p}.self_attn.k_proj`, kv, H),
      ...linear(`${p}.self_attn.v_proj`, kv, H),
      ...linear(`${p}.self_attn.o_proj`, H, H),
      ...linear(`${p}.mlp.gate_proj`, I, H),
      ...linear(`${p}.mlp.up_proj`, I, H),
      ...linear(`${p}.mlp.down_proj`, H, I),
      { name: `${p}.input_layernorm.weight`, dtype: 'F32', shape: [H] },
      { name: `${p}.post_attention_layernorm.weight`, dtype: 'F32', shape: [H] },
    );
  }
  t.push({ name: 'model.norm.weight', dtype: 'F32', shape: [H] });
  if (!opts.tied) t.push(...linear('lm_head', V, H));
  return t;
}

const config = (over: Record<string, unknown> = {}) => ({
  model_type: 'llama',
  hidden_size: H,
  num_hidden_layers: 4,
  num_attention_heads: 4,
  num_key_value_heads: 4,
  intermediate_size: I,
  vocab_size: V,
  max_position_embeddings: 4096,
  ...over,
});

const parse = (t: ReturnType<typeof llamaTensors>) => parseSafetensorsHeader(header(t));

describe('safetensors header', () => {
  it('reads names, dtypes, shapes and exact byte spans, skipping __metadata__', () => {
    const t = parseSafetensorsHeader(header([{ name: 'a', dtype: 'F16', shape: [3, 5] }, { name: 'b', dtype: 'U32', shape: [7] }]));
    expect(t).toEqual([
      { name: 'a', dtype: 'F16', shape: [3, 5], bytes: 30 },
      { name: 'b', dtype: 'U32', shape: [7], bytes: 28 },
    ]);
  });
  it('rejects malformed headers with a UsageError', () => {
    const good = header([{ name: 'a', dtype: 'F32', shape: [2] }]);
    expect(() => parseSafetensorsHeader(good.subarray(0, 5))).toThrow(/too short/);
    expect(() => parseSafetensorsHeader(good.subarray(0, good.length - 1))).toThrow(/only/);
    const huge = good.slice();
    new DataView(huge.buffer).setBigUint64(0, 10n ** 12n, true);
    expect(() => parseSafetensorsHeader(huge)).toThrow(/not plausible/);
    const notJson = good.slice();
    notJson[9] = 0x7b; // `{{` …
    expect(() => parseSafetensorsHeader(notJson)).toThrow(/not valid JSON/);
    expect(() => parseSafetensorsHeader(header([], { x: { dtype: 'F32', shape: [2], data_offsets: [0, 7] } }))).toThrow(/needs 8/);
    expect(() => parseSafetensorsHeader(header([], { x: { dtype: 'Q9', shape: [2], data_offsets: [0, 2] } }))).toThrow(/unknown dtype/);
    expect(() => parseSafetensorsHeader(header([], { x: { dtype: 'F32', shape: [-1] } }))).toThrow(/malformed/);
    expect(() => parseSafetensorsHeader(good, 8 + (good.length - 8) + 4)).toThrow(/past the end/);
    expect(() => parseSafetensorsHeader(good, 8 + (good.length - 8) + 8)).not.toThrow();
  });
});

describe('MLX model profile', () => {
  it('sums every layer tensor exactly and splits out embedding, norm and head', () => {
    const p = mlxModelProfile(config(), parse(llamaTensors(4)));
    const perLayer = 4 * (H * H * 4) + 3 * H * I * 4 + 2 * H * 4;
    expect(p.layers.map((l) => l.weightBytes)).toEqual([perLayer, perLayer, perLayer, perLayer]);
    expect(p.layers.every((l) => l.readBytesPerToken === l.weightBytes)).toBe(true);
    expect(p.tokenEmbdBytes).toBe(V * H * 4);
    expect(p.tokenEmbdRowBytes).toBe(H * 4);
    expect(p.outputBytes).toBe(V * H * 4);
    expect(p.outputTied).toBe(false);
    expect(p.outputNormBytes).toBe(H * 4);
    expect(p.fileTensorBytes).toBe(4 * perLayer + 2 * V * H * 4 + H * 4);
    expect(p).toMatchObject({ arch: 'llama', format: 'mlx', layerCount: 4, embd: H, ffn: I, vocab: V, heads: 4, weightType: 'F32' });
    expect(p.kvHeads).toEqual([4, 4, 4, 4]);
    expect(p.layers[0]).toMatchObject({ kEmbdGqa: H, vEmbdGqa: H, swa: false, largestTensorBytes: H * I * 4 });
  });

  it('counts packed weights, scales and biases of quantized layers', () => {
    const q = { bits: 4, group: 32 };
    const p = mlxModelProfile(config({ quantization: { bits: 4, group_size: 32 } }), parse(llamaTensors(4, { quant: q })));
    const lin = (out: number, inp: number) => out * (inp / 8) * 4 + 2 * out * (inp / 32) * 2;
    const perLayer = 4 * lin(H, H) + 2 * lin(I, H) + lin(H, I) + 2 * H * 4;
    expect(p.layers[2]?.weightBytes).toBe(perLayer);
    expect(p.tokenEmbdBytes).toBe(lin(V, H));
    expect(p.weightType).toBe('Q4g32');
    expect(p.mlx.quantization).toEqual({ bits: 4, groupSize: 32, mode: 'affine' });
  });

  it('tied embeddings: the output is the embedding', () => {
    const p = mlxModelProfile(config({ tie_word_embeddings: true }), parse(llamaTensors(4, { tied: true })));
    expect(p.outputTied).toBe(true);
    expect(p.outputBytes).toBe(p.tokenEmbdBytes);
  });

  it('GQA: KV width follows num_key_value_heads × head_dim', () => {
    const p = mlxModelProfile(config({ num_key_value_heads: 2 }), parse(llamaTensors(4, { kvHeads: 2 })));
    expect(p.layers[0]?.kEmbdGqa).toBe(2 * (H / 4));
    expect(p.kvHeads).toEqual([2, 2, 2, 2]);
    const explicit = mlxModelProfile(config({ num_key_value_heads: 2, head_dim: 32 }), parse(llamaTensors(4, { kvHeads: 2 })));
    expect(explicit.headDimK).toBe(32);
    expect(explicit.layers[0]?.vEmbdGqa).toBe(64);
  });

  it('sliding layers from layer_types, MoE read bytes from the routed share', () => {
    const swa = mlxModelProfile(
      config({ layer_types: ['sliding_attention', 'full_attention', 'sliding_attention', 'full_attention'], sliding_window: 512 }),
      parse(llamaTensors(4)),
    );
    expect(swa.swa).toEqual({ window: 512, layers: 2 });
    expect(swa.layers.map((l) => l.swa)).toEqual([true, false, true, false]);
    const t = llamaTensors(1);
    t.push({ name: 'model.layers.0.mlp.switch_mlp.gate_proj.weight', dtype: 'F32', shape: [8, I, H] });
    const moe = mlxModelProfile(config({ model_type: 'qwen3_moe', num_hidden_layers: 1, num_experts: 8, num_experts_per_tok: 2 }), parse(t));
    const experts = 8 * I * H * 4;
    expect(moe.arch).toBe('qwen3moe');
    expect(moe.moe).toMatchObject({ experts: 8, expertsUsed: 2 });
    expect(moe.layers[0]!.weightBytes - moe.layers[0]!.readBytesPerToken).toBe(experts - experts / 4);
  });

  it('reads the language model out of a nested text_config; maps mlx-lm model types to families', () => {
    const p = mlxModelProfile({ model_type: 'mistral3', text_config: config({ model_type: 'ministral3' }) }, parse(llamaTensors(4)));
    expect(p.arch).toBe('llama');
    expect(p.mlx.modelType).toBe('ministral3');
  });

  it('refuses what would silently mis-plan', () => {
    expect(() => mlxModelProfile(config({ model_type: 'mamba' }), parse(llamaTensors(4)))).toThrow(/unsupported MLX model_type "mamba"/);
    expect(() => mlxModelProfile(config({ hidden_size: 'x' }), parse(llamaTensors(4)))).toThrow(/hidden_size/);
    expect(() => mlxModelProfile(config({ num_hidden_layers: 5 }), parse(llamaTensors(4)))).toThrow(/no tensors for layer 4/);
    expect(() => mlxModelProfile(config({ vocab_size: 300 }), parse(llamaTensors(4)))).toThrow(/258 rows/);
    expect(() => mlxModelProfile(config(), parse(llamaTensors(4)).filter((t) => !t.name.includes('embed')))).toThrow(/embed_tokens/);
    expect(() => mlxModelProfile(config({ layer_types: ['full_attention'] }), parse(llamaTensors(4)))).toThrow(/layer_types/);
    expect(() => mlxModelProfile(config({ num_experts: 8, num_experts_per_tok: 9 }), parse(llamaTensors(4)))).toThrow(/experts/);
    expect(() => mlxModelProfile(config({ hidden_size: 66 }), parse(llamaTensors(4)))).toThrow(UsageError);
  });

  it('is the same shape as the GGUF profile: the memory model takes it unchanged', () => {
    const p = mlxModelProfile(config(), parse(llamaTensors(4)));
    const mm = memoryModel(p, { ...DEFAULT_MEMORY_OPTIONS, ctx: 1024 });
    const head = stageBytes(mm, 2, 3, true, true);
    const worker = stageBytes(mm, 0, 1, false, true);
    expect(head.total).toBeGreaterThan(worker.total);
    expect(worker.weights).toBe(p.layers[0]!.weightBytes + p.layers[1]!.weightBytes);
  });
});

describe('deepseek_v3 (Multi-head Latent Attention, routed experts)', () => {
  const ds = { model_type: 'deepseek_v3', n_routed_experts: 4, num_experts_per_tok: 2, kv_lora_rank: 16, qk_rope_head_dim: 8 };
  const expertTensors = (layers: number) => [
    ...llamaTensors(layers),
    ...Array.from({ length: layers }, (_, l) => ({ name: `model.layers.${l}.mlp.switch_mlp.up_proj.weight`, dtype: 'F32', shape: [4, I, H] })),
  ];

  it('caches the latent and the shared rope key (one "head"), not per-head K and V', () => {
    const p = mlxModelProfile(config(ds), parse(expertTensors(4)));
    expect(p.arch).toBe('deepseek2');
    expect(p.kvHeads).toEqual([1, 1, 1, 1]);
    expect(p.layers.map((l) => [l.kEmbdGqa, l.vEmbdGqa])).toEqual(Array(4).fill([16, 8]));
    expect(p.moe).toMatchObject({ experts: 4, expertsUsed: 2 });
    // decode reads 2 of the 4 experts' bytes
    expect(p.layers[0]!.readBytesPerToken).toBeLessThan(p.layers[0]!.weightBytes);
  });

  it('refuses a deepseek_v3 config without the latent sizes', () => {
    expect(() => mlxModelProfile(config({ ...ds, kv_lora_rank: undefined }), parse(expertTensors(4)))).toThrow(UsageError);
  });
});
