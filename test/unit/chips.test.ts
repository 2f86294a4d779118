import { describe, expect, it } from 'vitest';
import { CHIPS, chipVariants, estimateUnknownChipBandwidth, lookupChip, parseChipBrand } from '../../src/shared/chips.ts';

const GBps = 1e9;

describe('chip table', () => {
  it('covers base, Pro, Max and Ultra of M1–M3, base/Pro/Max of M4 and M5', () => {
    const names = new Set(CHIPS.map((c) => c.name));
    for (const f of ['M1', 'M2', 'M3']) for (const t of ['', ' Pro', ' Max', ' Ultra']) expect(names).toContain(`Apple ${f}${t}`);
    for (const f of ['M4', 'M5']) for (const t of ['', ' Pro', ' Max']) expect(names).toContain(`Apple ${f}${t}`);
  });

  it('has sane rows: positive counts, bandwidth in bytes/s, RAM options ascending', () => {
    for (const c of CHIPS) {
      expect(c.perfCores).toBeGreaterThan(0);
      expect(c.gpuCores.length).toBeGreaterThan(0);
      expect(c.bandwidthBytesPerSecond).toBeGreaterThanOrEqual(60 * GBps);
      expect(c.bandwidthBytesPerSecond).toBeLessThan(2000 * GBps);
      expect([...c.ramGB].sort((a, b) => a - b)).toEqual(c.ramGB);
    }
  });

  it('no two configurations of one chip share a GPU core count with different bandwidth', () => {
    for (const c of CHIPS) {
      for (const d of chipVariants(c.name)) {
        if (c === d) continue;
        const shared = c.gpuCores.filter((g) => d.gpuCores.includes(g));
        if (shared.length > 0 && c.perfCores === d.perfCores) expect(d.bandwidthBytesPerSecond).toBe(c.bandwidthBytesPerSecond);
      }
    }
  });
});

describe('lookupChip', () => {
  it.each([
    ['Apple M1', {}, 68.25],
    ['Apple M1 Pro', { gpuCores: 16 }, 200],
    ['Apple M1 Max', { gpuCores: 32 }, 400],
    ['Apple M1 Ultra', { gpuCores: 64 }, 800],
    ['Apple M2', { gpuCores: 10 }, 100],
    ['Apple M2 Pro', { gpuCores: 19 }, 200],
    ['Apple M2 Max', { gpuCores: 38 }, 400],
    ['Apple M2 Ultra', { gpuCores: 76 }, 800],
    ['Apple M3', { gpuCores: 10 }, 100],
    ['Apple M3 Pro', { gpuCores: 18 }, 150],
    ['Apple M3 Max', { gpuCores: 30 }, 300],
    ['Apple M3 Max', { gpuCores: 40 }, 400],
    ['Apple M3 Max', { perfCores: 10 }, 300],
    ['Apple M3 Max', { perfCores: 12 }, 400],
    ['Apple M3 Ultra', { gpuCores: 80 }, 819],
    ['Apple M3 Ultra', { gpuCores: 60 }, 819],
    ['Apple M4', { gpuCores: 10 }, 120],
    ['Apple M4 Pro', { gpuCores: 20 }, 273],
    ['Apple M4 Max', { gpuCores: 32 }, 410],
    ['Apple M4 Max', { gpuCores: 40 }, 546],
    ['Apple M4 Max', { perfCores: 12 }, 546],
    ['Apple M5', { gpuCores: 10 }, 153],
  ])('%s %o → %d GB/s', (brand, hints, gbps) => {
    expect(lookupChip(brand, hints)?.bandwidthBytesPerSecond).toBe(gbps * GBps);
  });

  it('picks the binned variant with its own core counts', () => {
    const m3max14 = lookupChip('Apple M3 Max', { gpuCores: 30 })!;
    expect([m3max14.perfCores, m3max14.effCores, m3max14.ramGB]).toEqual([10, 4, [36, 96]]);
    const m4max16 = lookupChip('Apple M4 Max', { gpuCores: 40 })!;
    expect([m4max16.perfCores, m4max16.effCores, m4max16.ramGB]).toEqual([12, 4, [48, 64, 128]]);
    const m3ultra = lookupChip('Apple M3 Ultra', { gpuCores: 80 })!;
    expect([m3ultra.perfCores, m3ultra.effCores, m3ultra.ramGB.at(-1)]).toEqual([24, 8, 512]);
  });

  it('without hints (or with hints that match nothing) picks the slowest configuration', () => {
    expect(lookupChip('Apple M3 Max')?.bandwidthBytesPerSecond).toBe(300 * GBps);
    expect(lookupChip('Apple M4 Max')?.bandwidthBytesPerSecond).toBe(410 * GBps);
    expect(lookupChip('Apple M4 Max', { gpuCores: 99 })?.bandwidthBytesPerSecond).toBe(410 * GBps);
  });

  it('GPU cores win over a contradicting perf-core hint', () => {
    // 40 GPU cores only exist on the 16-core M3 Max; a wrong perf count must not downgrade it.
    expect(lookupChip('Apple M3 Max', { gpuCores: 40, perfCores: 10 })?.bandwidthBytesPerSecond).toBe(400 * GBps);
  });

  it('accepts brand spellings and rejects non-Apple CPUs and unknown chips', () => {
    expect(lookupChip('  apple m2 ultra ')?.name).toBe('Apple M2 Ultra');
    expect(lookupChip('M4 Pro')?.name).toBe('Apple M4 Pro');
    expect(lookupChip('Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz')).toBeUndefined();
    expect(lookupChip('AMD EPYC')).toBeUndefined();
    expect(lookupChip('Apple M6 Max')).toBeUndefined();
    expect(lookupChip('Apple M4 Ultra')).toBeUndefined();
    expect(parseChipBrand('Apple M3 Max')).toEqual({ family: 'M3', tier: 'Max' });
    expect(parseChipBrand('Apple M3 Maximum')).toBeUndefined();
  });
});

describe('estimateUnknownChipBandwidth', () => {
  it('uses the slowest configuration of the newest known family of the same tier', () => {
    expect(estimateUnknownChipBandwidth('Apple M6 Max')).toBe(460 * GBps);
    expect(estimateUnknownChipBandwidth('Apple M5 Ultra')).toBe(819 * GBps);
    expect(estimateUnknownChipBandwidth('Apple M7')).toBe(153 * GBps);
    expect(estimateUnknownChipBandwidth('AMD EPYC')).toBeUndefined();
  });
});
