import type { Command } from 'commander';
import { CoordinatorClient, coordinatorAddress } from '../../coordinator/client.ts';
import { UsageError } from '../../shared/errors.ts';

/** Ask a coordinator to take in a node agent (static join, for networks without multicast). */
export async function joinCluster(coordinator: string, token: string, agent: string, timeoutMs = 15_000): Promise<{ nodeId: string; clusterId: string }> {
  if (!/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(agent)) throw new UsageError(`invalid --agent "${agent}": use HOST:PORT of the node agent`);
  if (!token) throw new UsageError('--token is required (print it on the coordinator with `orchard coordinator token`)');
  const client = new CoordinatorClient(coordinatorAddress(coordinator));
  try {
    const r = await client.unary('join', { token, agentAddress: agent }, timeoutMs);
    return { nodeId: String(r.nodeId ?? ''), clusterId: String(r.clusterId ?? '') };
  } finally {
    client.close();
  }
}

export function registerCluster(program: Command): void {
  const cluster = program.command('cluster').description('cluster membership');
  cluster
    .command('join')
    .description('join a node agent to a coordinator without Bonjour')
    .argument('<coordinator>', 'coordinator gRPC address HOST:PORT')
    .requiredOption('--token <token>', 'the cluster join token (`orchard coordinator token`)')
    .requiredOption('--agent <host:port>', 'the node agent address the coordinator should dial')
    .option('--json', 'print {nodeId, clusterId}')
    .action(async (coordinator: string, flags: { token: string; agent: string; json?: boolean }) => {
      const r = await joinCluster(coordinator, flags.token, flags.agent);
      if (flags.json) process.stdout.write(`${JSON.stringify(r)}\n`);
      else process.stdout.write(`joined cluster ${r.clusterId} as node ${r.nodeId}\n`);
    });
}
