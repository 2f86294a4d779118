import { z } from 'zod';
import { UsageError } from '../errors.ts';

/*
 * Cluster join tokens, format 1: `orchard1.<id>.<secret>.<ca-sha256>`.
 *   id      12 hex chars, public: names the stored record (lookup never touches the secret)
 *   secret  32 random bytes, base64url: proves the holder was given the token
 *   ca      sha256 of the cluster CA certificate (DER, hex): the joining node checks the
 *           coordinator's CA against it before sending anything (kubeadm's
 *           --discovery-token-ca-cert-hash), so a rogue coordinator learns nothing
 * Both sides read it: the coordinator redeems it (src/coordinator/membership/join-token.ts),
 * the node pins the CA with it before its first byte (src/node/join.ts).
 */
export const TOKEN_VERSION = 'orchard1';

const JoinTokenText = z
  .string()
  .trim()
  .regex(/^orchard1\.[0-9a-f]{12}\.[A-Za-z0-9_-]{43}\.[0-9a-f]{64}$/, 'not an orchard1 join token (orchard1.<id>.<secret>.<ca-sha256>)');

export interface ClusterJoinToken {
  readonly id: string;
  readonly secret: string;
  readonly caFingerprint: string;
}

/** The one parse of a presented token; the message never echoes the token back. */
export function parseClusterJoinToken(text: string): ClusterJoinToken {
  const parsed = JoinTokenText.safeParse(text);
  if (!parsed.success) throw new UsageError(parsed.error.issues[0]?.message ?? 'malformed join token');
  const [, id, secret, caFingerprint] = parsed.data.split('.') as [string, string, string, string];
  return { id, secret, caFingerprint };
}

export function formatClusterJoinToken(t: ClusterJoinToken): string {
  return `${TOKEN_VERSION}.${t.id}.${t.secret}.${t.caFingerprint}`;
}
