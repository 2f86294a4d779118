import type { ModelProfile } from '../model/profile.ts';
import { computeBufferBytes, hostComputeBufferBytes } from './compute.ts';
import { type KvOptions, kvGeometry, layerKvBytes } from './kv.ts';
import type { MemoryModel, MemoryOptions } from './memory-model.ts';

// The types live in memory-model.ts so compute.ts can use them without importing this file back.
export type { MemoryModel, MemoryOptions } from './memory-model.ts';

/**
 * Memory per stage. A stage is one device holding a contiguous layer range. The LAST stage is
 * the head: the node that runs llama-server. That follows llama.cpp's device order (RPC servers
 * first, the local GPU last — src/llama.cpp "add RPC servers at the front of the list") and its
 * output-layer rule (the output head goes to the device of unit n_layer, i.e. the last one), so
 * the head node's own GPU holds the last layers and the output head, and its CPU holds
 * `token_embd` (llama.cpp keeps the input layer on the CPU) plus a small host compute buffer.
 * On Apple Silicon both live in the same unified memory, so both count against the head's budget.
 */

export const DEFAULT_MEMORY_OPTIONS: MemoryOptions = {
  ctx: 4096,
  cacheType: 'f16',
  parallel: 1,
  unified: true,
  ubatch: 512,
  flashAttention: true,
};

/**
 * Fixed per-process cost beyond the buffers llama.cpp reports: the engine binary, its heap,
 * Metal/driver context and the RPC server's receive buffers. Measured on this Linux host the idle
 * RSS is ~10–20 MiB for ggml-rpc-server and ~60–120 MiB for llama-server; Metal adds its own
 * context and residency-set bookkeeping that cannot be measured here, so these are deliberately
 * generous round figures, not measurements.
 */
export const WORKER_OVERHEAD_BYTES = 256 * 2 ** 20;
export const HEAD_OVERHEAD_BYTES = 512 * 2 ** 20;

export interface StageBytes {
  readonly weights: number;
  readonly kv: number;
  readonly compute: number;
  readonly overhead: number;
  readonly total: number;
}

/** Per-device figures as llama.cpp reports them (for checking against its logs). */
export interface DeviceBytes {
  readonly model: number;
  readonly kv: number;
  readonly compute: number;
}

export function kvOptions(o: MemoryOptions): KvOptions {
  return { ctx: o.ctx, cacheTypeK: o.cacheType, cacheTypeV: o.cacheType, parallel: o.parallel, unified: o.unified, ubatch: o.ubatch };
}

/**
 * @param kvFill fraction of the KV cache a token attends to on average, for read costs only
 *   (a conversation fills the context gradually; 0.5 = halfway).
 */
export function memoryModel(profile: ModelProfile, options: MemoryOptions, kvFill = 0.5): MemoryModel {
  const kvo = kvOptions(options);
  const geometry = kvGeometry(profile, kvo);
  const layerWeights = profile.layers.map((l) => l.weightBytes);
  const layerKv = profile.layers.map((l) => layerKvBytes(l, geometry, kvo));
  const layerRead = profile.layers.map((l, i) => l.readBytesPerToken + kvFill * layerKv[i]!);
  return {
    profile,
    options,
    geometry,
    layerWeights,
    layerKv,
    layerRead,
    outputWeights: profile.outputNormBytes + profile.outputBytes + profile.otherBytes,
    hostWeights: profile.tokenEmbdBytes,
  };
}

/**
 * What llama.cpp will report for a device holding layers [first, last] (inclusive).
 * `pipeline`: the model spans more than one device (changes the compute buffer).
 */
export function deviceBytes(mm: MemoryModel, first: number, last: number, holdsOutput: boolean, pipeline: boolean): DeviceBytes {
  let model = 0;
  let kv = 0;
  for (let il = first; il <= last; il++) {
    model += mm.layerWeights[il]!;
    kv += mm.layerKv[il]!;
  }
  if (holdsOutput) model += mm.outputWeights;
  const layers = mm.profile.layers.slice(first, last + 1);
  return { model, kv, compute: computeBufferBytes(mm, layers, holdsOutput, pipeline) };
}

/** Host (CPU) buffers of the head process: token_embd (CPU_Mapped) and the CPU compute buffer. */
export function hostBytes(mm: MemoryModel, pipeline: boolean): DeviceBytes {
  return { model: mm.hostWeights, kv: 0, compute: hostComputeBufferBytes(mm, pipeline) };
}

/** Stage total: device buffers, plus the head's host buffers when this is the last stage. */
export function stageBytes(mm: MemoryModel, first: number, last: number, isHead: boolean, pipeline: boolean): StageBytes {
  const d = deviceBytes(mm, first, last, isHead, pipeline);
  const h = isHead ? hostBytes(mm, pipeline) : { model: 0, kv: 0, compute: 0 };
  const overhead = isHead ? HEAD_OVERHEAD_BYTES : WORKER_OVERHEAD_BYTES;
  const weights = d.model + h.model;
  const compute = d.compute + h.compute;
  return { weights, kv: d.kv, compute, overhead, total: weights + d.kv + compute + overhead };
}
