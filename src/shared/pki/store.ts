import { X509Certificate as NodeCertificate, createPrivateKey } from 'node:crypto';
import { join } from 'node:path';
import { z } from 'zod';
import { OrchardError } from '../errors.ts';
import { type ClusterCa, caClusterId, createClusterCa, createCsr, createKeyAndCsr } from './certificates.ts';
import { ensurePrivateDir, readIfExists, writeFileAtomic } from './files.ts';
import { ClusterId, IdentityId } from './identity.ts';

/**
 * Where cluster credentials live inside a state dir (`<state>/pki/`): private keys 0600,
 * certificates 0644 (they are public), the directory 0700. A coordinator holds `ca.key` +
 * `ca.crt`; a node holds `node.key`, `node.crt` and the CA certificate it pinned at join time.
 */
export function pkiPaths(stateDir: string) {
  const dir = join(stateDir, 'pki');
  return {
    dir,
    caKey: join(dir, 'ca.key'),
    caCert: join(dir, 'ca.crt'),
    nodeKey: join(dir, 'node.key'),
    nodeCert: join(dir, 'node.crt'),
  } as const;
}

const KEY_MODE = 0o600;
const CERT_MODE = 0o644;

/** A key file and a certificate file must belong together; a mismatch is never silently "fixed". */
function assertPair(keyPem: string, certPem: string, what: string): void {
  const cert = new NodeCertificate(certPem);
  if (!cert.checkPrivateKey(createPrivateKey(keyPem))) throw new OrchardError(`${what}: key and certificate do not belong together; restore or delete both`);
}

/**
 * The coordinator's CA: created on first start, loaded afterwards. A half-present pair (one file
 * without the other) is an error, not a reason to mint a new CA — that would orphan every node.
 */
export async function loadOrCreateClusterCa(stateDir: string, clusterId: string): Promise<{ ca: ClusterCa; created: boolean }> {
  const p = pkiPaths(stateDir);
  await ensurePrivateDir(p.dir);
  const [keyPem, certPem] = await Promise.all([readIfExists(p.caKey), readIfExists(p.caCert)]);
  if (keyPem !== undefined && certPem !== undefined) {
    assertPair(keyPem, certPem, p.dir);
    const stored = caClusterId(certPem);
    if (stored !== clusterId) throw new OrchardError(`${p.caCert} belongs to cluster ${stored}, not ${clusterId}`);
    return { ca: { clusterId, keyPem, certPem }, created: false };
  }
  if (keyPem !== undefined || certPem !== undefined) throw new OrchardError(`${p.dir} holds only half of the cluster CA (ca.key/ca.crt); restore the other file or delete both to start a new cluster`);
  const ca = await createClusterCa(clusterId);
  await writeFileAtomic(p.caKey, ca.keyPem, KEY_MODE);
  await writeFileAtomic(p.caCert, ca.certPem, CERT_MODE);
  return { ca, created: true };
}

/** The node's private key (made here once, never sent) and a CSR for it naming `nodeId`. */
export async function loadOrCreateNodeKey(stateDir: string, nodeId: string): Promise<{ keyPem: string; csrPem: string; created: boolean }> {
  const p = pkiPaths(stateDir);
  await ensurePrivateDir(p.dir);
  const id = IdentityId.parse(nodeId);
  const existing = await readIfExists(p.nodeKey);
  if (existing !== undefined) return { keyPem: existing, csrPem: await createCsr(existing, id), created: false };
  const made = await createKeyAndCsr(id);
  await writeFileAtomic(p.nodeKey, made.keyPem, KEY_MODE);
  return { ...made, created: true };
}

/** Store what the coordinator issued, after checking it certifies this node's own key. */
export async function saveNodeCertificate(stateDir: string, certPem: string, caCertPem: string): Promise<void> {
  const p = pkiPaths(stateDir);
  const keyPem = await readIfExists(p.nodeKey);
  if (keyPem === undefined) throw new OrchardError(`${p.nodeKey} is missing: cannot accept a certificate for a key this node does not hold`);
  assertPair(keyPem, certPem, p.dir);
  await writeFileAtomic(p.caCert, caCertPem, CERT_MODE);
  await writeFileAtomic(p.nodeCert, certPem, CERT_MODE);
}

export interface NodeCredentials {
  readonly keyPem: string;
  readonly certPem: string;
  readonly caCertPem: string;
}

/** The node's TLS credentials, or undefined before it has joined a cluster. */
export async function loadNodeCredentials(stateDir: string): Promise<NodeCredentials | undefined> {
  const p = pkiPaths(stateDir);
  const [keyPem, certPem, caCertPem] = await Promise.all([readIfExists(p.nodeKey), readIfExists(p.nodeCert), readIfExists(p.caCert)]);
  if (keyPem === undefined || certPem === undefined || caCertPem === undefined) return undefined;
  assertPair(keyPem, certPem, p.dir);
  return { keyPem, certPem, caCertPem };
}

/**
 * The cluster CA as one JSON document, so a second and third coordinator can share it
 * (`orchard coordinator export-ca | ssh other orchard coordinator import-ca`): agents trust any
 * coordinator-role certificate this CA signs. It holds the CA's private key: it travels over a
 * pipe (stdout → stdin), never on a command line or in a log.
 */
export const CaBundle = z.object({
  version: z.literal(1),
  clusterId: ClusterId,
  caCertPem: z.string().min(1),
  caKeyPem: z.string().min(1),
});
export type CaBundle = z.infer<typeof CaBundle>;

/** Check a bundle: key and certificate belong together, and the certificate names its cluster. */
export function checkCaBundle(b: CaBundle): void {
  assertPair(b.caKeyPem, b.caCertPem, 'the CA bundle');
  const named = caClusterId(b.caCertPem);
  if (named !== b.clusterId) throw new OrchardError(`the CA bundle says cluster ${b.clusterId} but its certificate names ${named}`);
}

/**
 * Install a shared CA into a state dir (files 0600). The same CA again is a no-op; a different
 * one is refused: replacing a CA orphans every node that joined under it.
 */
export async function installClusterCa(stateDir: string, b: CaBundle): Promise<{ installed: boolean }> {
  checkCaBundle(b);
  const p = pkiPaths(stateDir);
  await ensurePrivateDir(p.dir);
  const [keyPem, certPem] = await Promise.all([readIfExists(p.caKey), readIfExists(p.caCert)]);
  if (keyPem !== undefined || certPem !== undefined) {
    if (certPem === b.caCertPem && keyPem === b.caKeyPem) return { installed: false };
    throw new OrchardError(`${p.dir} already holds a different cluster CA; import into a fresh --state-dir (replacing a CA orphans its nodes)`);
  }
  await writeFileAtomic(p.caKey, b.caKeyPem, KEY_MODE);
  await writeFileAtomic(p.caCert, b.caCertPem, KEY_MODE);
  return { installed: true };
}
