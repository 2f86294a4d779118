import type { ClusterCa } from '../shared/pki/certificates.ts';
import { issueCertificate } from '../shared/pki/certificates.ts';
import { loadOrCreateNodeKey, saveNodeCertificate } from '../shared/pki/store.ts';
import { loadOrCreateIdentity } from '../node/identity.ts';
import { loadNodeTls } from '../node/identity-credentials.ts';
import { dueForRenewal } from '../node/join.ts';

/**
 * `orchard up`'s own agent: the coordinator and the agent run in one process as one user, who
 * holds the CA key anyway, so the agent is certified directly from the CA (its own key, a CSR,
 * a node certificate naming its id) instead of joining with a token over the network. Kept when
 * it is already a certificate of this CA that is not due for renewal.
 */
export async function enrollLocalNode(nodeStateDir: string, ca: ClusterCa): Promise<string> {
  const { nodeId } = await loadOrCreateIdentity(nodeStateDir);
  const current = await loadNodeTls(nodeStateDir, nodeId).catch(() => undefined);
  if (current && current.caCertPem.trim() === ca.certPem.trim() && !dueForRenewal(current)) return nodeId;
  const { csrPem } = await loadOrCreateNodeKey(nodeStateDir, nodeId);
  const { certPem } = await issueCertificate(ca, csrPem, { role: 'node', expectId: nodeId });
  await saveNodeCertificate(nodeStateDir, certPem, ca.certPem);
  return nodeId;
}
