import { stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FileMemo } from '../../src/shared/file-memo.ts';
import { tempDir } from '../helpers/temp-dir.ts';

const dir = tempDir('orchard-file-memo-');

describe('FileMemo', () => {
  it('reads a file again when its size or mtime changed, not otherwise', async () => {
    const f = join(dir.path, 'a');
    await writeFile(f, 'one');
    const reads: string[] = [];
    const memo = new FileMemo(async (p) => {
      reads.push(p);
      return reads.length;
    });
    expect(await memo.get(f)).toBe(1);
    expect(await memo.get(f)).toBe(1);
    await writeFile(f, 'two!');
    expect(await memo.get(f)).toBe(2);
    const st = await stat(f);
    await utimes(f, st.atime, new Date(st.mtimeMs + 5000));
    expect(await memo.get(f)).toBe(3);
    expect(await memo.get(f, { size: 3, mtimeMs: 1 })).toBe(4); // the caller's stat is the key
  });

  it('keeps at most `max` files, dropping the least recently used, and no failed read', async () => {
    const read: string[] = [];
    const memo = new FileMemo(async (p) => {
      read.push(p);
      if (p === 'bad') throw new Error('unreadable');
      return p;
    }, 2);
    const at = { size: 1, mtimeMs: 1 };
    for (const p of ['a', 'b', 'a', 'c', 'a', 'b']) await memo.get(p, at);
    expect(read).toEqual(['a', 'b', 'c', 'b']);
    await expect(memo.get('bad', at)).rejects.toThrow('unreadable');
    await expect(memo.get('bad', at)).rejects.toThrow('unreadable');
    expect(read.filter((p) => p === 'bad')).toHaveLength(2);
  });
});
