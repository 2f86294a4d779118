import { spawn } from 'node:child_process';
import { mkdir, readdir, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeScratchDir, scratchOwner, sweepScratchDirs } from '../../src/shared/scratch-dir.ts';
import { tempDir } from '../helpers/temp-dir.ts';

describe('scratch directory names (pure)', () => {
  it('reads the owner pid only from <prefix><pid>-XXXXXX', () => {
    expect(scratchOwner('orchard-sock-4242-AbC123', 'orchard-sock-')).toBe(4242);
    expect(scratchOwner('orchard-sock-1-zzzzzz', 'orchard-sock-')).toBe(1);
    for (const name of ['orchard-sock-AbC123', 'orchard-sock-4242-AbC12', 'orchard-sock-4242-AbC1234', 'orchard-sock-0-AbC123', 'orchard-sock--1-AbC123', 'orchard-demo-4242-AbC123', 'orchard-sock-42x-AbC123', 'orchard-sock-4242-AbC12!']) {
      expect(scratchOwner(name, 'orchard-sock-'), name).toBeUndefined();
    }
  });
});

describe('scratch directories (real files and processes)', () => {
  const tmp = tempDir('orchard-scratch-test-');

  it('removes the dirs of dead owners, keeps live ones, foreign names, files and symlinks', async () => {
    // A pid that surely ended: a child that exited and was reaped.
    const dead = await new Promise<number>((resolve, reject) => {
      const c = spawn(process.execPath, ['-e', '0']);
      c.once('error', reject);
      c.once('exit', () => resolve(c.pid!));
    });
    const deadDir = join(tmp.path, `orchard-sock-${dead}-aaaaaa`);
    await mkdir(deadDir);
    await writeFile(join(deadDir, 'rpc-20001.sock'), '');
    const liveDir = join(tmp.path, `orchard-sock-${process.ppid}-bbbbbb`);
    await mkdir(liveDir);
    const ownDir = join(tmp.path, `orchard-sock-${process.pid}-cccccc`);
    await mkdir(ownDir);
    const other = join(tmp.path, `orchard-sock-${dead}`);
    await mkdir(other);
    await writeFile(join(tmp.path, `orchard-sock-${dead}-dddddd`), 'a file, not ours to delete');
    await mkdir(join(tmp.path, 'target'));
    await symlink(join(tmp.path, 'target'), join(tmp.path, `orchard-sock-${dead}-eeeeee`));

    const removed = await sweepScratchDirs('orchard-sock-', tmp.path);
    expect(removed).toEqual([`orchard-sock-${dead}-aaaaaa`]);
    const left = (await readdir(tmp.path)).sort();
    expect(left).toEqual([`orchard-sock-${dead}`, `orchard-sock-${dead}-dddddd`, `orchard-sock-${dead}-eeeeee`, `orchard-sock-${process.pid}-cccccc`, `orchard-sock-${process.ppid}-bbbbbb`, 'target'].sort());
  });

  it('makes a fresh 0700 dir named after this process, sweeping first', async () => {
    const stale = join(tmp.path, 'orchard-demo-999999999-ffffff');
    await mkdir(stale);
    const dir = await makeScratchDir('orchard-demo-', tmp.path);
    expect(dir.startsWith(join(tmp.path, `orchard-demo-${process.pid}-`))).toBe(true);
    expect((await stat(dir)).mode & 0o777).toBe(0o700);
    expect(await readdir(tmp.path)).toEqual([dir.slice(tmp.path.length + 1)]);
  });
});
