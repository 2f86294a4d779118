import { createHash } from 'node:crypto';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadVocab, vocabPath } from '../../src/shared/testmodel/vocab.ts';
import { LLAMA_SOURCE_FILES } from '../../src/shared/llama-source.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/**
 * The tokenizer comes from the llama.cpp source bundle inside node-llama-cpp, so a fresh
 * machine needs nothing but node_modules and git. These tests point the tmp.path at an empty
 * directory to exercise that path for real.
 */
describe('vocabulary for test models', () => {
  const tmp = tempDir('orchard-vocab-', 'all');

  it('extracts ggml-vocab-llama-spm.gguf from the bundle into an empty tmp.path, then reuses it', async () => {
    const env = { ...process.env, ORCHARD_CACHE_DIR: tmp.path, ORCHARD_VOCAB_GGUF: '' };
    const [a, b] = await Promise.all([vocabPath(env), vocabPath(env)]); // concurrent extractions are safe
    expect(a).toBe(b);
    expect(a.startsWith(join(tmp.path, 'llama-source'))).toBe(true);
    // The file as llama.cpp ships it (models/ggml-vocab-llama-spm.gguf of the bundled release).
    const sha = createHash('sha256').update(await readFile(a)).digest('hex');
    expect(sha).toBe('16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69');
    // Only the kept source files stay (at their tree paths); scratch repositories are gone.
    const [version] = await readdir(join(tmp.path, 'llama-source'));
    const topDirs = [...new Set(LLAMA_SOURCE_FILES.map((f) => f.split('/')[0]!))].sort();
    expect(topDirs).toContain('models');
    expect((await readdir(join(tmp.path, 'llama-source', version!))).sort()).toEqual(topDirs);
    expect(await readdir(join(tmp.path, 'llama-source', version!, 'models'))).toEqual(['ggml-vocab-llama-spm.gguf']);
    expect(await vocabPath(env)).toBe(a);
  });

  it('loads the real SentencePiece tokenizer: 32000 tokens with their types', async () => {
    const vocab = await loadVocab({ ...process.env, ORCHARD_CACHE_DIR: tmp.path, ORCHARD_VOCAB_GGUF: '' });
    expect(vocab.size).toBe(32000);
    expect(vocab.metadata.get('tokenizer.ggml.model')).toEqual({ type: 'string', value: 'llama' });
    expect(vocab.tokenTypes.slice(0, 4)).toEqual([2, 3, 3, 6]); // <unk>, <s>, </s>, <0x00>
    expect([...vocab.metadata.keys()].every((k) => k.startsWith('tokenizer.'))).toBe(true);
  });

  it('ORCHARD_VOCAB_GGUF overrides the lookup, and a file without a tokenizer is refused', async () => {
    const bogus = join(tmp.path, 'bogus.gguf');
    // a valid GGUF with no tokenizer: magic, version 3, no tensors, no metadata
    await writeFile(bogus, Buffer.from('4747554603000000' + '00'.repeat(16), 'hex'));
    await expect(loadVocab({ ...process.env, ORCHARD_VOCAB_GGUF: bogus })).rejects.toThrow(/holds no tokenizer/);
  });
});
