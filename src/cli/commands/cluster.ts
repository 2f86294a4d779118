import { networkInterfaces } from 'node:os';
import { type Command, Option } from 'commander';
import { CoordinatorClient, coordinatorAddress } from '../../coordinator/api/client.ts';
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
    .addOption(new Option('--token <token>', 'the cluster join token (`orchard coordinator token`)').env('ORCHARD_JOIN_TOKEN').makeOptionMandatory())
    .requiredOption('--agent <host:port>', 'the node agent address the coordinator should dial')
    .option('--json', 'print {nodeId, clusterId}')
    .action(async (coordinator: string, flags: { token: string; agent: string; json?: boolean }) => {
      const r = await joinCluster(coordinator, flags.token, flags.agent);
      if (flags.json) process.stdout.write(`${JSON.stringify(r)}\n`);
      else process.stdout.write(`joined cluster ${r.clusterId} as node ${r.nodeId}\n`);
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

/**
 * `orchard node --join`: keep asking the coordinator to take this agent in until it answers
 * (it may start later). A wrong token is final: retrying would not fix it.
 */
export async function joinWithRetry(
  coordinator: string,
  token: string,
  agent: string,
  o: { signal: AbortSignal; onError: (message: string, final: boolean) => void },
): Promise<{ nodeId: string; clusterId: string } | undefined> {
  let delay = 500;
  while (!o.signal.aborted) {
    try {
      return await joinCluster(coordinator, token, agent, 10_000);
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      const final = /wrong join token|invalid|must be/i.test(message);
      o.onError(message, final);
      if (final) return undefined;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(5000, delay * 2);
    }
  }
  return undefined;
}
