import { open, readFile, readdir } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { z } from 'zod';
import { UsageError } from '../errors.ts';
import { type LayerProfile, type ModelProfile, dominantType } from './profile.ts';
import type { ExactArch } from './arch-rules.ts';

/**
 * The planner's ModelProfile for an MLX model directory (config.json + safetensors), built from
 * the config and the safetensors headers only — no weights read. Same shape as the GGUF profile,
 * so memory math and placement work unchanged.
 *
 * Mapping onto the GGUF vocabulary:
 *  - `*.layers.N.*` tensors → layer N (quantized weights are three tensors each — packed
 *    `weight`, `scales`, `biases` — and all count: that is what MLX keeps in memory);
 *  - `embed_tokens.*` → token embedding; `model.norm.*` → output norm; `lm_head.*` → output;
 *  - without `lm_head` (tied) the output is the embedding. MLX does not duplicate it (it calls
 *    `embed_tokens.as_linear`), but in Orchard's MLX pipeline every rank holds the embedding, the
 *    final norm and the head anyway, so counting the output separately is the honest figure
 *    for the last stage;
 *  - `arch` is the memory-math family (llama for llama/mistral/ministral3 …), while
 *    `mlx.modelType` keeps mlx-lm's own name.
 */
export interface MlxModelProfile extends ModelProfile {
  readonly format: 'mlx';
  readonly mlx: {
    readonly modelType: string;
    /** mlx-lm quantization (bits, group size, mode) when the checkpoint is quantized. */
    readonly quantization: { readonly bits: number; readonly groupSize: number; readonly mode: string } | undefined;
    readonly files: readonly string[];
    /**
     * Bytes per layer that tensor parallel keeps whole on every rank (mlx-lm's `shard()` splits
     * the attention and MLP projections, not the norms, the MoE router or a row-parallel bias).
     */
    readonly replicatedLayerBytes: readonly number[];
    /** Bytes per element of activations and KV cache: the float type the norms are stored in. */
    readonly activationBytes: number;
  };
}

export function isMlxProfile(profile: ModelProfile): profile is MlxModelProfile {
  return (profile as Partial<MlxModelProfile>).format === 'mlx';
}

/** One tensor as a safetensors header declares it. */
export interface SafetensorsTensor {
  readonly name: string;
  readonly dtype: string;
  readonly shape: readonly number[];
  readonly bytes: number;
}

/** Bytes per element of every safetensors dtype (U32 carries MLX's packed quantized weights). */
const DTYPE_BYTES: Readonly<Record<string, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  U64: 8,
  I32: 4,
  U32: 4,
  I16: 2,
  U16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
};

/** A header bigger than this is not a model header (the format itself caps it at 100 MB). */
const MAX_HEADER = 100_000_000;

const tensorEntrySchema = z.object({
  dtype: z.string(),
  shape: z.array(z.number().int().nonnegative()),
  data_offsets: z.tuple([z.number().int().nonnegative(), z.number().int().nonnegative()]),
});

/**
 * Parse a safetensors header: 8-byte little-endian length N, then N bytes of JSON mapping
 * tensor names to {dtype, shape, data_offsets}. `fileSize` (when known) bounds the offsets.
 * Throws UsageError for anything malformed.
 */
export function parseSafetensorsHeader(lengthAndJson: Uint8Array, fileSize?: number, what = 'safetensors file'): SafetensorsTensor[] {
  if (lengthAndJson.length < 8) throw new UsageError(`${what}: too short for a safetensors header`);
  const view = new DataView(lengthAndJson.buffer, lengthAndJson.byteOffset, lengthAndJson.byteLength);
  const n = Number(view.getBigUint64(0, true));
  if (n < 2 || n > MAX_HEADER) throw new UsageError(`${what}: header length ${n} is not plausible`);
  if (lengthAndJson.length < 8 + n) throw new UsageError(`${what}: header says ${n} bytes but only ${lengthAndJson.length - 8} are there`);
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(lengthAndJson.subarray(8, 8 + n)));
  } catch (err) {
    throw new UsageError(`${what}: header is not valid JSON (${err instanceof Error ? err.message : String(err)})`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new UsageError(`${what}: header is not a JSON object`);
  const dataSize = fileSize === undefined ? undefined : fileSize - 8 - n;
  const tensors: SafetensorsTensor[] = [];
  for (const [name, raw] of Object.entries(json)) {
    if (name === '__metadata__') continue;
    const parsed = tensorEntrySchema.safeParse(raw);
    if (!parsed.success) throw new UsageError(`${what}: tensor ${name} has a malformed entry`);
    const { dtype, shape, data_offsets: [begin, end] } = parsed.data;
    const size = DTYPE_BYTES[dtype];
    if (size === undefined) throw new UsageError(`${what}: tensor ${name} has unknown dtype ${dtype}`);
    const bytes = end - begin;
    const expected = shape.reduce((a, b) => a * b, 1) * size;
    if (bytes !== expected) {
      throw new UsageError(`${what}: tensor ${name} spans ${bytes} bytes but ${dtype}[${shape.join(', ')}] needs ${expected}`);
    }
    if (dataSize !== undefined && end > dataSize) throw new UsageError(`${what}: tensor ${name} ends past the end of the file`);
    tensors.push({ name, dtype, shape, bytes });
  }
  return tensors;
}

const numberish = z.number().int().positive();
const configSchema = z
  .object({
    model_type: z.string(),
    hidden_size: numberish,
    num_hidden_layers: numberish,
    num_attention_heads: numberish,
    num_key_value_heads: numberish.optional(),
    head_dim: numberish.nullish(),
    intermediate_size: z.number().int().nonnegative().optional(),
    vocab_size: numberish,
    max_position_embeddings: numberish.optional(),
    sliding_window: numberish.nullish(),
    layer_types: z.array(z.string()).optional(),
    num_local_experts: z.number().int().nonnegative().optional(),
    num_experts: z.number().int().nonnegative().optional(),
    num_experts_per_tok: z.number().int().nonnegative().optional(),
    moe_intermediate_size: z.number().int().nonnegative().optional(),
    n_routed_experts: z.number().int().nonnegative().nullish(),
    kv_lora_rank: numberish.optional(),
    qk_rope_head_dim: numberish.optional(),
    quantization: z
      .object({ bits: numberish, group_size: numberish, mode: z.string().optional() })
      .passthrough()
      .optional(),
    _name_or_path: z.string().optional(),
  })
  .passthrough();

/** mlx-lm model_type → the memory-math family the rest of Orchard knows. */
const FAMILY: Readonly<Record<string, ExactArch>> = {
  llama: 'llama',
  mistral: 'llama',
  ministral3: 'llama',
  qwen2: 'qwen2',
  qwen3: 'qwen3',
  qwen2_moe: 'qwen2moe',
  qwen3_moe: 'qwen3moe',
  gemma2: 'gemma2',
  gemma3_text: 'gemma3',
  phi3: 'phi3',
  deepseek_v3: 'deepseek2',
};

const LAYER_RE = /(?:^|\.)layers\.(\d+)\./;
/** Tensors `shard()` leaves whole: norms, the MoE router (`mlp.gate`, not `gate_proj`), biases of row-parallel projections. */
const REPLICATED_RE = /norm\.|\.mlp\.gate\.|\.(o_proj|down_proj)\.bias$/;
const EXPERT_RE = /\.(switch_mlp|experts)\./;

type MlxConfig = z.infer<typeof configSchema>;

/** config.json validated (vision-language checkpoints nest the language model's config). */
function parseConfig(configJson: unknown): MlxConfig {
  const merged =
    typeof configJson === 'object' && configJson !== null && 'text_config' in configJson && typeof configJson.text_config === 'object'
      ? { ...(configJson as Record<string, unknown>), ...(configJson.text_config as Record<string, unknown>) }
      : configJson;
  const parsed = configSchema.safeParse(merged);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new UsageError(`config.json: ${issue ? `${issue.path.join('.') || '(root)'}: ${issue.message}` : 'invalid'}`);
  }
  return parsed.data;
}

/** The attention and expert shape the config declares, checked as mlx-lm would load it. */
function hyperparameters(c: MlxConfig) {
  const arch = FAMILY[c.model_type];
  if (!arch) {
    throw new UsageError(`unsupported MLX model_type "${c.model_type}" (supported: ${Object.keys(FAMILY).join(', ')})`);
  }
  const layerCount = c.num_hidden_layers;
  const heads = c.num_attention_heads;
  const kvHeadCount = c.num_key_value_heads ?? heads;
  if (!c.head_dim && c.hidden_size % heads !== 0) {
    throw new UsageError(`config.json: hidden_size ${c.hidden_size} is not a multiple of num_attention_heads ${heads}`);
  }
  const headDim = c.head_dim ?? c.hidden_size / heads;
  const experts = c.num_local_experts ?? c.num_experts ?? c.n_routed_experts ?? 0;
  const expertsUsed = c.num_experts_per_tok ?? 0;
  if (experts > 0 && (expertsUsed === 0 || expertsUsed > experts)) {
    throw new UsageError(`config.json says ${expertsUsed} of ${experts} experts are used per token`);
  }
  const moe = experts > 0 ? { experts, expertsUsed, expertFfn: c.moe_intermediate_size ?? 0, shared: 0 } : undefined;
  let swaMask: boolean[] | undefined;
  if (c.layer_types) {
    if (c.layer_types.length !== layerCount) {
      throw new UsageError(`config.json: layer_types has ${c.layer_types.length} entries for ${layerCount} layers`);
    }
    swaMask = c.layer_types.map((t) => t === 'sliding_attention');
    if (!swaMask.some(Boolean)) swaMask = undefined;
  }
  if (swaMask && !c.sliding_window) throw new UsageError('config.json: sliding layers without sliding_window');
  return { arch, layerCount, heads, kvHeadCount, headDim, moe, swaMask, kv: kvWidths(c, kvHeadCount, headDim) };
}

/**
 * Cached elements per token and layer. mlx-lm's deepseek_v3 attention (Multi-head Latent
 * Attention) caches the normed latent (kv_lora_rank) as keys and the shared rope key
 * (qk_rope_head_dim) as values, one "head" each, not full per-head K and V.
 */
function kvWidths(c: MlxConfig, kvHeadCount: number, headDim: number): { k: number; v: number; heads: number } {
  if (c.model_type === 'deepseek_v3') {
    if (!c.kv_lora_rank || !c.qk_rope_head_dim) throw new UsageError('config.json: deepseek_v3 needs kv_lora_rank and qk_rope_head_dim');
    return { k: c.kv_lora_rank, v: c.qk_rope_head_dim, heads: 1 };
  }
  return { k: headDim * kvHeadCount, v: headDim * kvHeadCount, heads: kvHeadCount };
}

/** Tensor bytes per layer (held, read per token, largest) and outside the layers. */
function tensorBytes(tensors: readonly SafetensorsTensor[], layerCount: number, vocab: number, moe: ModelProfile['moe']) {
  const weight = new Array<number>(layerCount).fill(0);
  const read = new Array<number>(layerCount).fill(0);
  const largest = new Array<number>(layerCount).fill(0);
  const replicated = new Array<number>(layerCount).fill(0);
  let activationBytes = 0;
  const dtypeBytes = new Map<string, number>();
  let embedBytes = 0;
  let embedRows = 0;
  let headBytes = 0;
  let normBytes = 0;
  let otherBytes = 0;
  let total = 0;
  for (const t of tensors) {
    total += t.bytes;
    const m = LAYER_RE.exec(t.name);
    if (m) {
      const il = Number(m[1]);
      if (il >= layerCount) {
        // mlx-lm drops MTP layers past the last model layer at load; they never reach memory.
        continue;
      }
      weight[il]! += t.bytes;
      read[il]! += moe && EXPERT_RE.test(t.name) ? (t.bytes * moe.expertsUsed) / moe.experts : t.bytes;
      largest[il] = Math.max(largest[il]!, t.bytes);
      if (REPLICATED_RE.test(t.name)) {
        replicated[il]! += t.bytes;
        if (/norm\.weight$/.test(t.name)) activationBytes ||= DTYPE_BYTES[t.dtype] ?? 0;
      }
      dtypeBytes.set(t.dtype, (dtypeBytes.get(t.dtype) ?? 0) + t.bytes);
    } else if (/(^|\.)embed_tokens\./.test(t.name)) {
      embedBytes += t.bytes;
      if (t.name.endsWith('embed_tokens.weight')) embedRows = t.shape[0] ?? 0;
    } else if (/(^|\.)lm_head\./.test(t.name)) headBytes += t.bytes;
    else if (/(^|\.)(model\.)?norm\./.test(t.name)) normBytes += t.bytes;
    else if (/inv_freq$/.test(t.name)) continue; // sanitize() drops precomputed rotary tables
    else otherBytes += t.bytes;
  }
  if (embedBytes === 0) throw new UsageError('checkpoint has no embed_tokens weights');
  if (embedRows !== vocab) {
    throw new UsageError(`embed_tokens has ${embedRows} rows but config.json says vocab_size ${vocab}`);
  }
  for (let il = 0; il < layerCount; il++) {
    if (weight[il] === 0) throw new UsageError(`checkpoint has no tensors for layer ${il}`);
  }
  return { weight, read, largest, replicated, activationBytes: activationBytes || 2, dtypeBytes, embedBytes, headBytes, normBytes, otherBytes, total };
}

/** mlx-lm's quantization as a type name ("Q4g64"), else the dtype holding the most layer bytes. */
function weightTypeOf(q: MlxConfig['quantization'], dtypeBytes: ReadonlyMap<string, number>): string {
  if (q) return `${q.mode && q.mode !== 'affine' ? `${q.mode}-` : ''}Q${q.bits}g${q.group_size}`;
  return dominantType(dtypeBytes);
}

/** Build the profile from a parsed config.json and every tensor of the checkpoint. Pure. */
export function mlxModelProfile(configJson: unknown, tensors: readonly SafetensorsTensor[], files: readonly string[] = [], name?: string): MlxModelProfile {
  const c = parseConfig(configJson);
  const { arch, layerCount, heads, headDim, moe, swaMask, kv } = hyperparameters(c);
  const t = tensorBytes(tensors, layerCount, c.vocab_size, moe);
  const q = c.quantization;
  const layers: LayerProfile[] = t.weight.map((w, il) => ({
    index: il,
    weightBytes: w,
    readBytesPerToken: t.read[il]!,
    swa: swaMask?.[il] ?? false,
    routedExperts: t.read[il]! < w,
    kEmbdGqa: kv.k,
    vEmbdGqa: kv.v,
    largestTensorBytes: t.largest[il]!,
  }));
  return {
    arch,
    estimated: [],
    skippedBytes: 0,
    name: name ?? c._name_or_path,
    layerCount,
    layers,
    embd: c.hidden_size,
    ffn: c.intermediate_size ?? 0,
    vocab: c.vocab_size,
    heads,
    kvHeads: new Array<number>(layerCount).fill(kv.heads),
    headDimK: headDim,
    headDimV: headDim,
    contextLength: c.max_position_embeddings ?? 4096,
    swa: swaMask ? { window: c.sliding_window ?? 0, layers: swaMask.filter(Boolean).length } : undefined,
    moe,
    tokenEmbdBytes: t.embedBytes,
    tokenEmbdRowBytes: t.embedBytes / c.vocab_size,
    outputNormBytes: t.normBytes,
    outputBytes: t.headBytes > 0 ? t.headBytes : t.embedBytes,
    outputTied: t.headBytes === 0,
    otherBytes: t.otherBytes,
    fileTensorBytes: t.total,
    weightType: weightTypeOf(q, t.dtypeBytes),
    tensorCount: tensors.length,
    format: 'mlx',
    mlx: {
      modelType: c.model_type,
      quantization: q ? { bits: q.bits, groupSize: q.group_size, mode: q.mode ?? 'affine' } : undefined,
      files: [...files],
      replicatedLayerBytes: t.replicated,
      activationBytes: t.activationBytes,
    },
  };
}

/** Read just the header of one safetensors file (two small reads, whatever the file's size). */
export async function readSafetensorsHeader(path: string): Promise<SafetensorsTensor[]> {
  const fh = await open(path, 'r').catch((err: NodeJS.ErrnoException) => {
    throw new UsageError(`cannot open ${path}: ${err.code ?? err.message}`);
  });
  try {
    const { size } = await fh.stat();
    const head = Buffer.alloc(8);
    await fh.read(head, 0, 8, 0);
    const n = Number(head.readBigUInt64LE(0));
    if (n < 2 || n > MAX_HEADER || 8 + n > size) throw new UsageError(`${path}: header length ${n} does not fit a ${size}-byte file`);
    const buf = Buffer.alloc(8 + n);
    head.copy(buf);
    await fh.read(buf, 8, n, 8);
    return parseSafetensorsHeader(buf, size, path);
  } finally {
    await fh.close();
  }
}

/** Is this directory an MLX model (config.json + safetensors), as opposed to a GGUF file? */
export async function isMlxModelDir(dir: string): Promise<boolean> {
  try {
    const names = await readdir(dir);
    return names.includes('config.json') && names.some((n) => n.endsWith('.safetensors'));
  } catch {
    return false;
  }
}

/**
 * Profile an MLX model directory: config.json, the weight files named by
 * model.safetensors.index.json (or every model*.safetensors), headers only.
 */
export async function readMlxModelProfile(dir: string): Promise<MlxModelProfile> {
  let config: unknown;
  try {
    config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new UsageError(`${join(dir, 'config.json')}: ${e.code === 'ENOENT' ? 'not found (not an MLX model directory?)' : e.message}`);
  }
  let files: string[];
  try {
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8')) as { weight_map?: Record<string, string> };
    if (!index.weight_map || typeof index.weight_map !== 'object') throw new UsageError(`${dir}/model.safetensors.index.json has no weight_map`);
    files = [...new Set(Object.values(index.weight_map))].sort();
  } catch (err) {
    if (err instanceof UsageError) throw err;
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new UsageError(`${dir}/model.safetensors.index.json: ${(err as Error).message}`);
    files = (await readdir(dir)).filter((n) => /^model.*\.safetensors$/.test(n)).sort();
  }
  if (files.length === 0) throw new UsageError(`${dir} has no model*.safetensors files`);
  const tensors: SafetensorsTensor[] = [];
  for (const f of files) {
    if (f.includes('/') || f.includes('\\')) throw new UsageError(`weight file name ${f} must not contain a path`);
    tensors.push(...(await readSafetensorsHeader(join(dir, f))));
  }
  return mlxModelProfile(config, tensors, files, basename(dir));
}
