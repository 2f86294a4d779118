import { UsageError } from '../../shared/errors.ts';
import type { RECOVERY_CAUSES } from '../../shared/metrics/catalogue.ts';
import { formatBytes } from '../../shared/units.ts';
import type { EngineRequest } from './driver.ts';
import { PlanDoesNotFitError } from './planner-adapter.ts';

/**
 * Self-healing policy, pure: what counts as a cause, how many attempts, how a failed re-placement
 * is explained, and how an interrupted stream is resubmitted. The runtime (runtime.ts) drives it.
 *
 * A ready instance that loses an engine is re-placed on the nodes that are up, with the options it
 * was loaded with, up to `maxAttempts` times `retryDelayMs` apart. Requests wait for it meanwhile
 * (at most `waitMs`, in the instance's bounded queue). When every attempt failed the instance is
 * `failed` with a reason naming what is missing, and it is tried again whenever a node joins or
 * comes back up: it heals by itself when the lost node returns.
 */
export type HealMode = 'auto' | 'off';

/** Why an instance needed healing (the `cause` label of orchard_instance_recoveries_total). */
export type RecoveryCause = (typeof RECOVERY_CAUSES)[number];

export interface HealOptions {
  readonly mode: HealMode;
  readonly maxAttempts: number;
  readonly retryDelayMs: number;
  /** How long a request waits for a recovering instance before it is refused. */
  readonly waitMs: number;
}

export const DEFAULT_HEAL_OPTIONS: HealOptions = { mode: 'auto', maxAttempts: 3, retryDelayMs: 2000, waitMs: 120_000 };

export function parseHealMode(v: string | undefined, what = '--heal'): HealMode | undefined {
  if (v === undefined || v === '') return undefined;
  if (v === 'auto' || v === 'off') return v;
  throw new UsageError(`invalid ${what} "${v}": auto or off`);
}

/**
 * Why a re-placement attempt failed, for the operator: a plan that no longer fits names the
 * missing memory and the nodes whose loss caused it.
 */
export function attemptFailure(err: unknown, lostNodes: readonly string[], message: string): string {
  if (err instanceof PlanDoesNotFitError) {
    const shortfall = (err.plan as { shortfall?: { shortfallBytes?: number } } | undefined)?.shortfall?.shortfallBytes ?? 0;
    if (shortfall > 0) {
      const back = lostNodes.length > 0 ? `bring back ${lostNodes.join(' or ')} or add a node` : 'add a node';
      return `needs ${formatBytes(shortfall)} more: ${back}`;
    }
  }
  return message;
}

/**
 * The request that continues an interrupted stream: the same prompt and sampling (seed
 * included) plus the tokens already delivered, so the engine picks up where the lost one
 * stopped. Greedy output is then the same as an undisturbed run. Undefined when nothing is left
 * to generate.
 */
export function continuation(req: EngineRequest, delivered: readonly number[]): EngineRequest | undefined {
  if (delivered.length === 0) return req;
  if (req.maxTokens > 0 && delivered.length >= req.maxTokens) return undefined;
  return { ...req, maxTokens: req.maxTokens > 0 ? req.maxTokens - delivered.length : 0, continueTokenIds: [...delivered] };
}
