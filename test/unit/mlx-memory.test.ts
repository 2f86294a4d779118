import { describe, expect, it } from 'vitest';
import { feeds, kvSlots, mlxRankBytes, mlxRankWeights } from '../../src/shared/memory/mlx.ts';
import { type SafetensorsTensor, mlxModelProfile } from '../../src/shared/model/mlx-profile.ts';

const H = 64;
const I = 128;
const V = 258;

function t(name: string, shape: number[], dtype = 'F32'): SafetensorsTensor {
  return { name, dtype, shape, bytes: shape.reduce((a, b) => a * b, 1) * (dtype === 'F32' ? 4 : 2) };
}

function llama(layers: number, dtype = 'F32'): SafetensorsTensor[] {
  const out = [t('model.embed_tokens.weight', [V, H], dtype), t('model.norm.weight', [H], dtype), t('lm_head.weight', [V, H], dtype)];
  for (let i = 0; i < layers; i++) {
    const p = `model.layers.${i}`;
    out.push(t(`${p}.input_layernorm.weight`, [H], dtype), t(`${p}.post_attention_layernorm.weight`, [H], dtype));
    for (const n of ['q_proj', 'k_proj', 'v_proj', 'o_proj']) out.push(t(`${p}.self_attn.${n}.weight`, [H, H], dtype));
    out.push(t(`${p}.mlp.gate_proj.weight`, [I, H], dtype), t(`${p}.mlp.up_proj.weight`, [I, H], dtype), t(`${p}.mlp.down_proj.weight`, [H, I], dtype));
  }
  return out;
}

const config = { model_type: 'llama', hidden_size: H, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 4, intermediate_size: I, vocab_size: V };

describe('MLX memory rules', () => {
  it('feeds the prompt as generate_step does: prompt − 1 in chunks of 2048, then one token per step', () => {
    expect(feeds({ promptTokens: 5000, generatedTokens: 2 })).toEqual([2048, 2048, 903, 1, 1, 1]);
    expect(feeds({ promptTokens: 1, generatedTokens: 0 })).toEqual([1]);
  });
  it("grows the KV cache as mlx-lm's KVCache: steps of 256, a partly used buffer trimmed first", () => {
    expect(kvSlots([511, 1])).toEqual({ slots: 512, replaced: 0 });
    // 512 used of 512: one more token appends 256.
    expect(kvSlots([511, 1, 1])).toEqual({ slots: 768, replaced: 512 });
    // 300 used of 512, then 300 more: trim to 300, append 512.
    expect(kvSlots([300, 300])).toEqual({ slots: 812, replaced: 512 });
  });
  it('weights: a pipeline rank holds its layers plus embedding, norm and head; tensor splits all but norms', () => {
    const p = mlxModelProfile(config, llama(4));
    const layer = (2 * H + 4 * H * H + 3 * I * H) * 4;
    const outside = (2 * V * H + H) * 4;
    expect(mlxRankWeights(p, { mode: 'pipeline', ranks: 2, firstLayer: 1, lastLayer: 3 })).toBe(outside + 3 * layer);
    expect(mlxRankWeights(p, { mode: 'tensor', ranks: 2, firstLayer: 0, lastLayer: 3 })).toBe(outside + 4 * (2 * H * 4 + (layer - 2 * H * 4) / 2));
    expect(p.mlx.activationBytes).toBe(4);
    expect(mlxModelProfile(config, llama(4, 'BF16')).mlx.activationBytes).toBe(2);
  });
  it('peak: weights + KV of the local layers at its final size + the widest step; tensor halves the KV heads', () => {
    const p = mlxModelProfile(config, llama(4));
    const req = { promptTokens: 512, generatedTokens: 8 };
    const single = mlxRankBytes(p, { mode: 'single', ranks: 1, firstLayer: 0, lastLayer: 3 }, req);
    // 520 fed → 768 slots; K and V are 64 floats each per layer.
    expect(single.kv).toBe(4 * 768 * 2 * H * 4);
    // The prompt chunk's scores and their softmax: 4 heads × 511 × 511 floats each, at least.
    expect(single.transient).toBeGreaterThanOrEqual(2 * 4 * 511 * 511 * 4);
    expect(single.peak).toBe(single.weights + single.kv + single.transient);
    const tensor = mlxRankBytes(p, { mode: 'tensor', ranks: 2, firstLayer: 0, lastLayer: 3 }, req);
    expect(tensor.kv).toBe(single.kv / 2);
    expect(tensor.transient).toBeLessThan(single.transient);
  });
});
