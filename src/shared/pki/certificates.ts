import { createHash, randomBytes } from 'node:crypto';
import { x509 } from './x509.ts';
import { UsageError } from '../errors.ts';
import { ClusterId, type Identity, IdentityId, Role, identityUri } from './identity.ts';
import { SIGNING, generateKeyPair, keyPairFromPem, privateKeyPem } from './keys.ts';

/** A certificate with its private key, both PEM: what a TLS server or client is configured with. */
export interface KeyAndCert {
  readonly keyPem: string;
  readonly certPem: string;
}

export interface ClusterCa extends KeyAndCert {
  readonly clusterId: string;
}

const DAY_MS = 86_400_000;
export const CA_VALIDITY_DAYS = 3650;
export const NODE_VALIDITY_DAYS = 30;
/** Certificates start a little in the past so a peer whose clock lags a few minutes accepts them. */
const BACKDATE_MS = 5 * 60_000;
const CA_ORG = 'Orchard cluster';

/**
 * A leaf certificate's subject: its role and cluster, the same for every holder of the role —
 * the id lives only in the SAN (`orchard://<role>/<id>`, what every Orchard peer reads). A NATS
 * server can therefore map a whole role to one user by this name (`verify_and_map` falls back to
 * the subject when no URI SAN names a user): how an external server admits nodes that join later
 * without a per-node entry (coordinator/nats/auth.ts). The RFC 4514 string, as nats-server reads it.
 */
export function roleSubject(clusterId: string, role: Role): string {
  return `OU=${Role.parse(role)},O=${CA_ORG} ${ClusterId.parse(clusterId)}`;
}

/** A positive random 128-bit serial (high bit clear: DER INTEGERs are signed). */
function serialNumber(): string {
  const b = randomBytes(16);
  b[0] = (b[0] ?? 0) & 0x7f;
  return b.toString('hex');
}

/** Serials as one canonical string (lower-case hex, no leading zeros) wherever they are compared. */
export function canonicalSerial(hex: string): string {
  return BigInt(`0x${hex}`).toString(16);
}

/** sha256 of the certificate's DER, lower-case hex: what a join token pins. */
export function certificateFingerprint(certPem: string): string {
  return createHash('sha256').update(Buffer.from(x509.PemConverter.decodeFirst(certPem))).digest('hex');
}

/** The cluster id a CA certificate names (its serialNumber-free subject: CN=<clusterId>, O=Orchard cluster). */
export function caClusterId(caCertPem: string): string {
  const cert = new x509.X509Certificate(caCertPem);
  const [cn] = cert.subjectName.getField('CN');
  return ClusterId.parse(cn);
}

/** The cluster's root of trust: self-signed, may sign end-entity certificates only (pathLen 0). */
export async function createClusterCa(clusterId: string, now: Date = new Date()): Promise<ClusterCa> {
  const id = ClusterId.parse(clusterId);
  const keys = await generateKeyPair();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serialNumber(),
    name: [{ CN: [id] }, { O: [CA_ORG] }],
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: new Date(now.getTime() + CA_VALIDITY_DAYS * DAY_MS),
    keys,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { clusterId: id, keyPem: await privateKeyPem(keys.privateKey), certPem: cert.toString('pem') };
}

/**
 * A node's (or admin client's) own key and the request to certify it. Only `csrPem` is sent; the
 * key stays with the caller. The CSR names the id (CN); the role is the issuer's decision.
 */
export async function createKeyAndCsr(id: string): Promise<{ keyPem: string; csrPem: string }> {
  const keyPem = await privateKeyPem((await generateKeyPair()).privateKey);
  return { keyPem, csrPem: await createCsr(keyPem, id) };
}

/** A fresh CSR for a key the caller already holds (renewal keeps the node's key). */
export async function createCsr(keyPem: string, id: string): Promise<string> {
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: [{ CN: [IdentityId.parse(id)] }],
    keys: await keyPairFromPem(keyPem),
    signingAlgorithm: SIGNING,
  });
  return csr.toString('pem');
}

export interface IssueOptions {
  readonly role: Role;
  /** When set, the CSR must name exactly this id (the coordinator knows whom it is certifying). */
  readonly expectId?: string;
  readonly validityDays?: number;
  readonly now?: Date;
}

/**
 * Certify a CSR: its signature must verify (the requester holds the key), its CN must be a valid
 * id. The certificate carries `orchard://<role>/<id>` as its only SAN, `roleSubject` as its subject, serverAuth + clientAuth
 * (every agent both listens and dials), and nothing the requester asked for beyond its key and id.
 */
export async function issueCertificate(ca: ClusterCa, csrPem: string, o: IssueOptions): Promise<{ certPem: string; identity: Identity; serial: string }> {
  let csr: x509.Pkcs10CertificateRequest;
  try {
    csr = new x509.Pkcs10CertificateRequest(csrPem);
  } catch {
    throw new UsageError('certificate request is not a PKCS#10 CSR');
  }
  if (!(await csr.verify())) throw new UsageError('certificate request signature does not verify');
  const [cn, ...more] = csr.subjectName.getField('CN');
  const parsedId = IdentityId.safeParse(cn);
  if (!parsedId.success || more.length > 0) throw new UsageError('certificate request must name exactly one valid id (CN)');
  if (o.expectId !== undefined && parsedId.data !== o.expectId) throw new UsageError(`certificate request names ${parsedId.data}, expected ${o.expectId}`);
  const identity: Identity = { id: parsedId.data, role: Role.parse(o.role) };
  const now = o.now ?? new Date();
  const caCert = new x509.X509Certificate(ca.certPem);
  const caKeys = await keyPairFromPem(ca.keyPem);
  const serial = serialNumber();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial,
    subject: roleSubject(ca.clusterId, identity.role),
    issuer: caCert.subjectName,
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: new Date(now.getTime() + (o.validityDays ?? NODE_VALIDITY_DAYS) * DAY_MS),
    publicKey: csr.publicKey,
    signingKey: caKeys.privateKey,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      new x509.SubjectAlternativeNameExtension([{ type: 'url', value: identityUri(identity) }]),
      await x509.AuthorityKeyIdentifierExtension.create(caCert.publicKey),
      await x509.SubjectKeyIdentifierExtension.create(csr.publicKey),
    ],
  });
  return { certPem: cert.toString('pem'), identity, serial: canonicalSerial(serial) };
}
