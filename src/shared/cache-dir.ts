import { join } from 'node:path';

/** Root of Orchard's per-user cache: ORCHARD_CACHE_DIR, else the platform's cache folder. */
export function cacheRoot(env: NodeJS.ProcessEnv, platform: NodeJS.Platform, home: string): string {
  if (env.ORCHARD_CACHE_DIR) return env.ORCHARD_CACHE_DIR;
  if (platform === 'darwin') return join(home, 'Library', 'Caches', 'orchard');
  return join(env.XDG_CACHE_HOME || join(home, '.cache'), 'orchard');
}
