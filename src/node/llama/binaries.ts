import { access, constants } from 'node:fs/promises';
import { join } from 'node:path';
import { OrchardError } from '../../shared/errors.ts';

/** Paths of the llama.cpp engines Orchard runs. */
export interface LlamaBinaries {
  readonly llamaServer: string;
  readonly rpcServer: string;
  readonly llamaCppVersion: string;
  readonly binDir: string;
}

/**
 * Find usable engines: `ORCHARD_LLAMA_BIN_DIR` first, then the per-user build cache written by
 * `orchard setup`. Throws a one-line OrchardError telling the user to run `orchard setup`.
 * (The cache lookup is completed by the setup work.)
 */
export async function findLlamaBinaries(env: NodeJS.ProcessEnv = process.env): Promise<LlamaBinaries> {
  const dir = env.ORCHARD_LLAMA_BIN_DIR;
  if (dir) {
    const llamaServer = join(dir, 'llama-server');
    const rpcServer = join(dir, 'ggml-rpc-server');
    for (const p of [llamaServer, rpcServer]) {
      try {
        await access(p, constants.X_OK);
      } catch {
        throw new OrchardError(`ORCHARD_LLAMA_BIN_DIR=${dir} has no executable ${p}`);
      }
    }
    return { llamaServer, rpcServer, llamaCppVersion: 'external', binDir: dir };
  }
  throw new OrchardError('llama.cpp engines not found: run `npx orchard setup` (or set ORCHARD_LLAMA_BIN_DIR)');
}
