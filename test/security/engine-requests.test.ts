import { randomBytes } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, readlinkSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { findLlamaBinaries, type LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { CLUSTER_CHANNEL_OPTIONS, clusterChannelCredentials, type TlsCredentials } from '../../src/shared/pki/grpc-tls.ts';
import { orchardV1 } from '../../src/shared/proto.ts';
import { joinToken } from '../helpers/join.ts';
import { describeWith, llamaEngines, type Need } from '../helpers/needs.ts';
import { AGENT_ENV, type Agent, alive, coordinatorCredentials, grpcError, startAgent, startEngine, stopAll, unary } from '../helpers/node-agent.ts';
import { plainLlamaTokens } from '../helpers/oracle.ts';
import { canConnect, killGroup, orchard, type Proc, readyLine, spawnProc } from '../helpers/processes.ts';
import { SecretAudit } from '../helpers/secret-audit.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';

/*
 * Red team against StartEngine / PrepareCache / StopEngine with a real agent (issue #12, items 3,
 * 4 and 6). The attacker is a gRPC client on 127.0.0.1 that can call the agent (authentication is
 * another part's): it must not be able to write a file, load code into an engine, point an engine
 * at a path outside the agent's roots, exceed the node's budget, or stop someone else's engine.
 * Then a real two-stage cluster: no engine port answers on a non-loopback address of this machine,
 * and greedy tokens through the cluster still equal one plain llama-server (the oracle).
 */

const engines = await llamaEngines();
const CTX = 2048;
const PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time';
const N_PREDICT = 24;

let tmp: string;
let outside: string; // a directory outside every root of the agent
let canary: string;
let canaryBytes: Buffer;
let models: string;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'orchard-sec-engines-'));
  outside = join(tmp, 'outside');
  models = join(tmp, 'models');
  mkdirSync(outside);
  mkdirSync(models);
  canary = join(outside, 'canary.txt');
  canaryBytes = randomBytes(64);
  writeFileSync(canary, canaryBytes);
});

afterAll(async () => {
  stopAll();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

const LLAMA = { context: 512, parallel: 1, kvUnified: true, cacheType: 'f16', ubatch: 512, flashAttention: true, gpuLayers: 99 };

describeWith([engines], 'agent edge: typed engine requests, paths inside the roots, owners', () => {
  let agent: Agent;
  let model: string;

  beforeAll(async () => {
    model = join(models, 'tiny.gguf');
    const r = await orchard(['testmodel', 'gguf', '--out', model, '--layers', '2', '--dim', '64', '--ffn', '128', '--heads', '2', '--kv-heads', '2'], AGENT_ENV);
    expect(r.code, r.stderr).toBe(0);
    // The agent's OWN environment carries what must never reach an engine: llama-server honours
    // LLAMA_ARG_LOG_FILE, so an engine that inherited it would overwrite the canary.
    const env = { ...AGENT_ENV, LLAMA_ARG_LOG_FILE: canary, PYTHONSTARTUP: canary, LD_PRELOAD: '' };
    agent = await startAgent(join(tmp, 'state'), ['--models-dir', models, '--budget', String(8 * 2 ** 20)], env);
    symlinkSync(outside, join(models, 'link-out'));
    symlinkSync(canary, join(models, 'canary.gguf'));
  });
  afterAll(() => agent?.client.close());

  const refused = async (method: string, req: unknown, message: RegExp) => {
    const err = await grpcError(unary(agent, method, req));
    expect(err.code, `${JSON.stringify(req)} → ${err.details}`).toBe(grpc.status.INVALID_ARGUMENT);
    expect(err.details).toMatch(message);
  };

  it('env and argument injection is refused with INVALID_ARGUMENT', async () => {
    // On the wire, as a client built on the old schema (or raw bytes) sends them.
    const raw = async (req: Record<string, unknown>, message: RegExp) => {
      const err = await rawStartEngine(agent.ready.grpcPort, req);
      expect(err?.code, `${JSON.stringify(req)} → ${err?.details}`).toBe(grpc.status.INVALID_ARGUMENT);
      expect(err?.details).toMatch(message);
    };
    await raw({ kind: 1, env: { LLAMA_ARG_LOG_FILE: canary } }, /no field env/);
    await raw({ kind: 1, env: { LD_PRELOAD: join(outside, 'evil.so') } }, /no field env/);
    await raw({ kind: 1, env: { DYLD_INSERT_LIBRARIES: join(outside, 'evil.dylib') } }, /no field env/);
    await raw({ kind: 3, env: { PYTHONSTARTUP: canary } }, /no field env/);
    await raw({ kind: 2, args: ['-m', model, '--log-file', canary] }, /no field args/);
    await raw({ kind: 1, bindHost: '0.0.0.0' }, /no field bind_host/);
    await refused('startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, modelPath: model, devices: [`RPC0 --log-file ${canary}`] } }, /devices/);
    await refused('startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, modelPath: model, rpc: [{ nodeId: 'n', tunnelHost: `10.0.0.2 --log-file ${canary}`, tunnelPort: 1, enginePort: 1 }] } }, /tunnel_host/);
    await refused('startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, modelPath: model, cacheType: `f16 --log-file ${canary}` } }, /cacheType/);
    await refused('startEngine', { kind: 'ENGINE_KIND_RPC_SERVER', devices: ['CPU;touch /tmp/x'] }, /device/);
  });

  it('paths outside the roots are refused: absolute, `..`, a symlink out, for every path field', async () => {
    await refused('startEngine', { kind: 'ENGINE_KIND_RPC_SERVER', cacheDir: outside }, /outside this node's roots/);
    await refused('startEngine', { kind: 'ENGINE_KIND_RPC_SERVER', cacheDir: join(models, '..', 'outside', 'c') }, /outside this node's roots/);
    await refused('startEngine', { kind: 'ENGINE_KIND_RPC_SERVER', cacheDir: join(models, 'link-out', 'c') }, /resolves to/);
    await refused('startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, modelPath: canary } }, /outside this node's roots/);
    await refused('startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, modelPath: join(models, 'canary.gguf') } }, /resolves to/);
    await refused('startEngine', { kind: 'ENGINE_KIND_MLX_RANK', mlx: { modelDir: join(models, 'link-out') } }, /resolves to/);
    await refused('startEngine', { kind: 'ENGINE_KIND_MLX_RANK', mlx: { modelDir: '/etc' } }, /outside this node's roots/);
    // PrepareCache would write tensor-cache entries under cache_dir.
    const prep = await new Promise<grpc.ServiceError>((resolve) => {
      const call = agent.client.prepareCache!({ modelSha256: 'a'.repeat(64), modelSizeBytes: '1', firstLayer: 0, lastLayer: 0, cacheDir: join(models, 'link-out') }) as grpc.ClientReadableStream<unknown>;
      call.on('data', () => {});
      call.on('error', resolve);
    });
    expect(prep.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(prep.details).toMatch(/outside this node's roots/);
  });

  it('a start over the node budget is refused', async () => {
    const huge = join(models, 'huge.gguf');
    writeFileSync(huge, '');
    truncateSync(huge, 64 * 2 ** 20); // sparse, 64 MiB > the 8 MiB budget
    await refused('startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, modelPath: huge } }, /over this node's budget/);
  });

  it('an engine gets the allow-listed environment only; StopEngine of another owner is refused', async () => {
    const rpc = await startEngine(agent, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'mine', threads: 1, owner: 'cluster-a', cacheDir: join(tmp, 'state', 'rpc-cache') });
    const environ = readFileSync(`/proc/${rpc.pid}/environ`, 'utf8').split('\0').filter(Boolean);
    const names = environ.map((kv) => kv.slice(0, kv.indexOf('=')));
    expect(names).not.toContain('LLAMA_ARG_LOG_FILE');
    expect(names).not.toContain('PYTHONSTARTUP');
    expect(names).not.toContain('LD_PRELOAD');
    expect(environ).toContain(`LLAMA_CACHE=${join(tmp, 'state', 'rpc-cache')}`);
    // only on its Unix socket in the agent's private directory: nothing on any network interface
    expect(rpc.argv.slice(1, 3)).toEqual(['-H', `unix:${join(tmp, 'state', 'run', 'sockets', `rpc-${rpc.port}.sock`)}`]);

    const foreign = await grpcError(unary(agent, 'stopEngine', { engineId: 'mine', owner: 'cluster-b' }));
    expect(foreign.code).toBe(grpc.status.PERMISSION_DENIED);
    const anonymous = await grpcError(unary(agent, 'stopEngine', { engineId: 'mine' }));
    expect(anonymous.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(alive(rpc.pid)).toBe(true);

    // A head that really runs, from a typed request, with the agent's LLAMA_ARG_LOG_FILE set.
    const head = await startEngine(agent, { kind: 'ENGINE_KIND_LLAMA_SERVER', engineId: 'head', threads: 1, owner: 'cluster-a', llama: { ...LLAMA, modelPath: model, rpc: [{ nodeId: agent.ready.nodeId, enginePort: rpc.port }], devices: ['RPC0'] } });
    expect(alive(head.pid)).toBe(true);
    expect(await unary(agent, 'stopEngine', { engineId: 'head', owner: 'cluster-a' })).toEqual({ stopped: true });
    expect(await unary(agent, 'stopEngine', { engineId: 'mine', owner: 'cluster-a' })).toEqual({ stopped: true });
  });

  it('nothing was started and nothing outside the roots was touched: the canary is byte-identical', async () => {
    expect(readFileSync(canary).equals(canaryBytes)).toBe(true);
    expect(readdirSync(outside)).toEqual(['canary.txt']);
    const d = await unary<{ engines: unknown[] }>(agent, 'describe', {});
    expect(d.engines).toEqual([]);
  });
});

/** StartEngine as the old schema encoded it (bind_host 3, args 8, env 11), sent as raw bytes. */
const OLD_SCHEMA = protobuf.parse(`syntax = "proto3";
message OldStartEngineRequest { int32 kind = 1; string engine_id = 2; string bind_host = 3; repeated string args = 8; map<string, string> env = 11; }`).root.lookupType('OldStartEngineRequest');

async function rawStartEngine(port: number, req: Record<string, unknown>): Promise<grpc.ServiceError | undefined> {
  const client = new grpc.Client(`127.0.0.1:${port}`, clusterChannelCredentials(await coordinatorCredentials(), { role: 'node' }), CLUSTER_CHANNEL_OPTIONS);
  const bytes = Buffer.from(OLD_SCHEMA.encode(OLD_SCHEMA.fromObject(req)).finish());
  return new Promise((resolve) => {
    client.makeUnaryRequest('/orchard.v1.NodeAgent/StartEngine', (b: Buffer) => b, (b: Buffer) => b, bytes, { deadline: Date.now() + 30_000 }, (err) => {
      client.close();
      resolve(err ?? undefined);
    });
  });
}

/** A non-loopback IPv4 address of this machine, if it has one. */
function lanAddress(): string | undefined {
  return Object.values(networkInterfaces())
    .flat()
    .find((a) => a && a.family === 'IPv4' && !a.internal)?.address;
}

const lan = lanAddress();
const lanNeed: Need<unknown> = lan !== undefined ? { ok: true, value: lan } : { ok: false, reason: 'this machine has no non-loopback IPv4 address' };

describeWith([engines, lanNeed], 'cluster engines listen on loopback only; tokens unchanged', () => {
  let bins: LlamaBinaries;
  let env: NodeJS.ProcessEnv;
  let dir: string;
  let model: string;
  let coordAddr: string;
  const procs: Proc[] = [];
  const agentPids: number[] = [];
  const agentAddrs: string[] = [];
  let coordTls: TlsCredentials;
  /** No token, key or private key in any log or `ps` output while this cluster runs. */
  const audit = new SecretAudit();

  beforeAll(async () => {
    audit.start();
    bins = await findLlamaBinaries();
    dir = join(tmp, 'cluster');
    mkdirSync(dir);
    env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    const split = await modelThatMustSplit(['--layers', '8', '--seed', '7'], CTX);
    model = split.model;
    const budget = split.budget;
    // --heal off: this checks that the loss is noticed (failed at once); with healing on the same
    // loss turns the model `recovering` (test/integration/self-heal.test.ts).
    const coord = spawnProc('coordinator', [join(process.cwd(), 'bin/orchard.js'), 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir, 'coord'), '--heal', 'off', '--json'], env);
    procs.push(coord);
    coordAddr = `127.0.0.1:${String((await readyLine(coord)).grpcPort)}`;
    const token = await joinToken(join(dir, 'coord'), 2);
    audit.secret('join token', token);
    audit.log('coordinator', coord);
    env.ORCHARD_COORDINATOR_STATE_DIR = join(dir, 'coord');
    coordTls = await new StateDir(join(dir, 'coord')).coordinatorCredentials();
    for (const name of ['alpha', 'bravo']) {
      const args = [join(process.cwd(), 'bin/orchard.js'), 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name];
      const p = spawnProc(`node ${name}`, [...args, '--budget', String(budget), '--state-dir', join(dir, name), '--models-dir', dir, '--json', '--join', coordAddr], { ...env, ORCHARD_NODE_TOKEN: token });
      procs.push(p);
      audit.log(`node ${name}`, p);
      const ready = await readyLine(p);
      agentPids.push(Number(ready.pid ?? p.child.pid));
      agentAddrs.push(`127.0.0.1:${String(ready.grpcPort)}`);
    }
  });
  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
  });

  it('a two-stage load generates the oracle tokens, and no engine port answers on the LAN address', async () => {
    const oracle = await plainLlamaTokens(bins, { model, ctx: CTX, prompt: PROMPT, nPredict: N_PREDICT, threads: 2 });
    let load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    for (let i = 0; i < 20 && load.code !== 0 && /no node|not enough|does not fit/.test(load.stderr); i++) {
      await new Promise((r) => setTimeout(r, 300)); // the agents' joins may still be settling
      load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    }
    expect(load.code, load.stderr).toBe(0);
    const status = JSON.parse((await orchard(['status', '--json', '--coordinator', coordAddr], env)).stdout) as {
      models: { name: string; state: string; stages: { endpoint: string }[] }[];
    };
    const m = status.models.find((x) => x.name === 'm8')!;
    expect(m.state).toBe('ready');
    expect(m.stages.length).toBeGreaterThanOrEqual(2);
    const g = await orchard(['generate', '--prompt', PROMPT, '--max-tokens', String(N_PREDICT), '--temperature', '0', '--json', '--coordinator', coordAddr], env);
    expect(g.code, g.stderr).toBe(0);
    expect((JSON.parse(g.stdout) as { tokens: number[] }).tokens).toEqual(oracle);

    // Every TCP port an engine of this cluster listens on, from /proc (children of the agents): the
    // llama-server head only — the rpc-servers listen on Unix sockets in their agents' 0700 directories.
    const ports = engineListenPorts(agentPids);
    expect(ports.length).toBeGreaterThanOrEqual(1);
    const rpcServers = engineChildren(agentPids, /rpc-server/);
    expect(rpcServers.length).toBeGreaterThanOrEqual(2);
    expect(engineListenPorts(agentPids, /rpc-server/), 'rpc-servers listen on no TCP port').toEqual([]);
    for (const port of ports) {
      expect(await canConnect('127.0.0.1', port), `127.0.0.1:${port}`).toBe(true);
      expect(await canConnect(lan!, port), `${lan}:${port} must not accept`).toBe(false);
    }
    console.info(`${ports.length} engine ports: open on 127.0.0.1, closed on ${lan}`);
  });

  const modelState = async () => {
    const st = JSON.parse((await orchard(['status', '--json', '--coordinator', coordAddr], env)).stdout) as { models: { name: string; state: string; error?: string }[] };
    return st.models.find((x) => x.name === 'm8');
  };

  it('engine loss is noticed: a foreign StopEngine is refused; a stop its unload did not ask for fails the model at once', async () => {
    const agents = await Promise.all(agentAddrs.map(async (address) => ({ address, engines: (await describeAt(address, coordTls)).engines })));
    const withRpc = agents.find((a) => a.engines.some((e) => e.kind === 'ENGINE_KIND_RPC_SERVER'))!;
    const rpc = withRpc.engines.find((e) => e.kind === 'ENGINE_KIND_RPC_SERVER')!;
    // Not its owner: refused, the engine and the model untouched.
    const foreign = await stopAt(withRpc.address, coordTls, rpc.engineId, 'someone-else').then(() => undefined, (e: grpc.ServiceError) => e);
    expect(foreign?.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(alive(rpc.pid)).toBe(true);
    expect((await modelState())?.state).toBe('ready');
    // The owner's credential used by something other than the model's unload (an "expected" exit
    // on the agent's side): the model must not stay "ready" with a stage gone.
    const clusterId = (JSON.parse(readFileSync(join(dir, 'coord', 'cluster.json'), 'utf8')) as { clusterId: string }).clusterId;
    await stopAt(withRpc.address, coordTls, rpc.engineId, clusterId); // resolves once the engine exited
    const t0 = Date.now();
    let m = await modelState();
    while (m?.state === 'ready' && Date.now() - t0 < 3000) {
      await new Promise((r) => setTimeout(r, 100));
      m = await modelState();
    }
    expect(m?.state).toBe('failed');
    expect(m?.error).toMatch(/rpc-server .* exited/);
    // Each status query is one `orchard status` process (seconds on a loaded 2-core machine).
    console.info(`model seen failed ${Date.now() - t0} ms after the engine's exit, by status queries of ~1-4 s each`);
  });

  it('no token, key or private key in any log or `ps` output while the cluster ran', async () => {
    // the coordinator's CA key and admin key, each node's key (written by the join)
    await audit.expectNoLeaks([join(dir, 'coord'), join(dir, 'alpha'), join(dir, 'bravo')], 4);
  });
});

interface WireEngine {
  engineId: string;
  kind: string;
  pid: number;
}

/** The cluster's agents serve the coordinator role only: the test holds a coordinator certificate of that cluster. */
function agentClient(address: string, tls: TlsCredentials): grpc.Client & Record<string, (...a: unknown[]) => unknown> {
  return new (orchardV1().NodeAgent!)(address, clusterChannelCredentials(tls, { role: 'node' }), CLUSTER_CHANNEL_OPTIONS) as unknown as grpc.Client & Record<string, (...a: unknown[]) => unknown>;
}

function describeAt(address: string, tls: TlsCredentials): Promise<{ engines: WireEngine[] }> {
  const c = agentClient(address, tls);
  return new Promise((resolve, reject) =>
    c.describe!({}, { deadline: Date.now() + 10_000 }, (err: grpc.ServiceError | null, res: { engines: WireEngine[] }) => {
      c.close();
      if (err) reject(err);
      else resolve(res);
    }),
  );
}

function stopAt(address: string, tls: TlsCredentials, engineId: string, owner: string): Promise<unknown> {
  const c = agentClient(address, tls);
  return new Promise((resolve, reject) =>
    c.stopEngine!({ engineId, owner }, { deadline: Date.now() + 15_000 }, (err: grpc.ServiceError | null, res: unknown) => {
      c.close();
      if (err) reject(err);
      else resolve(res);
    }),
  );
}

/** The agents' child processes whose command line matches `kind` (engines). */
function engineChildren(agentPids: readonly number[], kind: RegExp): string[] {
  return readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      return agentPids.includes(ppid) && kind.test(readFileSync(`/proc/${p}/cmdline`, 'utf8'));
    } catch {
      return false;
    }
  });
}

/** TCP ports in LISTEN of the agents' engine children (of `kind`). */
function engineListenPorts(agentPids: readonly number[], kind = /rpc-server|llama-server/): number[] {
  const children = engineChildren(agentPids, kind);
  const inodes = new Set<string>();
  for (const pid of children) {
    for (const fd of readdirSync(`/proc/${pid}/fd`)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSafe(`/proc/${pid}/fd/${fd}`));
        if (m) inodes.add(m[1]!);
      } catch {
        // fd closed meanwhile
      }
    }
  }
  const ports: number[] = [];
  for (const line of readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10 || f[3] !== '0A' || !inodes.has(f[9]!)) continue; // 0A = LISTEN
    const [addr, port] = f[1]!.split(':');
    expect(addr, 'engine bound to a non-loopback address').toBe('0100007F'); // 127.0.0.1
    ports.push(Number.parseInt(port!, 16));
  }
  return ports;
}

function readlinkSafe(p: string): string {
  try {
    return readlinkSync(p);
  } catch {
    return '';
  }
}
