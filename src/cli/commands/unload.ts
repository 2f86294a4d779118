import { type Command, Option } from 'commander';
import { addCredentialOptions, type CredentialFlags, coordinatorClient } from '../credentials.ts';

export function registerUnload(program: Command): void {
  addCredentialOptions(program.command('unload'))
    .description('unload a model: stop every engine it started')
    .argument('<name>', 'model name (see `orchard status`)')
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address (default 127.0.0.1:7420)').env('ORCHARD_COORDINATOR'))
    .action(async (name: string, flags: CredentialFlags & { coordinator?: string }) => {
      const client = await coordinatorClient(flags);
      try {
        await client.unary('unload', { name }, 60_000);
        process.stdout.write(`${name} unloaded\n`);
      } finally {
        client.close();
      }
    });
}
