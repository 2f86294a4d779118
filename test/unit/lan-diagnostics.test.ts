import { describe, expect, it } from 'vitest';
import { engineSpread, linkCost } from '../../bench/lan/diagnostics.ts';

const s = (profile: string, name: string, predictedTokensPerSecond: number, measuredTokensPerSecond: number) => ({ profile, name, predictedTokensPerSecond, measuredTokensPerSecond });

describe('bench:lan link cost per token', () => {
  it('is the per-token time a profile adds to the same layout on 1 GbE, predicted and measured', () => {
    const r = linkCost([s('1gbe', 'orchard', 10, 10), s('1gbe', 'llama-default', 10, 12.5), s('slow-link', 'llama-default', 8, 10)]);
    expect(r).toEqual([{ profile: 'slow-link', name: 'llama-default', predictedMsPerToken: 25, measuredMsPerToken: 20 }]);
  });

  it('skips a layout with no 1 GbE scenario to compare with', () => {
    expect(linkCost([s('10gbe', 'exo', 10, 10), s('slow-link', 'exo', 9, 9)])).toEqual([]);
  });

  it('can be negative: a faster profile, or a measurement that moved the other way', () => {
    expect(linkCost([s('1gbe', 'exo', 10, 10), s('10gbe', 'exo', 10, 12.5)])[0]).toMatchObject({ predictedMsPerToken: 0, measuredMsPerToken: -20 });
  });
});

describe('bench:lan engine spread', () => {
  it('reports the windows’ range over the run and the widest scenario', () => {
    expect(engineSpread([[20, 22], [25, 30], [24]])).toEqual({ decodeTokensPerSecond: { min: 20, max: 30 }, overRun: 0.5, withinScenario: 0.2 });
  });

  it('is null without windows', () => {
    expect(engineSpread([])).toBeNull();
  });
});
