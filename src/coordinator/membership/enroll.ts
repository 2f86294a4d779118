import { type ClusterCa, issueCertificate } from '../../shared/pki/certificates.ts';
import { IdentityId } from '../../shared/pki/identity.ts';
import type { VerifiedPeer } from '../../shared/pki/verify.ts';
import { x509 } from '../../shared/pki/x509.ts';
import { CoordinatorError } from '../errors.ts';
import type { RedeemResult } from './join-token.ts';

/**
 * The coordinator's half of a join: a node sends a CSR for its own key (the key never leaves
 * it) and either a join token (first join) or, over mutual TLS, the node certificate it already
 * holds (renewal, or a restarted node announcing itself). It gets back a `node` certificate
 * whose identity is the id its CSR names, and the CA certificate. Order matters: the CSR and the
 * revocation list are checked before a token use is spent, so a request that would be refused
 * anyway costs the operator nothing.
 */
export interface EnrollRequest {
  readonly csrPem: string;
  /** Join token (`orchard1.…`); ignored when `peer` is a valid node certificate. */
  readonly token?: string | undefined;
  /** The caller's verified client certificate, when it presented one. */
  readonly peer?: VerifiedPeer | undefined;
}

export interface Enrollment {
  readonly nodeId: string;
  readonly certPem: string;
  readonly caCertPem: string;
  readonly serial: string;
  /** true when a node certificate (not a token) vouched for the request. */
  readonly renewal: boolean;
}

export interface EnrollContext {
  readonly ca: ClusterCa;
  readonly redeem: (token: string) => Promise<RedeemResult>;
  readonly isRevoked: (nodeId: string) => boolean;
  readonly validityDays?: number | undefined;
  readonly now?: Date | undefined;
}

/** The id a CSR names (CN), checked against the id grammar; the signature is checked at issue. */
export function csrNodeId(csrPem: string): string {
  let cn: string | undefined;
  try {
    [cn] = new x509.Pkcs10CertificateRequest(csrPem).subjectName.getField('CN');
  } catch {
    throw new CoordinatorError('INVALID_ARGUMENT', 'csr is not a PKCS#10 certificate request');
  }
  const id = IdentityId.safeParse(cn);
  if (!id.success) throw new CoordinatorError('INVALID_ARGUMENT', 'csr must name the node id (CN)');
  return id.data;
}

export async function enroll(ctx: EnrollContext, req: EnrollRequest): Promise<Enrollment> {
  const nodeId = csrNodeId(req.csrPem);
  if (ctx.isRevoked(nodeId)) throw new CoordinatorError('PERMISSION_DENIED', `node ${nodeId} was revoked from this cluster (\`orchard cluster revoke\`); it cannot join again`);
  const renewal = req.peer?.role === 'node';
  if (renewal) {
    if (req.peer!.id !== nodeId) throw new CoordinatorError('PERMISSION_DENIED', `node ${req.peer!.id} may renew only its own certificate, not ${nodeId}'s`);
  } else {
    if (!req.token) throw new CoordinatorError('PERMISSION_DENIED', 'a join token is required (create one on the coordinator with `orchard coordinator token`)');
    const r = await ctx.redeem(req.token);
    if (!r.ok) throw new CoordinatorError('PERMISSION_DENIED', r.message);
  }
  let issued: Awaited<ReturnType<typeof issueCertificate>>;
  try {
    issued = await issueCertificate(ctx.ca, req.csrPem, { role: 'node', expectId: nodeId, validityDays: ctx.validityDays, now: ctx.now });
  } catch (err) {
    throw new CoordinatorError('INVALID_ARGUMENT', `csr refused: ${(err as Error).message}`);
  }
  return { nodeId, certPem: issued.certPem, caCertPem: ctx.ca.certPem, serial: issued.serial, renewal };
}
