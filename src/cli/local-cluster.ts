import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { readFile } from 'node:fs/promises';
import { CoordinatorClient } from '../coordinator/api/client.ts';
import { StateDir } from '../coordinator/state/state-dir.ts';
import { EngineWatchdog } from '../node/watchdog.ts';
import { OrchardError } from '../shared/errors.ts';

/**
 * A whole cluster on this machine: one `orchard coordinator` and N `orchard node` child
 * processes on 127.0.0.1 with free ports, no mDNS, joined statically with a real join token
 * (`--join` + ORCHARD_NODE_TOKEN: pin the CA, CSR, certificate, announce). Used by `orchard demo`
 * (and by tests that need a real multi-stage cluster). Every child runs in its own process
 * group; `stop()` sends SIGTERM (the coordinator unloads its models, agents stop their engines),
 * waits, and SIGKILLs the groups of whatever is still alive — nothing outlives the caller, which
 * a sentinel (node/watchdog.ts) ensures even when the caller is SIGKILLed.
 */

export const ORCHARD_BIN = fileURLToPath(new URL('../../bin/orchard.js', import.meta.url));

export interface LocalNodeSpec {
  readonly name: string;
  readonly budgetBytes: number;
  /** Memory bandwidth in GB/s to advertise (default: the node's probe). */
  readonly bandwidthGBps?: number | undefined;
}

export interface LocalClusterOptions {
  readonly nodes: readonly LocalNodeSpec[];
  /** Folder for state dirs (coordinator + one per node); the caller owns and removes it. */
  readonly stateRoot: string;
  readonly env?: NodeJS.ProcessEnv | undefined;
  readonly coordinatorArgs?: readonly string[] | undefined;
  /** An admin API key for the coordinator, passed in its environment (never its arguments: `ps`). */
  readonly apiKey?: string | undefined;
  /** Lines the children print on stderr (logs), with the process name; default: dropped. */
  readonly onLog?: ((who: string, line: string) => void) | undefined;
  readonly readyTimeoutMs?: number | undefined;
}

export interface LocalProcess {
  readonly name: string;
  readonly pid: number;
  readonly ready: Record<string, unknown>;
}

export interface LocalCluster {
  readonly grpcAddress: string;
  readonly httpUrl: string;
  /** The join token the nodes used (one use per node, spent). */
  readonly joinToken: string;
  /** The coordinator's local admin key (state dir `admin-key`): valid whether or not the API is locked. */
  readonly adminKey: string;
  /** The cluster CA certificate (PEM): what a gRPC client trusts the coordinator by. */
  readonly caCertPem: string;
  /** A gRPC client of the coordinator (TLS to the cluster CA, the local admin key). */
  client(): CoordinatorClient;
  readonly coordinator: LocalProcess;
  readonly nodes: readonly LocalProcess[];
  /** Every pid started (coordinator and agents; engines are the agents' children). */
  pids(): number[];
  stop(): Promise<void>;
}

interface Child {
  readonly name: string;
  readonly proc: ChildProcess;
  readonly exited: Promise<void>;
  readonly stderrTail: string[];
}

function startChild(name: string, args: readonly string[], env: NodeJS.ProcessEnv, onLog: LocalClusterOptions['onLog'], watchdog: EngineWatchdog): Child {
  const proc = spawn(process.execPath, [ORCHARD_BIN, ...args], { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env });
  const pid = proc.pid;
  if (pid !== undefined) {
    watchdog.add(pid);
    proc.once('exit', () => watchdog.remove(pid));
  }
  const stderrTail: string[] = [];
  let buf = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (d: string) => {
    buf += d;
    const lines = buf.split('\n');
    buf = lines.pop() ?? '';
    for (const l of lines) {
      stderrTail.push(l);
      if (stderrTail.length > 20) stderrTail.shift();
      onLog?.(name, l);
    }
  });
  const exited = new Promise<void>((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) resolve();
    else proc.once('exit', () => resolve());
  });
  return { name, proc, exited, stderrTail };
}

/** The first JSON line with `"event":"ready"` on the child's stdout. */
function readyLine(c: Child, timeoutMs: number): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => fail(`${c.name} was not ready after ${timeoutMs / 1000} s`), timeoutMs);
    const onData = (d: string) => {
      buf += d;
      for (const line of buf.split('\n').slice(0, -1)) {
        try {
          const j = JSON.parse(line) as Record<string, unknown>;
          if (j.event === 'ready') {
            cleanup();
            resolve(j);
            return;
          }
        } catch {}
      }
    };
    const onExit = (code: number | null, sig: string | null) => fail(`${c.name} exited (${sig ?? `code ${code}`}) before it was ready`);
    const cleanup = () => {
      clearTimeout(timer);
      c.proc.stdout!.off('data', onData);
      c.proc.off('exit', onExit);
    };
    const fail = (why: string) => {
      cleanup();
      const last = c.stderrTail.filter((l) => l.trim()).slice(-3).join(' | ');
      reject(new OrchardError(`${why}${last ? `: ${last.slice(0, 600)}` : ''}`));
    };
    c.proc.stdout!.setEncoding('utf8');
    c.proc.stdout!.on('data', onData);
    c.proc.once('exit', onExit);
  });
}

async function stopChildren(children: readonly Child[], graceMs: number): Promise<void> {
  // The coordinator first: it unloads models, which stops the engines on the agents cleanly.
  const [first, ...rest] = children;
  const term = async (c: Child) => {
    if (c.proc.exitCode !== null || c.proc.signalCode !== null) return;
    try {
      process.kill(c.proc.pid!, 'SIGTERM');
    } catch {}
    const timedOut = await Promise.race([c.exited.then(() => false), new Promise<boolean>((r) => setTimeout(() => r(true), graceMs))]);
    if (timedOut) {
      try {
        process.kill(-c.proc.pid!, 'SIGKILL');
      } catch {}
      await c.exited;
    }
  };
  if (first) await term(first);
  await Promise.all(rest.map(term));
  // Anything left in the groups (an engine whose agent was SIGKILLed) goes too.
  for (const c of children) {
    try {
      process.kill(-c.proc.pid!, 'SIGKILL');
    } catch {}
  }
}

export async function startLocalCluster(o: LocalClusterOptions): Promise<LocalCluster> {
  const env = { ...process.env, ...o.env, ...(o.apiKey !== undefined ? { ORCHARD_API_KEY: o.apiKey } : {}) };
  const timeout = o.readyTimeoutMs ?? 30_000;
  const children: Child[] = [];
  // If the caller dies without stop() (SIGKILL), the sentinel sends the children SIGTERM — agents
  // stop their engines, the coordinator its nats-server — and SIGKILL 3 s later (an agent killed
  // so still takes its engines with it: its own sentinel).
  const watchdog = new EngineWatchdog({ graceTicks: 15 });
  let stopped: Promise<void> | undefined;
  const stop = () => {
    stopped ??= stopChildren(children, 15_000).finally(() => watchdog.close());
    return stopped;
  };
  try {
    const coordDir = `${o.stateRoot}/coordinator`;
    const coord = startChild(
      'coordinator',
      ['coordinator', '--json', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--no-mdns', '--state-dir', coordDir, ...(o.coordinatorArgs ?? [])],
      env,
      o.onLog,
      watchdog,
    );
    children.push(coord);
    const coordReady = await readyLine(coord, timeout);
    const grpcAddress = `127.0.0.1:${String(coordReady.grpcPort)}`;
    const state = new StateDir(coordDir);
    const { token: joinToken } = await (await state.joinTokens()).create({ uses: o.nodes.length, ttlMs: 10 * 60_000 });
    const nodeEnv = { ...env, ORCHARD_NODE_TOKEN: joinToken };
    const nodeChildren = o.nodes.map((n, i) => {
      const args = ['node', '--json', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--no-mdns', '--join', grpcAddress, '--name', n.name, '--budget', String(n.budgetBytes), '--state-dir', `${o.stateRoot}/node-${i}`];
      if (n.bandwidthGBps !== undefined) args.push('--bandwidth', String(n.bandwidthGBps));
      const c = startChild(n.name, args, nodeEnv, o.onLog, watchdog);
      children.push(c);
      return c;
    });
    const nodeReady = await Promise.all(nodeChildren.map((c) => readyLine(c, timeout)));
    const adminKey = (await readFile(state.localAdminKeyPath, 'utf8')).trim();
    const caCertPem = await readFile(`${coordDir}/pki/ca.crt`, 'utf8');
    const client = () => new CoordinatorClient(grpcAddress, { tls: { caCertPem }, apiKey: adminKey });
    await untilNodes(client(), o.nodes.length, timeout);
    return {
      grpcAddress,
      httpUrl: `http://127.0.0.1:${String(coordReady.httpPort)}`,
      joinToken,
      adminKey,
      caCertPem,
      client,
      coordinator: { name: 'coordinator', pid: coord.proc.pid!, ready: coordReady },
      nodes: nodeChildren.map((c, i) => ({ name: c.name, pid: c.proc.pid!, ready: nodeReady[i]! })),
      pids: () => children.map((c) => c.proc.pid!),
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** The nodes announce themselves after their ready line: wait until the coordinator has them all. */
async function untilNodes(client: CoordinatorClient, n: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      const nodes = ((await client.unary('status', {})).nodes ?? []) as unknown[];
      if (nodes.length >= n) return;
      if (Date.now() > deadline) throw new OrchardError(`only ${nodes.length} of ${n} nodes joined the coordinator within ${timeoutMs / 1000} s`);
      await new Promise((r) => setTimeout(r, 100));
    }
  } finally {
    client.close();
  }
}
