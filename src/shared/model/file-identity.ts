import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { readJsonMap, writeJsonMap } from '../json-map-file.ts';

/**
 * A model file's content identity, the same on every machine, so the coordinator can tell which
 * node already holds the file being loaded (and pre-seed its rpc-server tensor cache from it).
 * Both sides compute it: the node agent over its --models-dir, the coordinator over the file it
 * loads.
 *
 * Identity = size + SHA-256 of the whole file. Choice: a full hash rather than a sampled one,
 * because two GGUF files of the same size differing only inside the tensor data (re-quantized,
 * fine-tuned) are common and a sampled hash would call them equal. The cost (~1-2 s per GB) is
 * paid once per file: results are cached in `<cacheDir>/model-hashes.json` keyed by path + size +
 * mtime, so a restart re-hashes only files that changed. Correctness never rests on it: the
 * rpc-server cache is content-addressed by FNV-1a of each tensor, so a wrong match costs bytes on
 * the wire, not wrong weights.
 */

export interface ModelFile {
  readonly path: string;
  readonly sizeBytes: number;
  readonly mtimeMs: number;
  readonly sha256: string;
}

/** `${path}\0${size}\0${mtimeMs}` → sha256 hex, in `<cacheDir>/model-hashes.json`. */
const CACHE_FILE = 'model-hashes.json';
const key = (path: string, size: number, mtimeMs: number) => `${path}\0${size}\0${mtimeMs}`;

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 }) as AsyncIterable<Buffer>) h.update(chunk);
  return h.digest('hex');
}

/**
 * Identity of one file, from the cache when path+size+mtime match, else hashed (and cached).
 * `cacheDir` is where model-hashes.json lives (the agent's or coordinator's state dir).
 */
export async function identifyModelFile(path: string, cacheDir: string): Promise<ModelFile> {
  const st = await stat(path);
  const cacheFile = join(cacheDir, CACHE_FILE);
  const k = key(path, st.size, st.mtimeMs);
  let sha = (await readJsonMap(cacheFile))[k];
  if (!sha) {
    sha = await sha256File(path);
    const after = await stat(path);
    // changed while we read it: do not cache a hash of a moving target
    if (after.size === st.size && after.mtimeMs === st.mtimeMs) {
      const fresh = await readJsonMap(cacheFile);
      for (const old of Object.keys(fresh)) if (old.startsWith(`${path}\0`)) delete fresh[old];
      fresh[k] = sha;
      await writeJsonMap(cacheFile, fresh);
    }
  }
  return { path, sizeBytes: st.size, mtimeMs: st.mtimeMs, sha256: sha };
}
