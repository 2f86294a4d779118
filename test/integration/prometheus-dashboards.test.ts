import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { prometheusTargets } from '../../src/coordinator/api/prometheus-sd.ts';
import { findLlamaBinaries } from '../../src/node/llama/binaries.ts';
import { NodeMetrics } from '../../src/node/metrics.ts';
import { EngineWatchdog } from '../../src/node/watchdog.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import type { HardwareProfile } from '../../src/shared/hardware.ts';
import { CATALOGUE, findMetric } from '../../src/shared/metrics/catalogue.ts';
import { dashboardQueries, dashboardSchema, labelValuesQuery, substituteVariables } from '../../src/shared/metrics/dashboards.ts';
import { metricNamesInExpr } from '../../src/shared/metrics/promql.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { joinToken } from '../helpers/join.ts';
import { freePort, killGroup, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { testGguf } from '../helpers/test-models.ts';

/**
 * A REAL Prometheus (Debian's `prometheus` binary) on 127.0.0.1, configured only with an
 * HTTP-SD URL, discovers and scrapes an Orchard cluster; then every PromQL expression of every
 * dashboard panel is evaluated through Prometheus's HTTP API with the dashboard variables
 * substituted by the values Prometheus reports for them, and must return data.
 *
 * The cluster is live (`startLiveCluster`): a real coordinator, two `orchard node` agents, a
 * generated GGUF split over both by the planner and served by real llama.cpp engines, and
 * completions through the OpenAI API while Prometheus scrapes. Running cluster already up?
 * `ORCHARD_PROMETHEUS_SD_URL=http://127.0.0.1:<http-port>/v1/prometheus/targets` makes this
 * test use it instead (`externalCluster`) with the same assertions.
 */

const ROOT = resolve(import.meta.dirname, '..', '..');

interface ScrapedCluster {
  /** URL of the coordinator's HTTP-SD endpoint. */
  readonly sdUrl: string;
  /** Targets Prometheus must discover (coordinator + nodes). */
  readonly targets: number;
  /** `/metrics` URLs to lint with promtool. */
  readonly metricsUrls: readonly string[];
  stop(): Promise<void>;
}

/** A cluster someone else runs: every target its SD endpoint lists must be discovered and scraped. */
async function externalCluster(sdUrl: string): Promise<ScrapedCluster> {
  const groups = (await (await fetch(sdUrl)).json()) as { targets: string[] }[];
  const targets = groups.flatMap((g) => g.targets);
  return { sdUrl, targets: targets.length, metricsUrls: targets.map((t) => `http://${t}/metrics`), stop: async () => {} };
}

function profile(nodeId: string, name: string, chip: string, memGiB: number, bandwidthGBs: number): HardwareProfile {
  return {
    nodeId,
    name,
    hostname: `${name}.local`,
    os: 'macos',
    osVersion: '15.2',
    chip,
    performanceCores: 12,
    efficiencyCores: 4,
    gpuCores: 40,
    memoryBytes: memGiB * 2 ** 30,
    bandwidthBytesPerSecond: bandwidthGBs * 1e9,
    wiredLimitBytes: memGiB * 0.75 * 2 ** 30,
    budgetBytes: memGiB * 0.7 * 2 ** 30,
    engines: ['llama.cpp'],
    interfaces: [],
    protocolVersion: '1',
    agentVersion: '0.1.0',
  };
}

const BIN = join(ROOT, 'bin', 'orchard.js');

/** `orchard ARGS` in its own process group, so stopping it also stops the engines an agent forked. */
function startProc(name: string, args: string[], env: NodeJS.ProcessEnv): Proc {
  return spawnProc(name, [BIN, ...args], env);
}

function runCli(args: string[], env: NodeJS.ProcessEnv): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { env, encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/**
 * A live cluster on 127.0.0.1: a real coordinator and two `orchard node` agents (child
 * processes, static join with the cluster token), budgets a hair below what one node needs so
 * the planner must split a generated 8-layer GGUF over both, the model loaded through the CLI
 * (real ggml-rpc-server + llama-server), and completions through the OpenAI API for as long as
 * the cluster runs (plus a burst beyond the single slot with --max-queue 0: "rejected" as busy),
 * so the rate() and histogram_quantile() panels see moving counters.
 */
async function startLiveCluster(): Promise<ScrapedCluster> {
  const bins = await findLlamaBinaries();
  const dir = mkdtempSync(join(tmpdir(), 'orchard-prom-cluster-'));
  const env: NodeJS.ProcessEnv = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
  const procs: Proc[] = [];
  let running = true;
  let traffic: Promise<void> = Promise.resolve();
  const stop = async () => {
    running = false;
    await traffic;
    await Promise.all(procs.splice(0).map(killGroup));
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const model = await testGguf(['--layers', '8', '--seed', '7']);
    const single = planPlacement(modelProfile(await readGgufHeader(model)), [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx: 2048 });
    const budget = Math.floor(single.stages[0]!.bytes.total) - 2 * 2 ** 20;
    env.ORCHARD_COORDINATOR_STATE_DIR = join(dir, 'coord'); // the CLI trusts the coordinator by its state dir
    const coordinator = startProc('coordinator', ['coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--max-queue', '0', '--json'], env);
    procs.push(coordinator);
    const ready = await readyLine(coordinator);
    const token = await joinToken(join(dir, 'coord'), 2);
    const coordAddr = `127.0.0.1:${String(ready.grpcPort)}`;
    const http = `127.0.0.1:${String(ready.httpPort)}`;
    const nodeMetrics: string[] = [];
    for (const name of ['studio', 'mini']) {
      const p = startProc(`node ${name}`, ['node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', join(dir, name), '--models-dir', dir, '--json', '--join', coordAddr], { ...env, ORCHARD_NODE_TOKEN: token });
      procs.push(p);
      nodeMetrics.push(`http://127.0.0.1:${String((await readyLine(p)).metricsPort)}/metrics`);
    }
    await until('both nodes up', 30_000, async () => {
      const s = (await (await fetch(`http://${http}/status`)).json()) as { nodes: { state: string }[] };
      return s.nodes.filter((n) => n.state === 'NODE_STATE_UP').length === 2 ? true : undefined;
    });
    const load = runCli(['load', model, '--ctx', '2048', '--name', 'm8', '--coordinator', coordAddr], env);
    if (load.status !== 0) throw new Error(`load: ${load.stderr}`);
    const complete = (body: object) =>
      fetch(`http://${http}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }).then((r) => r.text().then(() => r.status));
    const first = await complete({ model: 'm8', prompt: 'Once upon a time', max_tokens: 12, temperature: 0 });
    if (first !== 200) throw new Error(`completion: HTTP ${first}`);
    // The OpenAI layer refuses an unknown model itself (404, before the runtime); with one slot
    // and --max-queue 0, concurrent requests beyond the first are refused by the runtime (429):
    // those are the "rejected" outcome.
    if ((await complete({ model: 'no-such-model', prompt: 'x', max_tokens: 4 })) !== 404) throw new Error('unknown model was not refused');
    // One real recovery, so the self-healing panels have data: SIGKILL the worker's rpc-server;
    // the model goes recovering, is re-placed and served again (the recovery histogram observes it).
    const rpc = workerRpcServers(procs.map((q) => q.child.pid!));
    if (rpc.length === 0) throw new Error('no rpc-server among the agents\' children');
    for (const pid of rpc) process.kill(pid, 'SIGKILL');
    await until('the model recovered', 90_000, async () => (coordinator.err.includes('model instance recovered') ? true : undefined));
    const burst = await Promise.all([0, 1, 2, 3].map((i) => complete({ model: 'm8', prompt: `Burst ${i}`, max_tokens: 32, temperature: 0 })));
    if (!burst.includes(429)) throw new Error(`no request was refused as busy: ${burst.join(', ')}`);
    traffic = (async () => {
      for (let i = 0; running; i++) {
        await complete({ model: 'm8', prompt: `Request ${i}: the quick brown fox`, max_tokens: 12, temperature: 0 }).catch(() => 0);
        await sleep(300);
      }
    })();
    return { sdUrl: `http://${http}/v1/prometheus/targets`, targets: 3, metricsUrls: [`http://${http}/metrics`, ...nodeMetrics], stop };
  } catch (err) {
    const logs = procs.map((p) => `${p.name}: ${p.err.slice(-1500)}`).join('\n');
    await stop();
    throw new Error(`${String(err)}\n${logs}`);
  }
}

/** Pids of the ggml rpc-servers below the given processes (the agents' engines). */
function workerRpcServers(roots: number[]): number[] {
  const rows = spawnSync('ps', ['-eo', 'pid=,ppid=,comm='], { encoding: 'utf8' }).stdout.trim().split('\n');
  const procs = rows.map((r) => r.trim().split(/\s+/)).map(([pid, ppid, comm]) => ({ pid: Number(pid), ppid: Number(ppid), comm: comm ?? '' }));
  const below = new Set(roots);
  for (let grew = true; grew; ) {
    grew = false;
    for (const q of procs) {
      if (below.has(q.ppid) && !below.has(q.pid)) {
        below.add(q.pid);
        grew = true;
      }
    }
  }
  return procs.filter((q) => below.has(q.pid) && /rpc-server/.test(q.comm)).map((q) => q.pid);
}

interface PromResponse<T> {
  status: 'success' | 'error';
  data: T;
  error?: string;
}
type Sample = { metric: Record<string, string>; value: [number, string] };

let cluster: ScrapedCluster | undefined;
let prometheus: ChildProcess | undefined;
// The node agent's sentinel: if this test process is SIGKILLed, Prometheus is killed too.
let watchdog: EngineWatchdog | undefined;
let promUrl = '';
let promLog = '';
const workDir = mkdtempSync(join(tmpdir(), 'orchard-prometheus-'));

async function api<T>(path: string): Promise<T> {
  const res = await fetch(`${promUrl}${path}`);
  const body = (await res.json()) as PromResponse<T>;
  if (body.status !== 'success') throw new Error(`${path}: ${body.error ?? res.status}`);
  return body.data;
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}\nprometheus log:\n${promLog.slice(-3000)}`);
}

function stopPrometheus(): Promise<void> {
  const p = prometheus;
  prometheus = undefined;
  if (!p || p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolveStop) => {
    const kill = setTimeout(() => {
      try {
        process.kill(-p.pid!, 'SIGKILL');
      } catch {}
    }, 5000);
    p.once('exit', () => {
      clearTimeout(kill);
      watchdog?.remove(p.pid!); // never signal a recycled pid
      resolveStop();
    });
    try {
      process.kill(-p.pid!, 'SIGTERM'); // its own process group (detached)
    } catch {
      clearTimeout(kill);
      resolveStop();
    }
  });
}

beforeAll(async () => {
  try {
    const external = process.env.ORCHARD_PROMETHEUS_SD_URL;
    cluster = external ? await externalCluster(external) : await startLiveCluster();
    const port = await freePort();
    promUrl = `http://127.0.0.1:${port}`;
    const config = join(workDir, 'prometheus.yml');
    // Generated, not deploy/prometheus/prometheus.yml: same job shape (one http_sd_configs
    // entry), but 1 s intervals so the test needs seconds, not minutes.
    writeFileSync(
      config,
      [
        'global:',
        '  scrape_interval: 1s',
        '  evaluation_interval: 1s',
        'scrape_configs:',
        '  - job_name: orchard',
        '    scrape_timeout: 1s',
        '    honor_labels: true',
        '    http_sd_configs:',
        `      - url: ${cluster.sdUrl}`,
        '        refresh_interval: 1s',
        '',
      ].join('\n'),
    );
    prometheus = spawn(
      'prometheus',
      [`--config.file=${config}`, `--storage.tsdb.path=${join(workDir, 'data')}`, `--web.listen-address=127.0.0.1:${port}`, '--log.level=warn', '--web.enable-lifecycle'],
      { detached: true, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    prometheus.stdout!.on('data', (d: Buffer) => {
      promLog += d.toString();
    });
    prometheus.stderr!.on('data', (d: Buffer) => {
      promLog += d.toString();
    });
    const spawned = prometheus;
    await new Promise<void>((ok, fail) => {
      spawned.once('spawn', ok);
      spawned.once('error', fail);
    });
    watchdog = new EngineWatchdog();
    watchdog.add(spawned.pid!);
    await until('prometheus ready', 60_000, async () => ((await fetch(`${promUrl}/-/ready`)).ok ? true : undefined));
  } catch (err) {
    await stopPrometheus();
    watchdog?.close();
    watchdog = undefined;
    await cluster?.stop();
    throw err;
  }
});

afterAll(async () => {
  await stopPrometheus();
  watchdog?.close();
  await cluster?.stop();
  rmSync(workDir, { recursive: true, force: true });
});

describe('a real Prometheus scraping Orchard', () => {
  it('every /metrics passes promtool check metrics with no lint warnings', async () => {
    for (const url of cluster!.metricsUrls) {
      const text = await (await fetch(url)).text();
      const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
      expect(r.error).toBeUndefined();
      expect(`${r.stdout}${r.stderr}`.trim(), url).toBe('');
      expect(r.status, url).toBe(0);
    }
    // promtool does flag bad exposition (the check can fail).
    const bad = spawnSync('promtool', ['check', 'metrics'], { input: '# HELP x_count a\n# TYPE x_count counter\nx_count 1\n', encoding: 'utf8' });
    expect(bad.status).not.toBe(0);
  });

  it('discovers the coordinator and every node through HTTP-SD and scrapes them all', async () => {
    const targets = await until('all targets up', 60_000, async () => {
      const d = await api<{ activeTargets: { labels: Record<string, string>; health: string; scrapeUrl: string }[] }>('/api/v1/targets?state=active');
      return d.activeTargets.length === cluster!.targets && d.activeTargets.every((t) => t.health === 'up') ? d.activeTargets : undefined;
    });
    const roles = targets.map((t) => t.labels['role']).sort();
    expect(roles).toEqual(['coordinator', ...Array(cluster!.targets - 1).fill('node')]);
    for (const t of targets.filter((x) => x.labels['role'] === 'node')) {
      expect(t.labels['node']).toBeTruthy();
      expect(t.labels['chip']).toBeTruthy();
    }
    // No label collided with a target label (would show up as exported_*).
    const collided = await api<string[]>('/api/v1/labels');
    expect(collided.filter((l) => l.startsWith('exported_'))).toEqual([]);
  });

  it('evaluates every PromQL expression of every dashboard panel with data', async () => {
    // rate()/increase() need two samples of every series in the window (targets are scraped at
    // different offsets), histogram_quantile a non-zero rate.
    await until('three scrapes of every target and moving request counters', 60_000, async () => {
      const scrapes = await api<{ result: Sample[] }>(`/api/v1/query?query=${encodeURIComponent('count_over_time(up[1m]) >= 3')}`);
      const moving = await api<{ result: Sample[] }>(`/api/v1/query?query=${encodeURIComponent('sum(rate(orchard_requests_total[1m])) > 0')}`);
      return scrapes.result.length === cluster!.targets && moving.result.length > 0 ? true : undefined;
    });
    const files = readdirSync(join(ROOT, 'dashboards')).filter((f) => f.endsWith('.json'));
    expect(files.length).toBeGreaterThanOrEqual(3);
    const evaluated: string[] = [];
    const failures: string[] = [];
    for (const f of files) {
      const d = dashboardSchema.parse(JSON.parse(readFileSync(join(ROOT, 'dashboards', f), 'utf8')));
      // Variables get the values Prometheus knows for them (what Grafana's dropdown would show, all selected).
      const values: Record<string, string[]> = {};
      for (const v of d.templating.list) {
        const lv = labelValuesQuery(v)!;
        const vals = await api<string[]>(`/api/v1/label/${lv.label}/values?match[]=${encodeURIComponent(lv.metric)}`);
        if (vals.length === 0) failures.push(`${d.uid}: variable $${v.name} (label_values(${lv.metric}, ${lv.label})) has no values`);
        values[v.name] = vals;
      }
      for (const q of dashboardQueries(d)) {
        const where = `${d.uid} / ${q.panel} / ${q.refId}`;
        for (const name of metricNamesInExpr(q.expr)) {
          if (name !== 'up' && !findMetric(name)) failures.push(`${where}: queries ${name}, which the catalogue does not declare`);
        }
        const expr = substituteVariables(q.expr, values);
        try {
          const r = await api<{ resultType: string; result: Sample[] }>(`/api/v1/query?query=${encodeURIComponent(expr)}`);
          const finite = r.result.filter((s) => Number.isFinite(Number(s.value[1])));
          if (finite.length === 0) failures.push(`${where}: no data (${r.result.length} series, none finite) for ${expr}`);
          else evaluated.push(where);
        } catch (err) {
          failures.push(`${where}: ${String(err)} for ${expr}`);
        }
      }
    }
    expect(failures).toEqual([]);
    expect(evaluated.length).toBeGreaterThanOrEqual(30);
  });

  it('every catalogue metric the live cluster exports reached Prometheus', async () => {
    // orchard_rpc_bytes_total has samples only once a tunnel carried bytes; this cluster's agents
    // hold no cluster credentials, so they run no tunnel (test/security/engine-network covers it).
    const expected = CATALOGUE.filter((d) => d.name !== 'orchard_rpc_bytes_total');
    const names = new Set(await api<string[]>('/api/v1/label/__name__/values'));
    for (const d of expected) expect(names.has(d.type === 'histogram' ? `${d.name}_bucket` : d.name), d.name).toBe(true);
    // And Prometheus parsed the exposition types the catalogue declares.
    const meta = await api<Record<string, { type: string }[]>>('/api/v1/metadata');
    for (const d of expected) expect(meta[d.name]?.[0]?.type, d.name).toBe(d.type);
  });

  it('the live model is placed on both nodes, and the engine-verified bytes sit next to the prediction', async () => {
    if (process.env.ORCHARD_PROMETHEUS_SD_URL) return; // an external cluster has other models
    const q = async (expr: string) => (await api<{ result: Sample[] }>(`/api/v1/query?query=${encodeURIComponent(expr)}`)).result;
    const layers = await q('orchard_stage_layers{model="m8"}');
    expect(layers.map((s) => s.metric['node']).sort()).toEqual(['mini', 'studio']);
    expect(layers.reduce((t, s) => t + Number(s.value[1]), 0)).toBe(8);
    // Weights are exact from the GGUF; llama.cpp pads tensors a little (engine-verify: 2 % / 1 MiB).
    const ratio = await q('orchard_stage_actual_bytes{model="m8",kind="weights"} / on (model, node, kind) orchard_stage_predicted_bytes{model="m8",kind="weights"}');
    expect(ratio).toHaveLength(2);
    for (const s of ratio) expect(Math.abs(Number(s.value[1]) - 1), JSON.stringify(s.metric)).toBeLessThan(0.05);
    const outcomes = Object.fromEntries((await q('sum by (outcome) (orchard_requests_total{model="m8"})')).map((s) => [s.metric['outcome'], Number(s.value[1])]));
    expect(outcomes['ok'], JSON.stringify(outcomes)).toBeGreaterThanOrEqual(2);
    expect(outcomes['error'], JSON.stringify(outcomes)).toBe(0);
    // The burst beyond the slot was refused as busy; the unknown model minted no series.
    expect(outcomes['rejected'], JSON.stringify(outcomes)).toBeGreaterThanOrEqual(1);
    expect(await q('orchard_requests_total{model="no-such-model"}')).toEqual([]);
    expect(Number((await q('sum(orchard_time_to_first_token_seconds_count{model="m8"})'))[0]?.value[1]), 'TTFT observations').toBeGreaterThanOrEqual(2);
    expect(Number((await q('sum(orchard_nodes{state="up"})'))[0]?.value[1])).toBe(2);
    expect(Number((await q('orchard_discovery_events_total{kind="added"}'))[0]?.value[1])).toBe(2);
    // Node identity on the node's own info series agrees with the SD target labels.
    for (const s of await q('orchard_node_info')) expect(s.metric['name']).toBe(s.metric['node']);
  });

  it('the SD answer Prometheus read is exactly prometheusTargets() of the cluster', async () => {
    const served = await (await fetch(cluster!.sdUrl)).json();
    expect(served).toEqual(
      prometheusTargets({
        coordinatorAddress: new URL(cluster!.sdUrl).host,
        nodes: (served as { targets: string[]; labels: Record<string, string> }[])
          .filter((g) => g.labels['role'] === 'node')
          .map((g) => ({ nodeId: g.labels['node_id']!, name: g.labels['node']!, chip: g.labels['chip']!, metricsAddress: g.targets[0] })),
      }),
    );
  });
});

/**
 * The node agent's real metrics class (src/node/metrics.ts), scraped as text: its orchard_*
 * families must be catalogue metrics of the declared type, and its exposition must lint clean.
 */
describe('the node agent\'s own /metrics', () => {
  async function agentExposition(): Promise<string> {
    const p = profileForAgent();
    const m = new NodeMetrics({
      profile: () => p,
      live: () => ({ availableBytes: p.memoryBytes / 2, memoryPressure: 'normal', thermalState: 'nominal', timestampSeconds: 0 }),
      engines: () => [{ engineId: 'e1', kind: 'rpc-server', host: '127.0.0.1', port: 50052, pid: 1, model: 'm', startedAtSeconds: 0, argv: [] }],
      rpcBytes: async () => [{ peer: 'id-head', sent: 4096, received: 1 << 20 }],
      links: () => [{ peer: 'id-head', sample: { rttSeconds: 0.0004, bytesPerSecond: 117e6 } }],
    });
    return m.registry.metrics();
  }
  function profileForAgent(): HardwareProfile {
    return profile('id-agent', 'agent', 'Apple M3 Max', 128, 400);
  }

  it('exports only catalogue metrics, with the declared types', async () => {
    const text = await agentExposition();
    const families = [...text.matchAll(/^# TYPE (orchard_\w+) (\w+)$/gm)].map((m) => ({ name: m[1]!, type: m[2]! }));
    expect(families.length).toBeGreaterThanOrEqual(8);
    for (const f of families) {
      const d = findMetric(f.name);
      expect(d, `${f.name} is not in the catalogue`).toBeDefined();
      expect(d!.type, f.name).toBe(f.type);
      expect(d!.exportedBy, f.name).toBe('node');
    }
  });

  // prom-client's own defaults would fail this (nodejs_active_*_total gauges); the agent uses
  // collectProcessMetrics from the catalogue's factories, which drops them.
  it('passes promtool check metrics with no lint warnings', async () => {
    const r = spawnSync('promtool', ['check', 'metrics'], { input: await agentExposition(), encoding: 'utf8' });
    expect(`${r.stdout}${r.stderr}`.trim()).toBe('');
    expect(r.status).toBe(0);
  });
});
