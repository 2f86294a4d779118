import { chmod, mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '../shared/log.ts';

/**
 * Start-up folders: files an engine reads only while it starts — an MLX group's launch files
 * (the ring hostfile names this node's peers and ports), a llama.cpp head's known tensor hashes.
 * Each engine gets a fresh one (mkdtemp: 0700), removed as soon as the engine is ready (it has
 * read them then) and again when it exits. An agent that is SIGKILLed removes nothing, so the
 * next start of the agent sweeps its run folder (prepareRunDir).
 */
const STARTUP_PREFIX = { mlx: 'orchard-mlx-', engine: 'orchard-engine-' } as const;

export type StartupFolderKind = keyof typeof STARTUP_PREFIX;

/** A fresh private start-up folder in `root` (the agent's run folder; default the system temp dir). */
export function startupFolder(kind: StartupFolderKind, root: string = tmpdir()): Promise<string> {
  return mkdtemp(join(root, STARTUP_PREFIX[kind]));
}

const isStartupFolder = (name: string) => Object.values(STARTUP_PREFIX).some((p) => name.startsWith(p));

/**
 * The agent's working folder for its engines, `<state dir>/run` (0700), where their start-up
 * folders live instead of the shared /tmp. The agent owns it alone, so at its start every
 * start-up folder there is one a previous run left behind (SIGKILLed while an engine started) and
 * none can be in use — the agent's watchdog kills its engines with it: all are removed.
 */
export async function prepareRunDir(stateDir: string, log: Logger): Promise<string> {
  const dir = join(stateDir, 'run');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  // mkdir leaves an existing folder's mode alone.
  await chmod(dir, 0o700);
  const stale = (await readdir(dir)).filter(isStartupFolder);
  await Promise.all(stale.map((n) => rm(join(dir, n), { recursive: true, force: true })));
  if (stale.length > 0) log.info({ dir, removed: stale }, 'removed engine start-up folders a previous run left behind');
  return dir;
}
