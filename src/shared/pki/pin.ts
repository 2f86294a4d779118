import { createHash } from 'node:crypto';
import { type DetailedPeerCertificate, connect } from 'node:tls';
import { OrchardError } from '../errors.ts';
import { x509 } from './x509.ts';
import type { Role } from './identity.ts';
import { CertificateRejected, type VerifiedPeer, verifyCertificate } from './verify.ts';

/**
 * Trust on a fingerprint (kubeadm's --discovery-token-ca-cert-hash): open a TLS connection to a
 * cluster server, read the chain it sends (leaf + CA, see clusterServerCredentials), and accept
 * its CA only when the sha256 of that CA certificate is the one the join token carries and the
 * leaf is a certificate of that CA in the expected role. Nothing but the TLS handshake is sent —
 * no token, no CSR — and the connection is closed before the caller sends anything; the caller
 * then dials again with the pinned CA as its only root, so a rogue server learns nothing and
 * a man in the middle cannot complete the second handshake.
 */
export async function fetchPinnedCa(
  host: string,
  port: number,
  caFingerprint: string,
  role: Role = 'coordinator',
  timeoutMs = 10_000,
): Promise<{ caCertPem: string; server: VerifiedPeer }> {
  const chain = await peerChain(host, port, timeoutMs);
  const ca = chain.find((c) => createHash('sha256').update(c).digest('hex') === caFingerprint);
  const where = `${host}:${port}`;
  if (!ca) throw new OrchardError(`the server at ${where} is not the cluster this token is for (no certificate in its chain has the token's CA fingerprint); check the address and the token`);
  const caCertPem = x509.PemConverter.encode(Uint8Array.from(ca).buffer, 'CERTIFICATE');
  const [leaf] = chain;
  let server: VerifiedPeer;
  try {
    server = verifyCertificate(Uint8Array.from(leaf ?? []), caCertPem);
  } catch (err) {
    throw new OrchardError(`the server at ${where} sent the cluster's CA but its own certificate is refused: ${err instanceof CertificateRejected ? err.message : String(err)}`);
  }
  if (server.role !== role) throw new OrchardError(`the server at ${where} is a ${server.role} of the cluster, not its ${role}`);
  return { caCertPem, server };
}

/** The DER certificates a TLS server sends, leaf first. No verification: the caller pins. */
function peerChain(host: string, port: number, timeoutMs: number): Promise<Buffer[]> {
  return new Promise((resolve, reject) => {
    // The server is unauthenticated at this point on purpose: the fingerprint decides, below.
    const socket = connect({ host, port, servername: 'orchard', rejectUnauthorized: false, ALPNProtocols: ['h2'] });
    const timer = setTimeout(() => fail(new OrchardError(`no TLS answer from ${host}:${port} within ${timeoutMs / 1000} s`)), timeoutMs);
    const fail = (err: Error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    socket.once('error', (err) => fail(new OrchardError(`cannot reach ${host}:${port} over TLS: ${err.message}`)));
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      const chain: Buffer[] = [];
      let c: DetailedPeerCertificate | undefined = socket.getPeerCertificate(true);
      while (c?.raw && !chain.some((seen) => seen.equals(c!.raw))) {
        chain.push(c.raw);
        c = c.issuerCertificate;
      }
      socket.destroy();
      resolve(chain);
    });
  });
}
