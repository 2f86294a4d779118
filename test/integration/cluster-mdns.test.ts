import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { findLlamaBinaries, type LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { describeWith, networkNamespaces } from '../helpers/needs.ts';
import { joinToken } from '../helpers/join.ts';
import { deleteNamespaces, linkNamespaces } from '../helpers/netns.ts';
import { ORACLE_PROMPT, plainLlamaTokens } from '../helpers/oracle.ts';
import { testGguf } from '../helpers/test-models.ts';

/*
 * The Bonjour variant of the cluster test: nodes are found by mDNS, never joined by hand. Two
 * network namespaces this test creates (and deletes) joined by a veth pair: the coordinator in
 * one, three node agents in the other, each advertising `_orchard._tcp` on the veth address.
 * Nothing runs mDNS on the host's interfaces. Greedy tokens through the cluster must equal one
 * plain llama-server on the same file (run on the host's loopback, no mDNS involved).
 */

const execFileP = promisify(execFile);
const ROOT = new URL('../..', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');
const CTX = 2048;
const PROMPT = ORACLE_PROMPT;
const N_PREDICT = 32;

const netns = networkNamespaces();

const tag = randomBytes(3).toString('hex');
const NS_COORD = `orch-cc-${tag}`;
const NS_NODES = `orch-cn-${tag}`;
const VETH_COORD = `cc${tag}`;
const VETH_NODES = `cn${tag}`;
const NODES_IP = '10.78.0.1';
const COORD_IP = '10.78.0.2';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Proc {
  readonly child: ChildProcess;
  out: string;
  err: string;
  readonly exited: Promise<void>;
}
const procs: Proc[] = [];

function startIn(ns: string | undefined, file: string, args: string[], env: NodeJS.ProcessEnv): Proc {
  const [cmd, argv] = ns ? ['ip', ['netns', 'exec', ns, file, ...args]] : [file, args];
  const child = spawn(cmd as string, argv as string[], { cwd: ROOT, detached: true, stdio: ['ignore', 'pipe', 'pipe'], env });
  const p: Proc = { child, out: '', err: '', exited: new Promise((r) => child.once('exit', () => r())) };
  child.stdout?.on('data', (b: Buffer) => {
    p.out += b.toString();
  });
  child.stderr?.on('data', (b: Buffer) => {
    p.err += b.toString();
    if (p.err.length > 1_000_000) p.err = p.err.slice(-500_000);
  });
  procs.push(p);
  return p;
}

async function readyLine(p: Proc): Promise<Record<string, unknown>> {
  for (let i = 0; i < 600; i++) {
    const line = p.out.split('\n').find((l) => l.includes('"event":"ready"'));
    if (line) return JSON.parse(line) as Record<string, unknown>;
    if (p.child.exitCode !== null) throw new Error(`exited early: ${p.err.slice(-2000)}`);
    await sleep(100);
  }
  throw new Error(`not ready: ${p.err.slice(-2000)}`);
}

async function orchardIn(ns: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP('ip', ['netns', 'exec', ns, process.execPath, BIN, ...args], { cwd: ROOT, env, maxBuffer: 16 * 2 ** 20 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: typeof err.code === 'number' ? err.code : 1, stdout: err.stdout, stderr: err.stderr };
  }
}

describeWith([netns], 'cluster over Bonjour inside network namespaces', () => {
  let dir = '';
  let nsCreated = false;
  let bins: LlamaBinaries;
  let env: NodeJS.ProcessEnv;
  let model = '';
  let coordLocal = '';
  let oracle: number[] = [];

  beforeAll(async () => {
    bins = await findLlamaBinaries();
    dir = await mkdtemp(join(tmpdir(), 'orchard-cluster-mdns-'));
    env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    delete env.ORCHARD_COORDINATOR;
    // This variant runs llama-server at DEBUG verbosity, so verification reads the engine's own
    // per-layer assignment lines (the static-join test covers the default: ranges from KV sizes).
    env.ORCHARD_ENGINE_DEBUG_LOG = '1';
    model = await testGguf(['--layers', '8', '--seed', '11'], 'm8.gguf'); // loaded without --name: named m8

    nsCreated = true;
    linkNamespaces({ ns: NS_COORD, veth: VETH_COORD, ip: COORD_IP }, { ns: NS_NODES, veth: VETH_NODES, ip: NODES_IP });

    const profile = modelProfile(await readGgufHeader(model));
    const single = planPlacement(profile, [{ name: 'x', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9 }], { ctx: CTX });
    const budget = Math.floor(single.stages[0]!.bytes.total) - 2 * 2 ** 20;

    // The CLI in the coordinator's namespace trusts it by its state dir (CA, local admin key).
    env.ORCHARD_COORDINATOR_STATE_DIR = join(dir, 'coord');
    const coord = startIn(NS_COORD, process.execPath, [BIN, 'coordinator', '--grpc-port', '0', '--http-port', '0', '--mdns-interface', COORD_IP, '--state-dir', join(dir, 'coord'), '--json'], env);
    coordLocal = `127.0.0.1:${String((await readyLine(coord)).grpcPort)}`;
    // Zero-config join: each node finds the coordinator over Bonjour (_orchard-coord._tcp, the
    // token's CA fingerprint), pins its CA, and joins with the token; no address is given.
    const token = await joinToken(join(dir, 'coord'), 3);
    for (const name of ['mdns-a', 'mdns-b', 'mdns-c']) {
      const n = startIn(NS_NODES, process.execPath, [BIN, 'node', '--grpc-port', '0', '--metrics-port', '0', '--bind', NODES_IP, '--mdns-interface', NODES_IP, '--name', name, '--budget', String(budget), '--state-dir', join(dir, name), '--models-dir', dir, '--json'], { ...env, ORCHARD_NODE_TOKEN: token });
      await readyLine(n);
    }

    // the oracle, on the host's loopback
    oracle = await plainLlamaTokens(bins, { model, ctx: CTX, prompt: PROMPT, nPredict: N_PREDICT, threads: 2 });
  });

  afterAll(async () => {
    for (const p of procs.splice(0)) {
      try {
        if (p.child.pid && p.child.exitCode === null) process.kill(-p.child.pid, 'SIGKILL');
      } catch {
        // gone
      }
      await p.exited;
    }
    if (nsCreated) deleteNamespaces(NS_COORD, NS_NODES);
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('finds the three agents by Bonjour, loads over ≥ 2 stages and matches one plain llama-server', async () => {
    let nodes: { name: string; state: string; address: string; discoveredBy: string }[] = [];
    for (let i = 0; i < 60; i++) {
      const s = await orchardIn(NS_COORD, ['status', '--json', '--coordinator', coordLocal], env);
      expect(s.code, s.stderr).toBe(0);
      nodes = (JSON.parse(s.stdout) as { nodes: typeof nodes }).nodes;
      if (nodes.filter((n) => n.state === 'up').length === 3) break;
      await sleep(500);
    }
    expect(nodes.map((n) => n.name).sort()).toEqual(['mdns-a', 'mdns-b', 'mdns-c']);
    for (const n of nodes) {
      expect(n.discoveredBy).toBe('mdns');
      expect(n.address.startsWith(`${NODES_IP}:`)).toBe(true);
    }
    const load = await orchardIn(NS_COORD, ['load', model, '--ctx', String(CTX), '--coordinator', coordLocal], env);
    expect(load.code, load.stderr).toBe(0);
    const s = JSON.parse((await orchardIn(NS_COORD, ['status', '--json', '--coordinator', coordLocal], env)).stdout) as {
      models: { state: string; stages: { endpoint: string }[] }[];
    };
    expect(s.models[0]!.state).toBe('ready');
    expect(s.models[0]!.stages.length).toBeGreaterThanOrEqual(2);
    // engines listen on loopback only, never on the cluster (veth) address: the three agents share
    // one namespace here, so the head reaches the workers' rpc-servers there (across hosts that
    // traffic is for the agents' TLS tunnels)
    // (the rpc-servers on Unix sockets in their agents' private dirs, a head on 127.0.0.1)
    for (const st of s.models[0]!.stages) expect(st.endpoint === '' || st.endpoint.startsWith('127.0.0.1:') || st.endpoint.startsWith('unix:/'), st.endpoint).toBe(true);
    const g = await orchardIn(NS_COORD, ['generate', '--prompt', PROMPT, '--max-tokens', String(N_PREDICT), '--temperature', '0', '--json', '--coordinator', coordLocal], env);
    expect(g.code, g.stderr).toBe(0);
    const tokens = (JSON.parse(g.stdout) as { tokens: number[] }).tokens;
    expect(new Set(tokens).size).toBeGreaterThan(5);
    expect(tokens).toEqual(oracle);
    const u = await orchardIn(NS_COORD, ['unload', 'm8', '--coordinator', coordLocal], env);
    expect(u.code, u.stderr).toBe(0);
  });
});
