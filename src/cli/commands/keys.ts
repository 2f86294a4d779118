import { type Command, Option } from 'commander';
import { API_KEY_SCOPES, type ApiKeyScope } from '../../coordinator/state/api-key-store.ts';
import { defaultStateDir, StateDir } from '../../coordinator/state/state-dir.ts';
import { OrchardError } from '../../shared/errors.ts';

/**
 * `orchard coordinator keys create|list|revoke`: the coordinator's API keys, changed in its
 * state dir on this machine. Why the file and not a call to the running coordinator: whoever can
 * write the state dir (its owner; 0700/0600) already holds the CA key and the local admin key, so
 * the file permission is the authority it would check anyway; it works while the coordinator is
 * stopped, and needs no bootstrap credential to make the first one. The running coordinator
 * re-reads the file when it changes, so a new key works and a revoked one fails at the next call.
 */
export function registerKeys(coordinator: Command): void {
  // `orchard coordinator` has --state-dir and --json of its own; commander gives them to it wherever they stand.
  const parent = () => coordinator.opts<{ stateDir?: string; json?: boolean }>();
  const keys = coordinator.command('keys').description('API keys with a scope: inference (generate, models) or admin (also load/unload)');
  const stateDirOption = () => new Option('--state-dir <dir>', 'the coordinator state dir').env('ORCHARD_COORDINATOR_STATE_DIR');
  const store = (flags: { stateDir?: string }) => new StateDir(flags.stateDir || parent().stateDir || defaultStateDir()).apiKeys();

  keys
    .command('create')
    .description('make a key and print it once (only its hash is kept)')
    .addOption(new Option('--scope <scope>', 'inference or admin').choices(API_KEY_SCOPES).makeOptionMandatory())
    .option('--name <name>', 'a name for list/revoke (default: scope-XXXXXX)')
    .addOption(stateDirOption())
    .option('--json', 'print {name, scope, key} as JSON')
    .action(async (flags: { scope: ApiKeyScope; name?: string; stateDir?: string; json?: boolean }) => {
      const { key, record } = await store(flags).create({ scope: flags.scope, name: flags.name });
      if (flags.json || parent().json) process.stdout.write(`${JSON.stringify({ name: record.name, scope: record.scope, key })}\n`);
      else {
        process.stdout.write(`${key}\n`);
        process.stderr.write(`key "${record.name}" (${record.scope}) created; it is shown only now — store it in a file (0600) and pass it with --api-key-file or ORCHARD_API_KEY\n`);
      }
    });

  keys
    .command('list')
    .description('names, scopes and creation times (never the keys)')
    .addOption(stateDirOption())
    .option('--json', 'print JSON')
    .action(async (flags: { stateDir?: string; json?: boolean }) => {
      const list = (await store(flags).list()).map(({ name, scope, created }) => ({ name, scope, created }));
      if (flags.json || parent().json) process.stdout.write(`${JSON.stringify(list)}\n`);
      else if (list.length === 0) process.stdout.write('no API keys (create one with `orchard coordinator keys create --scope inference`)\n');
      else for (const k of list) process.stdout.write(`${k.name.padEnd(24)} ${k.scope.padEnd(9)} ${k.created}\n`);
    });

  keys
    .command('revoke')
    .description('revoke a key by name: refused from the next request on')
    .argument('<name>', 'the key name (see `keys list`)')
    .addOption(stateDirOption())
    .action(async (name: string, flags: { stateDir?: string }) => {
      if (!(await store(flags).revoke(name))) throw new OrchardError(`no API key named "${name}" (see \`orchard coordinator keys list\`)`);
      process.stdout.write(`${name} revoked\n`);
    });
}
