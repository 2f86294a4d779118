import * as grpc from '@grpc/grpc-js';
import { Bonjour, type ServiceConfig } from 'bonjour-service';
import { OrchardError, UsageError, errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { createCsr } from '../shared/pki/certificates.ts';
import { CLUSTER_CHANNEL_OPTIONS, type TlsCredentials, clusterChannelCredentials } from '../shared/pki/grpc-tls.ts';
import { parseClusterJoinToken } from '../shared/pki/join-token-text.ts';
import { fetchPinnedCa } from '../shared/pki/pin.ts';
import { loadOrCreateNodeKey, saveNodeCertificate } from '../shared/pki/store.ts';
import { certificateValidity, needsRenewal, renewalStep } from '../shared/pki/verify.ts';
import { orchardV1 } from '../shared/proto.ts';
import { COORDINATOR_SERVICE_TYPE } from '../shared/service-types.ts';
import { loadNodeTls } from './identity-credentials.ts';

/**
 * The node's half of a join (the coordinator's is src/coordinator/membership/enroll.ts):
 *   1. find the coordinator: `--join HOST:PORT`, or Bonjour `_orchard-coord._tcp` whose TXT `ca`
 *      is the token's CA fingerprint (any other cluster's coordinator is ignored);
 *   2. pin: read the coordinator's TLS chain and accept its CA only if its sha256 is the one the
 *      token carries — before a single byte of the token is sent (fetchPinnedCa);
 *   3. Join over TLS with that CA as the only root: the token and a CSR for the node's own key
 *      (made here, 0600, never sent); store the certificate it returns.
 * Renewal and announcing the agent's address use the same RPC with the node certificate as the
 * client certificate instead of a token.
 */

export class JoinRefused extends OrchardError {
  override readonly name = 'JoinRefused';
}

interface JoinReply {
  readonly nodeId: string;
  readonly clusterId: string;
  readonly certPem: string;
  readonly caCertPem: string;
}

function splitAddress(address: string): { host: string; port: number } {
  const m = /^(\[([0-9a-fA-F:]+)\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(address);
  if (!m) throw new UsageError(`invalid coordinator address "${address}": use HOST:PORT`);
  return { host: m[2] ?? m[1]!, port: Number(m[3]) };
}

/** One Join call over TLS to a coordinator whose CA is already known (pinned or stored). */
function callJoin(address: string, creds: Parameters<typeof clusterChannelCredentials>[0], req: Record<string, string>, timeoutMs: number): Promise<JoinReply> {
  const Ctor = orchardV1().Coordinator!;
  const client = new Ctor(address, clusterChannelCredentials(creds, { role: 'coordinator' }), CLUSTER_CHANNEL_OPTIONS) as grpc.Client & Record<string, unknown>;
  return new Promise<JoinReply>((resolve, reject) => {
    const fn = client.join as (r: unknown, md: grpc.Metadata, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r: Record<string, unknown>) => void) => void;
    fn.call(client, req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => {
      client.close();
      if (err) {
        const final = err.code === grpc.status.PERMISSION_DENIED || err.code === grpc.status.INVALID_ARGUMENT || err.code === grpc.status.UNAUTHENTICATED;
        reject(final ? new JoinRefused(`the coordinator at ${address} refused the join: ${err.details}`) : new OrchardError(`join via ${address} failed: ${err.details || err.message}`));
        return;
      }
      resolve({ nodeId: String(res.nodeId ?? ''), clusterId: String(res.clusterId ?? ''), certPem: String(res.certificate ?? ''), caCertPem: String(res.caCertificate ?? '') });
    });
  });
}

/**
 * First join: pin the CA by the token's fingerprint, send token + CSR, store the certificate.
 * Returns the node's credentials, ready to serve with.
 */
export async function joinWithToken(o: { stateDir: string; nodeId: string; coordinator: string; token: string; timeoutMs?: number }): Promise<TlsCredentials> {
  const token = parseClusterJoinToken(o.token);
  const { host, port } = splitAddress(o.coordinator);
  const { caCertPem } = await fetchPinnedCa(host, port, token.caFingerprint, 'coordinator', o.timeoutMs ?? 10_000);
  const { csrPem } = await loadOrCreateNodeKey(o.stateDir, o.nodeId);
  const reply = await callJoin(o.coordinator, { caCertPem }, { token: o.token.trim(), csr: csrPem }, o.timeoutMs ?? 15_000);
  if (reply.caCertPem.trim() !== caCertPem.trim()) throw new JoinRefused(`the coordinator at ${o.coordinator} answered with another CA than the one pinned`);
  await saveNodeCertificate(o.stateDir, reply.certPem, caCertPem);
  const tls = await loadNodeTls(o.stateDir, o.nodeId);
  if (!tls) throw new OrchardError('the certificate was stored but cannot be read back');
  return tls;
}

/**
 * With the node certificate as the client certificate: a fresh certificate for the same key
 * (renewal), and — when `agentAddress` is set — the coordinator dials that agent and remembers it
 * (static join). Stores and returns the renewed credentials.
 */
export async function renewAndAnnounce(o: { stateDir: string; nodeId: string; coordinator: string; tls: TlsCredentials; agentAddress?: string | undefined; timeoutMs?: number }): Promise<TlsCredentials> {
  const csrPem = await createCsr(o.tls.keyPem, o.nodeId);
  const reply = await callJoin(o.coordinator, o.tls, { csr: csrPem, agentAddress: o.agentAddress ?? '' }, o.timeoutMs ?? 15_000);
  await saveNodeCertificate(o.stateDir, reply.certPem, o.tls.caCertPem);
  return { ...o.tls, certPem: reply.certPem };
}

/** Whether the node's certificate is into the last third of its life (needsRenewal). */
export function dueForRenewal(tls: TlsCredentials, now: Date = new Date()): boolean {
  return needsRenewal(certificateValidity(tls.certPem), now);
}

/** renewalStep for the node's own certificate: renew now, or how long to sleep first. */
export function nodeRenewalStep(tls: TlsCredentials, now: Date, checkMs: number): ReturnType<typeof renewalStep> {
  return renewalStep(certificateValidity(tls.certPem), now, checkMs);
}

/**
 * Browse `_orchard-coord._tcp` until a coordinator of the cluster with this CA fingerprint
 * answers; resolves with its HOST:PORT. Nothing is sent to it here — the join pins first.
 */
export function findCoordinator(caFingerprint: string, o: { interface?: string | undefined; signal: AbortSignal; log: Logger }): Promise<string> {
  const mdnsOptions = (o.interface ? { interface: o.interface, bind: '0.0.0.0' } : {}) as Partial<ServiceConfig>;
  const bonjour = new Bonjour(mdnsOptions, (err: unknown) => o.log.warn({ err: errorMessage(err) }, 'mDNS error'));
  return new Promise<string>((resolve, reject) => {
    const done = (fn: () => void) => {
      clearInterval(again);
      browser.stop();
      bonjour.destroy();
      fn();
    };
    const browser = bonjour.find({ type: COORDINATOR_SERVICE_TYPE, protocol: 'tcp' }, (s) => {
      const txt = (s.txt ?? {}) as Record<string, unknown>;
      if (String(txt.ca ?? '') !== caFingerprint) return; // another cluster's coordinator
      const host = (s.addresses ?? []).find((a) => /^\d+\.\d+\.\d+\.\d+$/.test(a)) ?? s.referer?.address;
      if (host && s.port > 0) done(() => resolve(`${host}:${s.port}`));
    });
    const again = setInterval(() => browser.update(), 2000);
    o.signal.addEventListener('abort', () => done(() => reject(new OrchardError('stopped while looking for the coordinator'))), { once: true });
  });
}
