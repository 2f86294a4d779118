import type { Timings, TokenLogprob } from '../../shared/generation.ts';
import type { Parallelism, ParallelismChoice } from '../../shared/placement/parallelism.ts';
import type { Objective } from '../../shared/placement/types.ts';
import type { NodeEntry } from '../membership/registry.ts';
import type { VerifyResult } from './llama/verify.ts';

/**
 * The vocabulary of model instances, shared by the runtime, the planner adapter, the engine
 * drivers and the APIs built on them. Types only (and the load defaults): no module here depends
 * on the runtime to speak about what it loads.
 */

/** The engine families; each has one driver (llama/driver.ts, mlx/driver.ts). */
export type EngineFamily = 'llama' | 'mlx';

export interface LoadOptions {
  readonly ctx: number;
  readonly cacheType: string;
  readonly parallel: number;
  readonly pin: readonly string[];
  /** MLX layout over the ranks (parallelism.ts); llama.cpp RPC splits are pipelines only. */
  readonly parallelism: Parallelism;
  /**
   * `--allow-untunnelled-rdma`: MLX may use JACCL (RDMA over Thunderbolt), whose links bypass the
   * agents' TLS tunnels. Off (absent): every link between nodes is a tunnelled TCP ring link.
   */
  readonly allowUntunnelledRdma?: boolean | undefined;
  /** Plan only (the Plan RPC, `orchard plan --prompt-tokens`): also predict time to first token for a prompt this long. */
  readonly promptTokens?: number | undefined;
  /** Plan only: what the placement minimises (a load plans for decode). */
  readonly objective?: Objective | undefined;
}

export const DEFAULT_LOAD_OPTIONS: LoadOptions = { ctx: 4096, cacheType: 'f16', parallel: 1, pin: [], parallelism: 'auto', allowUntunnelledRdma: false };

/** One stage as the planner returns it (the last stage is the head). */
export interface PlannedStage {
  readonly nodeId: string;
  readonly nodeName: string;
  readonly firstLayer: number;
  readonly lastLayer: number;
  readonly bytes: { readonly weights: number; readonly kv: number; readonly compute: number; readonly overhead: number; readonly total: number };
  readonly budgetBytes: number;
  /** What llama.cpp should report for this stage's device, when the planner predicts it. */
  readonly device?: { readonly model: number; readonly kv: number; readonly compute: number } | undefined;
}

export interface PlacementResult {
  readonly stages: readonly PlannedStage[];
  readonly nLayer: number;
  readonly predictedTokensPerSecond: number;
  /** KV bytes of every layer as the engine will allocate them (verification without -lv 5). */
  readonly layerKvBytes?: readonly number[] | undefined;
  /** The planner's full result, for `Plan` / `orchard plan --json`. */
  readonly raw: unknown;
  /** MLX over several ranks: pipeline or tensor, and why (decided with the plan). */
  readonly parallelism?: ParallelismChoice | undefined;
}

/**
 * Plans a model onto nodes; throws UsageError (bad file) or OrchardError ("does not fit …").
 * Node budgets leave out what loaded instances hold, except the instance named `ignoring` (what
 * re-planning a running instance could use).
 */
export type Planner = (modelPath: string, nodes: readonly NodeEntry[], options: LoadOptions, ignoring?: string) => Promise<PlacementResult>;

export type ModelState = 'loading' | 'ready' | 'recovering' | 'failed' | 'unloading';

/** Self-healing in progress (healing.ts), or how it ended when it gave up (state failed). */
export interface Recovery {
  /** What failed ("node bravo (…) is down: …"). */
  readonly cause: string;
  readonly attempt: number;
  readonly maxAttempts: number;
  /** The load phase of the current attempt, or "failed" once it gave up. */
  readonly phase: string;
  /** The latest progress line, or why the last attempt failed. */
  readonly message: string;
  readonly sinceMs: number;
}

export interface ModelStage extends PlannedStage {
  readonly endpoint: string;
}

export interface ModelStatus {
  readonly name: string;
  readonly path: string;
  readonly state: ModelState;
  readonly engine: EngineFamily;
  readonly stages: readonly ModelStage[];
  readonly error: string;
  readonly predictedTokensPerSecond: number;
  readonly options: LoadOptions;
  readonly verification?: VerifyResult | undefined;
  readonly loadedAtMs?: number | undefined;
  /** Self-healing of this instance: "auto" re-places it when an engine is lost. */
  readonly heal?: 'auto' | 'off' | undefined;
  /** How often it was re-placed since its load. */
  readonly recoveries?: number | undefined;
  readonly recovery?: Recovery | undefined;
  /** Its links between nodes bypass the TLS tunnels (MLX over JACCL, allowed at load). */
  readonly untunnelledRdma?: boolean | undefined;
  /** MLX over several ranks: the layout its plan chose and why. */
  readonly parallelism?: ParallelismChoice | undefined;
}

export interface LoadRequest {
  readonly modelPath: string;
  readonly name?: string | undefined;
  readonly options?: Partial<LoadOptions> | undefined;
  /** "mlx" | "llama" | "auto"/"" (by format: a directory with config.json → mlx, .gguf → llama). */
  readonly engine?: string | undefined;
  /** "auto" | "off" | undefined (the coordinator's --heal). */
  readonly heal?: string | undefined;
}

export interface LoadProgress {
  readonly phase: 'planning' | 'starting-workers' | 'starting-head' | 'verifying' | 'ready' | 'failed';
  readonly message: string;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly elapsedSeconds: number;
  readonly model?: ModelStatus | undefined;
}

export interface GenerateRequest {
  readonly model?: string | undefined;
  readonly prompt: string;
  readonly maxTokens: number;
  readonly temperature: number;
  readonly topP?: number | undefined;
  readonly seed?: number | undefined;
  readonly stop?: readonly string[] | undefined;
  /** Chat: the head applies the model's chat template to these instead of taking `prompt`. */
  readonly messages?: readonly ChatMessage[] | undefined;
  /** Report each token's logprob, and with topLogprobs > 0 that many alternatives (0–20). */
  readonly logprobs?: boolean | undefined;
  readonly topLogprobs?: number | undefined;
}

export interface ChatMessage {
  readonly role: string;
  readonly content: string;
}

export type GenerateEvent =
  | { readonly kind: 'token'; readonly text: string; readonly tokenIds: readonly number[]; readonly logprobs?: readonly TokenLogprob[] | undefined }
  | {
      readonly kind: 'done';
      readonly finishReason: string;
      readonly promptTokens: number;
      readonly completionTokens: number;
      readonly timings: Timings;
    };
