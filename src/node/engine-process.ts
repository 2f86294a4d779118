import { type ChildProcess, spawn } from 'node:child_process';
import { errorMessage } from '../shared/errors.ts';
import { type EngineCommand, EngineRequestError } from './engine-spec.ts';

/** Spawn an engine in its own process group; rejects when the binary cannot be started. */
export async function spawnEngine(cmd: EngineCommand): Promise<ChildProcess> {
  const child = spawn(cmd.file, cmd.argv, {
    // Own process group: a Ctrl-C on the agent's terminal reaches only the agent, which then
    // stops the engine in order (and reports the exit as expected); if the agent dies instead,
    // the watchdog ends the engine.
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
    // Exactly the environment engine-spec.ts built (an allow-list): nothing of the agent's own
    // LD_PRELOAD, DYLD_*, PYTHON* or LLAMA_ARG_* reaches an engine.
    env: { ...cmd.env },
  });
  const spawnError = await new Promise<Error | undefined>((resolve) => {
    child.once('spawn', () => resolve(undefined));
    child.once('error', (err) => resolve(err));
  });
  if (spawnError || child.pid === undefined) {
    throw new EngineRequestError('FAILED_PRECONDITION', `cannot start ${cmd.file}: ${errorMessage(spawnError)}`);
  }
  return child;
}
