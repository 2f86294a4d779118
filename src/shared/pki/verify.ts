import { X509Certificate as NodeCertificate, createHash } from 'node:crypto';
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
 * Certificates already checked, by digest: parsing with @peculiar/x509 and an ECDSA verify cost
 * 2-30 ms (the latter on a loaded 2-core machine), and every tunnel connection and every gRPC
 * call re-presents the same few certificates — without this, a llama.cpp load's dozen RPC
 * connections paid it dozens of times. Only what cannot change is kept (signature, identity,
 * validity dates); the clock is checked on every call. Bounded: oldest out first.
 */
const MEMO_LIMIT = 512;
const checkedMemo = new Map<string, VerifiedPeer>();
const identityMemo = new Map<string, Identity>();

function remember<T>(memo: Map<string, T>, key: string, make: () => T): T {
  const hit = memo.get(key);
  if (hit !== undefined) return hit;
  const value = make();
  if (memo.size >= MEMO_LIMIT) memo.delete(memo.keys().next().value as string);
  memo.set(key, value);
  return value;
}

const digest = (...parts: (string | Uint8Array)[]) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p).update('\0');
  return h.digest('hex');
};

/**
 * Check that `cert` (PEM or DER) was issued by this cluster's CA, is within its validity, is an
 * end-entity certificate, and carries exactly one Orchard identity. Node's X509Certificate does
 * the signature check (OpenSSL); @peculiar/x509 reads the SAN. Throws CertificateRejected with
 * the reason; never returns a partial identity. A rejection is never remembered.
 */
export function verifyCertificate(cert: string | Uint8Array, caCertPem: string, now: Date = new Date()): VerifiedPeer {
  const peer = remember(checkedMemo, digest(caCertPem, cert), () => checkSignedIdentity(cert, caCertPem));
  if (now < peer.notBefore) throw new CertificateRejected('certificate not yet valid');
  if (now > peer.notAfter) throw new CertificateRejected('certificate expired');
  return peer;
}

function checkSignedIdentity(cert: string | Uint8Array, caCertPem: string): VerifiedPeer {
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
  const identity = certificateIdentity(leaf.raw);
  const validity = { notBefore: new Date(leaf.validFrom), notAfter: new Date(leaf.validTo) };
  return Object.freeze({ ...identity, clusterId: caClusterId(caCertPem), serial: canonicalSerial(leaf.serialNumber), ...validity });
}

/**
 * The identity a certificate's SAN names, without checking who signed it: only for a
 * certificate the TLS layer has already verified against the cluster CA.
 */
export function certificateIdentity(der: Uint8Array): Identity {
  return remember(identityMemo, digest(der), () => readIdentity(der));
}

function readIdentity(der: Uint8Array): Identity {
  const cert = new x509.X509Certificate(Uint8Array.from(der));
  const san = cert.getExtension(x509.SubjectAlternativeNameExtension);
  const ids = (san?.names.items ?? []).map((n) => (n.type === 'url' ? parseIdentityUri(n.value) : undefined));
  const [identity, ...rest] = ids;
  if (!identity || rest.length > 0 || ids.length !== 1) throw new CertificateRejected('certificate carries no single Orchard identity');
  return Object.freeze(identity);
}

/**
 * Renew once less than `fraction` of the lifetime is left (a third, as cert-manager does by
 * default): a 30-day certificate renews from day 20, leaving ten days for a coordinator outage.
 */
export function needsRenewal(validity: { notBefore: Date; notAfter: Date }, now: Date = new Date(), fraction = 1 / 3): boolean {
  return now.getTime() > renewalDueAt(validity, fraction).getTime();
}

/** The moment needsRenewal turns true. */
export function renewalDueAt(validity: { notBefore: Date; notAfter: Date }, fraction = 1 / 3): Date {
  const life = validity.notAfter.getTime() - validity.notBefore.getTime();
  return new Date(validity.notAfter.getTime() - life * fraction);
}

/**
 * Pure: what a node's renewal loop does at `now`: renew, or sleep — `checkMs` at most (it also
 * re-checks the coordinator's view), and never past the moment renewal falls due, so a
 * certificate shorter than the check interval is still renewed in time.
 */
export function renewalStep(validity: { notBefore: Date; notAfter: Date }, now: Date, checkMs: number): { readonly renew: true } | { readonly renew: false; readonly waitMs: number } {
  if (needsRenewal(validity, now)) return { renew: true };
  // +1: needsRenewal is strict (due *after* the mark), so wake just past it
  return { renew: false, waitMs: Math.min(checkMs, renewalDueAt(validity).getTime() - now.getTime() + 1) };
}

export function certificateValidity(certPem: string): { notBefore: Date; notAfter: Date } {
  const c = new NodeCertificate(certPem);
  return { notBefore: new Date(c.validFrom), notAfter: new Date(c.validTo) };
}
