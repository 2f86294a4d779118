import { describe, expect, it } from 'vitest';
import { defaultWiredLimitBytes, osReserveBytes, safetyMarginBytes, usableBudget, wiredLimitBytes } from '../../src/shared/budget.ts';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

describe('GPU wired limit', () => {
  it('models macOS defaults observed via recommendedMaxWorkingSetSize (MiB as llama.cpp logs them)', () => {
    expect(defaultWiredLimitBytes(16 * GiB) / MiB).toBeCloseTo(10922.67, 2);
    expect(defaultWiredLimitBytes(32 * GiB) / MiB).toBeCloseTo(21845.33, 2);
    expect(defaultWiredLimitBytes(64 * GiB) / MiB).toBe(49152);
  });

  it('switches from 2/3 to 3/4 above 36 GiB', () => {
    expect(defaultWiredLimitBytes(36 * GiB)).toBe(24 * GiB);
    expect(defaultWiredLimitBytes(48 * GiB)).toBe(36 * GiB);
    expect(defaultWiredLimitBytes(192 * GiB)).toBe(144 * GiB);
  });

  it('a non-zero sysctl wins, capped at RAM; zero or missing means the default', () => {
    expect(wiredLimitBytes(64 * GiB, 56 * GiB)).toBe(56 * GiB);
    expect(wiredLimitBytes(64 * GiB, 100 * GiB)).toBe(64 * GiB);
    expect(wiredLimitBytes(64 * GiB, 0)).toBe(48 * GiB);
    expect(wiredLimitBytes(64 * GiB, undefined)).toBe(48 * GiB);
  });
});

describe('OS reserve and margin', () => {
  it('reserve is max(3 GiB, RAM/16)', () => {
    expect(osReserveBytes(8 * GiB)).toBe(3 * GiB);
    expect(osReserveBytes(48 * GiB)).toBe(3 * GiB);
    expect(osReserveBytes(64 * GiB)).toBe(4 * GiB);
    expect(osReserveBytes(512 * GiB)).toBe(32 * GiB);
  });

  it('margin is max(512 MiB, 5% of capacity)', () => {
    expect(safetyMarginBytes(4 * GiB)).toBe(512 * MiB);
    expect(safetyMarginBytes(100 * GiB)).toBe(5 * GiB);
  });
});

describe('usable budget', () => {
  it('idle 64 GiB machine: the wired limit binds', () => {
    const b = usableBudget({ memoryBytes: 64 * GiB, wiredLimitBytes: 48 * GiB, inUseBytes: 2 * GiB });
    expect(b).toEqual({ budgetBytes: 48 * GiB - Math.floor(48 * GiB * 0.05), reserveBytes: 4 * GiB, marginBytes: Math.floor(48 * GiB * 0.05), othersBytes: 0, limitedBy: 'wired-limit' });
  });

  it('apps using 10 GiB beyond the reserve do not also shrink the wired cap (no double count)', () => {
    const b = usableBudget({ memoryBytes: 64 * GiB, wiredLimitBytes: 48 * GiB, inUseBytes: 14 * GiB });
    expect(b.othersBytes).toBe(10 * GiB);
    expect(b.limitedBy).toBe('wired-limit'); // room 64 − 4 − 10 = 50 GiB > 48
    const busy = usableBudget({ memoryBytes: 64 * GiB, wiredLimitBytes: 48 * GiB, inUseBytes: 24 * GiB });
    expect(busy.limitedBy).toBe('ram'); // room 40 GiB
    expect(busy.budgetBytes).toBe(40 * GiB - 2 * GiB);
  });

  it('unknown usage takes only the reserve; Linux (no wired cap) is RAM − reserve − margin', () => {
    const b = usableBudget({ memoryBytes: 16 * GiB, wiredLimitBytes: 16 * GiB });
    expect(b.limitedBy).toBe('ram');
    expect(b.budgetBytes).toBe(13 * GiB - Math.floor(13 * GiB * 0.05));
  });

  it("others' memory is rounded up to 512 MiB steps, so small fluctuations do not change the budget", () => {
    const a = usableBudget({ memoryBytes: 64 * GiB, wiredLimitBytes: 64 * GiB, inUseBytes: 30 * GiB + 1 });
    const b = usableBudget({ memoryBytes: 64 * GiB, wiredLimitBytes: 64 * GiB, inUseBytes: 30 * GiB + 300 * MiB });
    expect(a.othersBytes).toBe(26 * GiB + 512 * MiB);
    expect(b).toEqual(a);
    expect(usableBudget({ memoryBytes: 64 * GiB, wiredLimitBytes: 64 * GiB, inUseBytes: 30 * GiB }).othersBytes).toBe(26 * GiB);
  });

  it('never negative; explicit reserve and margin are honoured', () => {
    expect(usableBudget({ memoryBytes: 4 * GiB, wiredLimitBytes: 2 * GiB, inUseBytes: 4 * GiB }).budgetBytes).toBe(0);
    const b = usableBudget({ memoryBytes: 32 * GiB, wiredLimitBytes: 32 * GiB, reserveBytes: 8 * GiB, marginBytes: GiB });
    expect(b.budgetBytes).toBe(23 * GiB);
  });
});
