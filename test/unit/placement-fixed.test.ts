import { describe, expect, it } from 'vitest';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { presetHeader } from '../../src/shared/model/shapes.ts';
import { freeMemoryProportionalPlan } from '../../src/shared/placement/baselines.ts';
import { planFixedSplit } from '../../src/shared/placement/fixed.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import type { PlacementNode } from '../../src/shared/placement/types.ts';

const GiB = 2 ** 30;
const profile = modelProfile(presetHeader('llama-3-70b', 'q4_k_m'));
const link = (rttSeconds: number, bytesPerSecond: number) => ({ rttSeconds, bytesPerSecond });
const nodes: PlacementNode[] = [
  { name: 'fast', budgetBytes: 30 * GiB, bandwidthBytesPerSecond: 400e9, prefillFlopsPerSecond: 10e12, links: { slow: link(0.002, 100e6), mid: link(0.0005, 1e9) } },
  { name: 'mid', budgetBytes: 30 * GiB, bandwidthBytesPerSecond: 300e9, links: { fast: link(0.0005, 1e9), slow: link(0.002, 100e6) } },
  { name: 'slow', budgetBytes: 60 * GiB, bandwidthBytesPerSecond: 100e9, links: { fast: link(0.002, 100e6), mid: link(0.002, 100e6) } },
];
const options = { ctx: 4096, promptTokens: 512 };

describe('a fixed split costed by the planner', () => {
  it("reproduces the planner's own prediction for the planner's own split, TTFT included", () => {
    const plan = planPlacement(profile, nodes, options);
    expect(plan.fits).toBe(true);
    expect(plan.stages.length).toBeGreaterThan(1);
    const again = planFixedSplit(profile, nodes, plan.stages, options);
    expect(again.stages.map((s) => [s.node, s.firstLayer, s.lastLayer])).toEqual(plan.stages.map((s) => [s.node, s.firstLayer, s.lastLayer]));
    expect(again.predicted.secondsPerToken).toBeCloseTo(plan.predicted.secondsPerToken, 12);
    expect(again.predicted.ttftSeconds).toBeCloseTo(plan.predicted.ttftSeconds, 12);
    expect(again.predicted.hopSeconds).toBeCloseTo(plan.predicted.hopSeconds, 12);
  });

  it('charges each boundary on its measured link to the head, so a baseline split is predicted slower', () => {
    const counts = freeMemoryProportionalPlan(profile, nodes, nodes.map((n) => n.budgetBytes), options);
    const llama = planFixedSplit(profile, nodes, counts.stages, options);
    const orchard = planPlacement(profile, nodes, options);
    expect(llama.stages.map((s) => s.node)).toEqual(['fast', 'mid', 'slow']);
    // fast → slow and mid → slow: two boundaries on 2 ms / 100 MB/s links (2 rows each per token,
    // and llama.cpp's f16 mask over half the 4096 cells + 20 B of positions and cell indices)
    const row = 2 * profile.embd * 4 + 2 * 2048 + 20;
    expect(llama.predicted.hopSeconds).toBeCloseTo(2 * (0.002 + row / 100e6), 12);
    expect(llama.predicted.tokensPerSecond).toBeLessThan(orchard.predicted.tokensPerSecond);
    // the prompt's rows cross the same links: P rows twice per boundary, one round trip per ubatch
    expect(llama.predicted.ttftSeconds).toBeGreaterThan(orchard.predicted.ttftSeconds);
  });

  it('keeps a stage over budget and says so', () => {
    const small = nodes.map((n) => ({ ...n, budgetBytes: 10 * GiB }));
    const plan = planFixedSplit(profile, small, [
      { node: 'fast', firstLayer: 0, lastLayer: 39 },
      { node: 'slow', firstLayer: 40, lastLayer: profile.layerCount - 1 },
    ], options);
    expect(plan.stages.every((s) => s.headroomBytes < 0)).toBe(true);
    expect(plan.reasons.join()).toMatch(/over budget on fast, slow/);
  });

  it('refuses splits that skip, repeat or miss layers, or name unknown nodes', () => {
    const L = profile.layerCount;
    expect(() => planFixedSplit(profile, nodes, [{ node: 'fast', firstLayer: 0, lastLayer: L - 2 }], options)).toThrow(/covers layers 0–78 of 80/);
    expect(() => planFixedSplit(profile, nodes, [{ node: 'fast', firstLayer: 0, lastLayer: 9 }, { node: 'mid', firstLayer: 11, lastLayer: L - 1 }], options)).toThrow(/does not continue at layer 10/);
    expect(() => planFixedSplit(profile, nodes, [{ node: 'nope', firstLayer: 0, lastLayer: L - 1 }], options)).toThrow(/not among the nodes/);
    expect(() => planFixedSplit(profile, nodes, [{ node: 'fast', firstLayer: 0, lastLayer: 9 }, { node: 'fast', firstLayer: 10, lastLayer: L - 1 }], options)).toThrow(/one stage at most/);
    // a head with no layers is a valid llama.cpp layout (workers hold every layer)
    expect(planFixedSplit(profile, nodes, [{ node: 'slow', firstLayer: 0, lastLayer: L - 1 }, { node: 'fast', firstLayer: L, lastLayer: L - 1 }], options).stages.length).toBe(2);
  });
});
