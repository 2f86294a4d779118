import { access, open, readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { OrchardError } from './errors.ts';

/**
 * The llama.cpp source Orchard builds its engines from and takes its test tokenizers from: the
 * git bundle node-llama-cpp ships (`llama/gitRelease.bundle`). Located here (not in src/node)
 * because the test-model generator needs it too.
 */
export interface LlamaSource {
  readonly bundle: string;
  readonly tag: string;
  readonly commit: string;
  readonly version: string;
}

/** Find node-llama-cpp's `llama/` folder by walking up from this file (its `exports` hide package.json). */
export async function findLlamaSource(start = dirname(fileURLToPath(import.meta.url))): Promise<LlamaSource> {
  let dir = start;
  for (;;) {
    const llama = join(dir, 'node_modules', 'node-llama-cpp', 'llama');
    const bundle = join(llama, 'gitRelease.bundle');
    if (await exists(bundle)) {
      const info = z.object({ tag: z.string() }).parse(JSON.parse(await readFile(join(llama, 'llama.cpp.info.json'), 'utf8')));
      const fh = await open(bundle, 'r');
      let header: string;
      try {
        const buf = Buffer.alloc(4096);
        const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
        header = buf.subarray(0, bytesRead).toString('latin1');
      } finally {
        await fh.close();
      }
      const commit = parseBundleHead(header);
      return { bundle, tag: info.tag, commit, version: formatLlamaCppVersion(info.tag, commit) };
    }
    const parent = dirname(dir);
    if (parent === dir) throw new OrchardError('node-llama-cpp is not installed (run `npm ci`): its llama.cpp source bundle is needed to build the engines');
    dir = parent;
  }
}

/** The commit a git bundle's HEAD points at, read from the bundle's text header. */
export function parseBundleHead(header: string): string {
  if (!/^# v[23] git bundle\n/.test(header)) throw new OrchardError('not a git bundle (bad header)');
  const lines = header.split('\n');
  let fallback: string | undefined;
  for (const line of lines.slice(1)) {
    if (line === '') break; // the header ends at the first empty line
    const m = /^([0-9a-f]{40}|[0-9a-f]{64}) (\S+)$/.exec(line);
    if (!m) continue; // capabilities (@...) and prerequisites (-...)
    if (m[2] === 'HEAD') return m[1]!;
    fallback ??= m[1];
  }
  if (fallback) return fallback;
  throw new OrchardError('git bundle names no commit');
}

/** `v0.5.0+de3ff815ea7d`: the release tag node-llama-cpp names plus the exact bundle commit. */
export function formatLlamaCppVersion(tag: string, commit: string): string {
  return `${tag}+${commit.slice(0, 12)}`;
}

async function exists(p: string): Promise<boolean> {
  try {
    await access(p);
    return true;
  } catch {
    return false;
  }
}
