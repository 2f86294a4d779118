import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { type Command, Option } from 'commander';
import { DEFAULT_COORDINATOR_GRPC_PORT, DEFAULT_COORDINATOR_HTTP_PORT } from '../../coordinator/api/client.ts';
import { startCoordinator } from '../../coordinator/coordinator.ts';
import { defaultStateDir as coordinatorStateDir, StateDir } from '../../coordinator/state/state-dir.ts';
import { type AgentReady, NodeAgent } from '../../node/agent.ts';
import { probeHardware, readLiveStats } from '../../node/hardware/probe.ts';
import { defaultStateDir as nodeStateDir } from '../../node/identity.ts';
import { findLlamaBinaries } from '../../node/llama/binaries.ts';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { createLogger } from '../../shared/log.ts';
import { formatBytes, parseBandwidth, parseInteger, parsePort, parseSize } from '../../shared/units.ts';
import { readKeyFile } from '../credentials.ts';
import { enrollLocalNode } from '../local-enroll.ts';
import { modelsDirOption, modelsDirs } from '../models-dir.ts';
import { addNatsOptions, natsSetting } from '../nats-option.ts';

interface UpFlags {
  grpcPort: string;
  httpPort: string;
  agentPort: string;
  metricsPort: string;
  host: string;
  httpHost: string;
  agentAddress?: string;
  name?: string;
  memoryLimit?: string;
  budget?: string;
  bandwidth?: string;
  modelsDir?: string[];
  mdns: boolean;
  apiKey?: string;
  apiKeyFile?: string;
  metricsPublic?: boolean;
  maxQueue?: string;
  nats?: string | boolean;
  json?: boolean;
}

/** The address other machines (and this coordinator) reach this Mac's agent at. */
export function defaultAgentAddress(ifaces = networkInterfaces()): string {
  for (const list of Object.values(ifaces)) {
    for (const a of list ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  return '127.0.0.1';
}

/**
 * `orchard up`: the single-Mac default — a coordinator and this machine's node agent in one
 * process. The agent is certified directly from the cluster CA (local-enroll.ts) and added
 * statically; up prints a join token for the other Macs (`orchard node` with it finds this
 * coordinator over Bonjour, or `--join HOST:PORT`).
 */
export function registerUp(program: Command): void {
  addNatsOptions(program.command('up'))
    .description('run a coordinator and this machine’s node agent in one process (others can still join)')
    .addOption(new Option('--grpc-port <port>', 'coordinator gRPC port').default(String(DEFAULT_COORDINATOR_GRPC_PORT)).env('ORCHARD_COORDINATOR_GRPC_PORT'))
    .addOption(new Option('--http-port <port>', 'OpenAI + management HTTP port').default(String(DEFAULT_COORDINATOR_HTTP_PORT)).env('ORCHARD_COORDINATOR_HTTP_PORT'))
    .addOption(new Option('--agent-port <port>', 'local node agent gRPC port').default('50151').env('ORCHARD_NODE_GRPC_PORT'))
    .addOption(new Option('--metrics-port <port>', 'local node agent metrics port').default('9151').env('ORCHARD_NODE_METRICS_PORT'))
    .addOption(new Option('--host <ip>', 'address the coordinator gRPC and agent listen on').default('0.0.0.0').env('ORCHARD_COORDINATOR_HOST'))
    .addOption(new Option('--http-host <ip>', 'address the HTTP API listens on (0.0.0.0 to serve the LAN; set --api-key)').default('127.0.0.1').env('ORCHARD_HTTP_HOST'))
    .addOption(new Option('--agent-address <ip>', 'address the local agent is reached at (default: first non-loopback IPv4)').env('ORCHARD_AGENT_ADDRESS'))
    .addOption(new Option('--name <name>', 'this node’s name').env('ORCHARD_NODE_NAME'))
    .addOption(new Option('--memory-limit <size>', 'pretend total RAM, e.g. 16GiB').env('ORCHARD_NODE_MEMORY_LIMIT'))
    .addOption(new Option('--budget <size>', 'usable model-memory budget of this node').env('ORCHARD_NODE_BUDGET'))
    .addOption(new Option('--bandwidth <GBps>', 'memory bandwidth in GB/s').env('ORCHARD_NODE_BANDWIDTH'))
    .addOption(modelsDirOption())
    .option('--no-mdns', 'do not browse Bonjour for other nodes')
    .addOption(new Option('--api-key <key>', 'an admin API key: HTTP and gRPC then need a key (prefer ORCHARD_API_KEY or --api-key-file)').env('ORCHARD_API_KEY'))
    .addOption(new Option('--api-key-file <file>', 'read the admin API key from this file (`-` = stdin)').env('ORCHARD_API_KEY_FILE'))
    .addOption(new Option('--metrics-public', 'serve /metrics without a key').env('ORCHARD_METRICS_PUBLIC'))
    .addOption(
      new Option('--max-queue <n>', 'requests that may wait per model beyond its --parallel slots (default 4 × parallel)').env('ORCHARD_COORDINATOR_MAX_QUEUE'),
    )
    .option('--json', 'print a machine-readable ready line')
    .addHelpText(
      'after',
      `
Examples:
  $ orchard up                                  # then: orchard load model.gguf; orchard chat
  $ orchard up --http-host 0.0.0.0 --api-key-file ~/.orchard/api-key
  $ orchard up --no-mdns --budget 24GiB         # others: ORCHARD_NODE_TOKEN=T orchard node --join THIS_IP:7420`,
    )
    .action(async (flags: UpFlags) => {
      await runUp(flags);
    });
}

async function runUp(flags: UpFlags): Promise<void> {
  for (const [k, v] of [['--host', flags.host], ['--http-host', flags.httpHost]] as const) {
    if (isIP(v) === 0) throw new UsageError(`invalid ${k} "${v}": give an IP address`);
  }
  const maxQueue = flags.maxQueue !== undefined ? parseInteger(flags.maxQueue, '--max-queue', 0, 100_000) : undefined;
  const agentAddress = flags.agentAddress ?? defaultAgentAddress();
  if (isIP(agentAddress) === 0) throw new UsageError(`invalid --agent-address "${agentAddress}": give an IP address`);
  const log = createLogger('orchard-up', process.env.ORCHARD_DEBUG ? 'debug' : undefined);
  const { ca } = await new StateDir(coordinatorStateDir()).clusterCa();
  await enrollLocalNode(nodeStateDir(), ca);
  const agent = new NodeAgent({
    name: flags.name,
    stateDir: nodeStateDir(),
    bindHost: flags.host,
    grpcPort: parsePort(flags.agentPort, '--agent-port'),
    metricsPort: parsePort(flags.metricsPort, '--metrics-port'),
    memoryLimitBytes: flags.memoryLimit ? parseSize(flags.memoryLimit, '--memory-limit') : undefined,
    budgetBytes: flags.budget ? parseSize(flags.budget, '--budget') : undefined,
    bandwidthBytesPerSecond: flags.bandwidth ? parseBandwidth(flags.bandwidth) : undefined,
    modelsDirs: modelsDirs(flags.modelsDir ?? []),
    // The coordinator is in this process: it is joined directly, Bonjour is not needed for it.
    mdns: false,
    probe: probeHardware,
    readLive: readLiveStats,
    binaries: () => findLlamaBinaries(),
    log: log.child({ part: 'node' }),
  });
  let stop: () => void = () => {};
  const stopped = new Promise<void>((r) => {
    stop = r;
  });
  let signals = 0;
  const onSignal = () => {
    signals++;
    if (signals > 1) {
      agent.killEngines();
      process.exit(130);
    }
    stop();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const ready = await agent.start();
  let coordinator: Awaited<ReturnType<typeof startCoordinator>> | undefined;
  try {
    coordinator = await startCoordinator({
      stateDir: coordinatorStateDir(),
      host: flags.host,
      grpcPort: parsePort(flags.grpcPort, '--grpc-port'),
      httpPort: parsePort(flags.httpPort, '--http-port'),
      httpHost: flags.httpHost,
      mdns: flags.mdns,
      nats: natsSetting(flags.nats),
      api: { apiKey: flags.apiKeyFile ? await readKeyFile(flags.apiKeyFile) : flags.apiKey || undefined, metricsPublic: !!flags.metricsPublic },
      maxQueue,
      log: log.child({ part: 'coordinator' }),
    }).catch((err: unknown) => {
      throw new OrchardError(`cannot start the coordinator: ${(err as Error).message} (another one running? use --grpc-port/--http-port)`);
    });
    await coordinator.membership.add(`${agentAddress}:${ready.grpcPort}`, 'join');
    const joinToken = await coordinator.createJoinToken({ ttlMs: 24 * 3_600_000 });
    printUpReady(flags, coordinator, ready, agentAddress, joinToken);
    await stopped;
    log.info('stopping: unloading models, stopping engines');
  } finally {
    await coordinator?.close();
    await agent.stop();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

function printUpReady(flags: UpFlags, coordinator: Awaited<ReturnType<typeof startCoordinator>>, ready: AgentReady, agentAddress: string, joinToken: string): void {
  const url = `http://${flags.httpHost === '0.0.0.0' ? agentAddress : flags.httpHost}:${coordinator.httpPort}`;
  if (flags.json) {
    process.stdout.write(
      `${JSON.stringify({ event: 'ready', clusterId: coordinator.clusterId, grpcPort: coordinator.grpcPort, httpPort: coordinator.httpPort, caFingerprint: coordinator.caFingerprint, joinToken, nodeId: ready.nodeId, agentPort: ready.grpcPort, pid: process.pid })}\n`,
    );
  } else {
    process.stdout.write(
      `orchard up: cluster ${coordinator.clusterId}\n` +
        `  this node: ${ready.name} (${formatBytes(ready.profile.budgetBytes)} usable), agent ${agentAddress}:${ready.grpcPort}\n` +
        `  OpenAI API: ${url}/v1    gRPC: ${flags.host}:${coordinator.grpcPort}\n` +
        `  join token (valid 24 h, shown once): ${joinToken}\n` +
        `  other Macs: ORCHARD_NODE_TOKEN=<token> orchard node${flags.mdns ? '' : ` --join ${agentAddress}:${coordinator.grpcPort}`}   (Bonjour finds this coordinator${flags.mdns ? '' : '; it is off here'})\n` +
        `  next: orchard load MODEL.gguf, then orchard chat --url ${url}\n`,
    );
  }
}
