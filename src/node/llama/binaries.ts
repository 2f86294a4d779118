import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { basename } from 'node:path';
import { OrchardError } from '../../shared/errors.ts';
import { expectedCacheEntry } from './build.ts';
import { listCacheEntries, llamaCacheDir, readCacheEntry } from './cache.ts';
import { locateInDir } from './external.ts';

/** Paths of the llama.cpp engines Orchard runs. */
export interface LlamaBinaries {
  readonly llamaServer: string;
  readonly rpcServer: string;
  readonly llamaCppVersion: string;
  /**
   * Which build these are: the cache entry's name (`<version>-<hash of platform, defines and
   * engine patches>`), or for ORCHARD_LLAMA_BIN_DIR `external-<hash of both binaries' paths,
   * sizes and modification times>` (a rebuilt or swapped binary is another build). Figures measured on one build (the
   * calibration) are keyed by it: a changed engine patch changes what the engines cost.
   */
  readonly build: string;
  readonly binDir: string;
}

/**
 * Find usable engines: `ORCHARD_LLAMA_BIN_DIR` first (checked for executables only; `orchard
 * setup --bin-dir` runs the full RPC check), then the per-user build cache written by `orchard
 * setup`: the entry for this llama.cpp source and host first, else the newest complete entry for
 * this platform (e.g. built before a CUDA toolkit appeared). Throws a one-line OrchardError
 * telling the user to run `orchard setup`. Fast: no process is started.
 */
export async function findLlamaBinaries(env: NodeJS.ProcessEnv = process.env): Promise<LlamaBinaries> {
  const dir = env.ORCHARD_LLAMA_BIN_DIR;
  if (dir) {
    try {
      const found = await locateInDir(dir);
      return { ...found, llamaCppVersion: 'external', build: await externalBuild(found), binDir: dir };
    } catch (err) {
      throw new OrchardError(`ORCHARD_LLAMA_BIN_DIR=${dir}: ${(err as Error).message}`);
    }
  }
  let exact: string | undefined;
  try {
    exact = (await expectedCacheEntry(env)).dir;
  } catch {
    exact = undefined; // no node-llama-cpp source here: any cached build will do
  }
  if (exact) {
    const m = await readCacheEntry(exact);
    if (m) return fromEntry(exact, m);
  }
  const [newest] = await listCacheEntries(llamaCacheDir(env));
  if (newest) return fromEntry(newest.dir, newest.manifest);
  throw new OrchardError('llama.cpp engines not found: run `npx orchard setup` (or set ORCHARD_LLAMA_BIN_DIR)');
}

function fromEntry(dir: string, m: { llamaServer: string; rpcServer: string; llamaCppVersion: string }): LlamaBinaries {
  return {
    llamaServer: `${dir}/${m.llamaServer}`,
    rpcServer: `${dir}/${m.rpcServer}`,
    llamaCppVersion: m.llamaCppVersion,
    build: basename(dir),
    binDir: `${dir}/bin`,
  };
}

async function externalBuild(found: { llamaServer: string; rpcServer: string }): Promise<string> {
  const h = createHash('sha256');
  for (const path of [found.llamaServer, found.rpcServer]) {
    const st = await stat(path);
    h.update(JSON.stringify([path, st.size, st.mtimeMs]));
  }
  return `external-${h.digest('hex').slice(0, 12)}`;
}
