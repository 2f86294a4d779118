import { createReadStream } from 'node:fs';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { readGgufHeader } from '../../shared/gguf/reader.ts';
import type { FileMemo } from '../../shared/file-memo.ts';
import { readJsonMap, writeJsonMap } from '../../shared/json-map-file.ts';
import { Fnv1a64 } from '../../shared/rpc-cache/fnv.ts';
import type { TensorHash } from '../../shared/rpc-cache/known-hashes.ts';
import { type CacheStage, type CachedTensor, RPC_CACHE_MIN_SIZE_BYTES, type TensorLayout, cacheEntryName, rpcCacheDir, stageCachePlan } from '../../shared/rpc-cache/plan.ts';

/**
 * Pre-seeding a ggml-rpc-server tensor cache from a local copy of the model file, so the head
 * offers these tensors by hash (RPC_CMD_SET_TENSOR_HASH) and the server finds them on disk
 * instead of receiving the bytes. The entries are exactly what the rpc-server would have
 * written itself after receiving them: file `<LLAMA_CACHE>/rpc/<fnv1a64 hex>` holding the raw
 * tensor bytes.
 *
 * I/O shape: each tensor is streamed once from the GGUF file (chunks of `chunkBytes`), hashed
 * and written to a temporary file in the cache dir as it goes, then renamed to its hash name
 * (atomic, so a half-written entry is never visible to the server). A manifest
 * (`orchard-seeded.json`, not a hash name so the server ignores it) remembers, per model file
 * (path, size, mtime) and tensor offset, the hash already written; a repeated seed then skips
 * those tensors without reading them, checks their entries all at once and rewrites no manifest.
 * What the seed takes from the GGUF header (tensor names, offsets, sizes) comes from a
 * `FileMemo` when the caller keeps one: the header of a real model is megabytes of
 * vocabulary, re-parsed on every load for the same few hundred tensor entries.
 */

export interface SeedProgress {
  readonly tensorsDone: number;
  readonly tensorsTotal: number;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  /** Bytes that had to be read and written (not already present). */
  readonly bytesWritten: number;
}

export interface SeedOptions {
  readonly modelPath: string;
  /** The LLAMA_CACHE dir given to the rpc-server (entries go into `<dir>/rpc/`). */
  readonly llamaCacheDir: string;
  readonly stage: CacheStage;
  readonly thresholdBytes?: number;
  readonly chunkBytes?: number;
  readonly onProgress?: (p: SeedProgress) => void;
  readonly signal?: AbortSignal;
  /** Where the file's tensor layout is remembered between seeds (the agent keeps one, of `readTensorLayout`); without it the header is read every time. */
  readonly layouts?: FileMemo<TensorLayout>;
}

/** The part of a GGUF header seeding uses (the vocabulary and other metadata dropped). */
export async function readTensorLayout(path: string): Promise<TensorLayout> {
  const header = await readGgufHeader(path);
  if (!header.hasData) throw new Error(`${path} holds no tensor data (header-only file)`);
  return { dataOffset: header.dataOffset, tensors: header.tensors.map((t) => ({ name: t.name, offset: t.offset, bytes: t.bytes })) };
}

export interface SeedResult extends SeedProgress {
  readonly cacheDir: string;
  /** Tensor name → 16-hex hash of every cache entry this stage needs. */
  readonly entries: Readonly<Record<string, string>>;
  /** The same with each tensor's size: the known hashes the head's engine offers without re-hashing. */
  readonly hashes: readonly TensorHash[];
  /** Bytes of the stage's tensors at or under the threshold: these still cross the network. */
  readonly sentBytes: number;
  readonly sentTensors: readonly string[];
  readonly seconds: number;
}

/** `${path}\0${size}\0${mtimeMs}\0${fileOffset}\0${bytes}` → cache entry name, so a re-seed copies nothing twice. */
const MANIFEST = 'orchard-seeded.json';

async function fileHasSize(path: string, bytes: number): Promise<boolean> {
  try {
    const st = await stat(path);
    return st.isFile() && st.size === bytes;
  } catch {
    return false;
  }
}

/** Stream `bytes` from `start` of `path` into `tmp`, returning the FNV-1a hash of what was copied. */
async function copyHashing(path: string, start: number, bytes: number, tmp: string, chunkBytes: number, signal?: AbortSignal): Promise<string> {
  const hash = new Fnv1a64();
  const out = await open(tmp, 'w');
  let copied = 0;
  try {
    const src = createReadStream(path, { start, end: start + bytes - 1, highWaterMark: chunkBytes, ...(signal ? { signal } : {}) });
    for await (const chunk of src as AsyncIterable<Buffer>) {
      hash.update(chunk);
      await out.write(chunk);
      copied += chunk.length;
    }
  } finally {
    await out.close();
  }
  if (copied !== bytes) throw new Error(`short read from ${path}: ${copied} of ${bytes} bytes at offset ${start}`);
  return hash.hex();
}

export async function seedTensorCache(o: SeedOptions): Promise<SeedResult> {
  const t0 = performance.now();
  const st = await stat(o.modelPath);
  const layout = await (o.layouts ? o.layouts.get(o.modelPath, st) : readTensorLayout(o.modelPath));
  const plan = stageCachePlan(layout, o.stage, o.thresholdBytes ?? RPC_CACHE_MIN_SIZE_BYTES);
  const dir = rpcCacheDir(o.llamaCacheDir);
  await mkdir(dir, { recursive: true });
  const seeded = await readJsonMap(join(dir, MANIFEST));
  const keyOf = (t: CachedTensor) => `${o.modelPath}\0${st.size}\0${st.mtimeMs}\0${t.fileOffset}\0${t.bytes}`;
  // Entries the manifest names, checked all at once: a repeated load finds every one of them.
  const present = await Promise.all(plan.cached.map(async (t) => {
    const known = seeded[keyOf(t)];
    return known !== undefined && (await fileHasSize(join(dir, known), t.bytes)) ? known : undefined;
  }));
  const chunk = o.chunkBytes ?? 4 * 1024 * 1024;
  const entries: Record<string, string> = {};
  let bytesDone = 0;
  let bytesWritten = 0;
  let tensorsDone = 0;
  const total = plan.cachedBytes;
  const report = () =>
    o.onProgress?.({ tensorsDone, tensorsTotal: plan.cached.length, bytesDone, bytesTotal: total, bytesWritten });
  report();
  for (const [i, t] of plan.cached.entries()) {
    o.signal?.throwIfAborted();
    const known = present[i];
    if (known) {
      entries[t.name] = known;
    } else {
      const tmp = join(dir, `.orchard-seed-${process.pid}-${tensorsDone}.tmp`);
      try {
        const hex = cacheEntryName(await copyHashing(o.modelPath, t.fileOffset, t.bytes, tmp, chunk, o.signal));
        const target = join(dir, hex);
        if (await fileHasSize(target, t.bytes)) await rm(tmp, { force: true });
        else await rename(tmp, target);
        entries[t.name] = hex;
        seeded[keyOf(t)] = hex;
        bytesWritten += t.bytes;
      } finally {
        await rm(tmp, { force: true });
      }
    }
    tensorsDone++;
    bytesDone += t.bytes;
    // a repeated seed finds everything at once: one progress message for it, not one per tensor
    if (!known || tensorsDone === plan.cached.length) report();
  }
  if (present.some((p) => p === undefined)) await writeJsonMap(join(dir, MANIFEST), seeded);
  return {
    cacheDir: dir,
    entries,
    tensorsDone,
    tensorsTotal: plan.cached.length,
    bytesDone,
    bytesTotal: total,
    bytesWritten,
    sentBytes: plan.sentBytes,
    sentTensors: plan.sent.map((t) => t.name),
    hashes: plan.cached.map((t) => ({ name: t.name, bytes: t.bytes, hash: entries[t.name]! })),
    seconds: (performance.now() - t0) / 1000,
  };
}
