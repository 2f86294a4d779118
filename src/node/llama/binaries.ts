import { OrchardError } from '../../shared/errors.ts';
import { expectedCacheEntry } from './build.ts';
import { listCacheEntries, llamaCacheDir, readCacheEntry } from './cache.ts';
import { locateInDir } from './external.ts';

/** Paths of the llama.cpp engines Orchard runs. */
export interface LlamaBinaries {
  readonly llamaServer: string;
  readonly rpcServer: string;
  readonly llamaCppVersion: string;
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
      return { ...found, llamaCppVersion: 'external', binDir: dir };
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
    binDir: `${dir}/bin`,
  };
}
