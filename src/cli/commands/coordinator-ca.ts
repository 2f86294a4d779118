import { text } from 'node:stream/consumers';
import { type Command, Option } from 'commander';
import { defaultStateDir, StateDir } from '../../coordinator/state/state-dir.ts';
import { UsageError } from '../../shared/errors.ts';
import { CaBundle } from '../../shared/pki/store.ts';

/**
 * `orchard coordinator export-ca` / `import-ca`: a second (third) coordinator of the same cluster
 * shares the cluster id and CA, so agents accept it when it leads. The bundle holds the CA key:
 * it goes from stdout to stdin (`orchard coordinator export-ca | ssh mac2 orchard coordinator
 * import-ca`), never through argv, and lands in files of mode 0600.
 */
export function registerCoordinatorCa(coordinator: Command): void {
  const parent = () => coordinator.opts<{ stateDir?: string }>();
  const stateDirOption = () => new Option('--state-dir <dir>', 'the coordinator state dir').env('ORCHARD_COORDINATOR_STATE_DIR');
  const state = (flags: { stateDir?: string }) => new StateDir(flags.stateDir || parent().stateDir || defaultStateDir());

  coordinator
    .command('export-ca')
    .description('print the cluster id and CA (key included) as JSON, for `orchard coordinator import-ca` on another coordinator')
    .addOption(stateDirOption())
    .action(async (flags: { stateDir?: string }) => {
      if (process.stdout.isTTY) throw new UsageError('export-ca prints the cluster CA key: pipe it into `orchard coordinator import-ca` (e.g. over ssh), not onto a terminal');
      process.stdout.write(`${JSON.stringify(await state(flags).exportCa())}\n`);
    });

  coordinator
    .command('import-ca')
    .description('make this state dir a coordinator of an existing cluster: reads `orchard coordinator export-ca` JSON on stdin')
    .addOption(stateDirOption())
    .action(async (flags: { stateDir?: string }) => {
      if (process.stdin.isTTY) throw new UsageError('import-ca reads the bundle on stdin: orchard coordinator export-ca | orchard coordinator import-ca --state-dir DIR');
      let json: unknown;
      try {
        json = JSON.parse(await text(process.stdin));
      } catch {
        throw new UsageError('stdin is not JSON from `orchard coordinator export-ca`');
      }
      const parsed = CaBundle.safeParse(json);
      if (!parsed.success) throw new UsageError(`stdin is not a CA bundle from \`orchard coordinator export-ca\`: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
      const dir = state(flags);
      const { installed } = await dir.importCa(parsed.data);
      process.stderr.write(
        installed
          ? `cluster ${parsed.data.clusterId}: CA installed in ${dir.dir} (0600). Start it with the same --nats URL as the others: orchard coordinator --state-dir ${dir.dir} --nats URL\n`
          : `${dir.dir} already holds this cluster's CA: nothing changed\n`,
      );
    });
}
