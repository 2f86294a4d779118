import type { GgufTensorInfo } from '../gguf/types.ts';

/**
 * Which tensors of a GGUF file a ggml-rpc-server will be offered by hash, and where their bytes
 * are. Pure. Rules from ggml/src/ggml-rpc/ggml-rpc.cpp (this llama.cpp version):
 * * `rpc_use_hash_cache`: `size > HASH_THRESHOLD` (10 MiB upstream, RPC_CACHE_MIN_SIZE_BYTES in
 *   Orchard's patched build; strictly greater) and the buffer is a
 *   weights buffer. With mmap (llama.cpp's default, and Orchard never passes --no-mmap) the model
 *   loader uploads each tensor in one `ggml_backend_tensor_set(cur, data, 0, ggml_nbytes)`, so
 *   "size" is the whole tensor and the hash covers exactly the tensor's bytes in the file.
 *   (Without mmap the loader may upload in chunks through a staging buffer; then each chunk
 *   would be hashed separately and this plan would not match — hence the mmap assumption.)
 * * A stage holding layers a..b gets every `blk.N.*` tensor with a ≤ N ≤ b; the stage holding
 *   the output layer (the last in llama.cpp's split) also gets `output.weight` — or, for models
 *   with tied embeddings (no `output.weight`), a duplicate of `token_embd.weight`.
 *   Non-layer tensors other than those (norms, rope factors) are tiny and always sent.
 */
export const HASH_THRESHOLD_BYTES = 10 * 1024 * 1024;

/**
 * The threshold Orchard's engines use instead: `orchard setup` builds llama.cpp with the
 * `GGML_RPC_CACHE_MIN_SIZE` patch (src/node/llama/patches.ts) and every llama-server the agent
 * starts with RPC targets gets this value (rpcCacheMinSizeEnv), so the GQA K/V projections of
 * real models (0.5–4 MiB) are offered by hash too. 64 KiB: every weight matrix of the models
 * Orchard places is above it, while 1-D norms (≤ 32 KiB at dim 8192) stay on the wire: each
 * offered tensor costs a round trip (hash probe) on every load, which a few KiB do not repay.
 * Pre-seeding uses the same value, so it writes exactly the entries the head will ask for.
 */
export const RPC_CACHE_MIN_SIZE_BYTES = 64 * 1024;

/** The environment that sets the patched engine's threshold (llama-server, the RPC client, reads it). */
export function rpcCacheMinSizeEnv(bytes: number = RPC_CACHE_MIN_SIZE_BYTES): { GGML_RPC_CACHE_MIN_SIZE: string } {
  return { GGML_RPC_CACHE_MIN_SIZE: String(bytes) };
}

export interface CacheStage {
  readonly firstLayer: number;
  /** Inclusive. */
  readonly lastLayer: number;
  /** This stage holds llama.cpp's output layer (the last stage of the split). */
  readonly holdsOutput: boolean;
}

/** What a cache plan needs of a GGUF header: where the data starts and each tensor's name, offset and size. */
export interface TensorLayout {
  readonly dataOffset: number;
  readonly tensors: readonly Pick<GgufTensorInfo, 'name' | 'offset' | 'bytes'>[];
}

export interface CachedTensor {
  readonly name: string;
  /** Absolute offset in the GGUF file. */
  readonly fileOffset: number;
  readonly bytes: number;
}

export interface StageCachePlan {
  /** Tensors the head will offer by hash: these are what pre-seeding writes. */
  readonly cached: readonly CachedTensor[];
  /** Tensors of the stage at or under the threshold: always sent over the wire. */
  readonly sent: readonly CachedTensor[];
  readonly cachedBytes: number;
  readonly sentBytes: number;
}

const LAYER_RE = /^blk\.(\d+)\./;

/**
 * Whether the stage holds the tensor named `name`; `tiedOutput`: the model has no `output.weight`,
 * so the output stage holds llama.cpp's duplicate of `token_embd.weight`.
 */
export function stageHoldsTensor(name: string, stage: CacheStage, tiedOutput: boolean): boolean {
  const m = LAYER_RE.exec(name);
  if (m) {
    const layer = Number(m[1]);
    return layer >= stage.firstLayer && layer <= stage.lastLayer;
  }
  if (!stage.holdsOutput) return false;
  return name === 'output.weight' || name === 'output_norm.weight' || name === 'output_norm.bias' || (name === 'token_embd.weight' && tiedOutput);
}

export function stageTensors(header: TensorLayout, stage: CacheStage): CachedTensor[] {
  const tied = !header.tensors.some((t) => t.name === 'output.weight');
  return header.tensors
    .filter((t) => stageHoldsTensor(t.name, stage, tied))
    .map((t) => ({ name: t.name, fileOffset: header.dataOffset + t.offset, bytes: t.bytes }));
}

export function stageCachePlan(
  header: TensorLayout,
  stage: CacheStage,
  thresholdBytes: number = RPC_CACHE_MIN_SIZE_BYTES,
): StageCachePlan {
  const cached: CachedTensor[] = [];
  const sent: CachedTensor[] = [];
  for (const t of stageTensors(header, stage)) (t.bytes > thresholdBytes ? cached : sent).push(t);
  const sum = (xs: CachedTensor[]) => xs.reduce((a, t) => a + t.bytes, 0);
  return { cached, sent, cachedBytes: sum(cached), sentBytes: sum(sent) };
}

/**
 * Where ggml-rpc-server looks for a cache entry: `<LLAMA_CACHE>/rpc/<16 hex digits>`. Orchard's
 * supervisor starts `ggml-rpc-server -c` with LLAMA_CACHE set to the StartEngine cache_dir, so
 * the entries live in `<cache_dir>/rpc/`.
 */
export function rpcCacheDir(llamaCacheDir: string): string {
  return `${llamaCacheDir.replace(/\/+$/, '')}/rpc`;
}

export function cacheEntryName(hashHex: string): string {
  if (!/^[0-9a-f]{16}$/.test(hashHex)) throw new Error(`not a 16-hex-digit FNV-1a hash: ${hashHex}`);
  return hashHex;
}
