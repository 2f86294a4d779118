import { llamaSourceFile } from '../llama-source.ts';
import { OrchardError } from '../errors.ts';
import { readGgufHeader } from '../gguf/reader.ts';
import type { GgufValue } from '../gguf/types.ts';

/** The real tokenizer test models carry: LLaMA/SentencePiece, 32000 tokens. */
export const VOCAB_FILE = 'ggml-vocab-llama-spm.gguf' as const;

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
 * Locate the vocab GGUF: `ORCHARD_VOCAB_GGUF` (a file), else the copy kept in the per-user cache
 * from the llama.cpp source bundle that node-llama-cpp ships (extracted on first use, see
 * llamaSourceFile). Works on a fresh machine with git and node_modules only; no network.
 */
export async function vocabPath(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  if (env.ORCHARD_VOCAB_GGUF) return env.ORCHARD_VOCAB_GGUF;
  return llamaSourceFile(`models/${VOCAB_FILE}`, env);
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
