import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { CoordinatorClient } from '../../src/coordinator/api/client.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import { canConnect } from '../../src/node/ports.ts';
import { killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, sleep, spawnProc } from '../../test/helpers/processes.ts';

/**
 * What the benches that run a real cluster share: the tests' process helper
 * (test/helpers/processes.ts: own process group, ready line, group kill) plus a registry that
 * kills every group on exit, error and Ctrl-C, a coordinator with agents that join it, a model
 * load. Statistics and flags: ./stats.ts.
 */

export { ORCHARD_BIN, sleep };

/** Until `host:port` accepts connections (ggml-rpc-server prints nothing useful when piped). */
export async function waitForPort(host: string, port: number, timeoutMs: number, what: string, alive: () => boolean = () => true): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await canConnect(host, port))) {
    if (!alive()) throw new Error(`${what} exited before listening on ${port}`);
    if (Date.now() > deadline) throw new Error(`${what} not listening on ${port} within ${timeoutMs / 1000} s`);
    await sleep(50);
  }
}

/** Every process a bench starts; `killAll` on every way out. */
export class BenchProcesses {
  readonly #procs: Proc[] = [];

  constructor() {
    process.once('SIGINT', () => {
      void this.killAll().finally(() => process.exit(130));
    });
  }

  start(name: string, args: string[], env: NodeJS.ProcessEnv = process.env, file = process.execPath): Proc {
    const p = spawnProc(name, args, env, file);
    this.#procs.push(p);
    return p;
  }

  async killAll(): Promise<void> {
    await Promise.all(this.#procs.splice(0).map(killGroup));
  }
}

/** The environment the benches' agents and coordinators run with: these engines, one thread each. */
export function benchEnv(binDir: string): NodeJS.ProcessEnv {
  return { ...process.env, ORCHARD_LLAMA_BIN_DIR: binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
}

/** `orchard testmodel gguf --out FILE …args`. */
export async function writeTestModel(file: string, args: readonly string[], env: NodeJS.ProcessEnv): Promise<string> {
  const r = await orchard(['testmodel', 'gguf', '--out', file, ...args], env);
  if (r.code !== 0) throw new Error(`orchard testmodel gguf failed: ${r.stderr}`);
  return file;
}

export interface BenchCluster {
  readonly client: CoordinatorClient;
  readonly coordinatorAddress: string;
  readonly token: string;
  /** The coordinator's state dir (CA, admin key): a bench that calls an agent directly issues itself coordinator credentials from it. */
  readonly coordinatorDir: string;
  /** Each agent's gRPC address, in the order of `nodes`. */
  readonly agents: readonly string[];
  /** Each agent's process, in the order of `nodes` (for benches that inject faults). */
  readonly agentProcs: readonly Proc[];
  /** host:port of the coordinator's HTTP API (/metrics, /v1). */
  readonly httpAddress: string;
}

/** A coordinator on 127.0.0.1 and one agent per node that joins it statically (no mDNS). */
export async function startBenchCluster(
  procs: BenchProcesses,
  o: { readonly dir: string; readonly env: NodeJS.ProcessEnv; readonly nodes: readonly { name: string; budget?: string }[]; readonly coordinatorArgs?: readonly string[] },
): Promise<BenchCluster> {
  const common = ['--no-mdns', '--grpc-port', '0', '--json'];
  const coordDir = join(o.dir, 'coord');
  const coord = procs.start('coordinator', [ORCHARD_BIN, 'coordinator', ...common, '--http-port', '0', '--host', '127.0.0.1', '--state-dir', coordDir, ...(o.coordinatorArgs ?? [])], o.env);
  const ready = await readyLine(coord);
  const coordinatorAddress = `127.0.0.1:${String(ready.grpcPort)}`;
  // A real join: a token with one use per node, sent by the nodes themselves (pin, CSR, certificate).
  const { token } = await (await new StateDir(coordDir).joinTokens()).create({ uses: o.nodes.length, ttlMs: 10 * 60_000 });
  const agents: string[] = [];
  const agentProcs: Proc[] = [];
  for (const n of o.nodes) {
    const p = procs.start(n.name, agentArgs(o.dir, n, coordinatorAddress), { ...o.env, ORCHARD_NODE_TOKEN: token });
    agentProcs.push(p);
    agents.push(`127.0.0.1:${String((await readyLine(p)).grpcPort)}`);
  }
  const client = await localCoordinatorClient(coordinatorAddress, coordDir);
  for (let i = 0; i < 100; i++) {
    if ((((await client.unary('status', {})).nodes ?? []) as unknown[]).length === o.nodes.length) break;
    await sleep(200);
  }
  return { client, coordinatorAddress, token, coordinatorDir: coordDir, agents, agentProcs, httpAddress: `127.0.0.1:${String(ready.httpPort)}` };
}

/**
 * `orchard node` joining the coordinator statically; the same state dir again = the same node id
 * and its certificate (a restart needs no token). The first start gets the token in ORCHARD_NODE_TOKEN.
 */
export function agentArgs(dir: string, n: { name: string; budget?: string }, coordinatorAddress: string): string[] {
  const budget = n.budget ? ['--budget', n.budget] : [];
  return [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--json', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', n.name, ...budget, '--state-dir', join(dir, n.name), '--models-dir', dir, '--join', coordinatorAddress];
}

export interface LoadedStage {
  readonly firstLayer: number;
  readonly lastLayer: number;
}

/** Coordinator.Load, streamed to the end; the stages of the ready model. */
export async function loadModel(client: CoordinatorClient, modelPath: string, name: string, ctx: number): Promise<LoadedStage[]> {
  let stages: LoadedStage[] = [];
  for await (const p of client.stream('load', { modelPath, name, options: { ctx, cacheType: 'f16', parallel: 1, pin: [] }, engine: '' })) {
    if (p.phase === 'failed') throw new Error(String(p.message));
    if (p.phase === 'ready') {
      stages = ((p.model as Record<string, unknown>).stages as LoadedStage[]).map((s) => ({ firstLayer: Number(s.firstLayer), lastLayer: Number(s.lastLayer) }));
    }
  }
  return stages;
}

/**
 * Run a bench in a fresh temporary folder: print its result as JSON (one line with --json), and
 * on every way out kill every process it started and remove the folder; a failure exits 1.
 */
export async function runBench(name: string, procs: BenchProcesses, jsonOut: boolean, body: (dir: string) => Promise<object>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), `orchard-bench-${name}-`));
  try {
    const result = await body(dir);
    process.stdout.write(jsonOut ? `${JSON.stringify(result)}\n` : `${JSON.stringify(result, null, 2)}\n`);
  } catch (err) {
    process.stderr.write(`bench:${name} failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  } finally {
    await procs.killAll();
    await rm(dir, { recursive: true, force: true });
  }
}
