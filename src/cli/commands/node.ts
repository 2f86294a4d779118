import { isIP } from 'node:net';
import Table from 'cli-table3';
import { type Command, Option } from 'commander';
import { type AgentReady, NodeAgent } from '../../node/agent.ts';
import { probeHardware, readLiveStats } from '../../node/hardware/probe.ts';
import { defaultStateDir } from '../../node/identity.ts';
import { findLlamaBinaries } from '../../node/llama/binaries.ts';
import { availableParallelism } from 'node:os';
import { loadCalibration, measureCalibration, withCalibration } from '../../node/calibrate.ts';
import { UsageError } from '../../shared/errors.ts';
import { measuredUnderContention } from '../../shared/placement/calibration.ts';
import type { Calibration } from '../../shared/placement/cost.ts';
import { createLogger } from '../../shared/log.ts';
import { formatBandwidth, formatBytes, parseBandwidth, parseInteger, parsePort, parseSize } from '../../shared/units.ts';
import { modelsDirOption, modelsDirs } from '../models-dir.ts';
import { loadOrCreateIdentity } from '../../node/identity.ts';
import { ensureJoined, keepMembership, readJoinToken, scrubArgv } from '../node-join.ts';
import { agentAdvertiseAddress } from './cluster.ts';
import { registerDrain } from './drain.ts';
import { type PortRange, parsePortRange } from '../../shared/engine-port-range.ts';
import { EnginePortAllocator, engineRangeOf } from '../../node/ports.ts';

export const DEFAULT_GRPC_PORT = 50151;
export const DEFAULT_METRICS_PORT = 9151;

interface NodeFlags {
  name?: string;
  grpcPort: string;
  metricsPort: string;
  tunnelPort: string;
  enginePorts?: string;
  stateDir?: string;
  memoryLimit?: string;
  budget?: string;
  bandwidth?: string;
  mdns: boolean;
  mdnsInterface?: string;
  bind: string;
  advertiseHost?: string;
  token?: string;
  tokenFile?: string;
  join?: string;
  calibrate?: boolean;
  renewCheck: string;
  json?: boolean;
  modelsDir: string[];
}

/** `orchard node`: run this machine's node agent until SIGTERM/SIGINT. */
export function registerNode(program: Command): void {
  const node = program
    .command('node')
    .description('run the node agent: probe this machine, advertise it over Bonjour, run engines for the coordinator')
    .addOption(new Option('--name <name>', 'node name (Bonjour instance name); default: the hostname').env('ORCHARD_NODE_NAME'))
    .addOption(new Option('--grpc-port <port>', 'NodeAgent gRPC port (0 = pick a free one)').default(String(DEFAULT_GRPC_PORT)).env('ORCHARD_NODE_GRPC_PORT'))
    .addOption(new Option('--metrics-port <port>', 'Prometheus /metrics and /healthz port (0 = pick)').default(String(DEFAULT_METRICS_PORT)).env('ORCHARD_NODE_METRICS_PORT'))
    .addOption(new Option('--tunnel-port <port>', 'TLS tunnel port for engine traffic between nodes, on the --bind host (0 = pick; only once the node holds cluster credentials)').default('0').env('ORCHARD_NODE_TUNNEL_PORT'))
    .addOption(new Option('--engine-ports <first-last>', 'ports this node hands its engines, all bound on 127.0.0.1 only; the part inside the OS ephemeral port range is left out (default 20000-32767)').env('ORCHARD_NODE_ENGINE_PORTS'))
    .addOption(new Option('--state-dir <dir>', 'where the stable node id is kept (default ~/.orchard/node or $XDG_STATE_HOME/orchard/node)').env('ORCHARD_NODE_STATE_DIR'))
    .addOption(new Option('--memory-limit <size>', 'pretend total RAM, e.g. 16GiB').env('ORCHARD_NODE_MEMORY_LIMIT'))
    .addOption(new Option('--budget <size>', 'usable model-memory budget, e.g. 12GiB (skips the computation)').env('ORCHARD_NODE_BUDGET'))
    .addOption(new Option('--bandwidth <GBps>', 'memory bandwidth in GB/s, e.g. 400').env('ORCHARD_NODE_BANDWIDTH'))
    .addOption(new Option('--no-mdns', 'do not advertise over Bonjour (use `cluster join` instead)').env('ORCHARD_NODE_NO_MDNS'))
    .addOption(new Option('--mdns-interface <ip>', 'advertise on the interface with this IPv4 address only').env('ORCHARD_NODE_MDNS_INTERFACE'))
    .addOption(new Option('--bind <host>', 'address the gRPC and metrics servers listen on').default('0.0.0.0').env('ORCHARD_NODE_BIND'))
    .addOption(new Option('--advertise-host <ip>', 'address the coordinator and the other nodes reach this node at when it is not the --bind address (port forwarding, a proxy); same gRPC and tunnel ports').env('ORCHARD_NODE_ADVERTISE_HOST'))
    .addOption(new Option('--token <token>', 'join token from `orchard coordinator token` (first start only; prefer ORCHARD_NODE_TOKEN or --token-file: a flag shows in `ps` until scrubbed)').env('ORCHARD_NODE_TOKEN'))
    .addOption(new Option('--token-file <file>', 'read the join token from this file').env('ORCHARD_NODE_TOKEN_FILE'))
    .addOption(new Option('--join <host:port>', 'the coordinator\'s gRPC address (static join, no Bonjour needed)').env('ORCHARD_JOIN'))
    .addOption(new Option('--renew-check <seconds>', 'how often the node checks whether its certificate is due for renewal').default('3600').env('ORCHARD_NODE_RENEW_CHECK'))
    .addOption(modelsDirOption())
    .option('--calibrate', 'measure this machine\'s engine (decode bandwidth, prompt FLOP/s) before starting; cached for later starts')
    .option('--json', 'print a machine-readable ready line ({"event":"ready",…}) instead of the profile table')
    .action(async (flags: NodeFlags) => {
      await runNode(flags);
    });
  registerDrain(node);
}

/** Flags → agent options; every check here is a UsageError (exit 2) before anything starts. */
function parseFlags(flags: NodeFlags) {
  const bind = flags.bind.trim();
  if (isIP(bind) === 0) throw new UsageError(`invalid --bind "${flags.bind}": give an IP address such as 0.0.0.0 or 127.0.0.1`);
  if (flags.advertiseHost !== undefined && isIP(flags.advertiseHost) === 0) throw new UsageError(`invalid --advertise-host "${flags.advertiseHost}": give an IP address`);
  if (flags.mdnsInterface !== undefined && isIP(flags.mdnsInterface) !== 4) {
    throw new UsageError(`invalid --mdns-interface "${flags.mdnsInterface}": give the interface's IPv4 address`);
  }
  if (flags.name !== undefined && !/^[^.\p{Cc}]{1,63}$/u.test(flags.name)) {
    throw new UsageError(`invalid --name "${flags.name}": 1–63 characters, no dots (it becomes the Bonjour instance name)`);
  }
  if (flags.name !== undefined && Buffer.byteLength(flags.name) > 63) throw new UsageError(`invalid --name "${flags.name}": at most 63 bytes`);
  const mdns = flags.mdns; // ORCHARD_NODE_NO_MDNS=0/false keeps mDNS: honourFalseEnv (src/cli/env.ts)
  return {
    name: flags.name,
    grpcPort: parsePort(flags.grpcPort, '--grpc-port'),
    metricsPort: parsePort(flags.metricsPort, '--metrics-port'),
    tunnelPort: parsePort(flags.tunnelPort, '--tunnel-port'),
    enginePorts: flags.enginePorts !== undefined ? parsePortRange(flags.enginePorts) : undefined,
    stateDir: flags.stateDir ?? defaultStateDir(),
    memoryLimitBytes: flags.memoryLimit !== undefined ? positive(parseSize(flags.memoryLimit, '--memory-limit'), '--memory-limit') : undefined,
    budgetBytes: flags.budget !== undefined ? positive(parseSize(flags.budget, '--budget'), '--budget') : undefined,
    bandwidthBytesPerSecond: flags.bandwidth !== undefined ? parseBandwidth(flags.bandwidth) : undefined,
    bindHost: bind,
    mdns,
    mdnsInterface: flags.mdnsInterface,
    modelsDirs: modelsDirs(flags.modelsDir ?? []),
    renewCheckMs: 1000 * parseInteger(flags.renewCheck, '--renew-check', 1, 86_400),
  };
}

function positive(n: number, what: string): number {
  if (n <= 0) throw new UsageError(`invalid ${what}: must be more than 0 bytes`);
  return n;
}

async function runNode(flags: NodeFlags): Promise<void> {
  scrubArgv();
  const parsed = parseFlags(flags);
  const token = await readJoinToken(flags);
  const log = createLogger('orchard-node', process.env.ORCHARD_DEBUG ? 'debug' : undefined);
  const calibration = await nodeCalibration(!!flags.calibrate, parsed.enginePorts, log);
  const agent = new NodeAgent({
    ...parsed,
    probe: async (o) => withCalibration(await probeHardware(o), calibration),
    readLive: readLiveStats,
    binaries: () => findLlamaBinaries(),
    log,
  });

  // Signals are handled before start so a TERM during start-up still stops cleanly.
  let signalled = 0;
  let stopRequested: () => void = () => {};
  const stopped = new Promise<void>((resolve) => {
    stopRequested = resolve;
  });
  const onSignal = (sig: NodeJS.Signals) => {
    signalled += 1;
    if (signalled === 1) {
      log.info({ signal: sig }, 'stopping: engines get SIGTERM, then SIGKILL after the grace period');
      stopRequested();
    } else {
      log.warn({ signal: sig }, 'second signal: killing engines now');
      agent.killEngines();
      process.exit(130);
    }
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('SIGHUP', onSignal); // terminal closed: stop in order rather than die at once

  const membershipAbort = new AbortController();
  void stopped.then(() => membershipAbort.abort());
  try {
    const { nodeId } = await loadOrCreateIdentity(parsed.stateDir);
    const plan = { stateDir: parsed.stateDir, nodeId, token, coordinator: flags.join, mdns: parsed.mdns, mdnsInterface: parsed.mdnsInterface, signal: membershipAbort.signal, log };
    const joining = ensureJoined(plan);
    joining.catch(() => undefined); // a refusal after a stop signal is nobody's business
    // A signal while the node is still looking for its coordinator ends the search.
    const tls = await Promise.race([joining, stopped.then(() => undefined)]);
    if (membershipAbort.signal.aborted) return;
    if (!tls && flags.join !== undefined) throw new UsageError('--join needs a join token the first time (ORCHARD_NODE_TOKEN or --token-file; `orchard coordinator token` prints one)');
    const ready = await agent.start();
    printReady(ready, parsed.bindHost, !!flags.json);
    void keepMembership({
      ...plan,
      agent,
      agentAddress: flags.join !== undefined ? agentAdvertiseAddress(flags.advertiseHost ?? parsed.bindHost, ready.grpcPort) : undefined,
      checkMs: parsed.renewCheckMs,
      onRefused: (message) => {
        log.error({ err: message }, 'the coordinator refused this node');
        process.exitCode = 1;
        stopRequested();
      },
    });
    log.info({ nodeId: ready.nodeId, grpcPort: ready.grpcPort, metricsPort: ready.metricsPort }, 'node agent ready');
    await stopped;
    membershipAbort.abort();
    await agent.stop();
    if (flags.json) process.stdout.write(`${JSON.stringify({ event: 'stopped', nodeId: ready.nodeId })}\n`);
  } finally {
    await agent.stop();
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    process.off('SIGHUP', onSignal);
  }
}

/**
 * The engines run with ORCHARD_RPC_THREADS threads (the coordinator's setting, which local
 * clusters pass to their agents too), else every core: the measurement is for that many.
 * Measured on --calibrate, and again at start-up when the cached figure was taken while other
 * processes wanted the engine's cores (calibration.ts `measuredUnderContention`): such a figure
 * describes the sharing, not the engine (the demo model's decode moved 27–94 tok/s between
 * seconds-apart samples on this 2-core VM as other work came and went). Otherwise the agent never
 * measures on its own: a measurement competes with whatever else runs.
 */
async function nodeCalibration(measure: boolean, enginePorts: PortRange | undefined, log: ReturnType<typeof createLogger>): Promise<Calibration | undefined> {
  const threads = process.env.ORCHARD_RPC_THREADS ? parseInteger(process.env.ORCHARD_RPC_THREADS, 'ORCHARD_RPC_THREADS', 1, 1024) : availableParallelism();
  const cached = measure ? undefined : await loadCalibration(threads);
  // A file handed over (ORCHARD_CALIBRATION_FILE: `orchard demo`, the benches) was measured for
  // this run under its load on purpose, and is used as it is.
  const handed = !!process.env.ORCHARD_CALIBRATION_FILE;
  if (!measure && (!cached || handed || !measuredUnderContention(cached, cached.cores))) return cached;
  if (cached) log.warn({ competingCores: cached.competingCores, cores: cached.cores }, 'the cached calibration was measured while other processes used the engine\'s cores: measuring again');
  log.info({ threads }, 'calibrating: measuring this machine\'s engine (up to half a minute)');
  // Its engines take their ports where the agent's will: from this node's engine port range.
  const c = await measureCalibration(threads, process.env, { ports: new EnginePortAllocator(engineRangeOf(enginePorts)) });
  log.info({ calibration: c }, 'calibrated');
  if (measuredUnderContention(c, c.cores)) log.warn({ competingCores: c.competingCores, cores: c.cores }, 'other processes used the engine\'s cores during the calibration: its figure is low; the next start measures again');
  return c;
}

function printReady(ready: AgentReady, bind: string, json: boolean): void {
  const p = ready.profile;
  if (json) {
    process.stdout.write(
      `${JSON.stringify({ event: 'ready', nodeId: ready.nodeId, name: ready.name, grpcPort: ready.grpcPort, metricsPort: ready.metricsPort, tunnelPort: ready.tunnelPort ?? 0, bind, pid: process.pid })}\n`,
    );
    return;
  }
  if (!process.stdout.isTTY) {
    process.stdout.write(`orchard node ${ready.name} (${ready.nodeId}) ready: gRPC ${bind}:${ready.grpcPort}, metrics ${bind}:${ready.metricsPort}\n`);
    return;
  }
  const t = new Table({ head: ['node', ready.name], style: { compact: true } });
  t.push(
    ['id', ready.nodeId],
    ['chip', p.chip],
    ['cores', `${p.performanceCores}P + ${p.efficiencyCores}E${p.gpuCores ? `, ${p.gpuCores} GPU` : ''}`],
    ['memory', formatBytes(p.memoryBytes)],
    ['wired limit', formatBytes(p.wiredLimitBytes)],
    ['usable budget', formatBytes(p.budgetBytes)],
    ['bandwidth', formatBandwidth(p.bandwidthBytesPerSecond)],
    ['measured', p.effectiveBandwidthBytesPerSecond ? `${formatBandwidth(p.effectiveBandwidthBytesPerSecond)} decode, ${((p.prefillFlopsPerSecond ?? 0) / 1e9).toFixed(0)} GFLOP/s prefill` : 'not calibrated (orchard node --calibrate)'],
    ['os', `${p.os} ${p.osVersion}`],
    ['engines', p.engines.length > 0 ? p.engines.join(', ') : 'none (run `orchard setup`)'],
    ['gRPC', `${bind}:${ready.grpcPort}`],
    ['metrics', `http://${bind}:${ready.metricsPort}/metrics`],
    ['engine ports', p.enginePorts ? `127.0.0.1:${p.enginePorts[0]}-${p.enginePorts[1]}` : '?'],
    ['tunnel', ready.tunnelPort !== undefined ? `${bind}:${ready.tunnelPort} (TLS 1.3, cluster certificates)` : 'none (no cluster credentials yet)'],
  );
  process.stdout.write(`${t.toString()}\n`);
}
