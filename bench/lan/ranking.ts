/**
 * Does the measured ranking of Orchard's plan against the baselines' agree with the predicted one?
 * Per profile and metric, every pair of Orchard's plan with a baseline whose predictions differ by
 * more than TIE (relative) must be measured in the same order; pairs the model calls a tie are
 * listed but not counted (their measured order is noise). Higher tok/s and lower TTFT rank first.
 * Pairs of two baselines are judged the same way and reported (`baselinePairs`), but do not decide
 * `agrees`: the claim under test is that Orchard's cost model orders its own plan against the
 * alternatives a user has, not how two other tools' plans compare (session 12: one run's only
 * disagreement was exo against llama.cpp's default, predicted 4.4 % apart).
 */
import type { Rule } from './cluster.ts';

export const TIE = 0.03;

/** The rule whose plan is compared with every other (one of bench/lan/cluster.ts RULES). */
export const ORCHARD = 'orchard' satisfies Rule;

interface Row {
  readonly profile: string;
  readonly name: string;
  readonly predictedTokensPerSecond: number;
  readonly measuredTokensPerSecond: number;
  readonly predictedTtftMs: number;
  readonly measuredTtftMs: number;
}

interface Pairs {
  counted: number;
  agreeing: number;
  ties: string[];
  disagreeing: string[];
}

function order(rows: readonly Row[], key: (r: Row) => number, higherFirst: boolean): string[] {
  return [...rows].sort((a, b) => (higherFirst ? key(b) - key(a) : key(a) - key(b))).map((r) => r.name);
}

function judge(into: Pairs, a: Row, b: Row, predicted: (r: Row) => number, measured: (r: Row) => number): void {
  const dp = predicted(a) - predicted(b);
  if (Math.abs(dp) <= TIE * Math.max(predicted(a), predicted(b))) {
    into.ties.push(`${a.name}~${b.name}`);
    return;
  }
  into.counted++;
  if (Math.sign(dp) === Math.sign(measured(a) - measured(b))) into.agreeing++;
  else into.disagreeing.push(`${a.name}/${b.name}`);
}

function metric(rows: readonly Row[], predicted: (r: Row) => number, measured: (r: Row) => number, higherFirst: boolean) {
  const withOrchard: Pairs = { counted: 0, agreeing: 0, ties: [], disagreeing: [] };
  const baselines: Pairs = { counted: 0, agreeing: 0, ties: [], disagreeing: [] };
  for (let i = 0; i < rows.length; i++) {
    for (let j = i + 1; j < rows.length; j++) {
      const [a, b] = [rows[i]!, rows[j]!];
      judge(a.name === ORCHARD || b.name === ORCHARD ? withOrchard : baselines, a, b, predicted, measured);
    }
  }
  return {
    predicted: order(rows, predicted, higherFirst),
    measured: order(rows, measured, higherFirst),
    pairsCounted: withOrchard.counted,
    pairsAgreeing: withOrchard.agreeing,
    predictedTies: withOrchard.ties,
    disagreeing: withOrchard.disagreeing,
    baselinePairs: { counted: baselines.counted, agreeing: baselines.agreeing, predictedTies: baselines.ties, disagreeing: baselines.disagreeing },
    agrees: withOrchard.agreeing === withOrchard.counted,
  };
}

export function rankingAgreement(rows: readonly Row[]) {
  const profiles = [...new Set(rows.map((r) => r.profile))];
  const per = profiles.map((p) => {
    const r = rows.filter((x) => x.profile === p);
    return {
      profile: p,
      decode: metric(r, (x) => x.predictedTokensPerSecond, (x) => x.measuredTokensPerSecond, true),
      ttft: metric(r, (x) => x.predictedTtftMs, (x) => x.measuredTtftMs, false),
    };
  });
  return { tieTolerance: TIE, agrees: per.every((p) => p.decode.agrees && p.ttft.agrees), profiles: per };
}
