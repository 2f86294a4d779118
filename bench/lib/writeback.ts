import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';

/**
 * The page cache's unwritten data, for benches that write gigabytes (a generated model, seeded
 * tensor caches) and then time engines: the kernel writes it back in the background
 * (vm.dirty_background_ratio, dirty_expire_centisecs), and on a 2-vCPU guest that writeback takes
 * a core from the scenario that happens to run next.
 */
export async function unwrittenBytes(): Promise<number> {
  const info = await readFile('/proc/meminfo', 'utf8');
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(info)?.[1] ?? 0);
  return (kib('Dirty') + kib('Writeback')) * 1024;
}

/** Write everything out now (sync(1)), so no measurement that follows pays for it; what there was and how long it took. */
export async function flushWrites(): Promise<{ seconds: number; megabytes: number }> {
  const before = await unwrittenBytes();
  const t0 = performance.now();
  await promisify(execFile)('sync');
  return { seconds: (performance.now() - t0) / 1000, megabytes: Math.round(before / 1e6) };
}
