import { join } from 'node:path';
import { agentSubjects, allAgentSubjects } from '../../shared/events.ts';
import { type ClusterCa, createKeyAndCsr, issueCertificate, roleSubject } from '../../shared/pki/certificates.ts';
import { ensurePrivateDir, writeFileAtomic } from '../../shared/pki/files.ts';
import { type Identity, identityUri } from '../../shared/pki/identity.ts';

/**
 * Who may do what on the cluster's NATS server. Every client presents a certificate from the
 * cluster CA (TLS, `verify_and_map`), so a certificate from elsewhere fails the handshake. The
 * server then looks the certificate up in the user list: first by its `orchard://<role>/<id>`
 * URI SAN, then by its subject, which names only the role and cluster (`roleSubject`) — nats-server
 * 2.9 and 2.15 match both exactly (no patterns; per-user permission templates exist only for JWT
 * accounts and auth callout), so a user named by a subject stands for every holder of the role.
 * A certificate no entry names is refused ("Authorization Violation"). Per user:
 *   coordinators and operators (role `coordinator` or `admin`, any id): everything (KV buckets,
 *   the stream, every subject);
 *   a node: publish on its agent subjects only, subscribe to nothing — so it cannot reach the
 *   JetStream API (no KV read or write) or listen to other clients' replies (`_INBOX.>` carries
 *   the coordinator's KV reads).
 * Two lists, one per kind of server:
 *   `natsAuthorization`: the local server the coordinator starts names each admitted node (joined,
 *   not revoked) by its URI, with publish on `orchard.<c>.agent.<its id>.>` alone; the coordinator
 *   rewrites it and the server reloads as nodes come and go.
 *   `natsRoleAuthorization`: an external server (`orchard coordinator nats-config`) cannot be
 *   rewritten by every coordinator, so it names the node role: any node of the cluster, joined
 *   later included, publishes on `orchard.<c>.agent.*.>` — it could speak for another node there
 *   (agent-bus.ts still drops an event whose subject, node and source disagree) — and each revoked
 *   node by its URI, with no permission at all, since a revoked certificate stays valid until it
 *   expires.
 */

/** The server's own certificate identity: the `nats` role may serve NATS and nothing else. */
export const NATS_SERVER_IDENTITY: Identity = { role: 'nats', id: 'nats-server' };
/** Users with every permission by URI: the ids certificates issued before `roleSubject` carried a CN. */
export const NATS_FULL_USERS: readonly Identity[] = [
  { role: 'coordinator', id: 'coordinator' },
  { role: 'admin', id: 'admin' },
];
const FULL_ROLES = ['coordinator', 'admin'] as const;

export interface NatsTlsFiles {
  readonly certFile: string;
  readonly keyFile: string;
  readonly caFile: string;
}

/** The `tls {}` block: client certificates required and mapped to users. */
export function natsTlsBlock(f: NatsTlsFiles): string {
  // The handshake timeout defaults to 0.5 s, less than an ECDSA handshake takes on a loaded Mac.
  return `tls { cert_file: ${JSON.stringify(f.certFile)}, key_file: ${JSON.stringify(f.keyFile)}, ca_file: ${JSON.stringify(f.caFile)}, verify_and_map: true, timeout: 5 }`;
}

interface Permissions {
  readonly publish: { readonly allow?: string[]; readonly deny?: string[] };
  readonly subscribe: { readonly deny: string[] };
}

/** What a node may do: publish its own agent events, nothing else. */
export function nodePermissions(clusterId: string, nodeId: string): Permissions {
  return { publish: { allow: [agentSubjects(clusterId, nodeId)] }, subscribe: { deny: ['>'] } };
}

const NOTHING: Permissions = { publish: { deny: ['>'] }, subscribe: { deny: ['>'] } };

function user(name: string, permissions?: Permissions): string {
  return `    { user: ${JSON.stringify(name)}${permissions ? `, permissions: ${JSON.stringify(permissions)}` : ''} }`;
}

function authorization(clusterId: string, more: string[]): string {
  const users = [
    ...NATS_FULL_USERS.map((u) => user(identityUri(u))),
    ...FULL_ROLES.map((role) => user(roleSubject(clusterId, role))),
    ...more,
  ];
  return `authorization {\n  users: [\n${users.join('\n')}\n  ]\n}`;
}

const sortedIds = (ids: Iterable<string>) => [...new Set(ids)].sort();

/** The local server's `authorization {}` block: these admitted nodes, each by its URI (pure; sorted, so a rewrite with the same members is identical). */
export function natsAuthorization(clusterId: string, nodeIds: Iterable<string>): string {
  return authorization(
    clusterId,
    sortedIds(nodeIds).map((id) => user(identityUri({ role: 'node', id }), nodePermissions(clusterId, id))),
  );
}

/** An external server's `authorization {}` block: every node by its role, the revoked ones by URI with nothing allowed (pure). */
export function natsRoleAuthorization(clusterId: string, revokedNodeIds: Iterable<string>): string {
  return authorization(clusterId, [
    // URIs are looked up before the subject: a revoked node's own entry wins over its role's.
    ...sortedIds(revokedNodeIds).map((id) => user(identityUri({ role: 'node', id }), NOTHING)),
    user(roleSubject(clusterId, 'node'), { publish: { allow: [allAgentSubjects(clusterId)] }, subscribe: { deny: ['>'] } }),
  ]);
}

/** A local server's certificate is made at each coordinator start; an external one's by `nats-config`, re-run within the year. */
const SERVER_VALIDITY_DAYS = 365;

/**
 * The server's key and certificate (role `nats`) and the CA it checks clients against, in `tlsDir`
 * (0600, like everything a server config points at): nats-server reads them from files, never
 * from its command line. `paths` is where the server will read them, when not from `tlsDir`.
 */
export async function writeNatsServerTls(tlsDir: string, ca: ClusterCa, paths: string = tlsDir): Promise<NatsTlsFiles> {
  await ensurePrivateDir(tlsDir);
  const { keyPem, csrPem } = await createKeyAndCsr(NATS_SERVER_IDENTITY.id);
  const { certPem } = await issueCertificate(ca, csrPem, { role: NATS_SERVER_IDENTITY.role, expectId: NATS_SERVER_IDENTITY.id, validityDays: SERVER_VALIDITY_DAYS });
  await writeFileAtomic(join(tlsDir, 'server.key'), keyPem, 0o600);
  // The chain sent is leaf + CA, like the cluster's gRPC servers.
  await writeFileAtomic(join(tlsDir, 'server.crt'), `${certPem.trim()}\n${ca.certPem.trim()}\n`, 0o600);
  await writeFileAtomic(join(tlsDir, 'ca.crt'), ca.certPem, 0o600);
  return { certFile: join(paths, 'server.crt'), keyFile: join(paths, 'server.key'), caFile: join(paths, 'ca.crt') };
}

/** The file an external server's configuration includes (`include "orchard.conf"`). */
export const NATS_INCLUDE_FILE = 'orchard.conf';

/**
 * Everything an external nats-server needs to serve this cluster, in `outDir`: its TLS files and
 * `orchard.conf` — the `tls {}` block and the role-wide user list (the operator adds listen,
 * JetStream and clustering around it). Nodes that join later need no change; a revocation does:
 * run it again and reload the server.
 */
export async function writeExternalNatsConfig(o: { outDir: string; ca: ClusterCa; revokedNodeIds: Iterable<string>; serverDir?: string | undefined }): Promise<void> {
  const tls = await writeNatsServerTls(o.outDir, o.ca, o.serverDir);
  await writeFileAtomic(join(o.outDir, NATS_INCLUDE_FILE), `${natsTlsBlock(tls)}\n${natsRoleAuthorization(o.ca.clusterId, o.revokedNodeIds)}\n`, 0o600);
}
