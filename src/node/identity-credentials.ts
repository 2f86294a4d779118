import { OrchardError } from '../shared/errors.ts';
import type { TlsCredentials } from '../shared/pki/grpc-tls.ts';
import { loadNodeCredentials, pkiPaths } from '../shared/pki/store.ts';
import { CertificateRejected, verifyCertificate } from '../shared/pki/verify.ts';

/**
 * The node's cluster credentials (`<state>/pki/`), checked against the node id before the agent
 * serves with them. The certificate is the identity: identity.json only names which id this
 * state dir belongs to, so one copied from another machine (without that machine's key and
 * certificate) cannot make this agent pass for that node — the ids disagree and the agent
 * refuses to start, and a peer believes only the certificate anyway. Undefined before joining.
 */
export async function loadNodeTls(stateDir: string, nodeId: string, now: Date = new Date()): Promise<TlsCredentials | undefined> {
  const creds = await loadNodeCredentials(stateDir);
  if (!creds) return undefined;
  const where = pkiPaths(stateDir).nodeCert;
  let peer: ReturnType<typeof verifyCertificate>;
  try {
    peer = verifyCertificate(creds.certPem, creds.caCertPem, now);
  } catch (err) {
    const why = err instanceof CertificateRejected ? err.message : String(err);
    throw new OrchardError(`${where}: ${why}; join the cluster again with a new token (\`orchard coordinator token\`)`);
  }
  if (peer.role !== 'node') throw new OrchardError(`${where} is a ${peer.role} certificate, not a node's`);
  if (peer.id !== nodeId) {
    throw new OrchardError(`identity.json in ${stateDir} names node ${nodeId} but this node's certificate names ${peer.id}: the identity file was replaced; restore it (the certificate is what proves who this node is)`);
  }
  return creds;
}
