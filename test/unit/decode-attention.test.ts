import { describe, expect, it } from 'vitest';
import { memoryModel } from '../../src/shared/memory/stage.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { presetHeader, shapeHeader } from '../../src/shared/model/shapes.ts';
import { repricedTokensPerSecond } from '../../src/shared/placement/calibration.ts';
import { calibrationRates, decodeContextTokens, layerAttentionFlops } from '../../src/shared/placement/cost.ts';
import { decodeAttentionRate, fitDecodeCost, windowContextTokens } from '../../src/shared/placement/decode-fit.ts';
import { planFixedSplit } from '../../src/shared/placement/fixed.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { DEFAULT_PLACEMENT_OPTIONS, type PlacementNode } from '../../src/shared/placement/types.ts';

/**
 * Decode attention (cost.ts, decode-fit.ts): a decoded token attends to every earlier position,
 * which on a CPU engine costs far more than the KV bytes the reads count, so a node's calibration
 * measures its rate and the planner prices it at a plan's own context.
 */

const sum = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0);
const shape = (layers: number, arch: 'llama' | 'gemma2' = 'llama') =>
  modelProfile(shapeHeader({ name: `d${layers}`, arch, layers, embd: 1024, ffn: 2816, heads: 16, kvHeads: 4, vocab: 32000, ctx: 8192 }, 'f16'));

describe('decode attention', () => {
  it('a token attends to its request\'s positions: P + (n + 1) ÷ 2 on average, capped by the cells; kvFill of them without a prompt', () => {
    const o = { ...DEFAULT_PLACEMENT_OPTIONS, kvFill: 0.5 };
    // positions P … P + n − 1, a token at p attends to p + 1: mean P + (n + 1) / 2
    expect(decodeContextTokens({ ...o, promptTokens: 16, outputTokens: 24 }, 1024)).toBe(16 + 12.5);
    expect(decodeContextTokens({ ...o, promptTokens: 1000, outputTokens: 100 }, 1024)).toBe(1024);
    expect(decodeContextTokens({ ...o, promptTokens: 0, outputTokens: 100 }, 1024)).toBe(512);
    expect(decodeContextTokens({ ...o, promptTokens: 7, outputTokens: 0 }, 1024)).toBe(8);
    expect(windowContextTokens(128, 31)).toBe(144);
  });

  it('FLOPs per decoded token: 2 × heads × (headDimK + headDimV) per position and layer; a sliding-window layer stops at its window', () => {
    const p = shape(2);
    expect(layerAttentionFlops(p, 100)).toEqual([2 * 16 * 128 * 100, 2 * 16 * 128 * 100]);
    const g = shape(4, 'gemma2');
    const flops = layerAttentionFlops(g, 6000);
    const window = g.swa!.window;
    expect(g.layers.some((l) => l.swa)).toBe(true);
    expect(flops).toEqual(g.layers.map((l) => 2 * g.heads * (g.headDimK + g.headDimV) * (l.swa ? window : 6000)));
  });

  it('the rate from two contexts: the extra seconds ÷ the extra FLOPs; none when the longer context was not slower', () => {
    expect(decodeAttentionRate({ decodeTokensPerSecond: 1 / 0.03, attentionFlopsPerToken: 7e6 }, { decodeTokensPerSecond: 1 / 0.028, attentionFlopsPerToken: 3e6 })).toBeCloseTo(4e6 / 0.002, 3);
    expect(decodeAttentionRate({ decodeTokensPerSecond: 35, attentionFlopsPerToken: 7e6 }, { decodeTokensPerSecond: 35, attentionFlopsPerToken: 3e6 })).toBeUndefined();
    expect(decodeAttentionRate({ decodeTokensPerSecond: 36, attentionFlopsPerToken: 7e6 }, { decodeTokensPerSecond: 35, attentionFlopsPerToken: 3e6 })).toBeUndefined();
    expect(decodeAttentionRate({ decodeTokensPerSecond: 30, attentionFlopsPerToken: 3e6 }, { decodeTokensPerSecond: 35, attentionFlopsPerToken: 3e6 })).toBeUndefined();
    // A step smaller than the windows' scatter is not a measurement: 2 ms slower, windows ±5 % of ~30 ms.
    const step = { long: { decodeTokensPerSecond: 1 / 0.03, attentionFlopsPerToken: 7e6 }, short: { decodeTokensPerSecond: 1 / 0.028, attentionFlopsPerToken: 3e6 } };
    expect(decodeAttentionRate({ ...step.long, decodeSpread: 0.05 }, { ...step.short, decodeSpread: 0.05 })).toBeCloseTo(4e6 / 0.002, 3);
    expect(decodeAttentionRate({ ...step.long, decodeSpread: 0.08 }, { ...step.short, decodeSpread: 0.08 })).toBeUndefined();
  });

  it('a calibration of an engine that pays for attention prices another depth at another context exactly', () => {
    // The engine: 7 ms per token whatever it reads, 17 GB/s, 1.75 GFLOP/s of decode attention.
    const engine = { fixed: 0.007, bandwidth: 17e9, attention: 1.75e9 };
    const o = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: 1024 };
    const bytes = (p: ReturnType<typeof shape>) => sum(memoryModel(p, o, o.kvFill).layerRead) + p.outputBytes + p.outputNormBytes + p.otherBytes + p.tokenEmbdRowBytes;
    const seconds = (p: ReturnType<typeof shape>, context: number) => engine.fixed + bytes(p) / engine.bandwidth + sum(layerAttentionFlops(p, context)) / engine.attention;
    // The calibration's windows: 12 and 24 layers after a 128-token prompt, 12 layers after a 16-token one.
    const [d12, d24] = [shape(12), shape(24)];
    const long = { p: d12, context: windowContextTokens(128, 31) };
    const short = windowContextTokens(16, 37);
    const rate = decodeAttentionRate(
      { decodeTokensPerSecond: 1 / seconds(d12, long.context), attentionFlopsPerToken: sum(layerAttentionFlops(d12, long.context)) },
      { decodeTokensPerSecond: 1 / seconds(d12, short), attentionFlopsPerToken: sum(layerAttentionFlops(d12, short)) },
    )!;
    expect(rate / engine.attention).toBeCloseTo(1, 9);
    const points = [
      { p: d12, context: long.context },
      { p: d24, context: windowContextTokens(128, 19) },
    ].map(({ p, context }) => ({ bytesPerToken: bytes(p), secondsPerToken: seconds(p, context) - sum(layerAttentionFlops(p, context)) / rate }));
    const fit = fitDecodeCost(points);
    expect(fit.fixedSecondsPerToken).toBeCloseTo(engine.fixed, 9);
    // The record's bandwidth: its own depth's rate, less the fixed part and the attention its windows paid.
    const c = calibrationRates(d12, { decodeTokensPerSecond: 1 / seconds(d12, long.context), promptTokensPerSecond: 300, promptTokens: 128, readBytesPerToken: bytes(d12) }, fit.fixedSecondsPerToken + sum(layerAttentionFlops(d12, long.context)) / rate);
    expect(c.effectiveBandwidthBytesPerSecond / engine.bandwidth).toBeCloseTo(1, 9);
    const node: PlacementNode = { name: 'me', budgetBytes: 64 * 2 ** 30, bandwidthBytesPerSecond: c.effectiveBandwidthBytesPerSecond, decodeFixedSecondsPerToken: fit.fixedSecondsPerToken, decodeAttentionFlopsPerSecond: rate };
    // 36 layers, a 12-token prompt and 24 tokens (bench:lan's decode runs), and 36 layers at 900 positions.
    const d36 = shape(36);
    const short36 = planPlacement(d36, [node], { ...o, promptTokens: 12, outputTokens: 24 });
    expect(short36.predicted.secondsPerToken).toBeCloseTo(seconds(d36, 12 + 12.5), 9);
    const long36 = planPlacement(d36, [node], { ...o, promptTokens: 880, outputTokens: 40 });
    expect(long36.predicted.secondsPerToken).toBeCloseTo(seconds(d36, 880 + 20.5), 9);
    // Without a prompt the plan prices kvFill of the context, as the KV reads do.
    expect(planPlacement(d36, [node], o).predicted.secondsPerToken).toBeCloseTo(seconds(d36, 512), 9);
  });

  it('a node that has not measured attention pays only its KV bytes, as before; a split charges each stage its own layers', () => {
    const p = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
    const o = { ctx: 8192, cacheType: 'f16' as const, parallel: 1, promptTokens: 4000, outputTokens: 200 };
    const plain = (name: string): PlacementNode => ({ name, budgetBytes: 6.5e9, bandwidthBytesPerSecond: 100e9 });
    const a = planPlacement(p, [plain('a'), plain('b')], o);
    const b = planPlacement(p, [plain('a'), plain('b')], { ...o, promptTokens: 10 });
    // Without an attention rate the context does not move decode: the KV reads are kvFill of the cache's, as before.
    expect(b.predicted.secondsPerToken).toBe(a.predicted.secondsPerToken);
    // With one, each stage pays its layers' attention at its rate: the same split, priced stage by stage.
    const nodes = [
      { ...plain('a'), decodeAttentionFlopsPerSecond: 50e9 },
      { ...plain('b'), decodeAttentionFlopsPerSecond: 200e9 },
    ];
    const layout = a.stages.map((s) => ({ node: s.node, firstLayer: s.firstLayer, lastLayer: s.lastLayer }));
    const priced = planFixedSplit(p, nodes, layout, o);
    const context = 4000 + 100.5;
    const perLayer = layerAttentionFlops(p, context);
    priced.stages.forEach((s, i) => {
      const rate = nodes.find((n) => n.name === s.node)!.decodeAttentionFlopsPerSecond;
      expect(s.secondsPerToken - s.readBytesPerToken / s.bandwidthBytesPerSecond).toBeCloseTo(sum(perLayer.slice(s.firstLayer, s.lastLayer + 1)) / rate, 12);
      expect(s.node).toBe(a.stages[i]!.node);
    });
    // Repricing another bandwidth keeps what it is told attention costs.
    const attention = priced.stages.reduce((t, s) => t + s.secondsPerToken - s.readBytesPerToken / s.bandwidthBytesPerSecond, 0);
    expect(repricedTokensPerSecond(priced, 100e9, undefined, attention)).toBeCloseTo(priced.predicted.tokensPerSecond, 9);
    expect(repricedTokensPerSecond(priced, 100e9)).toBeGreaterThan(priced.predicted.tokensPerSecond);
  });

  it('the planner weighs attention: a node that attends slowly gets fewer layers when the context is long', () => {
    const p = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
    const o = { ctx: 32768, cacheType: 'f16' as const, parallel: 1, outputTokens: 200 };
    const nodes: PlacementNode[] = [
      { name: 'fast', budgetBytes: 10e9, bandwidthBytesPerSecond: 100e9, decodeAttentionFlopsPerSecond: 400e9 },
      // reads twice as fast, attends twenty times slower
      { name: 'slow', budgetBytes: 10e9, bandwidthBytesPerSecond: 200e9, decodeAttentionFlopsPerSecond: 20e9 },
    ];
    const layersOn = (plan: ReturnType<typeof planPlacement>, n: string) => sum(plan.stages.filter((s) => s.node === n).map((s) => s.lastLayer - s.firstLayer + 1));
    const shortCtx = planPlacement(p, nodes, { ...o, promptTokens: 16 });
    const longCtx = planPlacement(p, nodes, { ...o, promptTokens: 30000 });
    expect(layersOn(longCtx, 'slow')).toBeLessThan(layersOn(shortCtx, 'slow'));
    expect(longCtx.fits && shortCtx.fits).toBe(true);
    expect(layersOn(longCtx, 'slow')).toBeGreaterThan(0);
  });
});
