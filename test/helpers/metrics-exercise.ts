import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoordinatorMetrics, observeGeneration } from '../../src/coordinator/api/metrics.ts';
import type { GenerateEvent, ModelStatus } from '../../src/coordinator/instances/runtime.ts';
import { Membership } from '../../src/coordinator/membership/membership.ts';
import type { EngineSpec } from '../../src/node/engine-spec.ts';
import { NodeMetrics } from '../../src/node/metrics.ts';
import { EngineSupervisor } from '../../src/node/supervisor.ts';
import { EngineTunnels } from '../../src/node/tunnel/engine-tunnels.ts';
import { createClusterCa, createKeyAndCsr, issueCertificate } from '../../src/shared/pki/certificates.ts';
import { connect, createServer } from 'node:net';
import type { HardwareProfile } from '../../src/shared/hardware.ts';
import { createLogger } from '../../src/shared/log.ts';
import { type MetricSample, samplesFromRegistry } from '../../src/shared/metrics/activity.ts';
import { studioProfile } from './profiles.ts';

/**
 * Drive the code that sets Orchard's metrics the way a running cluster does, then read every
 * sample back. Node side: the agent's NodeMetrics wired to a real EngineSupervisor (`follow`, as
 * the agent does) that starts, stops and loses (SIGKILL) real child processes — a tiny TCP
 * listener (on the Unix socket the supervisor names) stands in for ggml-rpc-server, because the
 * supervisor only needs "accepts connections". Coordinator side: CoordinatorMetrics on a real Membership whose registry sees
 * nodes join and go suspect, a verified two-stage placement, requests through observeGeneration
 * (what MeteredRuntime.generate wraps every request in) and a refusal at the HTTP edge.
 * Used by the catalogue test (every metric set) and the dashboards test (no panel on an idle
 * metric).
 */

const log = createLogger('metrics-exercise', 'silent');

/** The node the exercise reports (also the fixture of the catalogue's factory tests). */
// A calibrated node (orchard node --calibrate): its measured rates are exported too.
export const PROFILE: HardwareProfile = studioProfile({ engines: ['llama.cpp'], protocolVersion: '1', effectiveBandwidthBytesPerSecond: 512e9, prefillFlopsPerSecond: 16e12, decodeFixedSecondsPerToken: 0.004, boundaryOverheadSeconds: 0.0012, decodeAttentionFlopsPerSecond: 2e12 });

/** Stands in for ggml-rpc-server: listens on the socket `-H unix:<path>` names until it is signalled. */
const FAKE_RPC_SERVER = `#!${process.execPath}
const a = process.argv;
require('node:net').createServer((s) => s.destroy()).listen(a[a.indexOf('-H') + 1].slice('unix:'.length));
`;

function rpcSpec(model: string): EngineSpec {
  return { kind: 'rpc-server', engineId: '', port: 0, threads: 0, devices: [], cacheDir: '', model, readyTimeoutMs: 10_000, owner: '' };
}

export async function exerciseNodeMetrics(): Promise<MetricSample[]> {
  const dir = mkdtempSync(join(tmpdir(), 'orchard-metrics-'));
  const rpcServer = join(dir, 'ggml-rpc-server');
  writeFileSync(rpcServer, FAKE_RPC_SERVER);
  chmodSync(rpcServer, 0o755);
  const supervisor = new EngineSupervisor({ binaries: async () => ({ llamaServer: join(dir, 'absent'), rpcServer }), log, stopGraceMs: 2000 });
  const tunnels = await tunnelledBytes();
  const metrics = new NodeMetrics({
    profile: () => PROFILE,
    live: () => ({ availableBytes: 100 * 2 ** 30, memoryPressure: 'warn', thermalState: 'nominal', timestampSeconds: 1 }),
    engines: () => supervisor.list(),
    rpcBytes: () => tunnels.head.bytes(),
    links: () => tunnels.head.links(),
  });
  metrics.follow(supervisor);
  try {
    const stopped = await supervisor.start(rpcSpec('m8'));
    await supervisor.stop(stopped.engineId, ''); // expected exit
    const crashed = await supervisor.start(rpcSpec('m8'));
    const crash = new Promise((r) => supervisor.once('exited', r));
    process.kill(crashed.pid, 'SIGKILL'); // an exit the agent did not ask for
    await crash;
    await supervisor.start(rpcSpec('m8')); // running at scrape time: orchard_engine_up
    return samplesFromRegistry(await metrics.registry.getMetricsAsJSON());
  } finally {
    await supervisor.shutdown();
    await tunnels.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * A head agent's tunnels after one exchange with a worker agent's rpc-server (an echo server on
 * 127.0.0.1 registered as an engine): real TLS 1.3 with cluster certificates, real counters.
 */
async function tunnelledBytes(): Promise<{ head: EngineTunnels; close(): Promise<void> }> {
  const ca = await createClusterCa('metrics-exercise');
  const creds = async (id: string) => {
    const { keyPem, csrPem } = await createKeyAndCsr(id);
    return { keyPem, certPem: (await issueCertificate(ca, csrPem, { role: 'node', expectId: id })).certPem, caCertPem: ca.certPem };
  };
  const worker = new EngineTunnels({ nodeId: 'worker', credentials: await creds('worker'), host: '127.0.0.1', port: 0, log });
  const head = new EngineTunnels({ nodeId: PROFILE.nodeId, credentials: await creds(PROFILE.nodeId), host: '127.0.0.1', port: 0, log });
  const engine = createServer((s) => s.pipe(s));
  await new Promise<void>((r) => engine.listen(0, '127.0.0.1', () => r()));
  const enginePort = (engine.address() as { port: number }).port;
  await worker.start();
  worker.enginePorts.register(enginePort, 'rpc-echo');
  const [endpoint] = await head.endpoints('head', [{ nodeId: 'worker', tunnel: { host: '127.0.0.1', port: worker.port! }, enginePort }]);
  await new Promise<void>((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port: Number(endpoint!.split(':')[1]) });
    s.once('data', () => s.end(resolve));
    s.once('error', reject);
    s.write('ggml-rpc hello');
  });
  // what the coordinator asks of an agent when nodes join: probe the peer's tunnel
  const [probe] = await head.measureLinks([{ nodeId: 'worker', tunnel: { host: '127.0.0.1', port: worker.port! } }]);
  if (!probe || !('sample' in probe)) throw new Error(`link probe failed: ${JSON.stringify(probe)}`);
  return {
    head,
    close: async () => {
      await head.close();
      await worker.close();
      await new Promise<void>((r) => engine.close(() => r()));
    },
  };
}

const MiB = 2 ** 20;

function placedModel(): ModelStatus {
  const stage = (nodeName: string, firstLayer: number, lastLayer: number) => ({
    nodeId: `id-${nodeName}`,
    nodeName,
    firstLayer,
    lastLayer,
    bytes: { weights: 100 * MiB, kv: 2 * MiB, compute: 3 * MiB, overhead: 4 * MiB, total: 109 * MiB },
    budgetBytes: 1e9,
    endpoint: '',
  });
  const device = (nodeName: string, layers: string) => ({ device: `RPC0[${nodeName}]`, nodeName, plannedLayers: layers, actualLayers: layers, actual: { model: 101 * MiB, kv: 2 * MiB, compute: 5 * MiB } });
  return {
    name: 'm8',
    path: '/m/m8.gguf',
    state: 'ready',
    engine: 'llama',
    stages: [stage('alpha', 0, 3), stage('bravo', 4, 7)],
    error: '',
    predictedTokensPerSecond: 42,
    options: { ctx: 2048, cacheType: 'f16', parallel: 1, pin: [], parallelism: 'auto' },
    verification: { ok: true, problems: [], devices: [device('alpha', '0-3'), device('bravo', '4-7')], host: { model: 15 * MiB, kv: 0, compute: 9 * MiB } },
  };
}

async function* stream(clock: { t: number }): AsyncGenerator<GenerateEvent> {
  for (const [t, id] of [
    [100, 1],
    [130, 2],
  ] as const) {
    clock.t = t;
    yield { kind: 'token', text: `t${id}`, tokenIds: [id] };
  }
  clock.t = 131;
  yield { kind: 'done', finishReason: 'length', promptTokens: 5, completionTokens: 2, timings: { promptMs: 90, predictedMs: 30, promptTokensPerSecond: 55, predictedTokensPerSecond: 33, firstTokenMs: 100 } };
}

function profile(nodeId: string, name: string): HardwareProfile {
  return { ...PROFILE, nodeId, name, hostname: name };
}

export async function exerciseCoordinatorMetrics(): Promise<MetricSample[]> {
  const membership = new Membership({ suspectAfterMs: 2000, downAfterMs: 5000 }, log);
  try {
    const models = [placedModel()];
    const cm = new CoordinatorMetrics({
      version: '0.0.0',
      membership,
      processMetrics: false,
      runtime: () => ({ models: () => models, slotUsage: () => [{ model: 'm8', running: 1, queued: 1 }] }),
    });
    // What Membership does with each registry change (its #apply): emit it.
    const reg = membership.registry;
    for (const c of reg.connected({ profile: profile('id-alpha', 'alpha'), address: '127.0.0.1:1', discoveredBy: 'join', session: 's1' }, 0)) membership.emit('change', c);
    for (const c of reg.connected({ profile: profile('id-bravo', 'bravo'), address: '127.0.0.1:2', discoveredBy: 'join', session: 's2' }, 0)) membership.emit('change', c);
    for (const c of reg.disconnected('id-bravo', 's2', 10)) membership.emit('change', c);
    const clock = { t: 0 };
    for await (const _ of observeGeneration(cm.metrics, 'm8', stream(clock), () => clock.t)) {
      // drain: the client reads the whole stream
    }
    cm.refused('m8', 429);
    // What the runtime reports when an instance heals and a stream resumes (follow() wires these).
    cm.recovered('m8', 'node-down', 12.5);
    cm.streamResumed('m8');
    return samplesFromRegistry(await cm.registry.getMetricsAsJSON());
  } finally {
    membership.close();
  }
}
