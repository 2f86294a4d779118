import { UsageError } from '../../shared/errors.ts';

/**
 * Whether to re-place a ready instance on the nodes up now, pure. Two plans are weighed against
 * what runs: `ideal` (planned as if the instance held nothing: what re-planning could gain) and
 * `alongside` (planned with the instance's current engines still loaded: what load-new-then-switch
 * can reach without a pause). Only `alongside` is ever applied, and only when it gains at least
 * `minGain` and places the model differently; otherwise the reason says what stands in the way.
 */
export type RebalanceMode = 'auto' | 'off';

/** `--rebalance auto` applies a re-placement predicted to be at least this much faster. */
export const AUTO_REBALANCE_MIN_GAIN = 0.2;

export function parseRebalanceMode(v: string | undefined): RebalanceMode | undefined {
  if (v === undefined || v === '') return undefined;
  if (v === 'auto' || v === 'off') return v;
  throw new UsageError(`invalid --rebalance "${v}": auto or off`);
}

/** Where a plan puts the layers: enough to tell two placements apart. */
export interface StagePlacement {
  readonly nodeId: string;
  readonly firstLayer: number;
  readonly lastLayer: number;
}

export type CandidatePlan = { readonly tokensPerSecond: number; readonly stages: readonly StagePlacement[] } | { readonly doesNotFit: string };

export interface RebalanceInput {
  readonly currentTokensPerSecond: number;
  readonly currentStages: readonly StagePlacement[];
  readonly ideal: CandidatePlan;
  readonly alongside: CandidatePlan;
  /** 0.2 = apply only when the new placement is predicted ≥ 20 % faster. */
  readonly minGain: number;
}

export interface RebalanceDecision {
  readonly apply: boolean;
  /** Predicted gain of re-planning (ideal / current − 1); 0 when the ideal plan does not fit. */
  readonly gain: number;
  /** Predicted gain of what would be applied now (alongside / current − 1); undefined when it does not fit. */
  readonly gainNow: number | undefined;
  readonly reason: string;
}

const pct = (g: number) => `${(100 * g).toFixed(0)} %`;

/** Below the threshold, with room for rounding (12 / 10 − 1 is 0.19999999999999996). */
const below = (gain: number, min: number) => gain < min - 1e-9 || gain <= 1e-6;

function samePlacement(a: readonly StagePlacement[], b: readonly StagePlacement[]): boolean {
  return a.length === b.length && a.every((s, i) => s.nodeId === b[i]!.nodeId && s.firstLayer === b[i]!.firstLayer && s.lastLayer === b[i]!.lastLayer);
}

function gainOf(plan: CandidatePlan, current: number): number | undefined {
  if ('doesNotFit' in plan) return undefined;
  // An instance without a prediction (0) gains nothing measurable: never move it on a guess.
  return current > 0 ? plan.tokensPerSecond / current - 1 : 0;
}

export function decideRebalance(r: RebalanceInput): RebalanceDecision {
  const gain = gainOf(r.ideal, r.currentTokensPerSecond) ?? 0;
  const gainNow = gainOf(r.alongside, r.currentTokensPerSecond);
  const keep = (reason: string): RebalanceDecision => ({ apply: false, gain, gainNow, reason });
  if ('doesNotFit' in r.ideal) return keep(`re-planning on the nodes up now does not fit: ${r.ideal.doesNotFit}`);
  if (samePlacement(r.ideal.stages, r.currentStages)) return keep('already placed as the planner would place it now');
  if (below(gain, r.minGain)) return keep(`predicted gain ${pct(gain)} is below the ${pct(r.minGain)} threshold`);
  if ('doesNotFit' in r.alongside || gainNow === undefined) {
    const why = 'doesNotFit' in r.alongside ? r.alongside.doesNotFit : '';
    return keep(`re-planning would gain ${pct(gain)}, but the new placement cannot load next to the running one (${why}); unload and load it again to apply`);
  }
  if (samePlacement(r.alongside.stages, r.currentStages)) return keep(`re-planning would gain ${pct(gain)}, but with the running engines still loaded the best placement is the current one`);
  if (below(gainNow, r.minGain)) return keep(`re-planning would gain ${pct(gain)}, but with the running engines still loaded only ${pct(gainNow)} (below ${pct(r.minGain)})`);
  return { apply: true, gain, gainNow, reason: `predicted ${pct(gainNow)} faster: load the new placement, switch, stop the old engines` };
}
