/**
 * bench:nats — what the event path adds: an agent's event from the moment its engine supervisor
 * reports it to the moment the coordinator has taken it into account. Real pieces end to end on
 * this machine: a nats-server started by the coordinator's launcher with the cluster's
 * credentials (TLS client certificates, per-identity permissions: coordinator/nats/auth.ts), the
 * agent's publisher (node/event-bus.ts) connected with a node certificate from its state dir, and
 * the coordinator's AgentBus (coordinator/nats/agent-bus.ts) connected with the coordinator's
 * certificate, validating each event and applying it (Registry.busSeen on the node, registered
 * as up). Each event is an `engine.started` the supervisor emits; the clock is this process's
 * monotonic one, read at the emit and in the coordinator's listener. Bounded: `--events` events
 * (default 500) `--interval-ms` apart (default 5) after 20 warm-up ones.
 *
 * JSON: {eventLatencyMs: {p50, p99, count}, failover: {trials, secondsP50, secondsMax, reloads, …}, …}:
 * `failover` is bench/lib/nats-failover.ts (two coordinators, three agents, a model loaded; the
 * leader SIGKILLed `--trials` times, 0 = skip). The load average is printed: numbers taken under
 * load say so.
 * Usage: npm run bench:nats -- [--json] [--events 500] [--interval-ms 5] [--trials 5]
 */
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { connect } from '@nats-io/transport-node';
import { Membership } from '../src/coordinator/membership/membership.ts';
import { DEFAULT_REGISTRY_OPTIONS } from '../src/coordinator/membership/registry.ts';
import { AgentBus } from '../src/coordinator/nats/agent-bus.ts';
import { natsAuthorization, writeNatsServerTls } from '../src/coordinator/nats/auth.ts';
import { findNatsServer, startLocalNats } from '../src/coordinator/nats/server.ts';
import { AgentEventBus } from '../src/node/event-bus.ts';
import { EngineSupervisor } from '../src/node/supervisor.ts';
import { createClusterCa, createKeyAndCsr, issueCertificate } from '../src/shared/pki/certificates.ts';
import { natsClientTls } from '../src/shared/pki/nats-tls.ts';
import { loadOrCreateNodeKey, saveNodeCertificate } from '../src/shared/pki/store.ts';
import { createLogger } from '../src/shared/log.ts';
import { studioProfile } from '../test/helpers/profiles.ts';
import { measureFailover } from './lib/nats-failover.ts';
import { numberFlag, quantile } from './lib/stats.ts';

const argv = process.argv.slice(2);
const JSON_OUT = argv.includes('--json');
const EVENTS = numberFlag(argv, '--events', 500);
const INTERVAL_MS = numberFlag(argv, '--interval-ms', 5);
const TRIALS = numberFlag(argv, '--trials', 5);
const WARMUP = 20;
const CLUSTER = 'bench-nats';
const NODE = 'bench-node';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function credentials(dir: string) {
  const ca = await createClusterCa(CLUSTER);
  const c = await createKeyAndCsr('coordinator');
  const coordinator = { keyPem: c.keyPem, certPem: (await issueCertificate(ca, c.csrPem, { role: 'coordinator', expectId: 'coordinator' })).certPem, caCertPem: ca.certPem };
  // The node's state dir as a join leaves it: its own key, its certificate, the CA.
  const nodeDir = join(dir, 'node');
  const { csrPem } = await loadOrCreateNodeKey(nodeDir, NODE);
  await saveNodeCertificate(nodeDir, (await issueCertificate(ca, csrPem, { role: 'node', expectId: NODE })).certPem, ca.certPem);
  return { ca, coordinator, nodeDir };
}

async function measure(binary: string, dir: string): Promise<number[]> {
  const log = createLogger('bench-nats', 'warn');
  const { ca, coordinator, nodeDir } = await credentials(dir);
  const tls = await writeNatsServerTls(join(dir, 'nats', 'tls'), ca);
  const server = await startLocalNats({ stateDir: dir, binary, auth: { tls, authorization: natsAuthorization(CLUSTER, [NODE]) } });
  const nc = await connect({ servers: server.url, tls: natsClientTls(coordinator) });
  const membership = new Membership(DEFAULT_REGISTRY_OPTIONS, log);
  membership.registry.connected({ profile: studioProfile({ nodeId: NODE, name: NODE }), address: '127.0.0.1:1', discoveredBy: 'join', session: 's' }, Date.now());
  const bus = new AgentBus({ nc, clusterId: CLUSTER, urls: [server.url], server, log });
  const sentAt = new Map<string, number>();
  const latencies: number[] = [];
  bus.onEvent((e) => {
    const t0 = e.kind === 'engine.started' ? sentAt.get(e.engineId) : undefined;
    if (t0 !== undefined) latencies.push(performance.now() - t0);
  });
  bus.follow(membership);
  await nc.flush();
  const supervisor = new EngineSupervisor({ binaries: () => Promise.reject(new Error('bench:nats starts no engines')), log });
  const live = async () => ({ availableBytes: 1, memoryPressure: 'normal' as const, thermalState: 'nominal' as const, timestampSeconds: 0 });
  const agent = new AgentEventBus({ stateDir: nodeDir, nodeId: NODE, clusterId: CLUSTER, supervisor, live, log, healthIntervalMs: 60_000 });
  agent.setServers([server.url]);
  const emit = (engineId: string) => {
    sentAt.set(engineId, performance.now());
    supervisor.emit('started', { engineId, kind: 'rpc-server', host: '127.0.0.1', port: 1, pid: 1, model: '', startedAtSeconds: 0, argv: [] });
  };
  try {
    // Until the agent is connected its events are dropped (core NATS): probe until one arrives.
    const connectBy = Date.now() + 20_000;
    for (let i = 0; latencies.length === 0; i++) {
      if (Date.now() > connectBy) throw new Error('the agent never got an event through in 20 s');
      emit(`probe${i}`);
      await sleep(100);
    }
    latencies.length = 0;
    for (let i = 0; i < WARMUP + EVENTS; i++) {
      emit(`e${i}`);
      await sleep(INTERVAL_MS);
    }
    const deadline = Date.now() + 5000;
    while (latencies.length < WARMUP + EVENTS && Date.now() < deadline) await sleep(20);
    return latencies.slice(WARMUP);
  } finally {
    await agent.close();
    await bus.close();
    membership.close();
    await nc.close();
    await server.stop();
  }
}

async function main(): Promise<void> {
  const binary = findNatsServer();
  if (!binary) throw new Error('bench:nats needs nats-server (`npx orchard setup --nats`, or apt install nats-server)');
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-nats-'));
  const loadBefore = loadavg()[0];
  try {
    const ms = await measure(binary, dir);
    const failover = TRIALS > 0 ? await measureFailover({ trials: TRIALS }) : undefined;
    const round = (x: number) => Math.round(x * 1000) / 1000;
    const out = {
      bench: 'nats',
      natsServer: { binary, version: execFileSync(binary, ['--version'], { encoding: 'utf8' }).trim() },
      eventLatencyMs: { p50: round(quantile(ms, 0.5)), p99: round(quantile(ms, 0.99)), count: ms.length },
      intervalMs: INTERVAL_MS,
      failover,
      loadAverage1m: { before: loadBefore, after: loadavg()[0] },
    };
    if (JSON_OUT) process.stdout.write(`${JSON.stringify(out)}\n`);
    else process.stdout.write(`event path (agent publish → coordinator applied): p50 ${out.eventLatencyMs.p50} ms, p99 ${out.eventLatencyMs.p99} ms over ${ms.length} events (${out.natsServer.version}, load ${loadBefore?.toFixed(1)})\n${failover ? `failover: p50 ${failover.secondsP50} s, max ${failover.secondsMax} s over ${failover.trials} trials, ${failover.reloads} reloads\n` : ''}`);
  } finally {
    await rm(dir, { recursive: true, force: true, maxRetries: 30, retryDelay: 100 });
  }
}

await main();
