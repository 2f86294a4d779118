/**
 * bench:tunnel's worker end (bench/tunnel.ts): the process the worker's agent would be, run as
 * `bench/tunnel.ts --worker-listener` on the worker side (loopback or behind a link:
 * bench/lib/worker-side.ts), and the plain relay hop its `plain` control uses at both ends.
 */
import { connect, type Server, createServer } from 'node:net';
import { createInterface } from 'node:readline';
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
 * its credentials, the address to listen on and the engine ports from stdin (never argv: `ps`
 * shows that), starts the listener the agent would (the native relay when built) and the plain
 * control's worker hop, prints their ports, then answers each further stdin line with the CPU time
 * of the worker's end of the tunnel (this process and the native relay), and exits when stdin ends.
 */
export async function workerListener(): Promise<void> {
  const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const first = await lines.next();
  const { credentials, host, rpcPort, seededRpcPort, replayPort } = JSON.parse(String(first.value)) as { credentials: NodeCredentials; host: string; rpcPort: number; seededRpcPort: number; replayPort: number };
  const enginePorts = new EnginePorts();
  for (const port of [rpcPort, seededRpcPort, replayPort]) enginePorts.register(port, 'ggml-rpc-server');
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
