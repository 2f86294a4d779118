import type { ConnectionOptions, SecureVersion, TlsOptions } from 'node:tls';
import type { NodeCredentials } from '../../shared/pki/store.ts';

const TLS13: SecureVersion = 'TLSv1.3';

/**
 * TLS 1.3 only, trusting nothing but the cluster CA. Node's default trust store is replaced
 * (`ca`), so a certificate from any public CA is as foreign as a self-signed one. Half-open is
 * allowed so one direction's end does not cut the other (a peer may finish sending first).
 */
function base(c: NodeCredentials) {
  return { key: c.keyPem, cert: c.certPem, ca: [c.caCertPem], minVersion: TLS13, maxVersion: TLS13 };
}

export function serverTlsOptions(c: NodeCredentials): TlsOptions {
  return { ...base(c), requestCert: true, rejectUnauthorized: true, allowHalfOpen: true };
}

/** tls.connect passes allowHalfOpen to its TLSSocket; @types/node does not list it. */
export function clientTlsOptions(c: NodeCredentials): ConnectionOptions {
  return { ...base(c), rejectUnauthorized: true, allowHalfOpen: true } as ConnectionOptions;
}
