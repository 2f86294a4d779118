import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { UsageError } from '../../shared/errors.ts';

/**
 * The cluster's join token: the shared secret a node presents to `Coordinator.Join`.
 * 32 random bytes, base64url (43 characters), prefixed so it is recognisable in configs.
 */
const PREFIX = 'orchard-join-';

export function generateJoinToken(): string {
  return PREFIX + randomBytes(32).toString('base64url');
}

/** Tokens set by hand (`--join-token`, ORCHARD_JOIN_TOKEN) must still be hard to guess. */
export function validateJoinToken(token: string, source: string): string {
  const t = token.trim();
  if (t.length < 16) throw new UsageError(`join token from ${source} is too short: use at least 16 characters`);
  if (/\s/.test(t)) throw new UsageError(`join token from ${source} contains whitespace`);
  return t;
}

/**
 * Constant-time comparison. Both sides are hashed first so the comparison takes the same time
 * whatever the lengths (timingSafeEqual itself throws on a length mismatch, which would leak it).
 */
export function joinTokenMatches(expected: string, presented: string): boolean {
  const a = createHash('sha256').update(expected, 'utf8').digest();
  const b = createHash('sha256').update(presented, 'utf8').digest();
  return timingSafeEqual(a, b) && expected.length > 0;
}
