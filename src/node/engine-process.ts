import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { errorMessage } from '../shared/errors.ts';
import { TENSOR_HASHES_ENV } from '../shared/rpc-cache/known-hashes.ts';
import { type EngineCommand, EngineRequestError } from './engine-spec.ts';

/**
 * A head's known tensor hashes go to a file in a fresh private directory (mode 0700, so no other
 * user can swap it for other hashes), named in the engine's environment, and removed when the
 * engine exits: the engine reads it once, while it loads.
 */
async function withKnownHashes(cmd: EngineCommand): Promise<{ env: Record<string, string>; cleanup: () => Promise<void> }> {
  if (cmd.knownHashes === undefined) return { env: { ...cmd.env }, cleanup: async () => {} };
  const dir = await mkdtemp(join(tmpdir(), 'orchard-engine-'));
  const file = join(dir, 'tensor-hashes');
  await writeFile(file, cmd.knownHashes, { mode: 0o600 });
  return { env: { ...cmd.env, [TENSOR_HASHES_ENV]: file }, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** Spawn an engine in its own process group; rejects when the binary cannot be started. */
export async function spawnEngine(cmd: EngineCommand): Promise<ChildProcess> {
  const { env, cleanup } = await withKnownHashes(cmd);
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
  return child;
}
