import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/**
 * A string → string map kept as a cache in a JSON file (`{"entries": {…}}`). A missing or
 * damaged file reads as empty: a cache is rebuilt, never trusted for correctness. Writes go to a
 * temporary file renamed over the old one, so a crash mid-write leaves the previous map.
 */
export async function readJsonMap(path: string): Promise<Record<string, string>> {
  try {
    const j = JSON.parse(await readFile(path, 'utf8')) as { entries?: unknown };
    return typeof j.entries === 'object' && j.entries ? { ...(j.entries as Record<string, string>) } : {};
  } catch {
    return {};
  }
}

export async function writeJsonMap(path: string, entries: Readonly<Record<string, string>>): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  await writeFile(tmp, JSON.stringify({ entries }));
  await rename(tmp, path);
}
