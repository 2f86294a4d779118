import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AccessControl, bearerKey } from '../../src/coordinator/api/access.ts';
import { grpcScopeOf } from '../../src/coordinator/api/grpc-access.ts';
import { ApiKeyStore, loadOrCreateLocalAdminKey, matchApiKey, scopePermits } from '../../src/coordinator/state/api-key-store.ts';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-keys-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('API key store', () => {
  it('keeps hashes only (0600), matches the key it printed, revokes by name', async () => {
    const store = new ApiKeyStore(join(dir, 'api-keys.json'));
    const { key, record } = await store.create({ scope: 'inference', name: 'webui' });
    expect(key).toMatch(/^orchard_sk_[A-Za-z0-9_-]{43}$/);
    const text = await readFile(store.path, 'utf8');
    expect(text).not.toContain(key);
    expect((await stat(store.path)).mode & 0o777).toBe(0o600);
    expect(matchApiKey(await store.current(), key)).toEqual(record);
    expect(matchApiKey(await store.current(), `${key}x`)).toBeUndefined();
    await expect(store.create({ scope: 'admin', name: 'webui' })).rejects.toThrow(/exists/);
    await expect(store.create({ scope: 'admin', name: '../x' })).rejects.toThrow(/invalid key name/);
    expect(await store.revoke('webui')).toBe(true);
    expect(await store.revoke('webui')).toBe(false);
    expect(await store.current()).toEqual([]);
  });

  it('two creates at once both land (one queue, read-modify-write)', async () => {
    const store = new ApiKeyStore(join(dir, 'api-keys.json'));
    await Promise.all([store.create({ scope: 'admin' }), store.create({ scope: 'inference' })]);
    expect((await store.list()).map((r) => r.scope).sort()).toEqual(['admin', 'inference']);
  });

  it('the local admin key is made once and kept', async () => {
    const p = join(dir, 'admin-key');
    const a = await loadOrCreateLocalAdminKey(p);
    expect(await loadOrCreateLocalAdminKey(p)).toBe(a);
    expect((await stat(p)).mode & 0o777).toBe(0o600);
  });
});

describe('access decisions', () => {
  it('admin opens both scopes, inference only inference', () => {
    expect(scopePermits('admin', 'admin')).toBe(true);
    expect(scopePermits('admin', 'inference')).toBe(true);
    expect(scopePermits('inference', 'inference')).toBe(true);
    expect(scopePermits('inference', 'admin')).toBe(false);
  });

  it('open with no credential configured; the first stored key locks it; the local admin key alone does not', async () => {
    const store = new ApiKeyStore(join(dir, 'api-keys.json'));
    const access = new AccessControl({ adminKeys: [undefined, 'local-k'], locked: false, store });
    expect(await access.decide(undefined, 'admin')).toMatchObject({ ok: true });
    const { key } = await store.create({ scope: 'inference' });
    expect(await access.decide(undefined, 'inference')).toEqual({ ok: false, why: 'missing' });
    expect(await access.decide('nope', 'inference')).toEqual({ ok: false, why: 'invalid' });
    expect(await access.decide(key, 'inference')).toMatchObject({ ok: true, scope: 'inference' });
    expect(await access.decide(key, 'admin')).toEqual({ ok: false, why: 'scope', scope: 'inference' });
    expect(await access.decide('local-k', 'admin')).toMatchObject({ ok: true, scope: 'admin', keyName: 'local-admin' });
  });

  it('an operator key locks at once and is admin', async () => {
    const access = new AccessControl({ adminKeys: ['op'], locked: true });
    expect(await access.decide(undefined, 'inference')).toEqual({ ok: false, why: 'missing' });
    expect(await access.decide('op', 'admin')).toMatchObject({ ok: true, scope: 'admin', keyName: 'api-key' });
  });

  it('reads Bearer values strictly; unknown gRPC methods need admin', () => {
    expect(bearerKey('Bearer abc')).toBe('abc');
    expect(bearerKey('bearer abc ')).toBe('abc');
    expect(bearerKey('Basic abc')).toBeUndefined();
    expect(bearerKey('Bearer a b')).toBeUndefined();
    expect(grpcScopeOf('Join')).toBe('join-token');
    expect(grpcScopeOf('Generate')).toBe('inference');
    expect(grpcScopeOf('SomethingNew')).toBe('admin');
  });
});
