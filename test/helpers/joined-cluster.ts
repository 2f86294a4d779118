import { join } from 'node:path';
import { expect } from 'vitest';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import type { CoordinatorClient } from '../../src/coordinator/api/client.ts';
import { joinToken } from './join.ts';
import { killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, sleep, spawnProc } from './processes.ts';

/**
 * The cluster most integration and security tests start: one `orchard coordinator` with its
 * state dir in `dir/coord`, a join token, and `orchard node` agents joined statically with it
 * (`--join` + ORCHARD_NODE_TOKEN in the environment, never on the command line), all real
 * processes without mDNS. `env` carries ORCHARD_COORDINATOR_STATE_DIR, so the CLI trusts the
 * coordinator by its CA and finds its local admin key, as on the coordinator's own machine.
 * Every process started here is in `procs` and goes with `stop()`.
 */
export interface JoinedAgent {
  readonly name: string;
  readonly proc: Proc;
  readonly nodeId: string;
  /** host:port of its gRPC API. */
  readonly address: string;
  readonly ready: Record<string, unknown>;
}

export interface JoinedClusterOptions {
  /** Folder for the state dirs (`coord`, one per agent by name); the caller owns it. */
  readonly dir: string;
  /** The children's environment (engines, log format…); ORCHARD_COORDINATOR_STATE_DIR is added. */
  readonly env: NodeJS.ProcessEnv;
  /** The agents' --bind (default 127.0.0.1). */
  readonly bind?: string | undefined;
  /** The agents' --models-dir (default `dir`). */
  readonly modelsDir?: string | undefined;
}

export class JoinedCluster {
  readonly dir: string;
  readonly stateDir: string;
  readonly env: NodeJS.ProcessEnv;
  readonly procs: Proc[] = [];
  readonly agents = new Map<string, JoinedAgent>();
  coordinator: Proc | undefined;
  grpcAddress = '';
  httpAddress = '';
  token = '';
  readonly #bind: string;
  readonly #modelsDir: string;

  constructor(o: JoinedClusterOptions) {
    this.dir = o.dir;
    this.stateDir = join(o.dir, 'coord');
    this.env = { ...o.env, ORCHARD_COORDINATOR_STATE_DIR: this.stateDir };
    this.#bind = o.bind ?? '127.0.0.1';
    this.#modelsDir = o.modelsDir ?? o.dir;
  }

  /** Start (or start again, after a kill) the coordinator on this state dir; its ready line. */
  async startCoordinator(args: readonly string[] = [], label = 'coordinator'): Promise<Record<string, unknown>> {
    const p = this.spawn(label, [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', this.stateDir, '--json', ...args]);
    this.coordinator = p;
    const ready = await readyLine(p);
    this.grpcAddress = `127.0.0.1:${String(ready.grpcPort)}`;
    this.httpAddress = `127.0.0.1:${String(ready.httpPort)}`;
    return ready;
  }

  /** A join token good for `uses` first joins (an agent that joined once needs none again). */
  async mintToken(uses: number): Promise<string> {
    this.token = await joinToken(this.stateDir, uses);
    return this.token;
  }

  /** Start (or restart: same state dir, same node id) agent `name`, joined with the token. */
  async startAgent(name: string, extra: readonly string[] = [], env: NodeJS.ProcessEnv = this.env): Promise<JoinedAgent> {
    const args = [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', this.#bind, '--name', name, '--state-dir', join(this.dir, name), '--models-dir', this.#modelsDir, '--json', '--join', this.grpcAddress, ...extra];
    const proc = this.spawn(`node ${name}`, args, { ...env, ORCHARD_NODE_TOKEN: this.token });
    const ready = await readyLine(proc);
    const agent = { name, proc, nodeId: String(ready.nodeId), address: `${this.#bind}:${String(ready.grpcPort)}`, ready };
    this.agents.set(name, agent);
    return agent;
  }

  /** A child process that `stop()` ends with the rest. */
  spawn(name: string, args: string[], env: NodeJS.ProcessEnv = this.env): Proc {
    const p = spawnProc(name, args, env);
    this.procs.push(p);
    return p;
  }

  /** `orchard status --json` against this coordinator. */
  async status<T = { nodes: { state: string }[] }>(): Promise<T> {
    const r = await orchard(['status', '--json', '--coordinator', this.grpcAddress], this.env);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as T;
  }

  /** Wait (bounded) until `n` nodes are up: joins announce themselves a moment after the agents are ready. */
  async waitUp(n: number, timeoutMs = 20_000): Promise<void> {
    const until = Date.now() + timeoutMs;
    while ((await this.status()).nodes.filter((x) => x.state === 'up').length < n && Date.now() < until) await sleep(200);
  }

  /** An in-process gRPC client of the coordinator, as the CLI on its machine makes one. */
  client(): Promise<CoordinatorClient> {
    return localCoordinatorClient(this.grpcAddress, this.stateDir);
  }

  async stop(): Promise<void> {
    await Promise.all(this.procs.splice(0).map(killGroup));
  }
}

/** Coordinator, a token for `agents.length` joins (or `tokenUses`), and the agents, one after another. */
export async function startJoinedCluster(
  o: JoinedClusterOptions & { readonly agents: readonly string[]; readonly agentArgs?: readonly string[]; readonly coordinatorArgs?: readonly string[]; readonly tokenUses?: number },
): Promise<JoinedCluster> {
  const c = new JoinedCluster(o);
  await c.startCoordinator(o.coordinatorArgs);
  await c.mintToken(o.tokenUses ?? o.agents.length);
  for (const name of o.agents) await c.startAgent(name, o.agentArgs);
  return c;
}

/**
 * Greedy token ids of one streamed gRPC Generate through a coordinator; closes the client. The
 * oracle side of the tests that compare a split (or resumed, or failed-over) model with one engine.
 */
export async function greedyTokenIds(client: CoordinatorClient, request: { model: string; prompt: string; maxTokens: number }): Promise<number[]> {
  const tokens: number[] = [];
  try {
    for await (const ev of client.stream('generate', { ...request, temperature: 0 })) {
      if (ev.event === 'token') tokens.push(...((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number));
    }
  } finally {
    client.close();
  }
  return tokens;
}
