import { readFile } from 'node:fs/promises';
import { type Command, Option } from 'commander';
import { CoordinatorClient, coordinatorAddress } from '../coordinator/api/client.ts';
import { readLocalAdminKey } from '../coordinator/state/api-key-store.ts';
import { defaultStateDir, StateDir } from '../coordinator/state/state-dir.ts';
import { UsageError } from '../shared/errors.ts';

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
export interface CredentialFlags {
  apiKey?: string | undefined;
  apiKeyFile?: string | undefined;
}

export function addCredentialOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--api-key-file <file>', 'read the API key from this file (`-` = stdin); default: ORCHARD_API_KEY, else the local admin key').env('ORCHARD_API_KEY_FILE'))
    .addOption(new Option('--api-key <key>', 'API key (prefer ORCHARD_API_KEY or --api-key-file: a flag shows in `ps`)').env('ORCHARD_API_KEY'));
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
  const dir = env.ORCHARD_COORDINATOR_STATE_DIR || defaultStateDir(env);
  return readLocalAdminKey(new StateDir(dir).localAdminKeyPath);
}

/** A gRPC client for the command's --coordinator with the resolved credential. */
export async function coordinatorClient(flags: CredentialFlags & { coordinator?: string | undefined }): Promise<CoordinatorClient> {
  return new CoordinatorClient(coordinatorAddress(flags.coordinator), await resolveApiKey(flags));
}
