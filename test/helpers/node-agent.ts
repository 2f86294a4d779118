import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { createServer, type Server } from 'node:net';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import type { ClusterCa } from '../../src/shared/pki/certificates.ts';
import { CLUSTER_CHANNEL_OPTIONS, clusterChannelCredentials, type TlsCredentials } from '../../src/shared/pki/grpc-tls.ts';
import { orchardV1 } from '../../src/shared/proto.ts';
import { clientCredentials, enrollNode, testCa } from './cluster-pki.ts';
import { alive, ORCHARD_BIN as BIN } from './processes.ts';

export { alive };

/*
 * The node agent as a real process (`orchard node --json`) driven over real gRPC: start it, call
 * it, stream from it, read its metrics. Every process started here is killed by stopAll()
 * (process groups), also when a test fails.
 */

const execFileP = promisify(execFile);

/** JSON logs whatever the caller's terminal or CI sets: the tests tell log lines from the one human error line. */
export const AGENT_ENV: NodeJS.ProcessEnv = { ...process.env, ORCHARD_LOG_FORMAT: 'json' };

export interface Agent {
  readonly child: ChildProcess;
  /** The CA the agent's certificate is from (undefined: started without joining). */
  readonly ca: ClusterCa | undefined;
  readonly ready: { nodeId: string; name: string; grpcPort: number; metricsPort: number; pid: number };
  readonly client: grpc.Client & Record<string, (...a: unknown[]) => unknown>;
  stderr: string;
  stdout: string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const children: ChildProcess[] = [];
const enginePidsSeen = new Set<number>();

/** Kill `child`'s process group when the file ends (stopAll). */
export function track(child: ChildProcess): void {
  children.push(child);
}

/** afterAll: every agent's process group, and any engine pid a test saw (a failed SIGKILL test could leave one). */
export function stopAll(): void {
  for (const c of children) killGroup(c);
  for (const pid of enginePidsSeen) {
    try {
      if (alive(pid)) process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
}

export function killGroup(child: ChildProcess): void {
  if (child.pid && child.exitCode === null && child.signalCode === null) {
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
}


export function runCli(args: string[], env: NodeJS.ProcessEnv = AGENT_ENV): Promise<{ code: number; stdout: string; stderr: string }> {
  return execFileP(process.execPath, [BIN, ...args], { env, timeout: 60_000 }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

let suiteCa: Promise<ClusterCa> | undefined;
let suiteCoordinator: Promise<TlsCredentials> | undefined;

/** One CA per test file for agents started here, and the coordinator credentials that call them. */
export function agentCa(): Promise<ClusterCa> {
  suiteCa ??= testCa('agent-tests');
  return suiteCa;
}

export function coordinatorCredentials(): Promise<TlsCredentials> {
  suiteCoordinator ??= agentCa().then((ca) => clientCredentials(ca, 'coordinator', 'coordinator'));
  return suiteCoordinator;
}

/** A NodeAgent client with the coordinator's credentials (the only role an agent serves). */
export async function agentClient(address: string, creds?: TlsCredentials): Promise<Agent['client']> {
  const NodeAgent = orchardV1().NodeAgent!;
  const c = creds ?? (await coordinatorCredentials());
  return new NodeAgent(address, clusterChannelCredentials(c, { role: 'node' }), CLUSTER_CHANNEL_OPTIONS) as unknown as Agent['client'];
}

/**
 * `orchard node` as a process. By default its state dir is enrolled first (a node certificate
 * from this file's CA, written the way a join writes it: cluster-pki.ts) and the client calls it
 * as the coordinator over mutual TLS; `{ joined: false }` starts an agent that never joined (it
 * serves nothing; its client is plaintext).
 */
export async function startAgent(stateDir: string, extra: string[] = [], env: NodeJS.ProcessEnv = AGENT_ENV, o: { joined?: boolean; readyTimeoutMs?: number } = {}): Promise<Agent> {
  const ca = o.joined === false ? undefined : await agentCa();
  if (ca) await enrollNode(stateDir, ca);
  const args = [BIN, 'node', '--grpc-port', '0', '--metrics-port', '0', '--json', '--no-mdns', '--bind', '127.0.0.1', '--state-dir', stateDir, ...extra];
  // Own process group so cleanup reaches the agent, its watchdog and its engines at once.
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env });
  children.push(child);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  let stdout = '';
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => {
    stderr += b.toString();
  });
  const ready = await new Promise<Agent['ready']>((resolve, reject) => {
    const readyMs = o.readyTimeoutMs ?? 30_000;
    const timer = setTimeout(() => reject(new Error(`agent not ready in ${readyMs / 1000} s:\n${stderr}`)), readyMs);
    child.stdout?.on('data', (b: Buffer) => {
      stdout += b.toString();
      const line = stdout.split('\n').find((l) => l.startsWith('{"event":"ready"'));
      if (line) {
        clearTimeout(timer);
        resolve(JSON.parse(line) as Agent['ready']);
      }
    });
    void exited.then(({ code }) => reject(new Error(`agent exited (${code}) before ready:\n${stderr}`)));
  });
  const address = `127.0.0.1:${ready.grpcPort}`;
  const client = ca ? await agentClient(address) : (new (orchardV1().NodeAgent!)(address, grpc.credentials.createInsecure()) as unknown as Agent['client']);
  const agent: Agent = {
    ca,
    child,
    ready,
    client,
    exited,
    get stderr() {
      return stderr;
    },
    get stdout() {
      return stdout;
    },
  } as Agent;
  return agent;
}

export function unary<T>(agent: Agent, method: string, req: unknown, timeoutMs = 120_000): Promise<T> {
  return new Promise((resolve, reject) => {
    agent.client[method]!(req, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}

export async function grpcError(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as grpc.ServiceError;
  }
  throw new Error('call succeeded but an error was expected');
}

export interface EngineInfo {
  engineId: string;
  kind: string;
  host: string;
  port: number;
  pid: number;
  argv: string[];
}

export async function startEngine(agent: Agent, req: Record<string, unknown>): Promise<EngineInfo> {
  const res = await unary<{ engine: EngineInfo }>(agent, 'startEngine', req);
  enginePidsSeen.add(res.engine.pid);
  return res.engine;
}

export interface GenResult {
  tokens: number[];
  text: string;
  done: { finishReason: string; promptTokens: number; completionTokens: number; timings: { firstTokenMs: number; predictedTokensPerSecond: number } };
}

export function generate(agent: Agent, req: Record<string, unknown>): Promise<GenResult> {
  return new Promise((resolve, reject) => {
    const call = agent.client.generate!(req) as grpc.ClientReadableStream<{ event: string; token?: { text: string; tokenIds: number[] }; done?: GenResult['done'] }>;
    const out: GenResult = { tokens: [], text: '', done: undefined as unknown as GenResult['done'] };
    call.on('data', (ev) => {
      if (ev.token) {
        out.tokens.push(...ev.token.tokenIds);
        out.text += ev.token.text;
      }
      if (ev.done) out.done = ev.done;
    });
    call.on('error', reject);
    call.on('end', () => resolve(out));
  });
}

export async function metricsText(agent: Agent): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${agent.ready.metricsPort}/metrics`);
  return res.text();
}

export function freeListener(): Promise<Server> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => resolve(s));
  });
}

export async function waitFor<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}
