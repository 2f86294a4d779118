import { describe, expect, it } from 'vitest';
import { UsageError } from '../../src/shared/errors.ts';
import { AUTO_REBALANCE_MIN_GAIN, decideRebalance, parseRebalanceMode, type RebalanceInput } from '../../src/coordinator/instances/rebalance.ts';

const current = [
  { nodeId: 'a', firstLayer: 0, lastLayer: 15 },
  { nodeId: 'b', firstLayer: 16, lastLayer: 31 },
];
const onC = [{ nodeId: 'c', firstLayer: 0, lastLayer: 31 }];
const base: RebalanceInput = { currentTokensPerSecond: 10, currentStages: current, ideal: { tokensPerSecond: 15, stages: onC }, alongside: { tokensPerSecond: 15, stages: onC }, minGain: AUTO_REBALANCE_MIN_GAIN };

describe('rebalance decision', () => {
  it('applies a placement that fits next to the running one and gains at least the threshold', () => {
    const d = decideRebalance(base);
    expect(d.apply).toBe(true);
    expect(d.gain).toBeCloseTo(0.5);
    expect(d.gainNow).toBeCloseTo(0.5);
    expect(d.reason).toMatch(/50 % faster/);
  });

  it('the threshold is inclusive: exactly 20 % applies, 19 % does not', () => {
    expect(decideRebalance({ ...base, ideal: { tokensPerSecond: 12, stages: onC }, alongside: { tokensPerSecond: 12, stages: onC } }).apply).toBe(true);
    const d = decideRebalance({ ...base, ideal: { tokensPerSecond: 11.9, stages: onC }, alongside: { tokensPerSecond: 11.9, stages: onC } });
    expect(d.apply).toBe(false);
    expect(d.reason).toMatch(/19 % is below the 20 % threshold/);
  });

  it('keeps a model already placed as the planner would place it, whatever the numbers say', () => {
    const d = decideRebalance({ ...base, ideal: { tokensPerSecond: 30, stages: current }, alongside: { tokensPerSecond: 30, stages: current } });
    expect(d.apply).toBe(false);
    expect(d.reason).toMatch(/already placed/);
  });

  it('a gain that needs the running engines gone is shown but not applied (no load-new-then-switch without room)', () => {
    const d = decideRebalance({ ...base, alongside: { doesNotFit: 'needs 3.0 GiB more' } });
    expect(d.apply).toBe(false);
    expect(d.gain).toBeCloseTo(0.5);
    expect(d.gainNow).toBeUndefined();
    expect(d.reason).toMatch(/cannot load next to the running one \(needs 3.0 GiB more\)/);
  });

  it('next to the running engines the best placement may gain less than re-planning would: the lesser gain decides', () => {
    const d = decideRebalance({ ...base, alongside: { tokensPerSecond: 11, stages: [{ nodeId: 'c', firstLayer: 0, lastLayer: 20 }, { nodeId: 'b', firstLayer: 21, lastLayer: 31 }] } });
    expect(d.apply).toBe(false);
    expect(d.gainNow).toBeCloseTo(0.1);
    expect(d.reason).toMatch(/only 10 %/);
  });

  it('next to the running engines the best placement may be the current one', () => {
    const d = decideRebalance({ ...base, alongside: { tokensPerSecond: 10, stages: current } });
    expect(d.apply).toBe(false);
    expect(d.reason).toMatch(/best placement is the current one/);
  });

  it('a slower plan is never applied, and an instance without a prediction is never moved on a guess', () => {
    expect(decideRebalance({ ...base, ideal: { tokensPerSecond: 8, stages: onC }, alongside: { tokensPerSecond: 8, stages: onC }, minGain: 0 }).apply).toBe(false);
    expect(decideRebalance({ ...base, ideal: { tokensPerSecond: 10, stages: onC }, alongside: { tokensPerSecond: 10, stages: onC }, minGain: 0 }).apply).toBe(false);
    const d = decideRebalance({ ...base, currentTokensPerSecond: 0 });
    expect(d.apply).toBe(false);
    expect(d.gain).toBe(0);
  });

  it('an ideal plan that does not fit (nodes lost) is explained', () => {
    const d = decideRebalance({ ...base, ideal: { doesNotFit: 'no live nodes' }, alongside: { doesNotFit: 'no live nodes' } });
    expect(d).toMatchObject({ apply: false, gain: 0, gainNow: undefined });
    expect(d.reason).toMatch(/does not fit: no live nodes/);
  });

  it('--rebalance takes auto or off', () => {
    expect(parseRebalanceMode('auto')).toBe('auto');
    expect(parseRebalanceMode('off')).toBe('off');
    expect(parseRebalanceMode(undefined)).toBeUndefined();
    expect(() => parseRebalanceMode('sometimes')).toThrow(UsageError);
  });
});
