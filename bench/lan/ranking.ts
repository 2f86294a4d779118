/**
 * Does the measured ranking of the plans agree with the predicted one? Per profile and metric,
 * every pair of plans whose predictions differ by more than TIE (relative) must be measured in
 * the same order; pairs the model calls a tie are listed but not counted (their measured order is
 * noise). Higher tok/s and lower TTFT rank first.
 */
export const TIE = 0.03;

interface Row {
  readonly profile: string;
  readonly name: string;
  readonly predictedTokensPerSecond: number;
  readonly measuredTokensPerSecond: number;
  readonly predictedTtftMs: number;
  readonly measuredTtftMs: number;
}

function order(rows: readonly Row[], key: (r: Row) => number, higherFirst: boolean): string[] {
  return [...rows].sort((a, b) => (higherFirst ? key(b) - key(a) : key(a) - key(b))).map((r) => r.name);
}

function metric(rows: readonly Row[], predicted: (r: Row) => number, measured: (r: Row) => number, higherFirst: boolean) {
  let counted = 0;
  let agreeing = 0;
  const ties: string[] = [];
  for (let i = 0; i < rows.length; i++) {
    for (let j = i + 1; j < rows.length; j++) {
      const [a, b] = [rows[i]!, rows[j]!];
      const dp = predicted(a) - predicted(b);
      if (Math.abs(dp) <= TIE * Math.max(predicted(a), predicted(b))) {
        ties.push(`${a.name}~${b.name}`);
        continue;
      }
      counted++;
      if (Math.sign(dp) === Math.sign(measured(a) - measured(b))) agreeing++;
    }
  }
  return {
    predicted: order(rows, predicted, higherFirst),
    measured: order(rows, measured, higherFirst),
    pairsCounted: counted,
    pairsAgreeing: agreeing,
    predictedTies: ties,
    agrees: agreeing === counted,
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
