import { describe, expect, it } from 'vitest';
import { memoryModel } from '../../src/shared/memory/stage.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { presetHeader, shapeHeader } from '../../src/shared/model/shapes.ts';
import { DECODE_EFFICIENCY, boundarySeconds, bytesPerWeight, calibrationRates, effectiveBandwidth, layerPrefillFlops, linkOf, prefillSeconds } from '../../src/shared/placement/cost.ts';
import { fitDecodeCost } from '../../src/shared/placement/decode-fit.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../../src/shared/placement/types.ts';

describe('cost model', () => {
  it('effective bandwidth: a measurement wins, else spec × the engine efficiency', () => {
    expect(effectiveBandwidth(800e9, 'llama.cpp')).toBe(800e9 * DECODE_EFFICIENCY['llama.cpp']);
    expect(effectiveBandwidth(800e9, 'mlx')).toBe(800e9 * DECODE_EFFICIENCY.mlx);
    expect(effectiveBandwidth(800e9, 'llama.cpp', 123e9)).toBe(123e9);
    // The published llama.cpp figures put decode at 50–75 % of spec; MLX a little higher.
    expect(DECODE_EFFICIENCY['llama.cpp']).toBeGreaterThanOrEqual(0.5);
    expect(DECODE_EFFICIENCY['llama.cpp']).toBeLessThanOrEqual(0.75);
    expect(DECODE_EFFICIENCY.mlx).toBeGreaterThanOrEqual(DECODE_EFFICIENCY['llama.cpp']);
  });

  it('prefill FLOPs: ~2 per weight plus attention that grows with the prompt', () => {
    const p = modelProfile(presetHeader('llama-3-8b', 'f16'));
    expect(bytesPerWeight('F16')).toBe(2);
    expect(bytesPerWeight('Q4_K')).toBe(144 / 256);
    expect(bytesPerWeight('Q4g64')).toBe((4 + 0.5) / 8);
    const short = layerPrefillFlops(p, 1).reduce((a, b) => a + b, 0);
    const long = layerPrefillFlops(p, 8192).reduce((a, b) => a + b, 0);
    // Llama-3 8B has ~7.0e9 weights in its layers (the rest is embeddings and the output head).
    expect(short / 2).toBeGreaterThan(6.5e9);
    expect(short / 2).toBeLessThan(7.5e9);
    // At 8k tokens attention adds 32 layers × 2 × 32 heads × 256 × ~4096 positions ≈ 2.1e9 FLOPs per token.
    expect(long - short).toBeGreaterThan(1.9e9);
    expect(long - short).toBeLessThan(2.4e9);
  });

  it('a calibration reproduces its own measurement through the planner', () => {
    const p = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
    const o = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: 1024, promptTokens: 128 };
    const mm = memoryModel(p, o, o.kvFill);
    const readBytesPerToken = mm.layerRead.reduce((a, b) => a + b, 0) + p.outputBytes + p.outputNormBytes + p.otherBytes + p.tokenEmbdRowBytes;
    const measured = { decodeTokensPerSecond: 9.5, promptTokensPerSecond: 61, promptTokens: 128, readBytesPerToken };
    const c = calibrationRates(p, measured, o.headOverheadSeconds);
    const plan = planPlacement(p, [{ name: 'me', budgetBytes: 64 * 2 ** 30, bandwidthBytesPerSecond: c.effectiveBandwidthBytesPerSecond, prefillFlopsPerSecond: c.prefillFlopsPerSecond }], o);
    expect(plan.predicted.tokensPerSecond).toBeCloseTo(9.5, 9);
    // TTFT = the measured prompt time + the head's fixed overhead.
    expect(plan.predicted.ttftSeconds).toBeCloseTo(128 / 61 + o.headOverheadSeconds, 9);
  });

  it('a two-depth calibration reproduces both depths through the planner, and its fixed part is charged at the head', () => {
    const o = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: 1024 };
    const at = (layers: number) => {
      const p = modelProfile(shapeHeader({ name: `d${layers}`, arch: 'llama', layers, embd: 1024, ffn: 2816, heads: 16, kvHeads: 4, vocab: 32000, ctx: 1024 }, 'f16'));
      const mm = memoryModel(p, o, o.kvFill);
      return { p, bytes: mm.layerRead.reduce((a, b) => a + b, 0) + p.outputBytes + p.outputNormBytes + p.otherBytes + p.tokenEmbdRowBytes };
    };
    const [shallow, deep] = [at(4), at(12)];
    // An engine that pays 6 ms per token whatever it reads, and reads at 20 GB/s.
    const seconds = (b: number) => 0.006 + b / 20e9;
    const fit = fitDecodeCost([shallow, deep].map((d) => ({ bytesPerToken: d.bytes, secondsPerToken: seconds(d.bytes) })));
    const c = calibrationRates(deep.p, { decodeTokensPerSecond: 1 / seconds(deep.bytes), promptTokensPerSecond: 50, promptTokens: 128, readBytesPerToken: deep.bytes }, fit.fixedSecondsPerToken);
    expect(c.effectiveBandwidthBytesPerSecond / 20e9).toBeCloseTo(1, 9);
    const node = { name: 'me', budgetBytes: 64 * 2 ** 30, bandwidthBytesPerSecond: c.effectiveBandwidthBytesPerSecond, decodeFixedSecondsPerToken: fit.fixedSecondsPerToken };
    // The model 3× as deep is priced as the engine decodes it; a one-depth bandwidth prices it slower.
    const deeper = at(36);
    expect(planPlacement(deeper.p, [node], o).predicted.secondsPerToken).toBeCloseTo(seconds(deeper.bytes), 9);
    const oneDepth = calibrationRates(deep.p, { decodeTokensPerSecond: 1 / seconds(deep.bytes), promptTokensPerSecond: 50, promptTokens: 128, readBytesPerToken: deep.bytes }, o.headOverheadSeconds);
    const unfitted = { ...node, bandwidthBytesPerSecond: oneDepth.effectiveBandwidthBytesPerSecond, decodeFixedSecondsPerToken: undefined };
    expect(planPlacement(deeper.p, [unfitted], o).predicted.secondsPerToken).toBeGreaterThan(seconds(deeper.bytes) * 1.05);
  });
});

describe('prefill through a pipeline (cost.ts prefillSeconds)', () => {
  it('one ubatch, one stage, or no pipelining: the plain sum of stages and boundaries', () => {
    expect(prefillSeconds([3, 2, 1], [0.5, 0.25], 1, 0.1, true)).toBeCloseTo(6.75, 12);
    expect(prefillSeconds([3, 2, 1], [0.5, 0.25], 8, 0.1, false)).toBeCloseTo(6.75, 12);
    expect(prefillSeconds([4], [], 8, 0.1, true)).toBeCloseTo(4, 12);
  });

  it('ubatches overlap only on the last stage: T = A + c + (U − 1)·max(A, c)', () => {
    // Two equal stages of 8 s in 8 ubatches: 1 s each per ubatch, 9 ubatch-steps.
    expect(prefillSeconds([8, 8], [0], 8, 0, true)).toBeCloseTo(9, 12);
    // Three equal stages: the first two and their boundaries form the chain (2 s per ubatch).
    expect(prefillSeconds([8, 8, 8], [0, 0], 8, 0, true)).toBeCloseTo(2 + 1 + 7 * 2, 12);
    // Boundaries belong to the chain; a last stage slower than the chain sets the pace instead.
    expect(prefillSeconds([4, 4], [4], 4, 0, true)).toBeCloseTo(2 + 1 + 3 * 2, 12);
    expect(prefillSeconds([2, 12], [0], 4, 0, true)).toBeCloseTo(0.5 + 3 + 3 * 3, 12);
    // The head's logits are computed once, after the last ubatch.
    expect(prefillSeconds([8, 8.5], [0], 8, 0.5, true)).toBeCloseTo(9.5, 12);
  });

  it('the planner predicts a split prompt with the overlap, and a single-ubatch one as the sum', () => {
    const p = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
    const nodes = ['a', 'b'].map((name) => ({ name, budgetBytes: 6 * 2 ** 30, bandwidthBytesPerSecond: 100e9, prefillFlopsPerSecond: 1e12, linkBytesPerSecond: 1e9 }));
    const at = (promptTokens: number, pipelinedPrefill = true) => planPlacement(p, nodes, { ctx: 8192, promptTokens, pipelinedPrefill });
    const long = at(4096);
    expect(long.stages.length).toBe(2);
    const sum = (plan: ReturnType<typeof at>) => plan.stages.reduce((t, s) => t + s.prefillSeconds, 0);
    const plain = at(4096, false);
    expect(plain.stages).toEqual(long.stages);
    expect(long.predicted.ttftSeconds).toBeLessThan(0.7 * plain.predicted.ttftSeconds);
    expect(plain.predicted.ttftSeconds).toBeGreaterThan(sum(plain));
    const short = at(512);
    expect(short.predicted.ttftSeconds).toBeCloseTo(at(512, false).predicted.ttftSeconds, 12);
  });
});

describe('a boundary round trip: the link plus the worker\'s measured overhead (cost.ts linkOf, boundarySeconds)', () => {
  const profile = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
  const o = { ...DEFAULT_PLACEMENT_OPTIONS, promptTokens: 2048 };
  const worker = { name: 'w', budgetBytes: 64 * 2 ** 30, bandwidthBytesPerSecond: 400e9, links: { h: { rttSeconds: 0.4e-3, bytesPerSecond: 1e9 } } };

  it('adds the worker\'s overhead once per decoded token and once per prompt ubatch', () => {
    const plain = boundarySeconds(profile, worker, o, 'h');
    const measured = boundarySeconds(profile, { ...worker, boundaryOverheadSeconds: 2e-3 }, o, 'h');
    expect(measured.decode - plain.decode).toBeCloseTo(2e-3, 12);
    expect(measured.prefill - plain.prefill).toBeCloseTo(Math.ceil(2048 / o.ubatch) * 2e-3, 12);
    expect(linkOf({ ...worker, boundaryOverheadSeconds: 2e-3 }, o, 'h').rttSeconds).toBeCloseTo(2.4e-3, 12);
  });

  it('charges the options\' assumption (0 by default) where the worker has not measured it, on assumed links too', () => {
    expect(linkOf(worker, o, 'h').rttSeconds).toBe(0.4e-3);
    expect(linkOf(worker, { ...o, boundaryOverheadSeconds: 1e-3 }, 'h').rttSeconds).toBeCloseTo(1.4e-3, 12);
    expect(linkOf({ ...worker, boundaryOverheadSeconds: 3e-3 }, o).rttSeconds).toBeCloseTo(o.hopSeconds + 3e-3, 12);
  });

  it('is not charged to MLX ranks: their activations go over the ring, through no engine tunnel', () => {
    const mlx = { ...o, engine: 'mlx' as const };
    expect(linkOf({ ...worker, boundaryOverheadSeconds: 2e-3 }, mlx, 'h').rttSeconds).toBe(0.4e-3);
  });

  it('moves the planner: a worker whose boundaries cost more is passed over for one whose boundaries cost less', () => {
    // Two equal workers, a head too small for the model: the plan takes the worker with the cheaper boundary.
    const big = { budgetBytes: 64 * 2 ** 30, bandwidthBytesPerSecond: 400e9 };
    const nodes = [
      { name: 'head', budgetBytes: 3 * 2 ** 30, bandwidthBytesPerSecond: 400e9 },
      { name: 'slow-tunnel', ...big, boundaryOverheadSeconds: 5e-3 },
      { name: 'fast-tunnel', ...big, boundaryOverheadSeconds: 0.1e-3 },
    ];
    const plan = planPlacement(profile, nodes, { pinned: ['head'] });
    expect(plan.stages.map((s) => s.node)).toContain('fast-tunnel');
    expect(plan.stages.map((s) => s.node)).not.toContain('slow-tunnel');
  });
});
