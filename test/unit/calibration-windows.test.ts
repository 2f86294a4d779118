import { describe, expect, it } from 'vitest';
import {
  anotherWindow,
  CALIBRATION_WINDOWS,
  competingCores,
  MAX_WAITED_FRACTION,
  measuredUnderContention,
  median,
  relativeSpread,
  repricedTokensPerSecond,
  uncontendedRate,
  WINDOW_TOKENS,
  waitedFraction,
  windowTokens,
} from '../../src/shared/placement/calibration.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { presetHeader } from '../../src/shared/model/shapes.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';

describe('engine measurement windows', () => {
  it('a window lasts about a second of decoding, within the token bounds and the context left', () => {
    expect(windowTokens(95)).toBe(95);
    expect(windowTokens(3)).toBe(WINDOW_TOKENS.min);
    expect(windowTokens(5000)).toBe(WINDOW_TOKENS.max);
    expect(windowTokens(5000, 300)).toBe(300);
    expect(windowTokens(Number.NaN)).toBe(WINDOW_TOKENS.min);
  });

  it('takes the minimum, then more while the budget lasts, never past the maximum', () => {
    const p = { min: 3, max: 7, budgetSeconds: 12 };
    expect(anotherWindow(p, 0, 0)).toBe(true);
    // Slow windows: the minimum is taken even past the budget.
    expect(anotherWindow(p, 2, 30)).toBe(true);
    expect(anotherWindow(p, 3, 30)).toBe(false);
    // 1 s windows: the fourth starts (expected to end at 4 s), up to the maximum.
    expect(anotherWindow(p, 3, 3)).toBe(true);
    expect(anotherWindow(p, 7, 7)).toBe(false);
    // 2.5 s windows: the fifth would end at 12.5 s, past the budget.
    expect(anotherWindow(p, 4, 10)).toBe(false);
    expect(anotherWindow(p, 4, 9)).toBe(true);
    // The calibration's bound: at most max windows of ~1 s, or min windows whatever they cost.
    let taken = 0;
    while (anotherWindow(CALIBRATION_WINDOWS, taken, taken * 1.1)) taken++;
    expect(taken).toBe(CALIBRATION_WINDOWS.max);
  });

  it('median and spread of the windows', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([])).toBeNaN();
    // One window caught by a load spike moves the median by one rank, not by its size.
    expect(median([60, 61, 20, 59, 62])).toBe(60);
    expect(relativeSpread([90, 100, 110])).toBeCloseTo(0.1);
    expect(relativeSpread([50])).toBe(0);
  });

  it('competing cores: the machine busy time the engine did not use, per second', () => {
    const before = { wallSeconds: 100, machineBusySeconds: 1000, engineSeconds: 50 };
    // 10 s: the machine was busy 18 CPU-seconds, 9.5 of them the engine's.
    expect(competingCores(before, { wallSeconds: 110, machineBusySeconds: 1018, engineSeconds: 59.5 })).toBeCloseTo(0.85);
    // Quiet: only the engine ran (counter granularity can leave it a hair above the machine).
    expect(competingCores(before, { wallSeconds: 110, machineBusySeconds: 1010, engineSeconds: 60.01 })).toBe(0);
    expect(competingCores(before, before)).toBe(0);
  });

  it('waited fraction: the part of a window the engine spent runnable but without a core', () => {
    const at = (wall: number, wait?: number) => ({ wallSeconds: wall, machineBusySeconds: 0, engineSeconds: 0, ...(wait === undefined ? {} : { engineWaitSeconds: wait }) });
    // 2 s window, 0.5 s of it waiting for a core.
    expect(waitedFraction(at(10, 1), at(12, 1.5))).toBeCloseTo(0.25, 12);
    // No schedstat (macOS): nothing known, nothing taken off.
    expect(waitedFraction(at(10), at(12))).toBe(0);
    // Counter going backwards or no time passed: 0, never negative or NaN.
    expect(waitedFraction(at(10, 2), at(12, 1))).toBe(0);
    expect(waitedFraction(at(10, 1), at(10, 2))).toBe(0);
    // An engine that hardly ran is capped, not divided by ~0.
    expect(waitedFraction(at(10, 0), at(11, 5))).toBe(MAX_WAITED_FRACTION);
  });

  it('an uncontended rate: the same work in the part of the window the engine ran', () => {
    // 10 tok/s over a window it waited a quarter of: its work took 0.75 of the time.
    expect(uncontendedRate(10, 0.25)).toBeCloseTo(10 / 0.75, 12);
    expect(uncontendedRate(10, 0)).toBe(10);
    expect(uncontendedRate(10, -0.1)).toBe(10);
    expect(uncontendedRate(10, 0.99)).toBeCloseTo(10 / (1 - MAX_WAITED_FRACTION), 12);
    // Round trip with waitedFraction: 2 s of wall, 0.5 s waiting, 30 tokens → 20 tok/s of engine time.
    const w = waitedFraction({ wallSeconds: 0, machineBusySeconds: 0, engineSeconds: 0, engineWaitSeconds: 0 }, { wallSeconds: 2, machineBusySeconds: 0, engineSeconds: 0, engineWaitSeconds: 0.5 });
    expect(uncontendedRate(30 / 2, w)).toBeCloseTo(30 / 1.5, 12);
  });

  it('a figure measured while others wanted the engine cores counts as contended', () => {
    // 2 cores, 1 engine thread: one core is free for others; beyond it plus half a core, contended.
    expect(measuredUnderContention({ competingCores: 1.0, threads: 1 }, 2)).toBe(false);
    expect(measuredUnderContention({ competingCores: 1.6, threads: 1 }, 2)).toBe(true);
    // Every core for the engine: half a core of others' work is the limit.
    expect(measuredUnderContention({ competingCores: 0.3, threads: 8 }, 8)).toBe(false);
    expect(measuredUnderContention({ competingCores: 0.7, threads: 8 }, 8)).toBe(true);
  });

  it('repricing a plan with another bandwidth scales its stages and keeps hops and the head cost', () => {
    const profile = modelProfile(presetHeader('llama-3-8b', 'f16'));
    const nodes = (bw: number) => [
      { name: 'a', budgetBytes: 10e9, bandwidthBytesPerSecond: bw },
      { name: 'b', budgetBytes: 10e9, bandwidthBytesPerSecond: bw },
    ];
    const plan = planPlacement(profile, nodes(100e9), { ctx: 1024, cacheType: 'f16', parallel: 1 });
    expect(plan.stages).toHaveLength(2);
    // The same plan made at the other bandwidth predicts what the repricing does.
    const other = planPlacement(profile, nodes(40e9), { ctx: 1024, cacheType: 'f16', parallel: 1 });
    expect(other.stages.map((s) => [s.firstLayer, s.lastLayer])).toEqual(plan.stages.map((s) => [s.firstLayer, s.lastLayer]));
    expect(repricedTokensPerSecond(plan, 40e9)).toBeCloseTo(other.predicted.tokensPerSecond, 6);
    expect(repricedTokensPerSecond(plan, 100e9)).toBeCloseTo(plan.predicted.tokensPerSecond, 6);
  });

  it('repricing with another boundary overhead moves each worker boundary as the planner would have priced it', () => {
    const profile = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
    // No node holds it alone, two cannot either: three stages, two worker boundaries.
    const nodes = (bw: number, overhead: number) =>
      ['a', 'b', 'c'].map((name) => ({ name, budgetBytes: 3.6e9, bandwidthBytesPerSecond: bw, boundaryOverheadSeconds: overhead }));
    const o = { ctx: 1024, cacheType: 'f16' as const, parallel: 1 };
    const plan = planPlacement(profile, nodes(100e9, 0.5e-3), o);
    expect(plan.stages.filter((s) => s.role === 'worker').length).toBe(2);
    const other = planPlacement(profile, nodes(40e9, 2.5e-3), o);
    expect(other.stages.map((s) => [s.node, s.firstLayer, s.lastLayer])).toEqual(plan.stages.map((s) => [s.node, s.firstLayer, s.lastLayer]));
    expect(repricedTokensPerSecond(plan, 40e9, { plannedSeconds: 0.5e-3, measuredSeconds: 2.5e-3 })).toBeCloseTo(other.predicted.tokensPerSecond, 6);
    expect(repricedTokensPerSecond(plan, 100e9, { plannedSeconds: 0.5e-3, measuredSeconds: 0.5e-3 })).toBeCloseTo(plan.predicted.tokensPerSecond, 6);
  });
});
