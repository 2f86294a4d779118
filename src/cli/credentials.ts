import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { type Command, Option } from 'commander';
import { CoordinatorClient, coordinatorAddress } from '../coordinator/api/client.ts';
import { readLocalAdminKey } from '../coordinator/state/api-key-store.ts';
import { StateDir } from '../coordinator/state/state-dir.ts';
import { localCoordinatorStateDir, readAdminBundle, resolveCoordinatorTrust, type TrustFlags } from './coordinator-trust.ts';
import { UsageError } from '../shared/errors.ts';
import { createKeyAndCsr, issueCertificate } from '../shared/pki/certificates.ts';
import { readIfExists } from '../shared/pki/files.ts';
import type { NatsClientIdentity } from '../shared/pki/nats-tls.ts';
import { loadOrCreateClusterCa } from '../shared/pki/store.ts';

/**
 * The API key a CLI command sends to the coordinator, from (first wins):
 *   --api-key-file FILE (`-` = stdin)   the way to pass a secret: never visible in `ps`
 *   ORCHARD_API_KEY (or --api-key)      the environment; the flag exists for scripts that already
 *                                       use it, but puts the key on the command line
 *   the local admin key                 `admin-key` (0600) in the coordinator state dir on this
 *                                       machine (ORCHARD_COORDINATOR_STATE_DIR or the default), so
 *                                       the operator on the coordinator's machine types nothing
 * Undefined when none exists (a coordinator without keys needs none).
 */
export interface CredentialFlags extends TrustFlags {
  apiKey?: string | undefined;
  apiKeyFile?: string | undefined;
}

export function addCredentialOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--api-key-file <file>', 'read the API key from this file (`-` = stdin); default: ORCHARD_API_KEY, else the local admin key').env('ORCHARD_API_KEY_FILE'))
    .addOption(new Option('--api-key <key>', 'API key (prefer ORCHARD_API_KEY or --api-key-file: a flag shows in `ps`)').env('ORCHARD_API_KEY'))
    .addOption(new Option('--credentials <file>', 'admin bundle from `orchard coordinator credentials` (CA + client certificate)').env('ORCHARD_CREDENTIALS'))
    .addOption(new Option('--ca-sha256 <hex>', 'trust the coordinator whose cluster CA has this sha256 (printed at its start)').env('ORCHARD_COORDINATOR_CA_SHA256'));
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** The first line of a key file (or stdin), trimmed; an empty one is a usage error. */
export async function readKeyFile(file: string): Promise<string> {
  const text = file === '-' ? await readStdin() : await readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
    throw new UsageError(`cannot read --api-key-file ${file}: ${err.code ?? err.message}`);
  });
  const key = text.split(/\r?\n/)[0]?.trim();
  if (!key) throw new UsageError(`--api-key-file ${file} is empty`);
  return key;
}

export async function resolveApiKey(flags: CredentialFlags, env: NodeJS.ProcessEnv = process.env): Promise<string | undefined> {
  if (flags.apiKeyFile) return readKeyFile(flags.apiKeyFile);
  if (flags.apiKey) return flags.apiKey;
  return readLocalAdminKey(new StateDir(localCoordinatorStateDir(env)).localAdminKeyPath);
}

/**
 * A gRPC client for the command's --coordinator: TLS to the cluster CA (coordinator-trust.ts)
 * and the resolved credential — the admin certificate of a --credentials bundle, else the key.
 */
export async function coordinatorClient(flags: CredentialFlags & { coordinator?: string | undefined }): Promise<CoordinatorClient> {
  const address = coordinatorAddress(flags.coordinator);
  const tls = await resolveCoordinatorTrust(address, flags);
  return new CoordinatorClient(address, { tls, apiKey: tls.keyPem ? undefined : await resolveApiKey(flags) });
}

/**
 * A client holding what a coordinator's own state dir has — its CA and the local admin key — for
 * tools on the coordinator's machine that know the dir (local clusters, benches, tests).
 */
export async function localCoordinatorClient(address: string, stateDir: string): Promise<CoordinatorClient> {
  const caCertPem = await readFile(join(stateDir, 'pki', 'ca.crt'), 'utf8');
  return new CoordinatorClient(address, { tls: { caCertPem }, apiKey: await readLocalAdminKey(new StateDir(stateDir).localAdminKeyPath) });
}

/**
 * Who the CLI is on the cluster's NATS server (it requires client certificates from the cluster
 * CA, coordinator/nats/auth.ts): the --credentials bundle's admin certificate (the server admits
 * `orchard://admin/admin`, what `orchard coordinator credentials` names by default), else — on
 * the coordinator's machine — an `admin` certificate made in memory from the state dir's CA, as
 * the coordinator makes its own. Undefined without either: a plain NATS server needs none.
 */
export async function natsClientIdentity(flags: TrustFlags, env: NodeJS.ProcessEnv = process.env): Promise<NatsClientIdentity | undefined> {
  if (flags.credentials) return readAdminBundle(flags.credentials);
  const dir = localCoordinatorStateDir(env);
  if ((await readIfExists(join(dir, 'pki', 'ca.key'))) === undefined) return undefined;
  const { clusterId } = await new StateDir(dir).cluster();
  const { ca } = await loadOrCreateClusterCa(dir, clusterId);
  const { keyPem, csrPem } = await createKeyAndCsr('admin');
  const { certPem } = await issueCertificate(ca, csrPem, { role: 'admin', expectId: 'admin', validityDays: 1 });
  return { keyPem, certPem, caCertPem: ca.certPem };
}
