import { X509Certificate as NodeCertificate } from 'node:crypto';
import { x509 } from './x509.ts';
import { caClusterId, canonicalSerial } from './certificates.ts';
import { type Identity, parseIdentityUri } from './identity.ts';

/** What a verified cluster certificate proves about its holder. */
export interface VerifiedPeer extends Identity {
  readonly clusterId: string;
  /** Canonical hex serial (see canonicalSerial): what a revocation list names. */
  readonly serial: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
}

export class CertificateRejected extends Error {
  override readonly name = 'CertificateRejected';
}

/**
 * Check that `cert` (PEM or DER) was issued by this cluster's CA, is within its validity, is an
 * end-entity certificate, and carries exactly one Orchard identity. Node's X509Certificate does
 * the signature check (OpenSSL); @peculiar/x509 reads the SAN. Throws CertificateRejected with
 * the reason; never returns a partial identity.
 */
export function verifyCertificate(cert: string | Uint8Array, caCertPem: string, now: Date = new Date()): VerifiedPeer {
  let leaf: NodeCertificate;
  let ca: NodeCertificate;
  try {
    leaf = new NodeCertificate(typeof cert === 'string' ? cert : Buffer.from(cert));
    ca = new NodeCertificate(caCertPem);
  } catch {
    throw new CertificateRejected('not an X.509 certificate');
  }
  if (!leaf.checkIssued(ca) || !leaf.verify(ca.publicKey)) throw new CertificateRejected('not issued by this cluster');
  if (leaf.ca) throw new CertificateRejected('a CA certificate is not a peer identity');
  const notBefore = new Date(leaf.validFrom);
  const notAfter = new Date(leaf.validTo);
  if (now < notBefore) throw new CertificateRejected('certificate not yet valid');
  if (now > notAfter) throw new CertificateRejected('certificate expired');
  const identity = certificateIdentity(leaf.raw);
  return { ...identity, clusterId: caClusterId(caCertPem), serial: canonicalSerial(leaf.serialNumber), notBefore, notAfter };
}

/**
 * The identity a certificate's SAN names, without checking who signed it: only for a
 * certificate the TLS layer has already verified against the cluster CA.
 */
export function certificateIdentity(der: Uint8Array): Identity {
  const cert = new x509.X509Certificate(Uint8Array.from(der));
  const san = cert.getExtension(x509.SubjectAlternativeNameExtension);
  const ids = (san?.names.items ?? []).map((n) => (n.type === 'url' ? parseIdentityUri(n.value) : undefined));
  const [identity, ...rest] = ids;
  if (!identity || rest.length > 0 || ids.length !== 1) throw new CertificateRejected('certificate carries no single Orchard identity');
  return identity;
}

/**
 * Renew once less than `fraction` of the lifetime is left (a third, as cert-manager does by
 * default): a 30-day certificate renews from day 20, leaving ten days for a coordinator outage.
 */
export function needsRenewal(validity: { notBefore: Date; notAfter: Date }, now: Date = new Date(), fraction = 1 / 3): boolean {
  const life = validity.notAfter.getTime() - validity.notBefore.getTime();
  return validity.notAfter.getTime() - now.getTime() < life * fraction;
}

export function certificateValidity(certPem: string): { notBefore: Date; notAfter: Date } {
  const c = new NodeCertificate(certPem);
  return { notBefore: new Date(c.validFrom), notAfter: new Date(c.validTo) };
}
