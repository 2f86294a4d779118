/**
 * Paired comparisons for benches whose run-to-run noise is as large as the effect (bench:tunnel on
 * a 2-vCPU guest): two modes run in ABBA order, each pair two adjacent trials, so slow drift
 * (neighbours, page cache, thermal) lands on both members of a pair and cancels in the pair's ratio
 * or difference. The estimate is the median over pairs; its uncertainty a percentile bootstrap of
 * that median over pairs (resampling whole pairs keeps what pairing cancelled cancelled). Seeded,
 * so the same numbers give the same interval.
 */
import { seededRandom } from '../../test/helpers/random.ts';
import { median } from './stats.ts';

/** Which mode runs first in each pair: A B, B A, A B, B A … (a trial sequence ABBA ABBA …). */
export function abbaOrder<T>(a: T, b: T, pairs: number): [T, T][] {
  return Array.from({ length: pairs }, (_, i) => (i % 2 === 0 ? [a, b] : [b, a]));
}

/** The central `level` interval of the median of `xs` under resampling with replacement. */
export function bootstrapMedianInterval(xs: readonly number[], o: { level?: number; resamples?: number; seed?: number } = {}): [number, number] {
  const { level = 0.9, resamples = 4000, seed = 1 } = o;
  if (xs.length === 0) return [Number.NaN, Number.NaN];
  const random = seededRandom(seed);
  const medians = Array.from({ length: resamples }, () => median(Array.from(xs, () => xs[Math.floor(random() * xs.length)]!)));
  medians.sort((x, y) => x - y);
  const cut = Math.floor(((1 - level) / 2) * resamples); // as many resamples cut off each side
  return [medians[cut]!, medians[resamples - 1 - cut]!];
}

export type GoalOp = '>=' | '<' | '<=';

export interface Goal {
  readonly op: GoalOp;
  readonly value: number;
}

const holds = (x: number, g: Goal) => (g.op === '>=' ? x >= g.value : g.op === '<' ? x < g.value : x <= g.value);

export interface PairedEstimate {
  /** Median over pairs of the per-pair ratio or difference. */
  readonly estimate: number;
  /** 90 % percentile-bootstrap interval of that median, over pairs. */
  readonly interval90: [number, number];
  readonly pairs: number;
  readonly goal: string;
  readonly holdsAtEstimate: boolean;
  /** `met`: the whole interval meets the goal; `missed`: none of it does; else `undecided`. */
  readonly verdict: 'met' | 'missed' | 'undecided';
}

/** The median of per-pair values with its bootstrap interval, and whether `goal` holds at each. */
export function pairedEstimate(perPair: readonly number[], goal: Goal, digits = 3): PairedEstimate {
  const r = (x: number) => Math.round(x * 10 ** digits) / 10 ** digits;
  const estimate = median(perPair);
  const [lo, hi] = bootstrapMedianInterval(perPair);
  const atLo = holds(lo, goal);
  const atHi = holds(hi, goal);
  return {
    estimate: r(estimate),
    interval90: [r(lo), r(hi)],
    pairs: perPair.length,
    goal: `${goal.op} ${goal.value}`,
    holdsAtEstimate: holds(estimate, goal),
    verdict: atLo && atHi ? 'met' : !atLo && !atHi ? 'missed' : 'undecided',
  };
}
