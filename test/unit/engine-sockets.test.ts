import { lstat, mkdir, readdir, stat, symlink, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { engineSocketDirFor, prepareEngineSocketDir, rpcServerSocket, sunPathBytes, unixEndpoint } from '../../src/node/engine-sockets.ts';
import { createLogger } from '../../src/shared/log.ts';
import { tempDir } from '../helpers/temp-dir.ts';

const linux = { platform: 'linux' as const, uid: 501, tmp: '/tmp' };
const mac = { platform: 'darwin' as const, uid: 501, tmp: '/var/folders/zz/abcdefghijklmnopqrstuvwx0000gn/T' };
/** The longest socket path the directory must hold, with its NUL: what sun_path must fit. */
const longest = (dir: string) => Buffer.byteLength(join(dir, 'fwd-00000000.sock')) + 1;

describe('engine socket directory (pure)', () => {
  it('is <run dir>/sockets when every socket path fits sun_path', () => {
    expect(engineSocketDirFor('/home/u/.local/state/orchard/run', linux)).toBe('/home/u/.local/state/orchard/run/sockets');
    expect(rpcServerSocket('/r/sockets', 20001)).toBe('/r/sockets/rpc-20001.sock');
    expect(unixEndpoint('/r/sockets/rpc-20001.sock')).toBe('unix:/r/sockets/rpc-20001.sock');
  });

  it('falls back to a short private temp dir at exactly the byte where the longest path stops fitting (104 on macOS, 108 on Linux)', () => {
    for (const o of [linux, mac]) {
      const limit = sunPathBytes(o.platform);
      // `<run>/sockets/fwd-00000000.sock` + NUL: the run dir that fills sun_path exactly, and one byte more
      const fill = limit - ('/sockets/fwd-00000000.sock'.length + 1);
      const exact = `/${'a'.repeat(fill - 1)}`;
      expect(longest(join(exact, 'sockets'))).toBe(limit);
      expect(engineSocketDirFor(exact, o)).toBe(join(exact, 'sockets'));
      const over = `${exact}b`;
      const fallback = engineSocketDirFor(over, o);
      expect(fallback).toMatch(new RegExp(`^${o.tmp}/orchard-501-[0-9a-f]{12}$`));
      expect(longest(fallback)).toBeLessThanOrEqual(limit);
      // stable per run dir (the next start sweeps the same one), distinct between agents
      expect(engineSocketDirFor(over, o)).toBe(fallback);
      expect(engineSocketDirFor(`${over}c`, o)).not.toBe(fallback);
    }
    expect(sunPathBytes('darwin')).toBe(104);
    expect(sunPathBytes('linux')).toBe(108);
  });

  it('never uses a path llama.cpp cannot take: whitespace, commas or parentheses fall back', () => {
    for (const bad of ['/Users/u/Library/Application Support/orchard/run', '/a,b/run', '/a(b)/run']) expect(engineSocketDirFor(bad, mac)).toMatch(/^\/var\/folders\/.*\/orchard-501-[0-9a-f]{12}$/);
  });

  it('one clear error when even the fallback does not fit', () => {
    expect(() => engineSocketDirFor('/x run', { ...linux, tmp: `/${'t'.repeat(100)}` })).toThrow(/too long for a socket path/);
  });
});

describe('engine socket directory (on disk)', () => {
  const tmp = tempDir('orchard-sockets-');
  const log = createLogger('test', 'silent');

  it('is created 0700, an existing one is made 0700, and sockets a previous run left are removed (nothing else)', async () => {
    const run = join(tmp.path, 'run');
    await mkdir(join(run, 'sockets'), { recursive: true, mode: 0o755 });
    const stale = join(run, 'sockets', 'rpc-20001.sock');
    // a socket file as a SIGKILLed rpc-server leaves it (the server here is closed after the sweep)
    const server = createServer();
    await new Promise<void>((r) => server.listen(stale, () => r()));
    await writeFile(join(run, 'sockets', 'notes.txt'), 'kept');
    const dir = await prepareEngineSocketDir(run, log, { platform: 'linux', uid: process.getuid!(), tmp: tmp.path });
    expect(dir).toBe(join(run, 'sockets'));
    expect((await stat(dir)).mode & 0o777).toBe(0o700);
    expect((await readdir(dir)).sort()).toEqual(['notes.txt']);
    await new Promise<void>((r) => server.close(() => r()));
  });

  it('refuses a symlink in its place', async () => {
    const run = join(tmp.path, 'run2');
    await mkdir(run, { recursive: true });
    await mkdir(join(tmp.path, 'elsewhere'));
    await symlink(join(tmp.path, 'elsewhere'), join(run, 'sockets'));
    await expect(prepareEngineSocketDir(run, log, { platform: 'linux', uid: 0, tmp: tmp.path })).rejects.toThrow(/not a directory this user owns/);
    expect((await lstat(join(run, 'sockets'))).isSymbolicLink()).toBe(true);
  });
});
