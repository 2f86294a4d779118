import { DEFAULT_MEMORY_OPTIONS, type MemoryOptions, type StageBytes } from '../memory/stage.ts';
import type { ModelProfile } from '../model/profile.ts';
import { isMlxProfile } from '../model/mlx-profile.ts';
import type { LinkCost } from './links.ts';

/** The engine a plan is for: its memory rule and its decode efficiency differ (cost.ts, stage-memory.ts). */
export type EngineFamily = 'llama.cpp' | 'mlx';

/** A node as the planner sees it: what it may hold and how fast it reads memory. */
export interface PlacementNode {
  readonly name: string;
  /** Bytes the planner may fill on this node (already net of OS reserve and safety margin). */
  readonly budgetBytes: number;
  readonly bandwidthBytesPerSecond: number;
  /** Seconds one token spends crossing from this node's stage to the next; default from options. */
  readonly hopSeconds?: number;
  /** Prompt-processing FLOP/s (measured, or from cost.ts defaults); default bandwidth × 33. */
  readonly prefillFlopsPerSecond?: number;
  /** Payload bytes/s of this node's link to the next stage; default options.linkBytesPerSecond. */
  readonly linkBytesPerSecond?: number;
  /**
   * Measured links to other nodes by planner name (links.ts). A worker stage's boundary is
   * charged on its link to the head, which relays every stage's input and output; when that link
   * is measured it replaces hopSeconds and linkBytesPerSecond.
   */
  readonly links?: Readonly<Record<string, LinkCost>>;
  /**
   * Seconds per decoded token this node's engine pays as the head whatever the bytes it reads
   * (sampling, HTTP, the graph's launch and its RPC round trips: cost.ts Calibration), measured
   * by the node's two-depth calibration; options.headOverheadSeconds when not measured.
   */
  readonly decodeFixedSecondsPerToken?: number;
  /**
   * Seconds a llama.cpp stage boundary whose worker is this node costs per round trip (one per
   * decoded token, one per prompt ubatch) beyond the link's probed round trip and the bytes: the
   * engine tunnel's relays and the split's wake-ups, measured by the node's calibration through a
   * loopback tunnel (calibrate.ts); options.boundaryOverheadSeconds when not measured.
   */
  readonly boundaryOverheadSeconds?: number;
  /**
   * FLOP/s of attention in decode (cost.ts layerAttentionFlops at the decode context,
   * decodeContextTokens), measured by the node's calibration at two prompt lengths; without it a
   * token's attention costs only the KV bytes it reads.
   */
  readonly decodeAttentionFlopsPerSecond?: number;
}

/**
 * What the planner minimises: seconds per decoded token, time to first token for a prompt of
 * `promptTokens`, or the time of a whole request (TTFT + `outputTokens` × seconds per token).
 */
export const OBJECTIVES = ['decode', 'ttft', 'balanced'] as const;
export type Objective = (typeof OBJECTIVES)[number];

/** The memory options of every stage, and how the planner weighs nodes against each other. */
export interface PlacementOptions extends MemoryOptions {
  /** Extra bytes kept free on every node on top of its budget. */
  readonly safetyMarginBytes: number;
  /** Nodes that must hold a stage (e.g. where the model file already is). */
  readonly pinned: readonly string[];
  /**
   * Default per-hop cost. llama.cpp RPC does several round trips per stage per token (set input,
   * graph compute, get output), so ~1 ms on 10 GbE/Thunderbolt TCP; measured RTTs can override.
   */
  readonly hopSeconds: number;
  /**
   * Per-token fixed cost of a head that has not measured its own (PlacementNode
   * decodeFixedSecondsPerToken): sampling, detokenising, HTTP. 0.5 ms is an assumption from
   * before the calibration measured it, not a measurement; on this project's 2-vCPU Linux VM the
   * two-depth calibration measures several times more (bench/README.md, bench:decode-depth).
   */
  readonly headOverheadSeconds: number;
  /**
   * Per-round-trip cost of a llama.cpp boundary whose worker has not measured its own
   * (PlacementNode boundaryOverheadSeconds) beyond the probed round trip. 0: without a
   * measurement the link probe's round trip is taken as the whole of it, as before the
   * calibration measured it (on this project's 2-vCPU VM it measures 0.3–2.5 ms more per boundary,
   * bench/README.md).
   */
  readonly boundaryOverheadSeconds: number;
  /** Average fraction of the KV cache a token attends to, for read costs (0.5). */
  readonly kvFill: number;
  /**
   * The engine the stages run: llama.cpp's buffers (default) or MLX ranks' allocator peaks, where
   * `ctx` is the tokens one request feeds in all (memory/mlx.ts, placement/stage-memory.ts).
   */
  readonly engine?: EngineFamily;
  /** Fewest layers the head stage may hold (llama.cpp: 0; an MLX rank needs at least 1). */
  readonly headMinLayers?: number;
  /** Prompt length TTFT is predicted for (0: no prompt, TTFT not predicted). */
  readonly promptTokens: number;
  readonly objective: Objective;
  /** Tokens a request generates: for the balanced objective, and the previous request's KV a fresh prompt's prompt-cache save moves (cost.ts layerWire). */
  readonly outputTokens: number;
  /** Default link payload rate (10 GbE) for nodes that carry none. */
  readonly linkBytesPerSecond: number;
  /**
   * Times a boundary's activations cross a link. llama.cpp RPC: 2 — the head sends each worker
   * stage its input (set_tensor) and reads its output back (get_tensor, the one round trip that
   * waits), even between two workers (ggml-rpc copies across servers through the host).
   * An MLX pipeline: 1 (rank k sends to rank k + 1).
   */
  readonly activationCrossings: number;
  /**
   * llama-server's host-RAM prompt cache (`--cache-ram`) is on: before a fresh prompt it saves the
   * previous request's KV, reading the workers' layers over their links (cost.ts layerWire).
   * Orchard starts every llama-server with `--cache-ram 0` (llama-args.ts llamaMemoryArgs), so
   * false unless a plan prices an engine run with llama.cpp's default (8 GiB).
   */
  readonly hostPromptCache?: boolean;
  /**
   * A prompt's ubatches overlap on the last stage (cost.ts prefillSeconds): llama.cpp's pipeline
   * parallelism (default true; false costs the plain sum). Never for engine 'mlx' (not measured:
   * MLX ranks' prefill is costed as the plain sum).
   */
  readonly pipelinedPrefill: boolean;
}

/**
 * MLX plans: the MLX rank memory rule (every rank holds the embedding, final norm and output head
 * on top of its layers), every rank runs ≥ 1 layer, and rank k sends its activations to rank k + 1.
 */
export function mlxPlacementOptions(): { engine: EngineFamily; headMinLayers: number; activationCrossings: number } {
  return { engine: 'mlx', headMinLayers: 1, activationCrossings: 1 };
}

/** The options the model's engine family needs on top of the caller's (none for llama.cpp). */
export function familyPlacementOptions(profile: ModelProfile): Partial<PlacementOptions> {
  return isMlxProfile(profile) ? mlxPlacementOptions() : {};
}

export const DEFAULT_PLACEMENT_OPTIONS: PlacementOptions = {
  ...DEFAULT_MEMORY_OPTIONS,
  safetyMarginBytes: 0,
  pinned: [],
  hopSeconds: 0.001,
  headOverheadSeconds: 0.0005,
  boundaryOverheadSeconds: 0,
  kvFill: 0.5,
  promptTokens: 0,
  objective: 'decode',
  outputTokens: 256,
  // 10 GbE payload rate until links are measured.
  linkBytesPerSecond: 1.25e9,
  activationCrossings: 2,
  pipelinedPrefill: true,
};

export interface PlanStage {
  readonly node: string;
  /** Inclusive, 0-based. A head stage may hold no layers (firstLayer = lastLayer + 1). */
  readonly firstLayer: number;
  readonly lastLayer: number;
  /** The head runs llama-server: it holds the output head and token embeddings. */
  readonly role: 'worker' | 'head';
  readonly bytes: StageBytes;
  readonly budgetBytes: number;
  readonly headroomBytes: number;
  readonly bandwidthBytesPerSecond: number;
  readonly readBytesPerToken: number;
  readonly secondsPerToken: number;
  /** This stage's share of prefilling the prompt (compute only; boundaries are in hop costs). */
  readonly prefillSeconds: number;
}

export interface Shortfall {
  /** Bytes needed by kind if every node held a stage. */
  readonly need: StageBytes;
  readonly capacityBytes: number;
  /** need.total − capacity (≤ 0 when the total would fit but no layer split does). */
  readonly shortfallBytes: number;
}

export interface Plan {
  readonly fits: boolean;
  readonly stages: readonly PlanStage[];
  readonly predicted: {
    readonly secondsPerToken: number;
    readonly tokensPerSecond: number;
    readonly hopSeconds: number;
    /** Time to first token for options.promptTokens (prompt-cache save + prefill + boundaries + head overhead); 0 without a prompt. */
    readonly ttftSeconds: number;
    /**
     * The part of ttftSeconds before the prompt starts: llama-server copying the slot's previous
     * request's KV from the workers to its host prompt cache (cost.ts layerWire); 0 without a prompt.
     */
    readonly promptCacheSaveSeconds: number;
    readonly promptTokens: number;
    readonly objective: Objective;
  };
  readonly reasons: readonly string[];
  readonly shortfall?: Shortfall;
  readonly remedies?: readonly string[];
  readonly unusedNodes: readonly string[];
}
