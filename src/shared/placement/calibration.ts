/**
 * The statistics of an engine measurement (src/node/calibrate.ts, `orchard demo`): how long a
 * window is, how many are taken, what counts as the figure and when a figure describes a machine
 * that was busy with something else. Pure, so the rules are tested apart from the engines.
 *
 * Why windows and medians (2 vCPUs shared with other work, llama.cpp on 1 thread, the demo
 * model): one request's decode rate moved ±41 % between back-to-back 16-token requests, ±30 % at
 * 48 tokens and ±18 % at 128 tokens (8 requests each, load average ~6), while a passing load spike
 * can halve a single sample. So a window lasts about a second, and the figure is the median of
 * several windows, taken within a bounded time.
 */

/** Target length of one decode window. */
export const WINDOW_SECONDS = 1;
/** Fewest and most decode tokens in one window (the short end keeps a window meaningful on a very slow engine). */
export const WINDOW_TOKENS = { min: 16, max: 512 } as const;

/** How many windows: at least `min`, then more while the time budget lasts, at most `max`. */
export interface WindowPolicy {
  readonly min: number;
  readonly max: number;
  readonly budgetSeconds: number;
}

export const CALIBRATION_WINDOWS: WindowPolicy = { min: 3, max: 7, budgetSeconds: 12 };

/** Decode tokens for a window of about WINDOW_SECONDS at `tokensPerSecond` (from a warm-up request). */
export function windowTokens(tokensPerSecond: number, room: number = WINDOW_TOKENS.max): number {
  const want = Math.round(tokensPerSecond * WINDOW_SECONDS);
  return Math.max(WINDOW_TOKENS.min, Math.min(WINDOW_TOKENS.max, room, Number.isFinite(want) ? want : WINDOW_TOKENS.min));
}

/** Whether to take another window after `taken` windows in `elapsedSeconds`. */
export function anotherWindow(p: WindowPolicy, taken: number, elapsedSeconds: number): boolean {
  if (taken < p.min) return true;
  if (taken >= p.max) return false;
  // Only start a window that is expected to end within the budget.
  const perWindow = taken > 0 ? elapsedSeconds / taken : 0;
  return elapsedSeconds + perWindow <= p.budgetSeconds;
}

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Half the range relative to the median: ±x of the windows around their median. */
export function relativeSpread(xs: readonly number[]): number {
  if (xs.length === 0) return Number.NaN;
  return (Math.max(...xs) - Math.min(...xs)) / 2 / median(xs);
}

/** CPU time counters at one instant: the machine's busy time (all cores) and the engine's own. */
export interface CpuSnapshot {
  readonly wallSeconds: number;
  readonly machineBusySeconds: number;
  readonly engineSeconds: number;
  /** How long the engine's threads have waited, runnable, for a core others held (Linux schedstat run_delay); absent where the OS does not say. */
  readonly engineWaitSeconds?: number;
}

/** Beyond this the engine barely ran: a window is not scaled up by more than 10×. */
export const MAX_WAITED_FRACTION = 0.9;

/**
 * Fraction of a window's wall time the engine's threads spent runnable but waiting for a core
 * that another process held. The engine's stages alternate (llama-server asks, an rpc-server
 * computes, the other blocks on its socket), so their waits add up along the one critical path.
 * Measured (bench:lan's machine, 2 cores, load average 6.5–6.9): ten back-to-back windows of the
 * calibration request decoded at 12.9–28.4 tok/s while the engine had 0.44–0.94 of a core; its
 * CPU time per token stayed 32–40 ms.
 */
export function waitedFraction(before: CpuSnapshot, after: CpuSnapshot): number {
  const wall = after.wallSeconds - before.wallSeconds;
  const waited = (after.engineWaitSeconds ?? 0) - (before.engineWaitSeconds ?? 0);
  if (!(wall > 0) || !(waited > 0)) return 0;
  return Math.min(MAX_WAITED_FRACTION, waited / wall);
}

/**
 * A rate measured over a window the engine spent `waited` of waiting for its cores, as the engine
 * runs with its cores free: the work took (1 − waited) of the window. The node's figure is its
 * engine's, not its neighbours' load at the moment it was measured; a stage's cores are its own on
 * a Mac that runs a cluster, and on a shared machine a stage that sleeps between tokens is not
 * held back as a continuously busy calibration engine is (bench/README.md, bench:lan).
 */
export function uncontendedRate(rate: number, waited: number): number {
  return rate / (1 - Math.min(MAX_WAITED_FRACTION, Math.max(0, waited)));
}

/**
 * Cores' worth of CPU other processes used between two snapshots: the machine's busy time minus
 * the engine's, per second of wall time. 0 on a quiet machine; 1.5 means another process kept
 * one and a half cores busy on average while the engine was measured.
 */
export function competingCores(before: CpuSnapshot, after: CpuSnapshot): number {
  const wall = after.wallSeconds - before.wallSeconds;
  if (!(wall > 0)) return 0;
  const others = after.machineBusySeconds - before.machineBusySeconds - (after.engineSeconds - before.engineSeconds);
  return Math.max(0, others / wall);
}

/**
 * A measurement taken while other processes wanted the engine's cores describes the sharing, not
 * the engine: the cores the engine's threads did not use are free for others, and beyond them
 * more than half a core of others' work on average means the engine waited for its own cores.
 */
export function measuredUnderContention(m: { readonly competingCores: number; readonly threads: number }, cores: number): boolean {
  return m.competingCores > Math.max(0, cores - m.threads) + 0.5;
}

/**
 * A plan's decode prediction priced again with another effective bandwidth for every stage (the
 * demo's nodes share one machine and one measurement): stage seconds scale with the bandwidth,
 * hops and the head's fixed cost stay as the planner computed them — except, with `boundary`,
 * each worker stage's boundary overhead (PlacementNode boundaryOverheadSeconds), which moves from
 * the one the plan was priced with to the one measured now. A stage's decode attention (cost.ts,
 * in its seconds) is replaced by `attentionSecondsPerToken`: 0 when the new bandwidth was measured
 * on the very request being predicted and so carries its attention (the demo), else the plan's
 * attention priced at that request's context (bench:lan).
 */
export function repricedTokensPerSecond(
  plan: {
    readonly stages: readonly { readonly role?: string; readonly readBytesPerToken: number; readonly secondsPerToken: number }[];
    readonly predicted: { readonly secondsPerToken: number };
  },
  bandwidthBytesPerSecond: number,
  boundary?: { readonly plannedSeconds: number; readonly measuredSeconds: number },
  attentionSecondsPerToken = 0,
): number {
  const stageSeconds = plan.stages.reduce((t, s) => t + s.secondsPerToken, 0);
  const workers = plan.stages.filter((s) => s.role === 'worker').length;
  const fixed = plan.predicted.secondsPerToken - stageSeconds + (boundary ? workers * (boundary.measuredSeconds - boundary.plannedSeconds) : 0);
  const read = plan.stages.reduce((t, s) => t + s.readBytesPerToken, 0);
  return 1 / (read / bandwidthBytesPerSecond + attentionSecondsPerToken + fixed);
}
