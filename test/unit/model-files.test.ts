import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { findModelFile, listGgufFiles, parseModelsDirs, scanModelFiles } from '../../src/node/model-files.ts';
import { identifyModelFile } from '../../src/shared/model/file-identity.ts';

let dir = '';
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-model-files-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('model files of a node', () => {
  it('parses repeated --models-dir values and path lists, env last, without duplicates', () => {
    expect(parseModelsDirs(['/a:/b', '/c'], '/b:/d')).toEqual(['/a', '/b', '/c', '/d']);
    expect(parseModelsDirs([], undefined)).toEqual([]);
    expect(parseModelsDirs([' /x ', ''], '')).toEqual(['/x']);
  });

  it('lists *.gguf two levels deep, skipping hidden dirs and other files', async () => {
    const root = join(dir, 'tree');
    await mkdir(join(root, 'fam', 'deeper'), { recursive: true });
    await mkdir(join(root, '.hidden'), { recursive: true });
    for (const f of ['a.gguf', 'B.GGUF', 'notes.txt', 'fam/c.gguf', 'fam/deeper/d.gguf', '.hidden/e.gguf']) await writeFile(join(root, f), 'x');
    expect((await listGgufFiles([root, join(dir, 'missing')])).map((p) => p.slice(root.length + 1))).toEqual(['B.GGUF', 'a.gguf', 'fam/c.gguf']);
  });

  it('hashes once and serves the cached SHA-256 while path, size and mtime are unchanged', async () => {
    const state = join(dir, 'state');
    const f = join(dir, 'm.gguf');
    await writeFile(f, 'first content');
    await utimes(f, 1_700_000_000, 1_700_000_000); // whole seconds: utimes round-trips them exactly
    const sha = (s: string) => createHash('sha256').update(s).digest('hex');
    const a = await identifyModelFile(f, state);
    expect(a.sha256).toBe(sha('first content'));
    expect(a.sizeBytes).toBe(13);
    // Same size and mtime, different bytes: the cache answers (that is the point: no re-hash).
    await writeFile(f, 'other content');
    await utimes(f, 1_700_000_000, 1_700_000_000);
    expect((await identifyModelFile(f, state)).sha256).toBe(sha('first content'));
    // A new mtime invalidates the entry; the old one for this path is dropped.
    await utimes(f, 1_700_000_000, 1_700_000_005);
    expect((await identifyModelFile(f, state)).sha256).toBe(sha('other content'));
    const cache = JSON.parse(await readFile(join(state, 'model-hashes.json'), 'utf8')) as { entries: Record<string, string> };
    expect(Object.keys(cache.entries).filter((k) => k.startsWith(`${f}\0`))).toHaveLength(1);
  });

  it('finds a file by size and hash only', async () => {
    const d = join(dir, 'scan');
    await mkdir(d);
    await writeFile(join(d, 'x.gguf'), 'xxxx');
    const files = await scanModelFiles([d], join(dir, 'state2'));
    expect(files).toHaveLength(1);
    const x = files[0]!;
    expect(findModelFile(files, 4, x.sha256)?.path).toBe(join(d, 'x.gguf'));
    expect(findModelFile(files, 5, x.sha256)).toBeUndefined();
    expect(findModelFile(files, 4, '0'.repeat(64))).toBeUndefined();
  });
});
