import { isAbsolute, join, resolve } from 'node:path';
import { type Command, Option } from 'commander';
import { NATS_INCLUDE_FILE, writeExternalNatsConfig } from '../../coordinator/nats/auth.ts';
import { defaultStateDir, StateDir } from '../../coordinator/state/state-dir.ts';
import { UsageError } from '../../shared/errors.ts';

/**
 * `orchard coordinator nats-config`: what an external nats-server (`orchard coordinator --nats
 * tls://…`, several coordinators) needs to serve this cluster — its `nats`-role key and
 * certificate from the cluster CA, the CA, and `orchard.conf` to include: the same `tls {}` and
 * permissions as the local server's, but naming roles, so nodes that join later need no edit
 * (coordinator/nats/auth.ts). Files only (0600), nothing secret on stdout or argv.
 */
export function registerNatsConfig(coordinator: Command): void {
  const parent = () => coordinator.opts<{ stateDir?: string }>();
  coordinator
    .command('nats-config')
    .description('write an external nats-server\'s certificate, key, CA and orchard.conf (TLS + users) for this cluster (files 0600)')
    .requiredOption('--out <dir>', 'where to write server.crt, server.key, ca.crt and orchard.conf')
    .option('--server-dir <dir>', 'the absolute path the NATS host will keep these files at (the paths in orchard.conf; default --out)')
    .addOption(new Option('--state-dir <dir>', 'the coordinator state dir').env('ORCHARD_COORDINATOR_STATE_DIR'))
    .action(async (flags: { out: string; serverDir?: string; stateDir?: string }) => {
      if (flags.serverDir !== undefined && !isAbsolute(flags.serverDir)) throw new UsageError(`--server-dir "${flags.serverDir}" must be an absolute path: nats-server resolves relative paths from its working directory`);
      const state = new StateDir(flags.stateDir || parent().stateDir || defaultStateDir());
      const { ca } = await state.clusterCa();
      const revoked = (await state.revocations()).ids();
      const outDir = resolve(flags.out);
      await writeExternalNatsConfig({ outDir, ca, revokedNodeIds: revoked, serverDir: flags.serverDir });
      process.stderr.write(
        `cluster ${ca.clusterId}: nats-server files in ${outDir} (0600; ${revoked.length} revoked node(s) refused). In the server's config: include ${JSON.stringify(join(flags.serverDir ?? outDir, NATS_INCLUDE_FILE))} (with jetstream {…}); coordinators: --nats tls://HOST:4222. Run again and reload the server after \`orchard cluster revoke\`.\n`,
      );
    });
}
