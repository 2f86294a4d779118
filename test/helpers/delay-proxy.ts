import { createServer, type Server, type Socket, connect } from 'node:net';

/**
 * A TCP relay that holds every chunk `delayMs` before passing it on, both ways: a link with
 * latency on loopback (this kernel has no netem, and Toxiproxy is not installed). A round trip
 * through it costs at least 2 × delayMs. Chunks keep their order (equal timers fire in order).
 */
export interface DelayProxy {
  readonly port: number;
  close(): Promise<void>;
}

export async function startDelayProxy(o: { listenHost: string; listenPort: number; targetHost: string; targetPort: number; delayMs: number }): Promise<DelayProxy> {
  const sockets = new Set<Socket>();
  const relay = (from: Socket, to: Socket) => {
    from.on('data', (chunk) => {
      if (o.delayMs === 0) to.write(chunk);
      else setTimeout(() => to.writable && to.write(chunk), o.delayMs);
    });
    from.on('end', () => setTimeout(() => to.end(), o.delayMs));
    from.on('error', () => to.destroy());
    from.on('close', () => setTimeout(() => to.destroy(), o.delayMs + 1));
  };
  const server: Server = createServer((client) => {
    const upstream = connect(o.targetPort, o.targetHost);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
    }
    relay(client, upstream);
    relay(upstream, client);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(o.listenPort, o.listenHost, () => resolve());
  });
  const address = server.address();
  return {
    port: typeof address === 'object' && address ? address.port : o.listenPort,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
