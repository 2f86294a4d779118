import { z } from 'zod';

/**
 * Who a cluster certificate speaks for. The role decides what its holder may do: `node` runs
 * engines and tunnels, `coordinator` drives nodes, `admin` is an operator's client (CLI), `nats`
 * is the cluster's NATS server (a certificate that may serve TLS to NATS clients and nothing else:
 * no agent or coordinator method accepts it).
 * The identity lives in one URI SAN, `orchard://<role>/<id>`, so one parse answers both
 * questions and no peer-written field (a Join message, a TXT record) is ever trusted for it.
 */
export const ROLES = ['node', 'coordinator', 'admin', 'nats'] as const;
export const Role = z.enum(ROLES);
export type Role = z.infer<typeof Role>;

/** Node ids are UUIDs today; the wider set keeps coordinator and admin names readable. */
export const IdentityId = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, 'identity id: 1–64 of A–Z a–z 0–9 . _ -, starting alphanumeric');

export const ClusterId = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, 'cluster id: 1–64 of A–Z a–z 0–9 . _ -, starting alphanumeric');

export interface Identity {
  readonly id: string;
  readonly role: Role;
}

const URI_PREFIX = 'orchard://';

export function identityUri(identity: Identity): string {
  return `${URI_PREFIX}${Role.parse(identity.role)}/${IdentityId.parse(identity.id)}`;
}

/** The identity a URI SAN names, or undefined when it is not one of ours. */
export function parseIdentityUri(uri: string): Identity | undefined {
  if (!uri.startsWith(URI_PREFIX)) return undefined;
  const [role, id, ...rest] = uri.slice(URI_PREFIX.length).split('/');
  if (rest.length > 0) return undefined;
  const r = Role.safeParse(role);
  const i = IdentityId.safeParse(id);
  return r.success && i.success ? { id: i.data, role: r.data } : undefined;
}
