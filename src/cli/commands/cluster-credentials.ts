import { type Command, Option } from 'commander';
import { defaultStateDir, StateDir } from '../../coordinator/state/state-dir.ts';
import { UsageError } from '../../shared/errors.ts';
import { createKeyAndCsr, issueCertificate } from '../../shared/pki/certificates.ts';
import { writeFileAtomic } from '../../shared/pki/files.ts';
import { IdentityId } from '../../shared/pki/identity.ts';
import { AdminBundle } from '../coordinator-trust.ts';

/**
 * `orchard coordinator token` and `orchard coordinator credentials`: made in the coordinator's
 * state dir on this machine, like `keys` (keys.ts says why the file is the authority). Printed or
 * written once; only hashes (tokens) or nothing (certificates) are kept.
 */

const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `24h`, `30m`, `7d`, `never`. */
export function parseTtl(text: string): number | undefined {
  if (text === 'never') return undefined;
  const m = /^(\d+)([smhd])$/.exec(text.trim());
  if (!m || Number(m[1]) <= 0) throw new UsageError(`invalid --ttl "${text}": use a duration such as 30m, 24h, 7d (or never)`);
  return Number(m[1]) * UNITS[m[2]!]!;
}

export function registerClusterCredentials(coordinator: Command): void {
  const parent = () => coordinator.opts<{ stateDir?: string; json?: boolean }>();
  const stateDirOption = () => new Option('--state-dir <dir>', 'the coordinator state dir').env('ORCHARD_COORDINATOR_STATE_DIR');
  const state = (flags: { stateDir?: string }) => new StateDir(flags.stateDir || parent().stateDir || defaultStateDir());

  coordinator
    .command('token')
    .description('make a join token for nodes (`orchard node --token T`): printed once, expires, limited uses')
    .addOption(new Option('--ttl <duration>', 'how long it may be used: 30m, 24h, 7d or never').default('24h'))
    .addOption(new Option('--uses <n>', 'how many nodes may join with it (default: unlimited until it expires)'))
    .addOption(stateDirOption())
    .option('--json', 'print {token, id, expiresAt, usesLeft}')
    .action(async (flags: { ttl: string; uses?: string; stateDir?: string; json?: boolean }) => {
      const uses = flags.uses === undefined ? undefined : Number(flags.uses);
      if (uses !== undefined && !(Number.isInteger(uses) && uses > 0)) throw new UsageError(`invalid --uses "${flags.uses}": a positive integer`);
      const { token, record } = await (await state(flags).joinTokens()).create({ ttlMs: parseTtl(flags.ttl), uses });
      if (flags.json || parent().json) process.stdout.write(`${JSON.stringify({ token, id: record.id, expiresAt: record.expiresAt, usesLeft: record.usesLeft })}\n`);
      else {
        process.stdout.write(`${token}\n`);
        process.stderr.write(`join token ${record.id}: ${record.expiresAt ? `valid until ${record.expiresAt}` : 'never expires'}, ${record.usesLeft ?? 'unlimited'} uses; shown only now. On a node: ORCHARD_NODE_TOKEN=… orchard node\n`);
      }
    });

  coordinator
    .command('credentials')
    .description('write an admin client certificate bundle (key, certificate, CA; 0600) for the CLI on another machine (--credentials FILE)')
    .requiredOption('--out <file>', 'where to write the bundle (JSON, mode 0600)')
    .option('--name <name>', 'the admin identity the certificate names', 'admin')
    .addOption(stateDirOption())
    .action(async (flags: { out: string; name: string; stateDir?: string }) => {
      const name = IdentityId.parse(flags.name);
      const { ca } = await state(flags).clusterCa();
      const { keyPem, csrPem } = await createKeyAndCsr(name);
      const { certPem } = await issueCertificate(ca, csrPem, { role: 'admin', expectId: name, validityDays: 365 });
      const bundle: AdminBundle = { version: 1, keyPem, certPem, caCertPem: ca.certPem };
      await writeFileAtomic(flags.out, `${JSON.stringify(AdminBundle.parse(bundle), null, 2)}\n`, 0o600);
      process.stderr.write(`admin credentials for "${name}" written to ${flags.out} (0600, valid 365 days): orchard status --coordinator HOST:PORT --credentials ${flags.out}\n`);
    });
}
