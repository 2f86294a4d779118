import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import { UsageError } from '../../shared/errors.ts';

import { type ClusterJoinToken, formatClusterJoinToken, parseClusterJoinToken } from '../../shared/pki/join-token-text.ts';

export { type ClusterJoinToken, formatClusterJoinToken, parseClusterJoinToken, TOKEN_VERSION } from '../../shared/pki/join-token-text.ts';

export const JoinTokenRecord = z.object({
  id: z.string().regex(/^[0-9a-f]{12}$/),
  secretSha256: z.string().regex(/^[0-9a-f]{64}$/),
  createdAt: z.iso.datetime(),
  /** null: never expires (only when the operator asked for it). */
  expiresAt: z.iso.datetime().nullable(),
  /** null: unlimited uses. */
  usesLeft: z.number().int().nonnegative().nullable(),
});
export type JoinTokenRecord = z.infer<typeof JoinTokenRecord>;

const sha256Hex = (s: string) => createHash('sha256').update(s, 'utf8').digest('hex');

export interface NewTokenOptions {
  readonly caFingerprint: string;
  /** Lifetime in ms; undefined = no expiry. */
  readonly ttlMs?: number | undefined;
  /** How many joins it allows; undefined = unlimited. */
  readonly uses?: number | undefined;
  readonly now?: Date;
}

export const DEFAULT_TOKEN_TTL_MS = 24 * 3_600_000;

export function newClusterJoinToken(o: NewTokenOptions): { token: string; record: JoinTokenRecord } {
  if (!/^[0-9a-f]{64}$/.test(o.caFingerprint)) throw new UsageError('CA fingerprint must be 64 hex characters (sha256)');
  if (o.ttlMs !== undefined && !(o.ttlMs > 0)) throw new UsageError('token lifetime must be positive');
  if (o.uses !== undefined && !(Number.isInteger(o.uses) && o.uses > 0)) throw new UsageError('token uses must be a positive integer');
  const now = o.now ?? new Date();
  const t: ClusterJoinToken = { id: randomBytes(6).toString('hex'), secret: randomBytes(32).toString('base64url'), caFingerprint: o.caFingerprint };
  const record: JoinTokenRecord = {
    id: t.id,
    secretSha256: sha256Hex(t.secret),
    createdAt: now.toISOString(),
    expiresAt: o.ttlMs === undefined ? null : new Date(now.getTime() + o.ttlMs).toISOString(),
    usesLeft: o.uses ?? null,
  };
  return { token: formatClusterJoinToken(t), record };
}

export type RedeemRefusal = 'malformed' | 'wrong-cluster' | 'unknown' | 'expired' | 'used-up';

export type RedeemResult =
  | { readonly ok: true; readonly id: string; readonly records: JoinTokenRecord[] }
  | { readonly ok: false; readonly reason: RedeemRefusal; readonly message: string };

const REFUSALS: Record<RedeemRefusal, string> = {
  malformed: 'join token is malformed: copy it again from `orchard coordinator token`',
  'wrong-cluster': 'join token is for another cluster (its CA fingerprint does not match this coordinator)',
  unknown: 'join token is not valid for this cluster (unknown or revoked): create one with `orchard coordinator token`',
  expired: 'join token has expired: create a new one with `orchard coordinator token`',
  'used-up': 'join token has no uses left: create a new one with `orchard coordinator token --uses N`',
};

const refuse = (reason: RedeemRefusal): RedeemResult => ({ ok: false, reason, message: REFUSALS[reason] });

/**
 * Spend one use of a presented token. Pure: returns the records to persist. The secret check is
 * constant-time over fixed-length hashes; a wrong secret and an unknown id get the same answer.
 */
export function redeemClusterJoinToken(records: readonly JoinTokenRecord[], presented: string, caFingerprint: string, now: Date = new Date()): RedeemResult {
  let t: ClusterJoinToken;
  try {
    t = parseClusterJoinToken(presented);
  } catch {
    return refuse('malformed');
  }
  // the fingerprint is public: a plain comparison leaks nothing
  if (t.caFingerprint !== caFingerprint) return refuse('wrong-cluster');
  const record = records.find((r) => r.id === t.id);
  const presentedHash = Buffer.from(sha256Hex(t.secret), 'hex');
  // compare against a dummy when the id is unknown, so both paths cost the same
  const storedHash = Buffer.from(record?.secretSha256 ?? sha256Hex(''), 'hex');
  if (!timingSafeEqual(presentedHash, storedHash) || !record) return refuse('unknown');
  if (record.expiresAt !== null && now.getTime() >= Date.parse(record.expiresAt)) return refuse('expired');
  if (record.usesLeft !== null && record.usesLeft <= 0) return refuse('used-up');
  const spent = { ...record, usesLeft: record.usesLeft === null ? null : record.usesLeft - 1 };
  return { ok: true, id: record.id, records: records.map((r) => (r.id === record.id ? spent : r)) };
}

/** Withdraw a token before it expires (`orchard coordinator token --revoke ID`). */
export function revokeJoinToken(records: readonly JoinTokenRecord[], id: string): { records: JoinTokenRecord[]; found: boolean } {
  const kept = records.filter((r) => r.id !== id);
  return { records: kept, found: kept.length !== records.length };
}

/** Drop expired and spent records (kept until then so a late join gets a clear refusal). */
export function pruneJoinTokens(records: readonly JoinTokenRecord[], now: Date = new Date(), graceMs = DEFAULT_TOKEN_TTL_MS): JoinTokenRecord[] {
  return records.filter((r) => {
    const dead = (r.expiresAt !== null && now.getTime() >= Date.parse(r.expiresAt)) || r.usesLeft === 0;
    const since = r.expiresAt !== null ? Date.parse(r.expiresAt) : Date.parse(r.createdAt);
    return !dead || now.getTime() - since < graceMs;
  });
}
