import { describe, expect, it } from 'vitest';
import { abbaOrder, bootstrapMedianInterval, pairedEstimate } from '../../bench/lib/paired.ts';

/**
 * bench:tunnel's verdicts (bench/lib/paired.ts): the order must alternate so drift cancels, the
 * interval must cover the estimate, shrink as pairs are added and be reproducible, and a goal is
 * called met or missed only when the whole interval agrees.
 */
describe('paired comparison', () => {
  it('alternates which mode goes first, so the trial sequence is A B B A A B B A', () => {
    expect(abbaOrder('d', 't', 4).flat()).toEqual(['d', 't', 't', 'd', 'd', 't', 't', 'd']);
  });

  it('bootstraps an interval around the median that narrows with more pairs and repeats exactly', () => {
    // a spread of per-pair differences: deterministic, symmetric around 5
    const few = Array.from({ length: 8 }, (_, i) => 5 + ((i * 7) % 9) - 4);
    const many = Array.from({ length: 64 }, (_, i) => 5 + ((i * 7) % 9) - 4);
    const [lo8, hi8] = bootstrapMedianInterval(few);
    const [lo64, hi64] = bootstrapMedianInterval(many);
    expect(lo8).toBeLessThanOrEqual(5);
    expect(hi8).toBeGreaterThanOrEqual(5);
    expect(lo64).toBeLessThanOrEqual(5);
    expect(hi64).toBeGreaterThanOrEqual(5);
    expect(hi64 - lo64).toBeLessThan(hi8 - lo8);
    expect(bootstrapMedianInterval(many)).toEqual([lo64, hi64]);
  });

  it('calls a goal met or missed only when the whole interval agrees, else undecided', () => {
    const tight = Array.from({ length: 40 }, (_, i) => 1 + (i % 5) * 0.001);
    expect(pairedEstimate(tight, { op: '>=', value: 0.97 })).toMatchObject({ verdict: 'met', holdsAtEstimate: true, pairs: 40 });
    expect(pairedEstimate(tight, { op: '<=', value: 0.9 })).toMatchObject({ verdict: 'missed', holdsAtEstimate: false });
    const wide = Array.from({ length: 40 }, (_, i) => (i % 2 === 0 ? -8 : 10) + (i % 7));
    const e = pairedEstimate(wide, { op: '<', value: 2 }, 2);
    expect(e.interval90[0]).toBeLessThan(2);
    expect(e.interval90[1]).toBeGreaterThan(2);
    expect(e.verdict).toBe('undecided');
  });
});
