import { UsageError } from '../errors.ts';
import type { GgufHeader, GgufTensorInfo } from '../gguf/types.ts';
import { metaArray, metaNumber, metaString } from '../gguf/types.ts';

/**
 * What the planner needs to know about a model, derived from its GGUF header alone (no weights
 * read). Byte counts are exact: they come from the tensor infos (ggml_nbytes), not from
 * parameter-count estimates.
 *
 * Where tensors live follows llama.cpp (src/llama-model.cpp, `load_tensors`): `blk.N.*` tensors
 * belong to layer N and go to that layer's device; `token_embd` is the input layer and always
 * stays on the CPU of the process running llama-server; `output_norm` and `output` form the
 * output layer, assigned like one more repeating layer (unit n_layer) — so the last device.
 * Without an `output` tensor (tied embeddings) llama.cpp creates the output as a DUPLICATE of
 * `token_embd` on the output device: those bytes count twice (CPU copy + output device copy).
 */
export interface LayerProfile {
  readonly index: number;
  /** Bytes of every `blk.N.*` tensor. */
  readonly weightBytes: number;
  /**
   * Bytes one decoded token reads from this layer's weights. Equals weightBytes for dense
   * layers; for MoE layers only `expertsUsed / expertCount` of the expert tensors are read.
   */
  readonly readBytesPerToken: number;
  /** Sliding-window attention layer (its KV cache holds a window, not the full context). */
  readonly swa: boolean;
  /** n_embd_k_gqa = key_length × n_head_kv of this layer (0 when the layer has no KV). */
  readonly kEmbdGqa: number;
  readonly vEmbdGqa: number;
  /** Largest single tensor of the layer: sizes scratch in compute buffers. */
  readonly largestTensorBytes: number;
}

export interface ModelProfile {
  readonly arch: SupportedArch;
  readonly name: string | undefined;
  readonly layerCount: number;
  readonly layers: readonly LayerProfile[];
  readonly embd: number;
  readonly ffn: number;
  readonly vocab: number;
  readonly heads: number;
  /** Per layer (GGUF allows an array). */
  readonly kvHeads: readonly number[];
  readonly headDimK: number;
  readonly headDimV: number;
  readonly contextLength: number;
  readonly swa: { readonly window: number; readonly layers: number } | undefined;
  readonly moe: { readonly experts: number; readonly expertsUsed: number } | undefined;
  readonly tokenEmbdBytes: number;
  /** Bytes of one token_embd row: what a decoded token reads from the input layer. */
  readonly tokenEmbdRowBytes: number;
  readonly outputNormBytes: number;
  /** Bytes of `output.weight`; for tied embeddings the duplicated token_embd. */
  readonly outputBytes: number;
  readonly outputTied: boolean;
  /** Tensors that are neither per-layer nor input/output (e.g. rope_freqs): kept on the output device here. */
  readonly otherBytes: number;
  /** Sum of every tensor in the file (what the file's data section holds, without padding). */
  readonly fileTensorBytes: number;
  /** Dominant weight type of the layers, e.g. Q4_K. */
  readonly weightType: string;
  readonly tensorCount: number;
}

export const SUPPORTED_ARCHS = ['llama', 'qwen2', 'qwen3', 'gemma2', 'gemma3', 'qwen2moe', 'qwen3moe', 'phi3'] as const;
export type SupportedArch = (typeof SUPPORTED_ARCHS)[number];

const LAYER_RE = /^blk\.(\d+)\./;

function isArch(a: string): a is SupportedArch {
  return (SUPPORTED_ARCHS as readonly string[]).includes(a);
}

/** An integer key that must be present and positive. */
function required(header: GgufHeader, key: string): number {
  const n = metaNumber(header, key);
  if (n === undefined) throw new UsageError(`GGUF header lacks ${key}`);
  if (!Number.isSafeInteger(n) || n <= 0) throw new UsageError(`GGUF key ${key} = ${n} must be a positive integer`);
  return n;
}

function optionalInt(header: GgufHeader, key: string): number | undefined {
  const n = metaNumber(header, key);
  if (n === undefined) return undefined;
  if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`GGUF key ${key} = ${n} must be a non-negative integer`);
  return n;
}

/** head_count_kv may be a scalar or a per-layer array (e.g. some hybrid models). */
function perLayer(header: GgufHeader, key: string, layers: number, fallback: number): number[] {
  const v = header.metadata.get(key);
  if (!v) return new Array<number>(layers).fill(fallback);
  if (v.type === 'array') {
    const arr = metaArray(header, key)!;
    if (arr.value.length !== layers) {
      throw new UsageError(`GGUF key ${key} has ${arr.value.length} entries for ${layers} layers`);
    }
    return arr.value.map((x) => {
      const n = Number(x);
      if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`GGUF key ${key} holds invalid value ${String(x)}`);
      return n;
    });
  }
  const n = optionalInt(header, key)!;
  return new Array<number>(layers).fill(n);
}

/**
 * Which layers use sliding-window attention, mirroring llama.cpp's `load_swa_pattern`:
 * an explicit bool array `<arch>.attention.sliding_window_pattern` wins; otherwise a period n
 * (key or the architecture's default) where layer il is SWA iff il % n < n − 1.
 */
function swaLayers(header: GgufHeader, arch: SupportedArch, layers: number): { window: number; mask: boolean[] } | undefined {
  let window: number | undefined;
  let defaultPeriod: number;
  if (arch === 'gemma2') {
    // llama.cpp: gemma-2 always uses SWA, window 4096 unless the key says otherwise.
    window = optionalInt(header, `${arch}.attention.sliding_window`) ?? 4096;
    defaultPeriod = 2;
  } else if (arch === 'gemma3') {
    window = optionalInt(header, `${arch}.attention.sliding_window`);
    defaultPeriod = 6;
  } else {
    // phi3's sliding_window key is ignored by this llama.cpp ("Phi SWA is currently disabled");
    // llama/qwen families have no SWA.
    return undefined;
  }
  if (!window) return undefined;
  const key = `${arch}.attention.sliding_window_pattern`;
  const v = header.metadata.get(key);
  if (v?.type === 'array') {
    if (v.itemType !== 'bool' || v.value.length < layers) {
      throw new UsageError(`GGUF key ${key} must be a bool array with one entry per layer`);
    }
    return { window, mask: (v.value as readonly boolean[]).slice(0, layers) };
  }
  const period = optionalInt(header, key) ?? defaultPeriod;
  const mask = Array.from({ length: layers }, (_, il) => period === 0 || il % period < period - 1);
  return { window, mask };
}

/** The hyperparameters llama.cpp reads from the metadata, checked as its loader checks them. */
function hyperparameters(header: GgufHeader) {
  const archName = metaString(header, 'general.architecture');
  if (archName === undefined) throw new UsageError('GGUF header lacks general.architecture');
  if (!isArch(archName)) {
    throw new UsageError(`unsupported model architecture "${archName}" (supported: ${SUPPORTED_ARCHS.join(', ')})`);
  }
  const arch = archName;
  const layerCount = required(header, `${arch}.block_count`);
  if (layerCount > 4096) throw new UsageError(`GGUF key ${arch}.block_count = ${layerCount} is implausible`);
  const embd = required(header, `${arch}.embedding_length`);
  const heads = required(header, `${arch}.attention.head_count`);
  const kvHeads = perLayer(header, `${arch}.attention.head_count_kv`, layerCount, heads);
  if (embd % heads !== 0 && metaNumber(header, `${arch}.attention.key_length`) === undefined) {
    throw new UsageError(`embedding length ${embd} is not a multiple of head count ${heads}`);
  }
  const headDimK = optionalInt(header, `${arch}.attention.key_length`) ?? embd / heads;
  const headDimV = optionalInt(header, `${arch}.attention.value_length`) ?? embd / heads;
  const contextLength = required(header, `${arch}.context_length`);
  const ffnKey = header.metadata.get(`${arch}.feed_forward_length`);
  const ffn = ffnKey?.type === 'array' ? Math.max(...perLayer(header, `${arch}.feed_forward_length`, layerCount, 0)) : (optionalInt(header, `${arch}.feed_forward_length`) ?? 0);

  const experts = optionalInt(header, `${arch}.expert_count`) ?? 0;
  const expertsUsed = optionalInt(header, `${arch}.expert_used_count`) ?? 0;
  if (experts > 0 && (expertsUsed === 0 || expertsUsed > experts)) {
    throw new UsageError(`GGUF says ${expertsUsed} of ${experts} experts are used per token`);
  }
  if ((arch === 'qwen2moe' || arch === 'qwen3moe') && experts === 0) {
    throw new UsageError(`${arch} model lacks ${arch}.expert_count`);
  }
  const moe = experts > 0 ? { experts, expertsUsed } : undefined;
  const swa = swaLayers(header, arch, layerCount);
  return { arch, layerCount, embd, heads, kvHeads, headDimK, headDimV, contextLength, ffn, moe, swa };
}

/** Tensor bytes per layer (held, read per token, largest) and outside the layers. */
function tensorBytes(header: GgufHeader, layerCount: number, embd: number, moe: ModelProfile['moe']) {
  const weight = new Array<number>(layerCount).fill(0);
  const read = new Array<number>(layerCount).fill(0);
  const largest = new Array<number>(layerCount).fill(0);
  const typeBytes = new Map<string, number>();
  let tokenEmbd: GgufTensorInfo | undefined;
  let output: GgufTensorInfo | undefined;
  let outputNormBytes = 0;
  let otherBytes = 0;
  let fileTensorBytes = 0;
  for (const t of header.tensors) {
    fileTensorBytes += t.bytes;
    const m = LAYER_RE.exec(t.name);
    if (m) {
      const il = Number(m[1]);
      if (il >= layerCount) throw new UsageError(`tensor ${t.name} names layer ${il} but the model has ${layerCount} layers`);
      weight[il]! += t.bytes;
      // Expert tensors (ffn_{gate,up,down}_exps) are read only for the routed experts.
      read[il]! += moe && t.name.includes('_exps.') ? (t.bytes * moe.expertsUsed) / moe.experts : t.bytes;
      largest[il] = Math.max(largest[il]!, t.bytes);
      typeBytes.set(t.type.name, (typeBytes.get(t.type.name) ?? 0) + t.bytes);
    } else if (t.name === 'token_embd.weight') tokenEmbd = t;
    else if (t.name === 'output.weight') output = t;
    else if (t.name === 'output_norm.weight' || t.name === 'output_norm.bias') outputNormBytes += t.bytes;
    else otherBytes += t.bytes;
  }
  if (!tokenEmbd) throw new UsageError('GGUF has no token_embd.weight tensor');
  const vocab = tokenEmbd.dims[1] ?? 0;
  if (tokenEmbd.dims[0] !== embd || vocab <= 0) {
    throw new UsageError(`token_embd.weight has shape [${tokenEmbd.dims.join(', ')}], expected [${embd}, n_vocab]`);
  }
  for (let il = 0; il < layerCount; il++) {
    if (weight[il] === 0) throw new UsageError(`GGUF has no tensors for layer ${il}`);
  }
  return { weight, read, largest, tokenEmbd, vocab, output, outputNormBytes, otherBytes, fileTensorBytes, weightType: dominantType(typeBytes) };
}

/** The weight type holding the most layer bytes ("Q4_K" for a Q4_K_M file). */
export function dominantType(typeBytes: ReadonlyMap<string, number>): string {
  let weightType = 'F32';
  let most = -1;
  for (const [name, bytes] of typeBytes) {
    if (bytes > most) {
      most = bytes;
      weightType = name;
    }
  }
  return weightType;
}

/** Build the profile. Throws UsageError naming the problem for anything llama.cpp would refuse. */
export function modelProfile(header: GgufHeader): ModelProfile {
  const { arch, layerCount, embd, heads, kvHeads, headDimK, headDimV, contextLength, ffn, moe, swa } = hyperparameters(header);
  const t = tensorBytes(header, layerCount, embd, moe);
  const { tokenEmbd, output, vocab } = t;
  const layers: LayerProfile[] = [];
  for (let il = 0; il < layerCount; il++) {
    layers.push({
      index: il,
      weightBytes: t.weight[il]!,
      readBytesPerToken: t.read[il]!,
      swa: swa?.mask[il] ?? false,
      kEmbdGqa: headDimK * kvHeads[il]!,
      vEmbdGqa: headDimV * kvHeads[il]!,
      largestTensorBytes: t.largest[il]!,
    });
  }
  return {
    arch,
    name: metaString(header, 'general.name'),
    layerCount,
    layers,
    embd,
    ffn,
    vocab,
    heads,
    kvHeads,
    headDimK,
    headDimV,
    contextLength,
    swa: swa ? { window: swa.window, layers: swa.mask.filter(Boolean).length } : undefined,
    moe,
    tokenEmbdBytes: tokenEmbd.bytes,
    tokenEmbdRowBytes: tokenEmbd.bytes / vocab,
    outputNormBytes: t.outputNormBytes,
    outputBytes: output ? output.bytes : tokenEmbd.bytes,
    outputTied: !output,
    otherBytes: t.otherBytes,
    fileTensorBytes: t.fileTensorBytes,
    weightType: t.weightType,
    tensorCount: header.tensors.length,
  };
}
