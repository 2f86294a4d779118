import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { spawnEngine } from '../../src/node/engine-process.ts';

describe('spawnEngine: a head’s known tensor hashes', () => {
  let runDir = '';
  beforeEach(async () => {
    runDir = await mkdtemp(join(tmpdir(), 'orchard-spawn-engine-test-'));
  });
  afterEach(() => rm(runDir, { recursive: true, force: true }));

  const printsHashes = (text: string) =>
    spawnEngine({ file: '/bin/sh', argv: ['-c', 'echo "$GGML_RPC_TENSOR_HASHES"; cat "$GGML_RPC_TENSOR_HASHES"; exec sleep 30'], env: { PATH: '/usr/bin:/bin' }, knownHashes: text }, runDir);

  async function hashesPath(child: Awaited<ReturnType<typeof printsHashes>>['child'], text: string): Promise<string> {
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
    await expect.poll(() => out.split('\n').length, { timeout: 5000 }).toBeGreaterThan(2);
    const [path, ...rest] = out.split('\n');
    expect(rest.join('\n')).toBe(text);
    return path!;
  }

  const stopped = async (child: Awaited<ReturnType<typeof printsHashes>>['child']) => {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
  };

  it('are written to a private file in a start-up folder of the run folder, named in GGML_RPC_TENSOR_HASHES, removed when the engine exits', async () => {
    const text = 'blk.0.attn_q.weight 2097152 0123456789abcdef\n';
    const { child } = await printsHashes(text);
    const path = await hashesPath(child, text);
    expect(dirname(dirname(path))).toBe(runDir);
    expect(await readdir(runDir)).toEqual([expect.stringMatching(/^orchard-engine-/)]);
    expect((await stat(dirname(path))).mode & 0o777).toBe(0o700);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    await stopped(child);
    await expect.poll(() => readdir(runDir), { timeout: 5000 }).toEqual([]);
  });

  it('removeStartupFiles takes them away while the engine runs (once it is ready), and again at exit does no harm', async () => {
    const text = 'output.weight 4096 fedcba9876543210\n';
    const { child, removeStartupFiles } = await printsHashes(text);
    await hashesPath(child, text);
    await removeStartupFiles();
    expect(await readdir(runDir)).toEqual([]);
    expect(child.exitCode).toBeNull();
    await stopped(child);
    await removeStartupFiles();
  });

  it('leave the environment alone when there are none', async () => {
    const { child } = await spawnEngine({ file: '/bin/sh', argv: ['-c', 'env | grep -c ^GGML_RPC_TENSOR_HASHES='], env: { PATH: '/usr/bin:/bin' } }, runDir);
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
    await new Promise((r) => child.once('exit', r));
    expect(out.trim()).toBe('0');
    expect(await readdir(runDir)).toEqual([]);
  });
});
