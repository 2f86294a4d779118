import { chmod, mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '../shared/log.ts';
import { MLX_WORK_PREFIX } from './mlx/group.ts';

/**
 * The agent's working folder for its engines, `<state dir>/run` (0700): an MLX group's launch
 * files (the ring hostfile names this node's peers and ports) live there instead of the shared
 * /tmp. A group removes its own folder when it closes; one whose agent was SIGKILLed cannot, so
 * the next start of the agent removes every group folder left behind — none can be in use then,
 * since the agent's watchdog kills its engines with it.
 */
export async function prepareRunDir(stateDir: string, log: Logger): Promise<string> {
  const dir = join(stateDir, 'run');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  // mkdir leaves an existing folder's mode alone.
  await chmod(dir, 0o700);
  const stale = (await readdir(dir)).filter((n) => n.startsWith(MLX_WORK_PREFIX));
  await Promise.all(stale.map((n) => rm(join(dir, n), { recursive: true, force: true })));
  if (stale.length > 0) log.info({ dir, removed: stale }, 'removed MLX work folders a previous run left behind');
  return dir;
}
