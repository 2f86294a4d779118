import { type CacheStage, stageHoldsTensor } from './plan.ts';

/**
 * Known tensor hashes: what a node that pre-seeded its rpc-server cache already computed, handed
 * to the head's llama-server so that it offers those hashes instead of hashing every weight byte
 * again (FNV-1a one byte at a time: the largest part of a pre-seeded load, bench/README.md
 * bench:lan). The head engine reads them from the file named by GGML_RPC_TENSOR_HASHES
 * (Orchard's ggml-rpc-hash-hints.patch, src/node/llama/patches.ts): one `<name> <bytes> <hash>`
 * line per tensor, used only for a whole tensor of exactly that size.
 *
 * Trust: a hint decides only which cache entry the rpc-server it is sent to loads. The
 * coordinator keeps, of each node's hashes, those of the stage that node serves
 * (`hashesOfStage`), so a node can name entries for its own layers only — which it computes
 * anyway.
 */
export interface TensorHash {
  readonly name: string;
  readonly bytes: number;
  /** FNV-1a 64, 16 lowercase hex digits: the rpc-server's cache entry name. */
  readonly hash: string;
}

export const TENSOR_HASHES_ENV = 'GGML_RPC_TENSOR_HASHES';

/** What the engine's parser accepts: a GGUF tensor name (≤ 63 bytes, ggml's limit) without white space. */
export const TENSOR_NAME_RE = /^[A-Za-z0-9_.+-]{1,63}$/;
export const TENSOR_HASH_RE = /^[0-9a-f]{16}$/;

/**
 * The hashes of tensors `stage` holds. `tiedOutput` is unknown to the coordinator without the
 * header; `token_embd.weight` on the output stage is kept either way: when the model has an
 * `output.weight`, the head holds `token_embd.weight` on its CPU, never on an rpc-server, so the
 * hint is never consulted.
 */
export function hashesOfStage(hashes: readonly TensorHash[], stage: CacheStage): TensorHash[] {
  return hashes.filter((h) => TENSOR_NAME_RE.test(h.name) && TENSOR_HASH_RE.test(h.hash) && h.bytes > 0 && stageHoldsTensor(h.name, stage, true));
}

/** The file the engine reads; one line per tensor, the first of a repeated name wins. */
export function knownHashesFileText(hashes: readonly TensorHash[]): string {
  const seen = new Set<string>();
  const lines: string[] = [];
  for (const h of hashes) {
    if (seen.has(h.name)) continue;
    seen.add(h.name);
    lines.push(`${h.name} ${h.bytes} ${h.hash}\n`);
  }
  return lines.join('');
}

/** The proto shape (uint64 as a decimal string, as the loader gives longs). */
export function tensorHashesToWire(hashes: readonly TensorHash[]): { name: string; bytes: string; hash: string }[] {
  return hashes.map((h) => ({ name: h.name, bytes: String(h.bytes), hash: h.hash }));
}

/** From the proto shape; malformed entries are dropped (a hint is an optimisation, never required). */
export function tensorHashesFromWire(raw: unknown): TensorHash[] {
  if (!Array.isArray(raw)) return [];
  const out: TensorHash[] = [];
  for (const r of raw as Record<string, unknown>[]) {
    const h = { name: String(r?.name ?? ''), bytes: Number(r?.bytes ?? 0), hash: String(r?.hash ?? '') };
    if (TENSOR_NAME_RE.test(h.name) && TENSOR_HASH_RE.test(h.hash) && Number.isSafeInteger(h.bytes) && h.bytes > 0) out.push(h);
  }
  return out;
}
