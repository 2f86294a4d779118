import { isIP } from 'node:net';
import { type Command, Option } from 'commander';
import { DEFAULT_COORDINATOR_GRPC_PORT, DEFAULT_COORDINATOR_HTTP_PORT } from '../../coordinator/api/client.ts';
import { startCoordinator } from '../../coordinator/coordinator.ts';
import { parseHealMode } from '../../coordinator/instances/healing.ts';
import { parseRebalanceMode } from '../../coordinator/instances/rebalance.ts';
import { DEFAULT_REGISTRY_OPTIONS } from '../../coordinator/membership/registry.ts';
import { defaultStateDir } from '../../coordinator/state/state-dir.ts';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { createLogger } from '../../shared/log.ts';
import { parseInteger, parsePort, parseSize } from '../../shared/units.ts';
import { readKeyFile } from '../credentials.ts';
import { addNatsOptions, natsSetting } from '../nats-option.ts';
import { registerClusterCredentials } from './cluster-credentials.ts';
import { registerCoordinatorCa } from './coordinator-ca.ts';
import { registerNatsConfig } from './coordinator-nats.ts';
import { registerKeys } from './keys.ts';

interface CoordinatorFlags {
  grpcPort: string;
  httpPort: string;
  host: string;
  stateDir?: string;
  mdns: boolean;
  mdnsInterface?: string;
  suspectAfter: string;
  downAfter: string;
  heal: string;
  rebalance: string;
  maxQueue?: string;
  apiKey?: string;
  apiKeyFile?: string;
  metricsPublic?: boolean;
  maxBody: string;
  nats?: string | boolean;
  leaseTtl: string;
  advertise?: string;
  json?: boolean;
}

/** `orchard coordinator`: run the coordinator; `token`, `credentials`, `keys`: its secrets, made in its state dir. */
export function registerCoordinator(program: Command): void {
  const cmd = addNatsOptions(program.command('coordinator'))
    .description('run the coordinator: discover nodes, load models across them, stream tokens')
    .addOption(new Option('--grpc-port <port>', 'Coordinator gRPC port (0 = pick a free one)').default(String(DEFAULT_COORDINATOR_GRPC_PORT)).env('ORCHARD_COORDINATOR_GRPC_PORT'))
    .addOption(new Option('--http-port <port>', 'HTTP port: OpenAI API, /healthz, /status, /metrics (0 = pick)').default(String(DEFAULT_COORDINATOR_HTTP_PORT)).env('ORCHARD_COORDINATOR_HTTP_PORT'))
    .addOption(new Option('--host <ip>', 'address the gRPC server listens on (agents join through it)').default('0.0.0.0').env('ORCHARD_COORDINATOR_HOST'))
    .addOption(new Option('--state-dir <dir>', `cluster id, CA, join tokens, joined agents (default ${defaultStateDir()})`).env('ORCHARD_COORDINATOR_STATE_DIR'))
    .addOption(new Option('--no-mdns', 'do not browse Bonjour (nodes join with `orchard cluster join`)'))
    .addOption(new Option('--mdns-interface <ip>', 'browse Bonjour via the interface with this IPv4 address').env('ORCHARD_COORDINATOR_MDNS_INTERFACE'))
    .option('--suspect-after <ms>', 'heartbeat silence before a node is suspect (its models wait, nothing fails)', String(DEFAULT_REGISTRY_OPTIONS.suspectAfterMs))
    .option('--down-after <ms>', 'grace period: heartbeat silence before a node is down and its models are re-placed', String(DEFAULT_REGISTRY_OPTIONS.downAfterMs))
    .option('--heal <mode>', 'auto: re-place a model that lost a node or engine and resume its streams; off: fail it (a load may override)', 'auto')
    .option('--rebalance <mode>', 'auto: re-place a model when a node joins or returns and it is predicted ≥ 20 % faster (load new, switch, stop old); off: only `orchard rebalance`', 'off')
    .option('--max-queue <n>', 'requests that may wait per model beyond its --parallel slots (default 4 × parallel)')
    .addOption(new Option('--api-key <key>', 'an admin API key: HTTP and gRPC then need a key (prefer ORCHARD_API_KEY or --api-key-file: a flag shows in `ps`)').env('ORCHARD_API_KEY'))
    .addOption(new Option('--api-key-file <file>', 'read the admin API key from this file (`-` = stdin)').env('ORCHARD_API_KEY_FILE'))
    .addOption(new Option('--metrics-public', 'serve /metrics without a key (otherwise Prometheus sends an inference key)').env('ORCHARD_METRICS_PUBLIC'))
    .addOption(new Option('--max-body <size>', 'largest HTTP request body (413 beyond it)').default('4MiB').env('ORCHARD_MAX_BODY'))
    .addOption(new Option('--lease-ttl <ms>', 'several coordinators on --nats: the leader lease TTL (a standby takes over within about 1.3 × TTL)').default('5000').env('ORCHARD_LEASE_TTL'))
    .addOption(new Option('--advertise <host>', 'several coordinators: the host others reach this one\'s gRPC and HTTP by (default --host/--http-host, or the host name)').env('ORCHARD_COORDINATOR_ADVERTISE'))
    .option('--json', 'print a machine-readable ready line ({"event":"ready",…})')
    .action(async (flags: CoordinatorFlags) => {
      await runCoordinator(flags);
    });
  registerClusterCredentials(cmd);
  registerCoordinatorCa(cmd);
  registerNatsConfig(cmd);
  registerKeys(cmd);
}

async function runCoordinator(flags: CoordinatorFlags): Promise<void> {
  if (isIP(flags.host) === 0) throw new UsageError(`invalid --host "${flags.host}": give an IP address such as 0.0.0.0 or 127.0.0.1`);
  if (flags.mdnsInterface !== undefined && isIP(flags.mdnsInterface) !== 4) throw new UsageError(`invalid --mdns-interface "${flags.mdnsInterface}": give an IPv4 address`);
  const suspectAfterMs = parseInteger(flags.suspectAfter, '--suspect-after', 100, 600_000);
  const downAfterMs = parseInteger(flags.downAfter, '--down-after', 200, 3_600_000);
  if (downAfterMs <= suspectAfterMs) throw new UsageError('--down-after must be greater than --suspect-after');
  const log = createLogger('orchard-coordinator', process.env.ORCHARD_DEBUG ? 'debug' : undefined);
  const stateDir = flags.stateDir ?? defaultStateDir();
  const nats = natsSetting(flags.nats);
  const handle = await startCoordinator({
    stateDir,
    nats,
    leaseTtlMs: parseInteger(flags.leaseTtl, '--lease-ttl', 1000, 120_000),
    advertiseHost: flags.advertise,
    host: flags.host,
    grpcPort: parsePort(flags.grpcPort, '--grpc-port'),
    httpPort: parsePort(flags.httpPort, '--http-port'),
    mdns: flags.mdns,
    mdnsInterface: flags.mdnsInterface,
    registry: { suspectAfterMs, downAfterMs, forgetAfterMs: Math.max(10 * 60_000, downAfterMs + 1) },
    heal: { mode: parseHealMode(flags.heal) ?? 'auto' },
    rebalance: parseRebalanceMode(flags.rebalance) ?? 'off',
    maxQueue: flags.maxQueue !== undefined ? parseInteger(flags.maxQueue, '--max-queue', 0, 100_000) : undefined,
    extraHeadArgs: process.env.ORCHARD_LLAMA_SERVER_EXTRA_ARGS?.split(/\s+/).filter(Boolean),
    api: { apiKey: flags.apiKeyFile ? await readKeyFile(flags.apiKeyFile) : flags.apiKey || undefined, metricsPublic: !!flags.metricsPublic, maxBodyBytes: parseSize(flags.maxBody, '--max-body') },
    rpcThreads: process.env.ORCHARD_RPC_THREADS ? parseInteger(process.env.ORCHARD_RPC_THREADS, 'ORCHARD_RPC_THREADS', 0, 1024) : undefined,
    // MLX watchdogs, in seconds: every rank ready within (default 300), rank 0 silent at most (30).
    mlxReadyTimeoutMs: process.env.ORCHARD_MLX_READY_TIMEOUT ? 1000 * parseInteger(process.env.ORCHARD_MLX_READY_TIMEOUT, 'ORCHARD_MLX_READY_TIMEOUT', 1, 3600) : undefined,
    mlxStallTimeoutSeconds: process.env.ORCHARD_MLX_STALL_TIMEOUT ? parseInteger(process.env.ORCHARD_MLX_STALL_TIMEOUT, 'ORCHARD_MLX_STALL_TIMEOUT', 1, 3600) : undefined,
    log,
  }).catch((err: unknown) => {
    if ((err as NodeJS.ErrnoException).code === 'EADDRINUSE' || /address already in use|No address added/i.test(String(err))) {
      throw new OrchardError(`cannot listen: ${(err as Error).message} (another coordinator running? use --grpc-port/--http-port)`);
    }
    throw err;
  });
  if (flags.json) {
    process.stdout.write(
      `${JSON.stringify({ event: 'ready', clusterId: handle.clusterId, grpcPort: handle.grpcPort, httpPort: handle.httpPort, caFingerprint: handle.caFingerprint, pid: process.pid, stateDir, stateStore: handle.storeInfo, role: handle.roles().role })}\n`,
    );
  } else {
    process.stdout.write(`orchard coordinator ready: gRPC ${flags.host}:${handle.grpcPort}, HTTP 127.0.0.1:${handle.httpPort}, cluster ${handle.clusterId}\n`);
    process.stdout.write(`  state: ${handle.storeInfo.backend === 'nats' ? `NATS JetStream at ${handle.storeInfo.location}` : handle.storeInfo.location}\n`);
    if (handle.roles().role !== 'single') process.stdout.write(`  ${handle.roles().role === 'leader' ? 'leader' : 'standby (relays to the leader; leads when the lease is free)'}\n`);
    process.stdout.write(`  cluster CA sha256 ${handle.caFingerprint}\n  nodes join with a token from \`orchard coordinator token\`: ORCHARD_NODE_TOKEN=… orchard node\n`);
  }
  await new Promise<void>((resolve) => {
    let n = 0;
    const onSignal = (sig: NodeJS.Signals) => {
      n++;
      if (n > 1) process.exit(130);
      log.info({ signal: sig }, 'stopping: unloading models (engines on the agents stop)');
      resolve();
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
  await handle.close();
  if (flags.json) process.stdout.write(`${JSON.stringify({ event: 'stopped' })}\n`);
}
