import { stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { describe, expect, it } from 'vitest';
import { spawnEngine } from '../../src/node/engine-process.ts';

describe('spawnEngine: a head’s known tensor hashes', () => {
  it('are written to a private file named in GGML_RPC_TENSOR_HASHES, removed when the engine exits', async () => {
    const text = 'blk.0.attn_q.weight 2097152 0123456789abcdef\n';
    const child = await spawnEngine({ file: '/bin/sh', argv: ['-c', 'echo "$GGML_RPC_TENSOR_HASHES"; cat "$GGML_RPC_TENSOR_HASHES"; exec sleep 30'], env: { PATH: '/usr/bin:/bin' }, knownHashes: text });
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
    await expect.poll(() => out.split('\n').length, { timeout: 5000 }).toBeGreaterThan(2);
    const [path, ...rest] = out.split('\n');
    expect(rest.join('\n')).toBe(text);
    expect((await stat(dirname(path!))).mode & 0o777).toBe(0o700);
    expect((await stat(path!)).mode & 0o777).toBe(0o600);
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
    await expect.poll(() => stat(dirname(path!)).then(() => 'there', () => 'gone'), { timeout: 5000 }).toBe('gone');
  });

  it('leave the environment alone when there are none', async () => {
    const child = await spawnEngine({ file: '/bin/sh', argv: ['-c', 'env | grep -c ^GGML_RPC_TENSOR_HASHES='], env: { PATH: '/usr/bin:/bin' } });
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
    await new Promise((r) => child.once('exit', r));
    expect(out.trim()).toBe('0');
  });
});
