import { describe, expect, it } from 'vitest';
import { UsageError } from '../../src/shared/errors.ts';
import { MLX_RANK_OVERHEAD_BYTES, type MlxRankLayout, budgetRequests, mlxRankBudget, mlxRankBytes } from '../../src/shared/memory/mlx.ts';
import { type MlxModelProfile, type SafetensorsTensor, mlxModelProfile } from '../../src/shared/model/mlx-profile.ts';
import { chooseParallelism } from '../../src/shared/placement/parallelism.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { type StageMemory, asTensorPlan, mlxStageMemory, mlxTensorFit } from '../../src/shared/placement/stage-memory.ts';
import { mlxPlacementOptions } from '../../src/shared/placement/types.ts';
import { seededRandom } from '../helpers/random.ts';

// Two small bf16 checkpoints as mlx-lm lays them out: a dense llama and a qwen3_moe (8 experts,
// 2 per token, router `mlp.gate`), 6 layers each, hidden 512.
const H = 512;
const V = 1000;
const L = 6;
const t = (name: string, shape: number[]): SafetensorsTensor => ({ name, dtype: 'BF16', shape, bytes: shape.reduce((a, b) => a * b, 1) * 2 });

function checkpoint(moe: boolean): MlxModelProfile {
  const out = [t('model.embed_tokens.weight', [V, H]), t('model.norm.weight', [H]), t('lm_head.weight', [V, H])];
  for (let i = 0; i < L; i++) {
    const p = `model.layers.${i}`;
    out.push(t(`${p}.input_layernorm.weight`, [H]), t(`${p}.post_attention_layernorm.weight`, [H]));
    out.push(t(`${p}.self_attn.q_proj.weight`, [H, H]), t(`${p}.self_attn.o_proj.weight`, [H, H]));
    out.push(t(`${p}.self_attn.k_proj.weight`, [H / 2, H]), t(`${p}.self_attn.v_proj.weight`, [H / 2, H]));
    if (moe) {
      out.push(t(`${p}.mlp.gate.weight`, [8, H]));
      for (const n of ['gate_proj', 'up_proj', 'down_proj']) out.push(t(`${p}.mlp.switch_mlp.${n}.weight`, [8, 256, H]));
    } else {
      for (const n of ['gate_proj', 'up_proj', 'down_proj']) out.push(t(`${p}.mlp.${n}.weight`, [1024, H]));
    }
  }
  const config = moe
    ? { model_type: 'qwen3_moe', hidden_size: H, num_hidden_layers: L, num_attention_heads: 8, num_key_value_heads: 4, intermediate_size: 1024, vocab_size: V, num_experts: 8, num_experts_per_tok: 2, moe_intermediate_size: 256 }
    : { model_type: 'llama', hidden_size: H, num_hidden_layers: L, num_attention_heads: 8, num_key_value_heads: 4, intermediate_size: 1024, vocab_size: V };
  return mlxModelProfile(config, out);
}

const MODELS = { dense: checkpoint(false), moe: checkpoint(true) } as const;
const LAYOUTS: MlxRankLayout[] = [
  { mode: 'single', ranks: 1, firstLayer: 0, lastLayer: L - 1 },
  { mode: 'pipeline', ranks: 2, firstLayer: 2, lastLayer: L - 1 },
  { mode: 'pipeline', ranks: 3, firstLayer: 0, lastLayer: 0 },
  { mode: 'tensor', ranks: 2, firstLayer: 0, lastLayer: L - 1 },
];

describe('MLX budget: the requests a rank is budgeted for bound every request of ctx tokens', () => {
  // Splits of ctx into prompt + generated tokens around the 256-slot steps and the 2048-token
  // prefill chunk: every split up to ctx 600, beyond it every split within 2 of a 256-slot step
  // and every 17th.
  const CTX = [1, 2, 3, 255, 256, 257, 300, 511, 512, 513, 600, 2047, 2048, 2049, 2050, 2304, 4097];
  const prompts = (ctx: number) => Array.from({ length: ctx }, (_, i) => i + 1).filter((p) => ctx <= 600 || p % 17 === 0 || (p + 2) % 256 <= 4 || p === ctx);
  for (const [name, p] of Object.entries(MODELS)) {
    it(`${name}: no split of ctx peaks above the budget, and the budget is a split's own peak`, () => {
      for (const ctx of CTX) {
        for (const l of LAYOUTS) {
          const budget = mlxRankBudget(p, l, ctx);
          const peaks: number[] = [];
          for (const prompt of prompts(ctx)) {
            const b = mlxRankBytes(p, l, { promptTokens: prompt, generatedTokens: ctx - prompt });
            // The KV cache depends on the tokens fed alone.
            expect(b.kv).toBe(budget.kv);
            peaks.push(b.peak);
          }
          expect(Math.max(...peaks)).toBeLessThanOrEqual(budget.peak);
          expect(budgetRequests(ctx).map((r) => mlxRankBytes(p, l, r).peak)).toContain(budget.peak);
        }
      }
    });
  }
});

describe('MLX stage memory: per-layer sums and per-stage constants bound every stage', () => {
  for (const [name, p] of Object.entries(MODELS)) {
    it(`${name}: every range at every stage count is the rank's budget plus the process, within the DP's bound`, () => {
      for (const ctx of [256, 2049, 8192]) {
        const maxStages = 4;
        const m = mlxStageMemory(p, { ctx, kvFill: 0.5 }, maxStages);
        for (let first = 0; first < L; first++) {
          for (let last = first; last < L; last++) {
            const layers = m.layerBytes.slice(first, last + 1).reduce((a, b) => a + b, 0);
            for (let stages = 1; stages <= maxStages; stages++) {
              const s = m.stage(first, last, stages === 1, stages);
              const layout: MlxRankLayout = { mode: stages > 1 ? 'pipeline' : 'single', ranks: stages, firstLayer: first, lastLayer: last };
              const b = mlxRankBudget(p, layout, ctx);
              expect(s).toEqual({ weights: b.weights, kv: b.kv, compute: b.transient, overhead: MLX_RANK_OVERHEAD_BYTES, total: b.peak + MLX_RANK_OVERHEAD_BYTES });
              const bound = layers + (stages > 1 ? m.workerFixed.total : m.headConstSingle);
              // Exact at the rank count the constants were taken for; a bound below it.
              if (stages === maxStages || stages === 1) expect(s.total).toBe(bound);
              else expect(s.total).toBeLessThanOrEqual(bound);
            }
          }
        }
      }
    });
  }

  it('MoE reads only the routed experts per token but holds all of them', () => {
    const m = mlxStageMemory(MODELS.moe, { ctx: 256, kvFill: 0 }, 2);
    const kv = 256 * (H / 2 + H / 2) * 2;
    const experts = 3 * 8 * 256 * H * 2;
    expect(m.layerBytes[0]).toBe(MODELS.moe.layers[0]!.weightBytes + kv);
    expect(m.layerBytes[0]! - kv - m.layerRead[0]!).toBe(experts * (6 / 8));
  });
});

/** Every plan of ≤ 2 nodes by brute force: is there a split whose exact stages fit? */
function bruteFits(m: StageMemory, budgets: readonly number[]): boolean {
  if (budgets.some((b) => m.stage(0, L - 1, true, 1).total <= b)) return true;
  for (let a = 0; a < budgets.length; a++) {
    for (let h = 0; h < budgets.length; h++) {
      if (a === h) continue;
      for (let k = 1; k < L; k++) if (m.stage(0, k - 1, false, 2).total <= budgets[a]! && m.stage(k, L - 1, true, 2).total <= budgets[h]!) return true;
    }
  }
  return false;
}

describe('MLX placement budgets with the MLX memory model', () => {
  for (const [name, p] of Object.entries(MODELS)) {
    it(`${name}: on one or two nodes a plan exists exactly when some split fits, and every stage is within its budget`, () => {
      const random = seededRandom(name.length);
      let fits = 0;
      let refused = 0;
      for (const ctx of [256, 2049, 8192]) {
        const m = mlxStageMemory(p, { ctx, kvFill: 0.5 }, 2);
        const alone = m.stage(0, L - 1, true, 1).total;
        for (let trial = 0; trial < 90; trial++) {
          const n = trial % 3 === 0 ? 1 : 2;
          const budgets = Array.from({ length: n }, () => Math.round(alone * (0.3 + random())));
          const nodes = budgets.map((budgetBytes, i) => ({ name: `n${i}`, budgetBytes, bandwidthBytesPerSecond: (1 + (i % 2)) * 100e9 }));
          const plan = planPlacement(p, nodes, { ctx, ...mlxPlacementOptions() });
          expect(plan.fits).toBe(bruteFits(m, budgets));
          if (!plan.fits) {
            refused++;
            continue;
          }
          fits++;
          for (const [i, s] of plan.stages.entries()) {
            expect(s.lastLayer).toBeGreaterThanOrEqual(s.firstLayer);
            expect(s.bytes).toEqual(m.stage(s.firstLayer, s.lastLayer, i === plan.stages.length - 1, plan.stages.length));
            expect(s.bytes.total).toBeLessThanOrEqual(s.budgetBytes);
          }
        }
      }
      // Both outcomes were exercised.
      expect(fits).toBeGreaterThan(30);
      expect(refused).toBeGreaterThan(15);
    });
  }

  it('more nodes: every stage is within budget, and a split needing fewer ranks than nodes is still found', () => {
    const p = MODELS.dense;
    const ctx = 4096;
    const two = mlxStageMemory(p, { ctx, kvFill: 0.5 }, 2);
    // Budgets that hold a 3 + 3 split at two ranks' all_gather exactly, and a third node holding nothing.
    const nodes = [
      { name: 'a', budgetBytes: two.stage(0, 2, false, 2).total, bandwidthBytesPerSecond: 100e9 },
      { name: 'b', budgetBytes: two.stage(3, L - 1, true, 2).total, bandwidthBytesPerSecond: 100e9 },
      { name: 'tiny', budgetBytes: 2 ** 20, bandwidthBytesPerSecond: 100e9 },
    ];
    // At three ranks the same split is over budget (a pipeline rank gathers every rank's hidden states).
    const three = mlxStageMemory(p, { ctx, kvFill: 0.5 }, 3);
    expect(three.stage(0, 2, false, 3).total).toBeGreaterThan(nodes[0]!.budgetBytes);
    const plan = planPlacement(p, nodes, { ctx, ...mlxPlacementOptions() });
    expect(plan.fits).toBe(true);
    // Head and worker ranks hold the same (every rank holds embedding and head): a and b are interchangeable.
    expect(plan.stages.map((s) => [s.firstLayer, s.lastLayer])).toEqual([[0, 2], [3, 5]]);
    expect(plan.stages.map((s) => s.node).sort()).toEqual(['a', 'b']);
    expect(plan.stages.every((s) => s.headroomBytes === 0)).toBe(true);
    const random = seededRandom(7);
    for (let trial = 0; trial < 60; trial++) {
      const n = 3 + (trial % 2);
      const many = Array.from({ length: n }, (_, i) => ({ name: `n${i}`, budgetBytes: Math.round(two.stage(0, L - 1, true, 1).total * (0.15 + random() * 0.6)), bandwidthBytesPerSecond: 100e9 * (1 + random()) }));
      const q = planPlacement(MODELS.moe, many, { ctx, ...mlxPlacementOptions() });
      const m = mlxStageMemory(MODELS.moe, { ctx, kvFill: 0.5 }, n);
      for (const [i, s] of q.stages.entries()) {
        expect(s.bytes).toEqual(m.stage(s.firstLayer, s.lastLayer, i === q.stages.length - 1, q.stages.length));
        expect(s.bytes.total).toBeLessThanOrEqual(s.budgetBytes);
      }
    }
  });

  it('a plan without the MLX engine option keeps llama.cpp’s memory rule (the two differ)', () => {
    const nodes = [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }];
    const llama = planPlacement(MODELS.dense, nodes, { ctx: 4096 }).stages[0]!.bytes;
    const mlx = planPlacement(MODELS.dense, nodes, { ctx: 4096, ...mlxPlacementOptions() }).stages[0]!.bytes;
    expect(mlx.overhead).toBe(MLX_RANK_OVERHEAD_BYTES);
    expect(mlx).not.toEqual(llama);
    expect(mlx.total).toBe(mlxRankBudget(MODELS.dense, { mode: 'single', ranks: 1, firstLayer: 0, lastLayer: L - 1 }, 4096).peak + MLX_RANK_OVERHEAD_BYTES);
  });
});

describe('MLX tensor parallel budgets with the MLX memory model', () => {
  const base = { readBytesPerToken: 8e9, bandwidthBytesPerSecond: 400e9, linkSeconds: 1e-6, linkBytesPerSecond: 10e9, linkSource: 'assumed: test link' };
  for (const [name, p] of Object.entries(MODELS)) {
    it(`${name}: each rank holds the tensor rank's budget; a node that cannot is named, tensor refused, auto falls back`, () => {
      const ctx = 2049;
      const whole = mlxRankBudget(p, { mode: 'single', ranks: 1, firstLayer: 0, lastLayer: L - 1 }, ctx).peak;
      for (const ranks of [2, 4]) {
        const share = mlxRankBudget(p, { mode: 'tensor', ranks, firstLayer: 0, lastLayer: L - 1 }, ctx).peak + MLX_RANK_OVERHEAD_BYTES;
        expect(share - MLX_RANK_OVERHEAD_BYTES).toBeLessThan(whole);
        const stages = Array.from({ length: ranks }, (_, i) => ({ node: `n${i}`, budgetBytes: share }));
        const ok = mlxTensorFit(p, stages, ctx);
        expect(ok.bytes.total).toBe(share);
        expect(ok.overBudget).toEqual([]);
        const tight = mlxTensorFit(p, stages.map((s, i) => (i === 1 ? { ...s, budgetBytes: share - 1 } : s)), ctx);
        expect(tight.overBudget).toHaveLength(1);
        expect(tight.overBudget[0]).toMatch(/^n1 cannot hold its tensor share \(.+ per rank, budget .+\)$/);
        const input = { ...base, ranks, profile: p };
        expect(chooseParallelism({ ...input, requested: 'auto', overBudget: ok.overBudget }).mode).toBe('tensor');
        expect(() => chooseParallelism({ ...input, requested: 'tensor', overBudget: tight.overBudget })).toThrow(UsageError);
        expect(() => chooseParallelism({ ...input, requested: 'tensor', overBudget: tight.overBudget })).toThrow(/n1 cannot hold its tensor share/);
        const auto = chooseParallelism({ ...input, requested: 'auto', overBudget: tight.overBudget });
        expect(auto).toEqual({ mode: 'pipeline', reason: expect.stringMatching(/^auto: pipeline, tensor parallel is impossible \(n1 cannot hold/) });
      }
    });
  }

  it('a tensor plan carries each rank’s bytes and the headroom they leave', () => {
    const p = MODELS.dense;
    const plan = planPlacement(p, [{ name: 'a', budgetBytes: 3e8, bandwidthBytesPerSecond: 1e11 }, { name: 'b', budgetBytes: 3e8, bandwidthBytesPerSecond: 1e11 }], { ctx: 256, ...mlxPlacementOptions() });
    const fit = mlxTensorFit(p, plan.stages, 256);
    const tensor = asTensorPlan(plan, fit.bytes);
    for (const s of tensor.stages) {
      expect(s.bytes).toEqual(fit.bytes);
      expect(s.headroomBytes).toBe(s.budgetBytes - fit.bytes.total);
    }
  });
});
