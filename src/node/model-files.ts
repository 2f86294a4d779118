import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, readFile, readdir, rename, stat, writeFile } from 'node:fs/promises';
import { delimiter, join, resolve } from 'node:path';

/**
 * The model files a node holds, with their content identity, so the coordinator can tell which
 * worker already has the file being loaded (and pre-seed its rpc-server tensor cache from it).
 *
 * Identity = size + SHA-256 of the whole file. Choice: a full hash rather than a sampled one,
 * because two GGUF files of the same size differing only inside the tensor data (re-quantized,
 * fine-tuned) are common and a sampled hash would call them equal. The cost (~1-2 s per GB) is
 * paid once per file: results are cached in `<stateDir>/model-hashes.json` keyed by path + size +
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

/** `--models-dir` values (repeatable) and ORCHARD_NODE_MODELS_DIR, each a path list (`:`). */
export function parseModelsDirs(flags: readonly string[], env: string | undefined): string[] {
  const out: string[] = [];
  for (const v of [...flags, ...(env ? [env] : [])]) {
    for (const p of v.split(delimiter)) if (p.trim() !== '') out.push(resolve(p.trim()));
  }
  return [...new Set(out)];
}

interface HashCache {
  /** `${path}\0${size}\0${mtimeMs}` → sha256 hex */
  readonly entries: Record<string, string>;
}

const CACHE_FILE = 'model-hashes.json';
const key = (path: string, size: number, mtimeMs: number) => `${path}\0${size}\0${mtimeMs}`;

async function readCache(stateDir: string): Promise<HashCache> {
  try {
    const j = JSON.parse(await readFile(join(stateDir, CACHE_FILE), 'utf8')) as Partial<HashCache>;
    return { entries: typeof j.entries === 'object' && j.entries ? { ...j.entries } : {} };
  } catch {
    return { entries: {} };
  }
}

async function writeCache(stateDir: string, cache: HashCache): Promise<void> {
  await mkdir(stateDir, { recursive: true });
  const tmp = join(stateDir, `.${CACHE_FILE}.${process.pid}.tmp`);
  await writeFile(tmp, JSON.stringify(cache));
  await rename(tmp, join(stateDir, CACHE_FILE));
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 }) as AsyncIterable<Buffer>) h.update(chunk);
  return h.digest('hex');
}

/** `*.gguf` files under each dir (two levels deep: `dir/x.gguf`, `dir/family/x.gguf`). */
export async function listGgufFiles(dirs: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string, depth: number) => {
    let ents: import('node:fs').Dirent[];
    try {
      ents = await readdir(d, { withFileTypes: true });
    } catch {
      return; // a missing dir is reported by the caller at start, not here on every scan
    }
    for (const e of ents) {
      const p = join(d, e.name);
      if (e.isFile() && e.name.toLowerCase().endsWith('.gguf')) out.push(p);
      else if (e.isDirectory() && depth > 0 && !e.name.startsWith('.')) await walk(p, depth - 1);
    }
  };
  for (const d of dirs) await walk(d, 1);
  return [...new Set(out)].sort();
}

/**
 * Identity of one file, from the cache when path+size+mtime match, else hashed (and cached).
 * `cacheDir` is where model-hashes.json lives (the agent's or coordinator's state dir).
 */
export async function identifyModelFile(path: string, cacheDir: string): Promise<ModelFile> {
  const st = await stat(path);
  const cache = await readCache(cacheDir);
  const k = key(path, st.size, st.mtimeMs);
  let sha = cache.entries[k];
  if (!sha) {
    sha = await sha256File(path);
    const after = await stat(path);
    // changed while we read it: do not cache a hash of a moving target
    if (after.size === st.size && after.mtimeMs === st.mtimeMs) {
      const fresh = await readCache(cacheDir);
      for (const old of Object.keys(fresh.entries)) if (old.startsWith(`${path}\0`)) delete fresh.entries[old];
      fresh.entries[k] = sha;
      await writeCache(cacheDir, fresh);
    }
  }
  return { path, sizeBytes: st.size, mtimeMs: st.mtimeMs, sha256: sha };
}

/** Every model file under `dirs` with its identity; files that vanish mid-scan are skipped. */
export async function scanModelFiles(dirs: readonly string[], cacheDir: string): Promise<ModelFile[]> {
  const out: ModelFile[] = [];
  for (const p of await listGgufFiles(dirs)) {
    try {
      out.push(await identifyModelFile(p, cacheDir));
    } catch {
      // removed or unreadable between listing and hashing
    }
  }
  return out;
}

export function findModelFile(files: readonly ModelFile[], sizeBytes: number, sha256: string): ModelFile | undefined {
  return files.find((f) => f.sizeBytes === sizeBytes && f.sha256 === sha256);
}
