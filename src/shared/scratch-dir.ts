import { lstat, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { processAlive } from './process-alive.ts';

/*
 * Temporary directories a process owns for its lifetime (a standalone supervisor's or the
 * calibration's engine sockets, `orchard demo`'s state). They are removed on a normal exit; a
 * SIGKILL skips that, and nothing else would ever remove them. So the owner's pid is in the name
 * (`<prefix><pid>-XXXXXX`), and whoever makes the next one with the same prefix first removes
 * those whose owner is gone. A pid that was reused since is alive, so its directory stays (the
 * safe side); directories another user owns are never touched.
 */

/** Pure: the owner pid in a scratch directory's name, or undefined when the name is not one. */
export function scratchOwner(name: string, prefix: string): number | undefined {
  if (!name.startsWith(prefix)) return undefined;
  const m = /^([1-9][0-9]{0,9})-[A-Za-z0-9]{6}$/.exec(name.slice(prefix.length));
  return m ? Number(m[1]) : undefined;
}

/** Remove `<root>/<prefix><pid>-XXXXXX` directories of this user whose pid is not running; their names. */
export async function sweepScratchDirs(prefix: string, root = tmpdir(), alive: (pid: number) => boolean = processAlive): Promise<string[]> {
  const uid = process.getuid?.();
  const names = await readdir(root).catch(() => [] as string[]);
  const removed: string[] = [];
  for (const name of names) {
    const pid = scratchOwner(name, prefix);
    if (pid === undefined || pid === process.pid || alive(pid)) continue;
    const path = join(root, name);
    const st = await lstat(path).catch(() => undefined);
    if (!st?.isDirectory() || (uid !== undefined && st.uid !== uid)) continue;
    await rm(path, { recursive: true, force: true }).catch(() => undefined);
    removed.push(name);
  }
  return removed;
}

/** A fresh 0700 `<root>/<prefix><pid>-XXXXXX`, after sweeping the ones dead processes left. */
export async function makeScratchDir(prefix: string, root = tmpdir()): Promise<string> {
  await sweepScratchDirs(prefix, root);
  return mkdtemp(join(root, `${prefix}${process.pid}-`));
}
