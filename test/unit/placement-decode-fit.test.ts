import { describe, expect, it } from 'vitest';
import { boundaryOverhead, fitDecodeCost } from '../../src/shared/placement/decode-fit.ts';

const line = (fixed: number, bandwidth: number, bytes: readonly number[]) => bytes.map((b) => ({ bytesPerToken: b, secondsPerToken: fixed + b / bandwidth }));

describe('fitDecodeCost', () => {
  it('recovers the fixed part and the bandwidth exactly from two depths', () => {
    const f = fitDecodeCost(line(0.012, 9e9, [0.11e9, 0.33e9]));
    expect(f.fixedSecondsPerToken).toBeCloseTo(0.012, 12);
    expect(f.bandwidthBytesPerSecond / 9e9).toBeCloseTo(1, 10);
  });

  it('recovers them from many depths and repeated windows, in any order', () => {
    const pts = [...line(0.0035, 12e9, [0.94e9, 0.11e9, 0.63e9, 0.33e9]), ...line(0.0035, 12e9, [0.33e9, 0.94e9])];
    const f = fitDecodeCost(pts);
    expect(f.fixedSecondsPerToken).toBeCloseTo(0.0035, 12);
    expect(f.bandwidthBytesPerSecond / 12e9).toBeCloseTo(1, 10);
  });

  it('is the least-squares line through noisy points (symmetric noise cancels)', () => {
    const pts = [
      { bytesPerToken: 1e8, secondsPerToken: 0.01 + 1e8 / 1e10 + 0.001 },
      { bytesPerToken: 1e8, secondsPerToken: 0.01 + 1e8 / 1e10 - 0.001 },
      { bytesPerToken: 3e8, secondsPerToken: 0.01 + 3e8 / 1e10 + 0.002 },
      { bytesPerToken: 3e8, secondsPerToken: 0.01 + 3e8 / 1e10 - 0.002 },
    ];
    const f = fitDecodeCost(pts);
    expect(f.fixedSecondsPerToken).toBeCloseTo(0.01, 12);
    expect(f.bandwidthBytesPerSecond / 1e10).toBeCloseTo(1, 10);
  });

  it('a zero fixed part stays zero (pure bandwidth)', () => {
    const f = fitDecodeCost(line(0, 5e9, [1e8, 2e8, 4e8]));
    expect(f.fixedSecondsPerToken).toBeCloseTo(0, 15);
    expect(f.bandwidthBytesPerSecond / 5e9).toBeCloseTo(1, 10);
  });

  it('a negative intercept is noise around zero: fixed 0 and the slope through the origin', () => {
    // 0.02 s at 1e8 B and 0.05 s at 2e8 B: the line meets the axis at −0.01 s.
    const f = fitDecodeCost([
      { bytesPerToken: 1e8, secondsPerToken: 0.02 },
      { bytesPerToken: 2e8, secondsPerToken: 0.05 },
    ]);
    expect(f.fixedSecondsPerToken).toBe(0);
    // Σb·s ÷ Σb² = (2e6 + 1e7) ÷ (1e16 + 4e16) = 2.4e-10 s/B
    expect(f.bandwidthBytesPerSecond).toBeCloseTo(1 / 2.4e-10, 0);
  });

  it('refuses one depth, however many windows', () => {
    expect(() => fitDecodeCost(line(0.01, 1e10, [3e8, 3e8, 3e8]))).toThrow(/two depths/);
    expect(() => fitDecodeCost([])).toThrow(/two depths/);
  });

  it('refuses a slope that does not rise with the bytes', () => {
    expect(() =>
      fitDecodeCost([
        { bytesPerToken: 1e8, secondsPerToken: 0.03 },
        { bytesPerToken: 3e8, secondsPerToken: 0.03 },
      ]),
    ).toThrow(/do not grow/);
    expect(() =>
      fitDecodeCost([
        { bytesPerToken: 1e8, secondsPerToken: 0.04 },
        { bytesPerToken: 3e8, secondsPerToken: 0.03 },
      ]),
    ).toThrow(/do not grow/);
  });

  it.each([
    [0, 0.01],
    [-1, 0.01],
    [Number.NaN, 0.01],
    [Number.POSITIVE_INFINITY, 0.01],
    [1e8, 0],
    [1e8, -0.01],
    [1e8, Number.NaN],
  ])('refuses a point of %s B and %s s', (bytes, seconds) => {
    expect(() => fitDecodeCost([{ bytesPerToken: bytes, secondsPerToken: seconds }, ...line(0.01, 1e10, [2e8, 3e8])])).toThrow(/positive, finite/);
  });
});

describe('boundaryOverhead', () => {
  const rate = (msPerToken: number) => ({ decodeTokensPerSecond: 1000 / msPerToken });

  it('is the tunnelled split minus the whole minus the probe round trip', () => {
    // 13.57 ms on one rpc-server, 14.12 ms split with its first stage tunnelled, probe 0.257 ms (session 11)
    expect(boundaryOverhead(rate(13.57), rate(14.12), 0.257e-3)).toBeCloseTo(0.293e-3, 9);
  });

  it('never goes below 0: a split measured faster than the whole, or a probe slower than the step, is noise around none', () => {
    expect(boundaryOverhead(rate(13.57), rate(13.33), 0.25e-3)).toBe(0);
    expect(boundaryOverhead(rate(13.0), rate(13.2), 0.5e-3)).toBe(0);
  });

  it('grows with the step one for one', () => {
    const a = boundaryOverhead(rate(10), rate(12), 0.3e-3);
    const b = boundaryOverhead(rate(10), rate(13), 0.3e-3);
    expect(b - a).toBeCloseTo(1e-3, 12);
  });
});
