import { type Command, Option } from 'commander';
import { CoordinatorClient, coordinatorAddress } from '../../coordinator/api/client.ts';

export function registerUnload(program: Command): void {
  program
    .command('unload')
    .description('unload a model: stop every engine it started')
    .argument('<name>', 'model name (see `orchard status`)')
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address (default 127.0.0.1:7420)').env('ORCHARD_COORDINATOR'))
    .action(async (name: string, flags: { coordinator?: string }) => {
      const client = new CoordinatorClient(coordinatorAddress(flags.coordinator));
      try {
        await client.unary('unload', { name }, 60_000);
        process.stdout.write(`${name} unloaded\n`);
      } finally {
        client.close();
      }
    });
}
