import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  type JoinTokenRecord,
  formatClusterJoinToken,
  newClusterJoinToken,
  parseClusterJoinToken,
  pruneJoinTokens,
  redeemClusterJoinToken,
  revokeJoinToken,
} from '../../src/coordinator/membership/join-token.ts';
import { JoinTokenStore } from '../../src/coordinator/state/join-token-store.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { OrchardError, UsageError } from '../../src/shared/errors.ts';
import { certificateFingerprint } from '../../src/shared/pki/certificates.ts';

describe('StateDir', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'orchard-state-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
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

const CA = 'a'.repeat(64);
const OTHER_CA = 'b'.repeat(64);
const HOUR = 3_600_000;
const T0 = new Date('2030-01-01T00:00:00Z');

describe('cluster join token (orchard1)', () => {
  it('carries id, secret and CA fingerprint; parses back exactly', () => {
    const { token, record } = newClusterJoinToken({ caFingerprint: CA, ttlMs: HOUR, uses: 2, now: T0 });
    expect(token).toMatch(/^orchard1\.[0-9a-f]{12}\.[A-Za-z0-9_-]{43}\.a{64}$/);
    const t = parseClusterJoinToken(` ${token}\n`);
    expect(t.caFingerprint).toBe(CA);
    expect(t.id).toBe(record.id);
    expect(formatClusterJoinToken(t)).toBe(token);
    expect(record).toEqual({ id: t.id, secretSha256: expect.stringMatching(/^[0-9a-f]{64}$/), createdAt: T0.toISOString(), expiresAt: new Date(T0.getTime() + HOUR).toISOString(), usesLeft: 2 });
    expect(JSON.stringify(record)).not.toContain(t.secret);
  });

  it('refuses malformed text without echoing it', () => {
    const { token } = newClusterJoinToken({ caFingerprint: CA });
    for (const bad of ['', 'orchard-join-abc', token.replace('orchard1', 'orchard2'), `${token}0`, token.slice(0, -1), token.replace('.', '..')]) {
      expect(() => parseClusterJoinToken(bad)).toThrow(UsageError);
    }
    try {
      parseClusterJoinToken(`${token}0`);
    } catch (err) {
      expect((err as Error).message).not.toContain(token.split('.')[2]);
    }
  });

  it('refuses bad creation options', () => {
    expect(() => newClusterJoinToken({ caFingerprint: 'xyz' })).toThrow(/fingerprint/);
    expect(() => newClusterJoinToken({ caFingerprint: CA, ttlMs: 0 })).toThrow(/lifetime/);
    expect(() => newClusterJoinToken({ caFingerprint: CA, uses: 0 })).toThrow(/uses/);
    expect(() => newClusterJoinToken({ caFingerprint: CA, uses: 1.5 })).toThrow(/uses/);
  });

  it('redeems within its uses and lifetime, then refuses with a clear reason', () => {
    const { token, record } = newClusterJoinToken({ caFingerprint: CA, ttlMs: HOUR, uses: 2, now: T0 });
    let records: JoinTokenRecord[] = [record];
    for (let i = 0; i < 2; i++) {
      const r = redeemClusterJoinToken(records, token, CA, T0);
      if (!r.ok) throw new Error(r.message);
      expect(r.id).toBe(record.id);
      records = r.records;
    }
    expect(records[0]?.usesLeft).toBe(0);
    const spent = redeemClusterJoinToken(records, token, CA, T0);
    expect(spent).toMatchObject({ ok: false, reason: 'used-up', message: expect.stringMatching(/no uses left/) });
    const fresh = newClusterJoinToken({ caFingerprint: CA, ttlMs: HOUR, now: T0 });
    expect(redeemClusterJoinToken([fresh.record], fresh.token, CA, new Date(T0.getTime() + HOUR - 1)).ok).toBe(true);
    expect(redeemClusterJoinToken([fresh.record], fresh.token, CA, new Date(T0.getTime() + HOUR))).toMatchObject({ ok: false, reason: 'expired', message: expect.stringMatching(/expired/) });
  });

  it('unlimited tokens stay unlimited; no-expiry tokens never expire', () => {
    const { token, record } = newClusterJoinToken({ caFingerprint: CA, now: T0 });
    const r = redeemClusterJoinToken([record], token, CA, new Date('2099-01-01T00:00:00Z'));
    expect(r.ok && r.records[0]?.usesLeft).toBe(null);
  });

  it('a wrong secret and an unknown id are refused alike; another cluster’s token says so; garbage is malformed', () => {
    const { token, record } = newClusterJoinToken({ caFingerprint: CA, now: T0 });
    const t = parseClusterJoinToken(token);
    const wrongSecret = formatClusterJoinToken({ ...t, secret: `${t.secret.slice(0, -1)}${t.secret.endsWith('A') ? 'B' : 'A'}` });
    const unknownId = formatClusterJoinToken({ ...t, id: t.id === '000000000000' ? '000000000001' : '000000000000' });
    const a = redeemClusterJoinToken([record], wrongSecret, CA, T0);
    const b = redeemClusterJoinToken([record], unknownId, CA, T0);
    expect(a).toMatchObject({ ok: false, reason: 'unknown' });
    expect(b).toEqual(a);
    expect(redeemClusterJoinToken([record], token, OTHER_CA, T0)).toMatchObject({ ok: false, reason: 'wrong-cluster' });
    expect(redeemClusterJoinToken([record], 'nonsense', CA, T0)).toMatchObject({ ok: false, reason: 'malformed' });
    expect(redeemClusterJoinToken([], token, CA, T0)).toMatchObject({ ok: false, reason: 'unknown' });
  });

  it('revoke removes exactly one token; prune keeps live and recently dead ones', () => {
    const a = newClusterJoinToken({ caFingerprint: CA, ttlMs: HOUR, now: T0 }).record;
    const b = newClusterJoinToken({ caFingerprint: CA, uses: 1, now: T0 }).record;
    expect(revokeJoinToken([a, b], a.id)).toEqual({ records: [b], found: true });
    expect(revokeJoinToken([a, b], 'ffffffffffff').found).toBe(false);
    const later = new Date(T0.getTime() + 2 * HOUR);
    expect(pruneJoinTokens([a, b], later, 24 * HOUR)).toEqual([a, b]);
    expect(pruneJoinTokens([a, b], new Date(T0.getTime() + 26 * HOUR), 24 * HOUR)).toEqual([b]);
    const spentB = { ...b, usesLeft: 0 };
    expect(pruneJoinTokens([spentB], new Date(T0.getTime() + 25 * HOUR), 24 * HOUR)).toEqual([]);
  });
});

describe('JoinTokenStore and the cluster CA in the state dir', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'orchard-tokens-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('pins the state dir’s CA, stores hashes only (0600), and keeps use counts across restarts', async () => {
    const s = new StateDir(dir);
    const { ca, created } = await s.clusterCa();
    expect(created).toBe(true);
    expect((await s.clusterCa()).created).toBe(false);
    const store = await s.joinTokens();
    const { token } = await store.create({ ttlMs: HOUR, uses: 1 });
    expect(parseClusterJoinToken(token).caFingerprint).toBe(certificateFingerprint(ca.certPem));
    expect((await stat(s.joinTokensPath)).mode & 0o777).toBe(0o600);
    expect(await readFile(s.joinTokensPath, 'utf8')).not.toContain(parseClusterJoinToken(token).secret);
    expect((await (await new StateDir(dir).joinTokens()).redeem(token)).ok).toBe(true);
    expect(await (await new StateDir(dir).joinTokens()).redeem(token)).toMatchObject({ ok: false, reason: 'used-up' });
  });

  it('concurrent joins cannot spend one use twice', async () => {
    const store = new JoinTokenStore(join(dir, 'tokens.json'), CA);
    const { token } = await store.create({ uses: 3 });
    const results = await Promise.all(Array.from({ length: 10 }, () => store.redeem(token)));
    expect(results.filter((r) => r.ok)).toHaveLength(3);
    expect((await store.list())[0]?.usesLeft).toBe(0);
  });

  it('revoked tokens are refused; a corrupt file is an error, not an empty store', async () => {
    const store = new JoinTokenStore(join(dir, 'tokens.json'), CA);
    const { token, record } = await store.create({});
    expect(await store.revoke(record.id)).toBe(true);
    expect(await store.revoke(record.id)).toBe(false);
    expect(await store.redeem(token)).toMatchObject({ ok: false, reason: 'unknown' });
    await writeFile(store.path, '{"version":1,"tokens":[{"id":"x"}]}');
    await expect(store.list()).rejects.toThrow(/malformed/);
    await writeFile(store.path, 'nope');
    await expect(store.redeem(token)).rejects.toThrow(OrchardError);
  });
});
