import { join } from 'node:path';
import { agentSubjects } from '../../shared/events.ts';
import { type ClusterCa, createKeyAndCsr, issueCertificate } from '../../shared/pki/certificates.ts';
import { ensurePrivateDir, writeFileAtomic } from '../../shared/pki/files.ts';
import { type Identity, identityUri } from '../../shared/pki/identity.ts';

/**
 * Who may do what on the cluster's NATS server. Every client presents a certificate from the
 * cluster CA (TLS, `verify_and_map`): the server takes its `orchard://<role>/<id>` URI as the
 * user name (nats-server matches a certificate's URI SANs against the user list, 2.9 and later),
 * so a certificate from elsewhere fails the handshake and a cluster certificate the list does not
 * name is refused ("Authorization Violation"). Then, per user:
 *   coordinator (`orchard://coordinator/coordinator`, every coordinator of the cluster) and the
 *   operator's `orchard://admin/admin`: everything (KV buckets, the stream, every subject);
 *   each node: publish on `orchard.<c>.agent.<its id>.>` only, subscribe to nothing — so it
 *   cannot speak for another node, reach the JetStream API (no KV read or write), or listen to
 *   other clients' replies (`_INBOX.>` carries the coordinator's KV reads).
 * The list names the nodes the coordinator has admitted (joined, not revoked); it is rewritten
 * and the server reloaded as nodes come and go (local server), or regenerated for an external one.
 */

/** The server's own certificate identity: the `nats` role may serve NATS and nothing else. */
export const NATS_SERVER_IDENTITY: Identity = { role: 'nats', id: 'nats-server' };
/** Users with every permission. */
export const NATS_FULL_USERS: readonly Identity[] = [
  { role: 'coordinator', id: 'coordinator' },
  { role: 'admin', id: 'admin' },
];

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

/** What a node may do: publish its own agent events, nothing else. */
export function nodePermissions(clusterId: string, nodeId: string): { publish: { allow: string[] }; subscribe: { deny: string[] } } {
  return { publish: { allow: [agentSubjects(clusterId, nodeId)] }, subscribe: { deny: ['>'] } };
}

/** The `authorization {}` block for these members (pure; sorted, so a rewrite with the same members is identical). */
export function natsAuthorization(clusterId: string, nodeIds: Iterable<string>): string {
  const users = [
    ...NATS_FULL_USERS.map((u) => `    { user: ${JSON.stringify(identityUri(u))} }`),
    ...[...new Set(nodeIds)].sort().map((id) => `    { user: ${JSON.stringify(identityUri({ role: 'node', id }))}, permissions: ${JSON.stringify(nodePermissions(clusterId, id))} }`),
  ];
  return `authorization {\n  users: [\n${users.join('\n')}\n  ]\n}`;
}

/** Made fresh at every coordinator start; a year outlives any coordinator's uptime. */
const SERVER_VALIDITY_DAYS = 365;

/**
 * The server's key and certificate (role `nats`, fresh each start, key 0600) and the CA it checks
 * clients against, in `<dir>/tls/`: nats-server reads them from files, never from its command line.
 */
export async function writeNatsServerTls(dir: string, ca: ClusterCa): Promise<NatsTlsFiles> {
  const tlsDir = join(dir, 'tls');
  await ensurePrivateDir(tlsDir);
  const { keyPem, csrPem } = await createKeyAndCsr(NATS_SERVER_IDENTITY.id);
  const { certPem } = await issueCertificate(ca, csrPem, { role: NATS_SERVER_IDENTITY.role, expectId: NATS_SERVER_IDENTITY.id, validityDays: SERVER_VALIDITY_DAYS });
  const files = { certFile: join(tlsDir, 'server.crt'), keyFile: join(tlsDir, 'server.key'), caFile: join(tlsDir, 'ca.crt') };
  await writeFileAtomic(files.keyFile, keyPem, 0o600);
  // The chain sent is leaf + CA, like the cluster's gRPC servers.
  await writeFileAtomic(files.certFile, `${certPem.trim()}\n${ca.certPem.trim()}\n`, 0o644);
  await writeFileAtomic(files.caFile, ca.certPem, 0o644);
  return files;
}
