import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createFileAtomic, defaultStateDir, IDENTITY_FILE, loadOrCreateIdentity, parseIdentity } from '../../src/node/identity.ts';
import { OrchardError } from '../../src/shared/errors.ts';
import { tempDir } from '../helpers/temp-dir.ts';

const tmp = tempDir('orchard-identity-', 'each');

describe('node identity', () => {
  it('creates an id once and keeps it across loads', async () => {
    const first = await loadOrCreateIdentity(join(tmp.path, 'state'));
    expect(first.created).toBe(true);
    expect(first.nodeId).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    const second = await loadOrCreateIdentity(join(tmp.path, 'state'));
    expect(second).toEqual({ ...first, created: false });
    const onDisk = JSON.parse(await readFile(join(tmp.path, 'state', IDENTITY_FILE), 'utf8')) as { nodeId: string };
    expect(onDisk.nodeId).toBe(first.nodeId);
  });

  it('different state dirs give different ids', async () => {
    const a = await loadOrCreateIdentity(join(tmp.path, 'a'));
    const b = await loadOrCreateIdentity(join(tmp.path, 'b'));
    expect(a.nodeId).not.toBe(b.nodeId);
  });

  it('concurrent first starts agree on one id and leave no temp files', async () => {
    const ids = await Promise.all(Array.from({ length: 8 }, () => loadOrCreateIdentity(tmp.path)));
    expect(new Set(ids.map((i) => i.nodeId)).size).toBe(1);
    expect(ids.filter((i) => i.created)).toHaveLength(1);
    expect(await readdir(tmp.path)).toEqual([IDENTITY_FILE]);
  });

  it('refuses a damaged identity file instead of silently minting a new id', async () => {
    await writeFile(join(tmp.path, IDENTITY_FILE), '{"nodeId": ');
    await expect(loadOrCreateIdentity(tmp.path)).rejects.toThrow(/not valid JSON.*delete it/);
    await writeFile(join(tmp.path, IDENTITY_FILE), '{"nodeId": "../../etc"}');
    await expect(loadOrCreateIdentity(tmp.path)).rejects.toBeInstanceOf(OrchardError);
    expect(() => parseIdentity('{"createdAt":"x"}', 'p')).toThrow(/no valid nodeId/);
  });

  it('createFileAtomic never replaces an existing file', async () => {
    const p = join(tmp.path, 'f');
    expect(await createFileAtomic(p, 'one')).toBe(true);
    expect(await createFileAtomic(p, 'two')).toBe(false);
    expect(await readFile(p, 'utf8')).toBe('one');
    expect(await readdir(tmp.path)).toEqual(['f']);
  });

  it('default state tmp.path: explicit env, then XDG, then ~/.orchard/node', () => {
    expect(defaultStateDir({ ORCHARD_NODE_STATE_DIR: '/s' }, '/home/u')).toBe('/s');
    expect(defaultStateDir({ XDG_STATE_HOME: '/x' }, '/home/u')).toBe('/x/orchard/node');
    expect(defaultStateDir({}, '/home/u')).toBe('/home/u/.orchard/node');
  });
});
