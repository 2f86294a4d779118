import { type ChildProcess, spawn } from 'node:child_process';
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { errorMessage } from '../shared/errors.ts';
import { TENSOR_HASHES_ENV } from '../shared/rpc-cache/known-hashes.ts';
import { type EngineCommand, EngineRequestError } from './engine-spec.ts';
import { startupFolder } from './run-dir.ts';

export interface SpawnedEngine {
  readonly child: ChildProcess;
  /**
   * Remove the engine's start-up files (a head's known tensor hashes): call once it is ready.
   * llama-server reads the file once, at its first hashed weight while it loads (the hash-hints
   * patch: a function-local static), so a ready engine never opens it again; one that did would
   * only hash its weights itself. Also done when the engine exits; idempotent.
   */
  readonly removeStartupFiles: () => Promise<void>;
}

/**
 * A head's known tensor hashes go to a file in a fresh start-up folder (run-dir.ts: mode 0700, so
 * no other user can swap it for other hashes) in `runDir`, named in the engine's environment.
 */
async function withKnownHashes(cmd: EngineCommand, runDir: string | undefined): Promise<{ env: Record<string, string>; cleanup: () => Promise<void> }> {
  if (cmd.knownHashes === undefined) return { env: { ...cmd.env }, cleanup: async () => {} };
  const dir = await startupFolder('engine', runDir);
  const file = join(dir, 'tensor-hashes');
  await writeFile(file, cmd.knownHashes, { mode: 0o600 });
  return { env: { ...cmd.env, [TENSOR_HASHES_ENV]: file }, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/**
 * Spawn an engine in its own process group, its start-up files in `runDir` (the agent's run
 * folder; default the system temp dir); rejects when the binary cannot be started.
 */
export async function spawnEngine(cmd: EngineCommand, runDir?: string): Promise<SpawnedEngine> {
  const { env, cleanup } = await withKnownHashes(cmd, runDir);
  const child = spawn(cmd.file, cmd.argv, {
    // Own process group: a Ctrl-C on the agent's terminal reaches only the agent, which then
    // stops the engine in order (and reports the exit as expected); if the agent dies instead,
    // the watchdog ends the engine.
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
    // Exactly the environment engine-spec.ts built (an allow-list): nothing of the agent's own
    // LD_PRELOAD, DYLD_*, PYTHON* or LLAMA_ARG_* reaches an engine.
    env,
  });
  child.once('exit', () => void cleanup());
  const spawnError = await new Promise<Error | undefined>((resolve) => {
    child.once('spawn', () => resolve(undefined));
    child.once('error', (err) => resolve(err));
  });
  if (spawnError || child.pid === undefined) {
    await cleanup();
    throw new EngineRequestError('FAILED_PRECONDITION', `cannot start ${cmd.file}: ${errorMessage(spawnError)}`);
  }
  return { child, removeStartupFiles: cleanup };
}
