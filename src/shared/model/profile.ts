import { UsageError } from '../errors.ts';
import type { GgufHeader, GgufTensorInfo } from '../gguf/types.ts';
import { metaArray, metaNumber, metaString } from '../gguf/types.ts';
import { MOE_ONLY, isExactArch, isMla, nextnLayers, swaLayers } from './arch-rules.ts';

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
  /** The layer's FFN is routed experts (MoE layers; leading/interleaved dense layers are not). */
  readonly routedExperts: boolean;
  /** n_embd_k_gqa = key_length × n_head_kv of this layer (0 when the layer has no KV). */
  readonly kEmbdGqa: number;
  readonly vEmbdGqa: number;
  /** Largest single tensor of the layer: sizes scratch in compute buffers. */
  readonly largestTensorBytes: number;
}

export interface ModelProfile {
  /** general.architecture: any architecture llama.cpp loads (see `estimated`). */
  readonly arch: string;
  /**
   * Parts of the memory math that are estimates, empty for the architectures Orchard knows
   * exactly (arch-rules.ts EXACT_ARCHS). Weights are always exact (the tensor table); for other
   * architectures the KV cache comes from the standard keys and the compute buffer from the
   * llama-style structure, which the architecture may not follow.
   */
  readonly estimated: readonly string[];
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
  readonly moe:
    | {
        readonly experts: number;
        readonly expertsUsed: number;
        /** Width of one expert's FFN (`expert_feed_forward_length`, else the tensor's). */
        readonly expertFfn: number;
        /** Always-active shared experts (`expert_shared_count`; DeepSeek, GLM, Kimi). */
        readonly shared: number;
      }
    | undefined;
  /** Bytes of tensors llama.cpp does not load (multi-token-prediction layers, arch-rules.ts nextnLayers). */
  readonly skippedBytes: number;
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

const LAYER_RE = /^blk\.(\d+)\./;

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

/** The hyperparameters llama.cpp reads from the metadata, checked as its loader checks them. */
function hyperparameters(header: GgufHeader) {
  const arch = metaString(header, 'general.architecture');
  if (arch === undefined) throw new UsageError('GGUF header lacks general.architecture');
  const exact = isExactArch(arch);
  const blockCount = required(header, `${arch}.block_count`);
  if (blockCount > 4096) throw new UsageError(`GGUF key ${arch}.block_count = ${blockCount} is implausible`);
  const nextn = nextnLayers(header, arch);
  if (nextn >= blockCount) throw new UsageError(`GGUF key ${arch}.nextn_predict_layers = ${nextn} leaves no layers of ${blockCount}`);
  const layerCount = blockCount - nextn;
  const embd = required(header, `${arch}.embedding_length`);
  // Architectures without attention keys (recurrent ones) have no KV cache Orchard can size.
  const headsKey = header.metadata.get(`${arch}.attention.head_count`);
  if (exact || headsKey) required(header, `${arch}.attention.head_count`);
  const headsPerLayer = headsKey ? perLayer(header, `${arch}.attention.head_count`, blockCount, 0) : new Array<number>(blockCount).fill(0);
  const heads = Math.max(...headsPerLayer);
  const kvHeads = perLayer(header, `${arch}.attention.head_count_kv`, blockCount, heads).slice(0, layerCount);
  if (heads > 0 && embd % heads !== 0 && metaNumber(header, `${arch}.attention.key_length`) === undefined) {
    throw new UsageError(`embedding length ${embd} is not a multiple of head count ${heads}`);
  }
  const headDimK = optionalInt(header, `${arch}.attention.key_length`) ?? (heads ? embd / heads : 0);
  // MLA keeps no V cache: the latent in K is all there is (arch-rules.ts isMla).
  const headDimV = isMla(header, arch) ? 0 : (optionalInt(header, `${arch}.attention.value_length`) ?? (heads ? embd / heads : 0));
  const contextLength = required(header, `${arch}.context_length`);
  const ffnKey = header.metadata.get(`${arch}.feed_forward_length`);
  const ffn = ffnKey?.type === 'array' ? Math.max(...perLayer(header, `${arch}.feed_forward_length`, blockCount, 0)) : (optionalInt(header, `${arch}.feed_forward_length`) ?? 0);

  const experts = optionalInt(header, `${arch}.expert_count`) ?? 0;
  const expertsUsed = optionalInt(header, `${arch}.expert_used_count`) ?? 0;
  if (experts > 0 && (expertsUsed === 0 || expertsUsed > experts)) {
    throw new UsageError(`GGUF says ${expertsUsed} of ${experts} experts are used per token`);
  }
  if (MOE_ONLY.has(arch) && experts === 0) throw new UsageError(`${arch} model lacks ${arch}.expert_count`);
  const moe =
    experts > 0
      ? {
          experts,
          expertsUsed,
          expertFfn: optionalInt(header, `${arch}.expert_feed_forward_length`) ?? 0,
          shared: optionalInt(header, `${arch}.expert_shared_count`) ?? 0,
        }
      : undefined;
  const swa = swaLayers(header, arch, layerCount);
  const estimated = exact ? [] : heads > 0 ? ['KV cache (standard attention keys)', 'compute buffer'] : ['KV cache (no attention keys: counted as none)', 'compute buffer'];
  return { arch, estimated, blockCount, layerCount, embd, heads, kvHeads, headDimK, headDimV, contextLength, ffn, moe, swa };
}

/** Tensor bytes per layer (held, read per token, largest) and outside the layers. */
function tensorBytes(header: GgufHeader, blockCount: number, layerCount: number, embd: number, moe: ModelProfile['moe']) {
  const weight = new Array<number>(layerCount).fill(0);
  const read = new Array<number>(layerCount).fill(0);
  const largest = new Array<number>(layerCount).fill(0);
  const experts = new Array<boolean>(layerCount).fill(false);
  const typeBytes = new Map<string, number>();
  let tokenEmbd: GgufTensorInfo | undefined;
  let output: GgufTensorInfo | undefined;
  let outputNormBytes = 0;
  let otherBytes = 0;
  let skippedBytes = 0;
  let fileTensorBytes = 0;
  let expertFfn = 0;
  for (const t of header.tensors) {
    fileTensorBytes += t.bytes;
    const m = LAYER_RE.exec(t.name);
    if (m) {
      const il = Number(m[1]);
      if (il >= blockCount) throw new UsageError(`tensor ${t.name} names layer ${il} but the model has ${blockCount} layers`);
      if (il >= layerCount) {
        skippedBytes += t.bytes;
        continue;
      }
      weight[il]! += t.bytes;
      // Routed expert tensors (ffn_{gate,up,down,gate_up}_exps, weights and biases) are read only
      // for the experts a token is routed to; shared experts (_shexp), the router and attention
      // are read in full.
      const routed = moe && t.name.includes('_exps.');
      read[il]! += routed ? (t.bytes * moe.expertsUsed) / moe.experts : t.bytes;
      if (routed) experts[il] = true;
      if (routed && t.name.includes('ffn_down_exps.weight')) expertFfn = t.dims[0] ?? 0;
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
  return { weight, read, largest, experts, tokenEmbd, vocab, output, outputNormBytes, otherBytes, skippedBytes, fileTensorBytes, expertFfn, weightType: dominantType(typeBytes) };
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
  const { arch, estimated, blockCount, layerCount, embd, heads, kvHeads, headDimK, headDimV, contextLength, ffn, moe, swa } = hyperparameters(header);
  const t = tensorBytes(header, blockCount, layerCount, embd, moe);
  const { tokenEmbd, output, vocab } = t;
  const layers: LayerProfile[] = [];
  for (let il = 0; il < layerCount; il++) {
    layers.push({
      index: il,
      weightBytes: t.weight[il]!,
      readBytesPerToken: t.read[il]!,
      swa: swa?.mask[il] ?? false,
      routedExperts: t.experts[il]!,
      kEmbdGqa: headDimK * kvHeads[il]!,
      vEmbdGqa: headDimV * kvHeads[il]!,
      largestTensorBytes: t.largest[il]!,
    });
  }
  return {
    arch,
    estimated,
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
    moe: moe && { ...moe, expertFfn: moe.expertFfn || t.expertFfn },
    skippedBytes: t.skippedBytes,
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

/**
 * Weight bytes a model holds against the weight bytes one decoded token reads. They differ for
 * mixture-of-experts models: a token reads the routed experts it is sent to (expertsUsed of
 * experts), the shared experts, attention, the router, the dense layers, one token_embd row and
 * the output head — the figure decode speed follows on bandwidth-bound Macs.
 */
export function weightTraffic(p: ModelProfile): { heldBytes: number; readBytesPerToken: number } {
  // Tied output: llama.cpp duplicates token_embd onto the output device, so it is held twice.
  let held = p.tokenEmbdBytes + p.outputNormBytes + p.outputBytes + p.otherBytes;
  let read = p.tokenEmbdRowBytes + p.outputNormBytes + p.outputBytes + p.otherBytes;
  for (const l of p.layers) {
    held += l.weightBytes;
    read += l.readBytesPerToken;
  }
  return { heldBytes: held, readBytesPerToken: read };
}
