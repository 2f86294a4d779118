import type { ModelProfile } from '../model/profile.ts';
import type { CacheType, KvGeometry } from './kv.ts';

/** What the memory math of a stage depends on besides the model: llama.cpp's context options. */
export interface MemoryOptions {
  /** `-c`: KV cells (llama.cpp semantics: shared by all slots when the cache is unified). */
  readonly ctx: number;
  readonly cacheType: CacheType;
  readonly parallel: number;
  readonly unified: boolean;
  readonly ubatch: number;
  /** Flash attention on the devices (llama.cpp `-fa auto` turns it on where the backend supports it). */
  readonly flashAttention: boolean;
}

/** Everything per layer precomputed once, so planners can price ranges with prefix sums. */
export interface MemoryModel {
  readonly profile: ModelProfile;
  readonly options: MemoryOptions;
  readonly geometry: KvGeometry;
  readonly layerWeights: readonly number[];
  readonly layerKv: readonly number[];
  /** Bytes a decoded token reads per layer: weights (routed experts only) + the KV it attends to. */
  readonly layerRead: readonly number[];
  /** Output-layer weights: output_norm + output (+ unclassified tensors). */
  readonly outputWeights: number;
  /** Host-side (CPU) bytes of the head process: token_embd. */
  readonly hostWeights: number;
}
