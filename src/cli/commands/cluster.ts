import { networkInterfaces } from 'node:os';
import { type Command, Option } from 'commander';
import { coordinatorAddress } from '../../coordinator/api/client.ts';
import { defaultStateDir as defaultNodeStateDir, loadOrCreateIdentity } from '../../node/identity.ts';
import { loadNodeTls } from '../../node/identity-credentials.ts';
import { joinWithToken, renewAndAnnounce } from '../../node/join.ts';
import { UsageError } from '../../shared/errors.ts';
import { caClusterId } from '../../shared/pki/certificates.ts';
import { addCredentialOptions, type CredentialFlags, coordinatorClient } from '../credentials.ts';
import { readJoinToken, scrubArgv } from '../node-join.ts';

/**
 * `orchard cluster join COORD`: enrol this machine's node state dir with a join token (the same
 * flow as `orchard node --join COORD`, for a node that is started later or by a service manager),
 * and with --agent announce an agent that already serves with the node certificate.
 */
export async function joinCluster(o: { coordinator: string; token: string | undefined; stateDir: string; agent?: string | undefined }): Promise<{ nodeId: string; clusterId: string }> {
  if (o.agent !== undefined && !/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(o.agent)) throw new UsageError(`invalid --agent "${o.agent}": use HOST:PORT of the node agent`);
  const { nodeId } = await loadOrCreateIdentity(o.stateDir);
  let tls = await loadNodeTls(o.stateDir, nodeId);
  if (!tls) {
    if (!o.token) throw new UsageError('a join token is required (ORCHARD_NODE_TOKEN or --token-file; print one on the coordinator with `orchard coordinator token`)');
    tls = await joinWithToken({ stateDir: o.stateDir, nodeId, coordinator: o.coordinator, token: o.token });
  }
  if (o.agent !== undefined) await renewAndAnnounce({ stateDir: o.stateDir, nodeId, coordinator: o.coordinator, tls, agentAddress: o.agent });
  return { nodeId, clusterId: caClusterId(tls.caCertPem) };
}

export function registerCluster(program: Command): void {
  const cluster = program.command('cluster').description('cluster membership');
  cluster
    .command('join')
    .description("join this machine's node to a cluster without Bonjour: stores its node certificate (start `orchard node` afterwards)")
    .argument('<coordinator>', 'coordinator gRPC address HOST:PORT')
    .addOption(new Option('--token <token>', 'join token (`orchard coordinator token`; prefer ORCHARD_NODE_TOKEN or --token-file)').env('ORCHARD_NODE_TOKEN'))
    .addOption(new Option('--token-file <file>', 'read the join token from this file').env('ORCHARD_NODE_TOKEN_FILE'))
    .addOption(new Option('--state-dir <dir>', 'the node state dir (default ~/.orchard/node)').env('ORCHARD_NODE_STATE_DIR'))
    .option('--agent <host:port>', 'also have the coordinator dial this running agent (it must serve with this node\'s certificate)')
    .option('--json', 'print {nodeId, clusterId}')
    .action(async (coordinator: string, flags: { token?: string; tokenFile?: string; stateDir?: string; agent?: string; json?: boolean }) => {
      scrubArgv();
      const token = await readJoinToken(flags);
      const r = await joinCluster({ coordinator: coordinatorAddress(coordinator), token, stateDir: flags.stateDir ?? defaultNodeStateDir(), agent: flags.agent });
      if (flags.json) process.stdout.write(`${JSON.stringify(r)}\n`);
      else process.stdout.write(`joined cluster ${r.clusterId} as node ${r.nodeId}\n`);
    });
  addCredentialOptions(
    cluster
      .command('revoke')
      .description('refuse a node from now on: its channels close, it cannot join or renew again, every agent refuses it')
      .argument('<node>', 'node name (as `orchard status` shows it) or id'),
  )
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address').env('ORCHARD_COORDINATOR'))
    .option('--json', 'print {nodeId, revoked}')
    .action(async (node: string, flags: CredentialFlags & { coordinator?: string; json?: boolean }) => {
      const client = await coordinatorClient(flags);
      try {
        const r = await client.unary('revoke', { node });
        if (flags.json) process.stdout.write(`${JSON.stringify({ nodeId: r.nodeId, revoked: r.revoked })}\n`);
        else process.stdout.write(r.revoked ? `node ${String(r.nodeId)} revoked\n` : `node ${String(r.nodeId)} was already revoked\n`);
      } finally {
        client.close();
      }
    });
}

/**
 * The address a coordinator should dial for an agent bound to `bind`: the bind address itself,
 * or — when bound to all interfaces — the first non-internal IPv4 (a Thunderbolt bridge first,
 * since that is the fast data path between Macs).
 */
export function agentAdvertiseAddress(bind: string, port: number, interfaces = networkInterfaces()): string {
  if (bind !== '0.0.0.0' && bind !== '::') return bind.includes(':') ? `[${bind}]:${port}` : `${bind}:${port}`;
  const candidates = Object.entries(interfaces).flatMap(([name, addrs]) =>
    (addrs ?? []).filter((a) => a.family === 'IPv4' && !a.internal).map((a) => ({ name, address: a.address })),
  );
  const tb = candidates.find((c) => /^bridge\d+$/.test(c.name));
  const pick = tb ?? candidates[0];
  return `${pick?.address ?? '127.0.0.1'}:${port}`;
}
