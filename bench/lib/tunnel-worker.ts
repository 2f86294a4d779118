/**
 * bench:tunnel's worker end (bench/tunnel.ts): the process the worker's agent would be, run as
 * `bench/tunnel.ts --worker-listener` on the worker side (loopback or behind a link:
 * bench/lib/worker-side.ts), and the plain relay hop its `plain` control uses at both ends.
 */
import type { ChildProcess } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { connect, type Server, createServer } from 'node:net';
import { createInterface } from 'node:readline';
import { rpcServerSocket, unixEndpoint } from '../../src/node/engine-sockets.ts';
import { canConnectSocket } from '../../src/node/ports.ts';
import { EnginePorts } from '../../src/node/tunnel/engine-ports.ts';
import { startTunnelListener } from '../../src/node/tunnel/listener.ts';
import { findTunnelRelay } from '../../src/node/tunnel/native-forwarder.ts';
import { startNativeListener } from '../../src/node/tunnel/native-listener.ts';
import { relay } from '../../src/node/tunnel/relay.ts';
import type { NodeCredentials } from '../../src/shared/pki/store.ts';
import { processCpuSeconds } from './native-relay.ts';
import type { Route } from './rpc-traffic.ts';

/**
 * The control mode's hop: a listener on `listenHost` whose connections are relayed to `target`
 * with the tunnel's own relay code, minus TLS.
 */
export async function plainRelay(target: Route, listenHost = '127.0.0.1'): Promise<{ server: Server; port: number }> {
  const server = createServer({ allowHalfOpen: true, noDelay: true }, (from) => {
    const to = connect({ host: target.host, port: target.port, allowHalfOpen: true, noDelay: true });
    to.once('connect', () => void relay(from, to, { toEngine: 0, fromEngine: 0 }));
    to.once('error', () => from.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, listenHost, () => resolve()));
  const address = server.address();
  return { server, port: typeof address === 'object' && address ? address.port : 0 };
}

/**
 * The worker agent's half, run as `bench/tunnel.ts --worker-listener` on the worker side: reads
 * its credentials, the address to listen on and the engines (ports, the tunnel's socket) from stdin (never argv: `ps`
 * shows that), starts the listener the agent would (the native relay when built) and the plain
 * control's worker hop, prints their ports, then answers each further stdin line with the CPU time
 * of the worker's end of the tunnel (this process and the native relay), and exits when stdin ends.
 */
export async function workerListener(): Promise<void> {
  const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const first = await lines.next();
  const c = JSON.parse(String(first.value)) as { credentials: NodeCredentials; host: string; rpcPort: number; tunnelRpc: { port: number; socket?: string }; seededRpcPort: number; replayPort: number };
  const { credentials, host, rpcPort, seededRpcPort, replayPort } = c;
  const enginePorts = new EnginePorts();
  for (const port of [rpcPort, seededRpcPort, replayPort]) enginePorts.register(port, 'ggml-rpc-server');
  // the tunnel's rpc-server as the agent registers it: its port, and its Unix socket when it has one
  enginePorts.register(c.tunnelRpc.port, 'ggml-rpc-server', c.tunnelRpc.socket);
  const relayBinary = findTunnelRelay();
  const options = { host, port: 0, credentials, enginePorts };
  const listener = relayBinary ? await startNativeListener(relayBinary, { ...options, revoked: new Set() }) : await startTunnelListener(options);
  const relayCpu = () => ('pid' in listener ? processCpuSeconds(listener.pid() ?? 0) : 0);
  const local = (port: number) => ({ host: '127.0.0.1', port });
  const [plain, plainReplay] = [await plainRelay(local(rpcPort), host), await plainRelay(local(replayPort), host)];
  process.stdout.write(`${JSON.stringify({ port: listener.port, plainPort: plain.port, plainReplayPort: plainReplay.port, relay: relayBinary ? 'native' : 'node' })}\n`);
  for (let line = await lines.next(); !line.done; line = await lines.next()) process.stdout.write(`${JSON.stringify({ cpuSeconds: cpuSeconds() + relayCpu() })}\n`);
  await listener.close();
  plain.server.close();
  plainReplay.server.close();
}

/** This process's CPU seconds so far. */
export const cpuSeconds = (): number => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

/** The rpc-server the tunnel reaches: its engine port (its identity in the preamble) and, when it has one, its socket. */
export interface TunnelRpc {
  readonly port: number;
  readonly socket?: string;
}

/**
 * An rpc-server as the agent starts it: on a Unix-domain socket (engine patch
 * ggml-rpc-unix-socket) in the 0700 directory `dir`, `port` only its identity; ready once the
 * socket accepts.
 */
export async function unixRpcServer(dir: string, port: number, start: (file: string, args: string[]) => { proc: ChildProcess; log: () => string }, rpcServer: string, args: string[]): Promise<TunnelRpc> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const socket = rpcServerSocket(dir, port);
  const rpc = start(rpcServer, ['-H', unixEndpoint(socket), ...args]);
  const deadline = Date.now() + 60_000;
  while (!(await canConnectSocket(socket))) {
    if (rpc.proc.exitCode !== null || Date.now() > deadline) throw new Error(`rpc-server on ${socket} not ready: ${rpc.log().slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return { port, socket };
}
