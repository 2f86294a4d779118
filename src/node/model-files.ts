import { readdir } from 'node:fs/promises';
import { delimiter, join, resolve } from 'node:path';
import { identifyModelFile, type ModelFile } from '../shared/model/file-identity.ts';

/**
 * The model files a node holds, with their content identity (shared/model/file-identity.ts), so
 * the coordinator can tell which worker already has the file being loaded (and pre-seed its
 * rpc-server tensor cache from it).
 */

/** `--models-dir` values (repeatable) and ORCHARD_NODE_MODELS_DIR, each a path list (`:`). */
export function parseModelsDirs(flags: readonly string[], env: string | undefined): string[] {
  const out: string[] = [];
  for (const v of [...flags, ...(env ? [env] : [])]) {
    for (const p of v.split(delimiter)) if (p.trim() !== '') out.push(resolve(p.trim()));
  }
  return [...new Set(out)];
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
