import { open, readdir, readFile, rm } from 'node:fs/promises';
import { homedir, hostname } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { cacheRoot } from '../../shared/cache-dir.ts';
import { isExecutable } from './toolchain.ts';
import { processAlive } from '../../shared/process-alive.ts';

/*
 * The per-user engine cache: one folder per build (`<root>/llama/<version>-<hash>`, see cacheKey)
 * holding bin/ and a manifest, written by one builder at a time under a lock file.
 */

/** Folder holding one directory per built engine version: `<root>/llama`. */
export function llamaCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  return join(cacheRoot(env, process.platform, homedir()), 'llama');
}

/** What `orchard setup` records next to the binaries; also what findLlamaBinaries reads back. */
export const ManifestSchema = z.object({
  llamaCppVersion: z.string(),
  commit: z.string(),
  platform: z.string(),
  arch: z.string(),
  defines: z.record(z.string(), z.string()),
  /** Orchard's patches applied to the source (patches.ts); absent in entries built before patches existed. */
  patches: z.array(z.string()).optional(),
  builtAt: z.string(),
  buildSeconds: z.number(),
  llamaServer: z.string(),
  rpcServer: z.string(),
});
export type Manifest = z.infer<typeof ManifestSchema>;

/** Read a cache entry; undefined when absent, incomplete or for another platform. */
export async function readCacheEntry(dir: string): Promise<Manifest | undefined> {
  let manifest: Manifest;
  try {
    manifest = ManifestSchema.parse(JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8')));
  } catch {
    return undefined;
  }
  if (manifest.platform !== process.platform || manifest.arch !== process.arch) return undefined;
  for (const p of [manifest.llamaServer, manifest.rpcServer]) if (!(await isExecutable(join(dir, p)))) return undefined;
  return manifest;
}

/** All complete entries of the engine cache, newest build first. */
export async function listCacheEntries(root = llamaCacheDir()): Promise<Array<{ dir: string; manifest: Manifest }>> {
  let names: string[];
  try {
    names = await readdir(root);
  } catch {
    return [];
  }
  const entries: Array<{ dir: string; manifest: Manifest }> = [];
  for (const name of names) {
    if (name.startsWith('.') || name === 'logs') continue;
    const dir = join(root, name);
    const manifest = await readCacheEntry(dir);
    if (manifest) entries.push({ dir, manifest });
  }
  return entries.sort((a, b) => b.manifest.builtAt.localeCompare(a.manifest.builtAt));
}

export async function removeStaleBuildDirs(root: string): Promise<void> {
  for (const name of await readdir(root)) {
    const m = /^\.(?:build|old)-(\d+)-/.exec(name);
    if (m && !processAlive(Number(m[1]))) await rm(join(root, name), { recursive: true, force: true });
  }
}

export interface LockHolder {
  readonly pid: number;
  readonly host: string;
  readonly since: string;
}

/**
 * A lock file created with O_EXCL holding {pid, host}. A holder on this host whose pid is gone
 * left a stale lock (crash, kill -9): it is taken over. A holder on another host (shared home
 * over NFS) is waited for, since we cannot tell whether it lives.
 */
export async function acquireLock(path: string, events: { waiting?(holder: LockHolder): void }): Promise<{ release(): Promise<void>; waited: boolean }> {
  const me: LockHolder = { pid: process.pid, host: hostname(), since: new Date().toISOString() };
  let waited = false;
  let told = false;
  for (;;) {
    try {
      const fh = await open(path, 'wx');
      await fh.writeFile(JSON.stringify(me));
      await fh.close();
      return {
        waited,
        release: async () => {
          await rm(path, { force: true });
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    let holder: LockHolder | undefined;
    try {
      holder = JSON.parse(await readFile(path, 'utf8')) as LockHolder;
    } catch {
      holder = undefined; // being written right now, or garbage; look again shortly
    }
    if (holder && holder.host === me.host && !processAlive(holder.pid)) {
      await rm(path, { force: true });
      continue;
    }
    if (holder && !told) {
      events.waiting?.(holder);
      told = true;
    }
    waited = true;
    await new Promise((r) => setTimeout(r, 500));
  }
}
