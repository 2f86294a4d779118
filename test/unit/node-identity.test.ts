import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { IDENTITY_FILE, createFileAtomic, defaultStateDir, loadOrCreateIdentity, parseIdentity } from '../../src/node/identity.ts';
import { OrchardError } from '../../src/shared/errors.ts';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-identity-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('node identity', () => {
  it('creates an id once and keeps it across loads', async () => {
    const first = await loadOrCreateIdentity(join(dir, 'state'));
    expect(first.created).toBe(true);
    expect(first.nodeId).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    const second = await loadOrCreateIdentity(join(dir, 'state'));
    expect(second).toEqual({ ...first, created: false });
    const onDisk = JSON.parse(await readFile(join(dir, 'state', IDENTITY_FILE), 'utf8')) as { nodeId: string };
    expect(onDisk.nodeId).toBe(first.nodeId);
  });

  it('different state dirs give different ids', async () => {
    const a = await loadOrCreateIdentity(join(dir, 'a'));
    const b = await loadOrCreateIdentity(join(dir, 'b'));
    expect(a.nodeId).not.toBe(b.nodeId);
  });

  it('concurrent first starts agree on one id and leave no temp files', async () => {
    const ids = await Promise.all(Array.from({ length: 8 }, () => loadOrCreateIdentity(dir)));
    expect(new Set(ids.map((i) => i.nodeId)).size).toBe(1);
    expect(ids.filter((i) => i.created)).toHaveLength(1);
    expect(await readdir(dir)).toEqual([IDENTITY_FILE]);
  });

  it('refuses a damaged identity file instead of silently minting a new id', async () => {
    await writeFile(join(dir, IDENTITY_FILE), '{"nodeId": ');
    await expect(loadOrCreateIdentity(dir)).rejects.toThrow(/not valid JSON.*delete it/);
    await writeFile(join(dir, IDENTITY_FILE), '{"nodeId": "../../etc"}');
    await expect(loadOrCreateIdentity(dir)).rejects.toBeInstanceOf(OrchardError);
    expect(() => parseIdentity('{"createdAt":"x"}', 'p')).toThrow(/no valid nodeId/);
  });

  it('createFileAtomic never replaces an existing file', async () => {
    const p = join(dir, 'f');
    expect(await createFileAtomic(p, 'one')).toBe(true);
    expect(await createFileAtomic(p, 'two')).toBe(false);
    expect(await readFile(p, 'utf8')).toBe('one');
    expect(await readdir(dir)).toEqual(['f']);
  });

  it('default state dir: explicit env, then XDG, then ~/.orchard/node', () => {
    expect(defaultStateDir({ ORCHARD_NODE_STATE_DIR: '/s' }, '/home/u')).toBe('/s');
    expect(defaultStateDir({ XDG_STATE_HOME: '/x' }, '/home/u')).toBe('/x/orchard/node');
    expect(defaultStateDir({}, '/home/u')).toBe('/home/u/.orchard/node');
  });
});
