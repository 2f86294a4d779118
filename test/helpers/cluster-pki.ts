import { type ClusterCa, createClusterCa, createKeyAndCsr, issueCertificate } from '../../src/shared/pki/certificates.ts';
import type { TlsCredentials } from '../../src/shared/pki/grpc-tls.ts';
import type { Role } from '../../src/shared/pki/identity.ts';
import { loadOrCreateNodeKey, saveNodeCertificate } from '../../src/shared/pki/store.ts';
import { loadOrCreateIdentity } from '../../src/node/identity.ts';

/*
 * Cluster credentials for tests that talk to agents directly (no coordinator): a CA, an agent
 * state dir enrolled the way a join enrols it (the node's own key, a CSR, a `node` certificate
 * naming its id), and client credentials in any role.
 */

export function testCa(name = 'test-cluster'): Promise<ClusterCa> {
  return createClusterCa(name);
}

/** Give an agent state dir a node key and certificate from `ca`; returns the node id. */
export async function enrollNode(stateDir: string, ca: ClusterCa): Promise<string> {
  const { nodeId } = await loadOrCreateIdentity(stateDir);
  const { csrPem } = await loadOrCreateNodeKey(stateDir, nodeId);
  const { certPem } = await issueCertificate(ca, csrPem, { role: 'node', expectId: nodeId });
  await saveNodeCertificate(stateDir, certPem, ca.certPem);
  return nodeId;
}

/** A fresh key and a certificate for `id` in `role`, as a client would hold them. */
export async function clientCredentials(ca: ClusterCa, role: Role, id: string): Promise<TlsCredentials> {
  const { keyPem, csrPem } = await createKeyAndCsr(id);
  const { certPem } = await issueCertificate(ca, csrPem, { role, expectId: id });
  return { keyPem, certPem, caCertPem: ca.certPem };
}
