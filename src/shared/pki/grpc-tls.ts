import * as grpc from '@grpc/grpc-js';
import type { PeerCertificate, SecureContextOptions } from 'node:tls';
import type { Role } from './identity.ts';
import { CertificateRejected, type VerifiedPeer, verifyCertificate } from './verify.ts';

/** What a cluster member holds to speak TLS: its key and certificate, and the CA it trusts. */
export interface TlsCredentials {
  readonly keyPem: string;
  readonly certPem: string;
  readonly caCertPem: string;
}

/**
 * Server credentials for a cluster gRPC server. The server asks every client for a certificate
 * but does not let the TLS layer reject a missing or foreign one: the handler decides (see
 * `authenticate`), so a caller without a certificate gets UNAUTHENTICATED on the method it
 * called — an answer it can act on — instead of a dropped handshake that grpc-js reports as a
 * vague UNAVAILABLE. Whoever presents a certificate still proves holding its key (TLS 1.3
 * CertificateVerify), so a certificate the handler accepts is the caller's own.
 *
 * grpc-js has no public option for this: `createSsl(…, true)` sets `requestCert` and leaves
 * Node's `rejectUnauthorized` at true. It is set on the options grpc-js passes to
 * `http2.createSecureServer`; if a future grpc-js renames that field, handshakes without a
 * certificate fail again — test/security/identity.test.ts asserts UNAUTHENTICATED and notices.
 * The chain sent is leaf + CA, so a joining node can pin the CA by its fingerprint.
 */
export function clusterServerCredentials(c: TlsCredentials): grpc.ServerCredentials {
  const creds = grpc.ServerCredentials.createSsl(Buffer.from(c.caCertPem), [{ private_key: Buffer.from(c.keyPem), cert_chain: Buffer.from(`${c.certPem.trim()}\n${c.caCertPem.trim()}\n`) }], true);
  const ctor = (creds as unknown as { serverConstructorOptions?: Record<string, unknown> }).serverConstructorOptions;
  if (ctor && typeof ctor === 'object') ctor.rejectUnauthorized = false;
  return creds;
}

/**
 * Swap a renewed key and certificate into a running server (grpc-js re-keys its listeners via
 * setSecureContext): connections already open keep their session, new ones see the new chain.
 * The method is `protected` in grpc-js's typings (its certificate providers call it); the node
 * renewal test (test/security/join.test.ts) notices if it goes away.
 */
export function renewServerCredentials(creds: grpc.ServerCredentials, c: TlsCredentials): void {
  (creds as unknown as { updateSecureContextOptions(o: SecureContextOptions): void }).updateSecureContextOptions({ ca: Buffer.from(c.caCertPem), cert: Buffer.from(`${c.certPem.trim()}\n${c.caCertPem.trim()}\n`), key: Buffer.from(c.keyPem) });
}

export type PeerCheck = { readonly ok: true; readonly peer: VerifiedPeer } | { readonly ok: false; readonly code: grpc.status; readonly details: string };

/**
 * Who called: the certificate the TLS layer saw, verified against this cluster's CA (signature,
 * validity, one Orchard identity) and the revocation list (by node id or serial); then the role. No certificate or a
 * foreign one → UNAUTHENTICATED; a cluster member in the wrong role → PERMISSION_DENIED.
 */
export function authenticate(
  call: { getAuthContext?: () => { sslPeerCertificate?: PeerCertificate } | null },
  caCertPem: string,
  roles: readonly Role[],
  revoked: (peer: VerifiedPeer) => boolean = () => false,
): PeerCheck {
  const cert = call.getAuthContext?.()?.sslPeerCertificate;
  if (!cert?.raw || cert.raw.length === 0) return { ok: false, code: grpc.status.UNAUTHENTICATED, details: 'a client certificate from this cluster is required' };
  let peer: VerifiedPeer;
  try {
    peer = verifyCertificate(cert.raw, caCertPem);
  } catch (err) {
    const why = err instanceof CertificateRejected ? err.message : 'unreadable certificate';
    return { ok: false, code: grpc.status.UNAUTHENTICATED, details: `client certificate refused: ${why}` };
  }
  if (revoked(peer)) return { ok: false, code: grpc.status.UNAUTHENTICATED, details: `client certificate refused: ${peer.role} ${peer.id} is revoked` };
  if (!roles.includes(peer.role)) return { ok: false, code: grpc.status.PERMISSION_DENIED, details: `${peer.role} ${peer.id} may not call this method (needs ${roles.join(' or ')})` };
  return { ok: true, peer };
}

/**
 * Wrap every handler of a service: `policy(method)` names the roles allowed (undefined = open,
 * e.g. Join, which checks its token itself). The verified peer is kept on the call for the
 * handler (`peerOf`).
 */
export function requirePeers(
  handlers: grpc.UntypedServiceImplementation,
  caCertPem: () => string,
  policy: (method: string) => readonly Role[] | undefined,
  revoked?: (peer: VerifiedPeer) => boolean,
): grpc.UntypedServiceImplementation {
  const out: grpc.UntypedServiceImplementation = {};
  for (const [name, handler] of Object.entries(handlers)) {
    const roles = policy(name);
    if (roles === undefined) {
      out[name] = handler;
      continue;
    }
    out[name] = ((call: { emit(e: string, v: unknown): void }, cb?: grpc.sendUnaryData<unknown>) => {
      const check = authenticate(call as Parameters<typeof authenticate>[0], caCertPem(), roles, revoked);
      if (!check.ok) {
        const err = { code: check.code, details: check.details };
        if (typeof cb === 'function') cb(err);
        else call.emit('error', err);
        return;
      }
      PEERS.set(call, check.peer);
      (handler as (c: unknown, cb?: unknown) => void)(call, cb);
    }) as grpc.UntypedHandleCall;
  }
  return out;
}

const PEERS = new WeakMap<object, VerifiedPeer>();

/** The verified caller of a call that went through `requirePeers`. */
export function peerOf(call: object): VerifiedPeer | undefined {
  return PEERS.get(call);
}

/**
 * Channel options to use with `clusterChannelCredentials`: cluster members are dialled by IP,
 * and an IP is not a valid TLS server name (Node warns, RFC 6066); the certificate check above
 * does not look at the name, so a fixed one is sent.
 */
export const CLUSTER_CHANNEL_OPTIONS = { 'grpc.ssl_target_name_override': 'orchard' } as const;

/**
 * Client credentials for dialling a cluster member: our certificate, the cluster CA as the only
 * root, and — instead of a host name check (cluster certificates name identities, not hosts) —
 * a check that the server's certificate names the role (and id, when known) we meant to reach.
 * `onPeer` learns the server's identity, so a caller can tie what the peer says about itself to
 * what its certificate proves.
 */
export function clusterChannelCredentials(
  c: TlsCredentials | { readonly caCertPem: string; readonly keyPem?: undefined; readonly certPem?: undefined },
  expect: { readonly role: Role; readonly id?: string | undefined },
  onPeer?: (peer: VerifiedPeer) => void,
): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(Buffer.from(c.caCertPem), c.keyPem ? Buffer.from(c.keyPem) : null, c.certPem ? Buffer.from(c.certPem) : null, {
    checkServerIdentity: (_host, cert) => {
      try {
        const peer = verifyCertificate(cert.raw, c.caCertPem);
        if (peer.role !== expect.role) return new Error(`server is a ${peer.role}, expected a ${expect.role}`);
        if (expect.id !== undefined && peer.id !== expect.id) return new Error(`server is ${peer.id}, expected ${expect.id}`);
        onPeer?.(peer);
        return undefined;
      } catch (err) {
        return err instanceof Error ? err : new Error(String(err));
      }
    },
  });
}
