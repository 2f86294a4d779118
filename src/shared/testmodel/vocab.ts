import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rename, rm, stat, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { cacheRoot } from '../cache-dir.ts';
import { findLlamaSource } from '../llama-source.ts';
import { OrchardError, errorMessage } from '../errors.ts';
import { readGgufHeader } from '../gguf/reader.ts';
import type { GgufValue } from '../gguf/types.ts';

const exec = promisify(execFile);

/** The real tokenizer test models carry: LLaMA/SentencePiece, 32000 tokens. */
export const VOCAB_FILE = 'ggml-vocab-llama-spm.gguf';

export interface Vocab {
  /** All `tokenizer.*` keys of the vocab file, in file order. */
  readonly metadata: ReadonlyMap<string, GgufValue>;
  readonly size: number;
  /** Token types (llama_token_type: 1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte). */
  readonly tokenTypes: readonly number[];
  /** Where it was read from. */
  readonly path: string;
}

/**
 * Locate the vocab GGUF. Order: `ORCHARD_VOCAB_GGUF` (a file), the per-user cache
 * (`<cache>/vocab/<bundle commit>/…`), else extract it from the llama.cpp git bundle that
 * node-llama-cpp ships (`git fetch` of the bundle into a scratch bare repo, then `git show`),
 * store it in the cache atomically and use that. Works on a fresh machine with git and
 * node_modules only; no network.
 */
export async function vocabPath(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  if (env.ORCHARD_VOCAB_GGUF) return env.ORCHARD_VOCAB_GGUF;
  const source = await findLlamaSource();
  const dir = join(cacheRoot(env, process.platform, homedir()), 'vocab', source.commit.slice(0, 12));
  const file = join(dir, VOCAB_FILE);
  if (await isFile(file)) return file;
  await mkdir(dir, { recursive: true });
  const scratch = await mkdtemp(join(dir, '.extract-'));
  try {
    const git = (args: string[]) =>
      exec('git', ['--git-dir', scratch, ...args], { maxBuffer: 64 * 1024 * 1024, encoding: 'buffer' });
    await git(['init', '--quiet', '--bare']);
    await git(['fetch', '--quiet', '--no-tags', source.bundle, source.commit]);
    const { stdout } = await git(['show', `${source.commit}:models/${VOCAB_FILE}`]);
    const tmp = join(scratch, VOCAB_FILE); // same file system as `file`: the rename is atomic
    await writeFile(tmp, stdout);
    await rename(tmp, file); // atomic: concurrent extractions race harmlessly
  } catch (err) {
    throw new OrchardError(`cannot extract ${VOCAB_FILE} from ${source.bundle} (is git installed?): ${errorMessage(err)}`);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
  return file;
}

async function isFile(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isFile();
  } catch {
    return false;
  }
}

const loaded = new Map<string, Promise<Vocab>>();

/** Read the tokenizer out of the vocab GGUF (once per file and process). */
export async function loadVocab(env: NodeJS.ProcessEnv = process.env): Promise<Vocab> {
  const path = await vocabPath(env);
  let vocab = loaded.get(path);
  if (!vocab) {
    vocab = readVocab(path);
    loaded.set(path, vocab);
    vocab.catch(() => loaded.delete(path));
  }
  return vocab;
}

async function readVocab(path: string): Promise<Vocab> {
  const header = await readGgufHeader(path);
  const metadata = new Map<string, GgufValue>();
  for (const [k, v] of header.metadata) if (k.startsWith('tokenizer.')) metadata.set(k, v);
  const tokens = metadata.get('tokenizer.ggml.tokens');
  const types = metadata.get('tokenizer.ggml.token_type');
  if (tokens?.type !== 'array' || types?.type !== 'array' || types.itemType !== 'int32') {
    throw new OrchardError(`${path} holds no tokenizer (tokenizer.ggml.tokens / token_type missing)`);
  }
  return { metadata, size: tokens.value.length, tokenTypes: types.value as readonly number[], path };
}
