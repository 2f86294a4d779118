import { readFileSync } from 'node:fs';
import type { ConnectionOptions } from 'node:tls';
import { verifyCertificate } from './verify.ts';

/**
 * TLS options for a NATS client of the cluster (nats.js `tls`, which it spreads into Node's
 * `tls.connect`): our certificate from the cluster CA — the server maps it to a user by its
 * `orchard://<role>/<id>` URI (`verify_and_map`, coordinator/nats/auth.ts) — the cluster CA as
 * the only root, and instead of a host-name check (cluster certificates name identities, not
 * hosts; the server is dialled by IP) a check that the server holds the `nats` role.
 *
 * Given as files, nats.js re-reads them on every reconnect, so an agent whose certificate was
 * renewed on disk reconnects with the new one. Given as PEM, they are what the caller holds in
 * memory (the coordinator's per-start certificate).
 */
export type NatsClientIdentity =
  | { readonly keyPem: string; readonly certPem: string; readonly caCertPem: string }
  | { readonly keyFile: string; readonly certFile: string; readonly caFile: string };

export interface NatsClientTls {
  readonly key?: string;
  readonly cert?: string;
  readonly ca?: string;
  readonly keyFile?: string;
  readonly certFile?: string;
  readonly caFile?: string;
  readonly checkServerIdentity: NonNullable<ConnectionOptions['checkServerIdentity']>;
}

export function natsClientTls(id: NatsClientIdentity): NatsClientTls {
  const caCertPem = 'caCertPem' in id ? id.caCertPem : readFileSync(id.caFile, 'utf8');
  const checkServerIdentity: NatsClientTls['checkServerIdentity'] = (_host, cert) => {
    try {
      const peer = verifyCertificate(cert.raw, caCertPem);
      return peer.role === 'nats' ? undefined : new Error(`NATS server presents a ${peer.role} certificate, expected the cluster's nats server`);
    } catch (err) {
      return err instanceof Error ? err : new Error(String(err));
    }
  };
  if ('keyPem' in id) return { key: id.keyPem, cert: id.certPem, ca: id.caCertPem, checkServerIdentity };
  return { keyFile: id.keyFile, certFile: id.certFile, caFile: id.caFile, checkServerIdentity };
}
