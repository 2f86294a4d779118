import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { defaultStateDir } from '../coordinator/state/state-dir.ts';
import { OrchardError, UsageError } from '../shared/errors.ts';
import { fetchPinnedCa } from '../shared/pki/pin.ts';
import { readIfExists } from '../shared/pki/files.ts';

/**
 * How a CLI client knows it talks to the real coordinator (its gRPC port speaks TLS with a
 * certificate from the cluster CA), first that applies:
 *   1. --credentials FILE (ORCHARD_CREDENTIALS): an admin bundle from `orchard coordinator
 *      credentials` — the CA to trust and an admin client certificate (no API key needed);
 *   2. the coordinator state dir on this machine (ORCHARD_COORDINATOR_STATE_DIR or the default):
 *      its `pki/ca.crt` — the operator on the coordinator's Mac types nothing;
 *   3. --ca-sha256 HEX (ORCHARD_COORDINATOR_CA_SHA256): the CA fingerprint (printed by the
 *      coordinator at start, and the last field of every join token); the CA is read from the
 *      TLS chain and accepted only when it hashes to that value (pin.ts), then an API key is sent.
 * Without any of them the CLI refuses to send a key: an unverified server could be anyone.
 */
export const AdminBundle = z.object({ version: z.literal(1), keyPem: z.string(), certPem: z.string(), caCertPem: z.string() });
export type AdminBundle = z.infer<typeof AdminBundle>;

export interface CoordinatorTrust {
  readonly caCertPem: string;
  readonly keyPem?: string | undefined;
  readonly certPem?: string | undefined;
}

export interface TrustFlags {
  credentials?: string | undefined;
  caSha256?: string | undefined;
}

export async function readAdminBundle(file: string): Promise<AdminBundle> {
  const text = await readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
    throw new UsageError(`cannot read --credentials ${file}: ${err.code ?? err.message}`);
  });
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new UsageError(`--credentials ${file} is not JSON (make it with \`orchard coordinator credentials --out FILE\`)`);
  }
  const parsed = AdminBundle.safeParse(json);
  if (!parsed.success) throw new UsageError(`--credentials ${file} is not an Orchard admin bundle`);
  return parsed.data;
}

/** The coordinator state dir the CLI on this machine reads (CA, local admin key). */
export function localCoordinatorStateDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.ORCHARD_COORDINATOR_STATE_DIR || defaultStateDir(env);
}

export async function resolveCoordinatorTrust(address: string, flags: TrustFlags, env: NodeJS.ProcessEnv = process.env): Promise<CoordinatorTrust> {
  if (flags.credentials) return readAdminBundle(flags.credentials);
  const local = await readIfExists(join(localCoordinatorStateDir(env), 'pki', 'ca.crt'));
  if (local !== undefined) return { caCertPem: local };
  if (flags.caSha256) {
    const fp = flags.caSha256.trim().toLowerCase();
    if (!/^[0-9a-f]{64}$/.test(fp)) throw new UsageError('invalid --ca-sha256: 64 hex characters (the coordinator prints it at start)');
    const m = /^(\[([0-9a-fA-F:]+)\]|[^:]+):(\d+)$/.exec(address);
    if (!m) throw new UsageError(`invalid coordinator address "${address}"`);
    return { caCertPem: (await fetchPinnedCa(m[2] ?? m[1]!, Number(m[3]), fp)).caCertPem };
  }
  throw new OrchardError(
    `cannot verify the coordinator at ${address}: no cluster CA on this machine; pass --credentials FILE (\`orchard coordinator credentials\`) or --ca-sha256 HEX (printed by the coordinator at start)`,
  );
}
