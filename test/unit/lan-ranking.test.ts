import { describe, expect, it } from 'vitest';
import { rankingAgreement } from '../../bench/lan/ranking.ts';

const row = (name: string, predictedTokensPerSecond: number, measuredTokensPerSecond: number, predictedTtftMs = 100, measuredTtftMs = 100) => ({
  profile: 'p',
  name,
  predictedTokensPerSecond,
  measuredTokensPerSecond,
  predictedTtftMs,
  measuredTtftMs,
});

describe('bench:lan ranking agreement', () => {
  it('agrees when every pair with Orchard is measured in the predicted order', () => {
    const r = rankingAgreement([row('orchard', 30, 29), row('exo', 20, 21), row('llama-default', 25, 24)]);
    expect(r.agrees).toBe(true);
    expect(r.profiles[0]!.decode).toMatchObject({ pairsCounted: 2, pairsAgreeing: 2, disagreeing: [], predicted: ['orchard', 'llama-default', 'exo'] });
  });

  it('fails when Orchard’s plan is predicted ahead of a baseline and measured behind it', () => {
    const r = rankingAgreement([row('orchard', 30, 19), row('exo', 20, 21)]);
    expect(r.agrees).toBe(false);
    expect(r.profiles[0]!.decode.disagreeing).toEqual(['orchard/exo']);
  });

  it('does not count a pair predicted within the tie tolerance', () => {
    const r = rankingAgreement([row('orchard', 30, 25), row('exo', 29.5, 28)]);
    expect(r.agrees).toBe(true);
    expect(r.profiles[0]!.decode).toMatchObject({ pairsCounted: 0, predictedTies: ['orchard~exo'] });
  });

  it('reports a reversed pair of two baselines without failing the ranking', () => {
    const r = rankingAgreement([row('orchard', 40, 40), row('exo', 30, 25), row('llama-default', 25, 28)]);
    expect(r.agrees).toBe(true);
    expect(r.profiles[0]!.decode.baselinePairs).toEqual({ counted: 1, agreeing: 0, predictedTies: [], disagreeing: ['exo/llama-default'] });
  });

  it('ranks TTFT lower-first and judges each profile on its own', () => {
    const rows = [
      { ...row('orchard', 30, 30, 100, 100), profile: 'a' },
      { ...row('exo', 30, 30, 200, 90), profile: 'a' },
      { ...row('orchard', 30, 30, 100, 100), profile: 'b' },
      { ...row('exo', 30, 30, 200, 210), profile: 'b' },
    ];
    const r = rankingAgreement(rows);
    expect(r.agrees).toBe(false);
    expect(r.profiles.map((p) => [p.profile, p.ttft.agrees, p.ttft.measured])).toEqual([
      ['a', false, ['exo', 'orchard']],
      ['b', true, ['orchard', 'exo']],
    ]);
  });
});
