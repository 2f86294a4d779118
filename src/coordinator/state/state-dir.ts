import { randomUUID } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { OrchardError } from '../../shared/errors.ts';
import { type ClusterCa, certificateFingerprint, createKeyAndCsr, issueCertificate } from '../../shared/pki/certificates.ts';
import type { TlsCredentials } from '../../shared/pki/grpc-tls.ts';
import { readIfExists, writeFileAtomic } from '../../shared/pki/files.ts';
import { type CaBundle, checkCaBundle, installClusterCa, loadOrCreateClusterCa } from '../../shared/pki/store.ts';
import { ApiKeyStore, loadOrCreateLocalAdminKey } from './api-key-store.ts';
import { JoinTokenStore } from './join-token-store.ts';
import { RevocationList } from './revocations.ts';

/**
 * The coordinator's state directory: its cluster id, the agents that
 * joined statically (so a restarted coordinator finds them again without Bonjour), the cluster
 * CA (`pki/`, key 0600), the join tokens that pin it (`join-tokens.json`, hashed, 0600), the API
 * keys (`api-keys.json`, hashed, 0600) and the local admin key the CLI on this machine uses
 * (`admin-key`, 0600).
 * Default `$ORCHARD_HOME/coordinator` (ORCHARD_HOME defaults to ~/.orchard); `--state-dir` wins.
 */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  return join(env.ORCHARD_HOME ?? join(homedir(), '.orchard'), 'coordinator');
}

const ClusterFile = z.object({
  clusterId: z.string().min(1),
  /** host:port of agents that joined statically; re-dialled on start. */
  agents: z.array(z.string()).default([]),
});
export type ClusterState = z.infer<typeof ClusterFile>;

export class StateDir {
  constructor(readonly dir: string) {}

  get clusterPath(): string {
    return join(this.dir, 'cluster.json');
  }

  get joinTokensPath(): string {
    return join(this.dir, 'join-tokens.json');
  }

  get apiKeysPath(): string {
    return join(this.dir, 'api-keys.json');
  }

  get localAdminKeyPath(): string {
    return join(this.dir, 'admin-key');
  }

  apiKeys(): ApiKeyStore {
    return new ApiKeyStore(this.apiKeysPath);
  }

  /** The local admin key, created at first start (see api-key-store.ts). */
  async localAdminKey(): Promise<string> {
    await this.ensure();
    return loadOrCreateLocalAdminKey(this.localAdminKeyPath);
  }

  /** The cluster CA, created with the cluster on first start and kept for its lifetime. */
  async clusterCa(): Promise<{ ca: ClusterCa; created: boolean }> {
    const { clusterId } = await this.cluster();
    return loadOrCreateClusterCa(this.dir, clusterId);
  }

  get revocationsPath(): string {
    return join(this.dir, 'revoked.json');
  }

  /** Nodes revoked from this cluster (`orchard cluster revoke`). */
  revocations(): Promise<RevocationList> {
    return RevocationList.open(this.revocationsPath);
  }

  /**
   * The coordinator's own certificate (role `coordinator`) from the cluster CA: what it
   * presents to agents and to joining nodes. A fresh key and certificate every start, held in
   * memory only, so there is no second long-lived key on disk beside the CA's.
   */
  async coordinatorCredentials(): Promise<TlsCredentials> {
    return this.#issueOwn('coordinator', 'coordinator');
  }

  /**
   * An admin client certificate, in memory only, with which a standby relays a call to the leader
   * once it has checked the caller's own credential (api/forwarding.ts).
   */
  async relayCredentials(): Promise<TlsCredentials> {
    return this.#issueOwn('admin', 'coordinator-relay');
  }

  async #issueOwn(role: 'coordinator' | 'admin', id: string): Promise<TlsCredentials> {
    const { ca } = await this.clusterCa();
    const { keyPem, csrPem } = await createKeyAndCsr(id);
    const { certPem } = await issueCertificate(ca, csrPem, { role, expectId: id });
    return { keyPem, certPem, caCertPem: ca.certPem };
  }

  /** The cluster id and CA (key included) for another coordinator of the same cluster (`export-ca`). */
  async exportCa(): Promise<CaBundle> {
    if ((await readIfExists(this.clusterPath)) === undefined) throw new OrchardError(`${this.dir} holds no cluster yet: start the coordinator once (or give --state-dir)`);
    const { ca } = await this.clusterCa();
    return { version: 1, clusterId: ca.clusterId, caCertPem: ca.certPem, caKeyPem: ca.keyPem };
  }

  /**
   * Make this state dir a second coordinator of the bundle's cluster (`import-ca`): the same
   * cluster id and CA; join tokens, API keys and the local admin key stay its own.
   */
  async importCa(b: CaBundle): Promise<{ installed: boolean }> {
    checkCaBundle(b);
    const existing = (await readIfExists(this.clusterPath)) === undefined ? undefined : await this.cluster();
    if (existing && existing.clusterId !== b.clusterId) throw new OrchardError(`${this.dir} belongs to cluster ${existing.clusterId}, not ${b.clusterId}; import into a fresh --state-dir`);
    await this.ensure();
    const r = await installClusterCa(this.dir, b);
    if (!existing) await this.saveCluster({ clusterId: b.clusterId, agents: [] });
    return r;
  }

  /** Join tokens bound to this cluster's CA (creating the CA if this is the first start). */
  async joinTokens(): Promise<JoinTokenStore> {
    const { ca } = await this.clusterCa();
    return new JoinTokenStore(this.joinTokensPath, certificateFingerprint(ca.certPem));
  }

  async ensure(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
  }

  async cluster(): Promise<ClusterState> {
    await this.ensure();
    let text: string;
    try {
      text = await readFile(this.clusterPath, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      const fresh: ClusterState = { clusterId: randomUUID(), agents: [] };
      await this.saveCluster(fresh);
      return fresh;
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      throw new OrchardError(`${this.clusterPath} is not valid JSON; fix or delete it`);
    }
    const parsed = ClusterFile.safeParse(json);
    if (!parsed.success) throw new OrchardError(`${this.clusterPath} is malformed: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
    return parsed.data;
  }

  async saveCluster(state: ClusterState): Promise<void> {
    await this.ensure();
    await this.#writePrivate(this.clusterPath, `${JSON.stringify(state, null, 2)}\n`);
  }

  async #writePrivate(path: string, text: string): Promise<void> {
    await writeFileAtomic(path, text, 0o600);
  }
}
