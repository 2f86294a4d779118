/**
 * Two readings of a bench:lan run that say whether a miss is the cost model's or the machine's.
 *
 * `linkCost`: what each profile's links add to a layout's decode, per token, against the same
 * layout on the reference profile (1 GbE), predicted and measured. Only the links differ between
 * the two scenarios, so this isolates the network part of the cost model from the engines' rates
 * (session 12: the 20 Mbit/s link was priced ~9.6 ms per token and cost ~1.9 ms on the simulated
 * wire, whose token bucket let small messages through at veth speed).
 *
 * `engineSpread`: how far the calibration engine's decode windows, taken beside every scenario on
 * the same model, moved over the run — the machine's own drift, which no prediction made at the
 * start of the run can follow (a shared 2-vCPU VM: ±20 % within a minute on some days).
 */

export const REFERENCE_PROFILE = '1gbe';

interface Scenario {
  readonly profile: string;
  readonly name: string;
  readonly predictedTokensPerSecond: number;
  readonly measuredTokensPerSecond: number;
}

const msPerToken = (tokensPerSecond: number) => 1000 / tokensPerSecond;
const round2 = (x: number) => Math.round(x * 100) / 100;

export function linkCost(scenarios: readonly Scenario[]) {
  const reference = new Map(scenarios.filter((s) => s.profile === REFERENCE_PROFILE).map((s) => [s.name, s]));
  return scenarios.flatMap((s) => {
    const ref = reference.get(s.name);
    if (!ref || s.profile === REFERENCE_PROFILE) return [];
    return [
      {
        profile: s.profile,
        name: s.name,
        predictedMsPerToken: round2(msPerToken(s.predictedTokensPerSecond) - msPerToken(ref.predictedTokensPerSecond)),
        measuredMsPerToken: round2(msPerToken(s.measuredTokensPerSecond) - msPerToken(ref.measuredTokensPerSecond)),
      },
    ];
  });
}

export function engineSpread(windows: readonly (readonly number[])[]) {
  const all = windows.flat();
  if (all.length === 0) return null;
  const [min, max] = [Math.min(...all), Math.max(...all)];
  return {
    decodeTokensPerSecond: { min: round2(min), max: round2(max) },
    /** max ÷ min − 1 over the whole run. */
    overRun: round2(max / min - 1),
    /** The largest max ÷ min − 1 among one scenario's windows (taken within a minute). */
    withinScenario: round2(Math.max(...windows.filter((w) => w.length > 0).map((w) => Math.max(...w) / Math.min(...w) - 1))),
  };
}
