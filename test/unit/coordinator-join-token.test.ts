import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { generateJoinToken, joinTokenMatches, validateJoinToken } from '../../src/coordinator/membership/join-token.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { OrchardError, UsageError } from '../../src/shared/errors.ts';

describe('join token', () => {
  it('is random, long and recognisable', () => {
    const a = generateJoinToken();
    const b = generateJoinToken();
    expect(a).not.toBe(b);
    expect(a).toMatch(/^orchard-join-[A-Za-z0-9_-]{43}$/);
  });

  it('matches only the exact token, whatever the lengths', () => {
    const t = generateJoinToken();
    expect(joinTokenMatches(t, t)).toBe(true);
    expect(joinTokenMatches(t, `${t}x`)).toBe(false);
    expect(joinTokenMatches(t, t.slice(0, -1))).toBe(false);
    expect(joinTokenMatches(t, '')).toBe(false);
    expect(joinTokenMatches('', '')).toBe(false);
  });

  it('rejects weak explicit tokens with a usage error', () => {
    expect(() => validateJoinToken('short', 'flag')).toThrow(UsageError);
    expect(() => validateJoinToken('has white space in it!!', 'flag')).toThrow(/whitespace/);
    expect(validateJoinToken('  a-long-enough-token-1234 ', 'flag')).toBe('a-long-enough-token-1234');
  });
});

describe('StateDir', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'orchard-state-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('generates the token on first start, keeps it (0600) and returns it afterwards', async () => {
    const s = new StateDir(join(dir, 'c'));
    const first = await s.joinToken();
    expect(first.created).toBe(true);
    const again = await new StateDir(join(dir, 'c')).joinToken();
    expect(again).toEqual({ token: first.token, created: false });
    expect((await stat(s.tokenPath)).mode & 0o777).toBe(0o600);
    expect(await s.readJoinToken()).toBe(first.token);
  });

  it('an explicit token replaces the stored one', async () => {
    const s = new StateDir(dir);
    await s.joinToken();
    const t = await s.joinToken('explicit-token-0123456789');
    expect(t.token).toBe('explicit-token-0123456789');
    expect((await readFile(s.tokenPath, 'utf8')).trim()).toBe('explicit-token-0123456789');
    await expect(s.joinToken('bad')).rejects.toThrow(UsageError);
  });

  it('keeps a stable cluster id and the statically joined agents', async () => {
    const s = new StateDir(dir);
    const c = await s.cluster();
    expect(c.agents).toEqual([]);
    await s.saveCluster({ ...c, agents: ['127.0.0.1:5000'] });
    expect(await new StateDir(dir).cluster()).toEqual({ clusterId: c.clusterId, agents: ['127.0.0.1:5000'] });
  });

  it('refuses a corrupt state file instead of silently starting a new cluster', async () => {
    const s = new StateDir(dir);
    await writeFile(s.clusterPath, '{not json');
    await expect(s.cluster()).rejects.toThrow(OrchardError);
    await writeFile(s.clusterPath, '{"agents":[]}');
    await expect(s.cluster()).rejects.toThrow(/malformed/);
  });
});
