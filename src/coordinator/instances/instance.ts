import type { ParallelismChoice } from '../../shared/placement/parallelism.ts';
import type { EngineDriver, EngineGroup, EngineStream } from './driver.ts';
import type { HealMode, RecoveryCause } from './healing.ts';
import type { Slots } from './slots.ts';
import type { LoadOptions, ModelState, ModelStatus, PlannedStage, Recovery } from './types.ts';

/**
 * One model instance as the runtime keeps it: what the lifecycle (runtime.ts) and the request
 * path (request.ts) share. Mutable on purpose — the runtime is its only writer; the request path
 * reads it and waits on its promises.
 */
export interface Instance {
  readonly name: string;
  readonly path: string;
  readonly driver: EngineDriver;
  /** The current engines; a recovery or a move replaces them with a new group (new engine ids). */
  group: EngineGroup;
  /** The engines a move (drain, rebalance) is loading next to the current ones, until the switch. */
  staged: EngineGroup | undefined;
  /** Bumped whenever the instance loses its engines: a stream on an older epoch resumes. */
  epoch: number;
  state: ModelState;
  readonly heal: HealMode;
  recovery: Recovery | undefined;
  recoveries: number;
  /** Names of the nodes whose loss started the current outage (named in a shortfall). */
  lost: string[];
  /** Waiters for the end of a recovery (resolve: ready again; reject: failed). */
  serving: Deferred | undefined;
  /** The outage being healed (kept while failed, so a returning node can still heal it). */
  pending: { readonly cause: string; readonly kind: RecoveryCause; readonly sinceMs: number } | undefined;
  /** Why the current recovery attempt must stop (an engine it started is gone). */
  abortReason: string;
  /** Head streams open now (cancelled when the instance loses its engines, so they resume). */
  readonly calls: Set<EngineStream>;
  stages: PlannedStage[];
  error: string;
  predictedTokensPerSecond: number;
  /** MLX over several ranks: the layout of its current plan and why. */
  parallelism: ParallelismChoice | undefined;
  readonly options: LoadOptions;
  readonly slots: Slots;
  readonly active: Set<AbortController>;
  loadedAtMs: number | undefined;
  /** Resolves with the reason when the current epoch's engines are lost (names the culprit in errors). */
  failed: Promise<string>;
  markFailed: (reason: string) => void;
}

export interface Deferred {
  readonly promise: Promise<void>;
  resolve(): void;
  reject(err: unknown): void;
}

export function deferred(): Deferred {
  let resolve: () => void = () => {};
  let reject: (e: unknown) => void = () => {};
  const promise = new Promise<void>((a, b) => {
    resolve = a;
    reject = b;
  });
  promise.catch(() => {}); // nobody may be waiting
  return { promise, resolve, reject };
}

export function failureSignal(): { failed: Promise<string>; markFailed: (reason: string) => void } {
  let markFailed: (reason: string) => void = () => {};
  const failed = new Promise<string>((resolve) => {
    markFailed = resolve;
  });
  return { failed, markFailed };
}

/** A new instance in state `loading`; the runtime gives it its first engine group. */
export function newInstance(name: string, path: string, driver: EngineDriver, options: LoadOptions, heal: HealMode, slots: Slots): Instance {
  return {
    name,
    path,
    driver,
    group: undefined as unknown as EngineGroup,
    staged: undefined,
    epoch: 0,
    state: 'loading',
    heal,
    recovery: undefined,
    recoveries: 0,
    lost: [],
    serving: undefined,
    pending: undefined,
    abortReason: '',
    calls: new Set(),
    stages: [],
    error: '',
    predictedTokensPerSecond: 0,
    parallelism: undefined,
    options,
    slots,
    active: new Set(),
    loadedAtMs: undefined,
    ...failureSignal(),
  };
}

/** The instance as the APIs show it. */
export function instanceStatus(i: Instance): ModelStatus {
    return {
      name: i.name,
      path: i.path,
      state: i.state,
      engine: i.driver.family,
      stages: i.stages.map((s, k) => ({ ...s, endpoint: i.group.endpoint(k) })),
      error: i.error,
      predictedTokensPerSecond: i.predictedTokensPerSecond,
      ...(i.parallelism ? { parallelism: i.parallelism } : {}),
      options: i.options,
      verification: i.group.verification,
      loadedAtMs: i.loadedAtMs,
      heal: i.heal,
      recoveries: i.recoveries,
      recovery: i.recovery,
    };
  }
