import { execFile } from 'node:child_process';
import { access, mkdir, mkdtemp, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { z } from 'zod';
import { cacheRoot } from './cache-dir.ts';
import { errorMessage, OrchardError } from './errors.ts';

const exec = promisify(execFile);

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

// ───────────── files of the source tree that Orchard keeps ─────────────

/**
 * Files of the llama.cpp source tree that Orchard needs after the build: the SentencePiece
 * vocabulary test models carry, the RPC server's source (its tensor-hash function is checked
 * against Orchard's), and the other files Orchard's patches change (the model loader, the RPC
 * transport and the rpc-server tool: their test applies them to these files). `orchard setup` keeps them in the cache next to the engines; the lookup
 * below extracts a missing one from the bundle (cheap: no build), so a cache written before a
 * file joined this list still serves it.
 */
export const LLAMA_SOURCE_FILES = [
  'models/ggml-vocab-llama-spm.gguf',
  'ggml/src/ggml-rpc/ggml-rpc.cpp',
  'src/llama-model-loader.cpp',
  'ggml/src/ggml-rpc/transport.cpp',
  'ggml/src/ggml-rpc/transport.h',
  'tools/rpc/rpc-server.cpp',
] as const;
export type LlamaSourceFile = (typeof LLAMA_SOURCE_FILES)[number];

/** `<cache>/llama-source/<commit>`: the kept files of one llama.cpp commit, at their tree paths. */
export function llamaSourceDir(source: Pick<LlamaSource, 'commit'>, env: NodeJS.ProcessEnv = process.env): string {
  return join(cacheRoot(env, process.platform, homedir()), 'llama-source', source.commit.slice(0, 12));
}

/**
 * Make sure every kept file of `source` is in the cache. `tree` is a checkout of the same commit
 * (the build has one: copying is free); without it the files come out of the bundle. Returns the
 * files that were missing and are there now.
 */
export async function keepLlamaSourceFiles(source: LlamaSource, env: NodeJS.ProcessEnv = process.env, tree?: string): Promise<LlamaSourceFile[]> {
  const dir = llamaSourceDir(source, env);
  const missing: LlamaSourceFile[] = [];
  for (const f of LLAMA_SOURCE_FILES) if (!(await isFile(join(dir, f)))) missing.push(f);
  if (missing.length === 0) return [];
  await mkdir(dir, { recursive: true });
  // Written under a scratch name on the same file system, then renamed: concurrent keepers race harmlessly.
  const scratch = await mkdtemp(join(dir, '.keep-'));
  try {
    const contents = tree ? await Promise.all(missing.map((f) => readFile(join(tree, f)))) : await showFromBundle(source, missing, join(scratch, 'git'));
    for (const [i, f] of missing.entries()) {
      const tmp = join(scratch, `${i}`);
      await writeFile(tmp, contents[i]!);
      await mkdir(dirname(join(dir, f)), { recursive: true });
      await rename(tmp, join(dir, f));
    }
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
  return missing;
}

/** Path of one kept file of the llama.cpp source this checkout builds from (extracted on first use). */
export async function llamaSourceFile(file: LlamaSourceFile, env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const source = await findLlamaSource();
  const path = join(llamaSourceDir(source, env), file);
  if (!(await isFile(path))) await keepLlamaSourceFiles(source, env);
  return path;
}

/** `git show <commit>:<path>` for each path, through a scratch bare repository fetched from the bundle. */
async function showFromBundle(source: LlamaSource, paths: readonly string[], gitDir: string): Promise<Buffer[]> {
  const git = (args: string[]) => exec('git', ['--git-dir', gitDir, ...args], { maxBuffer: 64 * 2 ** 20, encoding: 'buffer' });
  try {
    await git(['init', '--quiet', '--bare']);
    await git(['fetch', '--quiet', '--no-tags', source.bundle, source.commit]);
    const out: Buffer[] = [];
    for (const p of paths) out.push((await git(['show', `${source.commit}:${p}`])).stdout);
    return out;
  } catch (err) {
    throw new OrchardError(`cannot extract ${paths.join(', ')} from ${source.bundle} (is git installed?): ${errorMessage(err)}`);
  }
}

async function isFile(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isFile();
  } catch {
    return false;
  }
}
