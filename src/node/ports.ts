import { connect, createServer } from 'node:net';

/**
 * Port helpers for engines. Engines take a port number on their command line, so "pick a free
 * port" means: bind port 0, read the number, release it, hand it to the engine. Another process
 * could grab it in between; the supervisor then sees the engine fail to bind and reports it.
 */

/** Resolve with a currently free TCP port on `host`. */
export function pickFreePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen({ host, port: 0, exclusive: true }, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error('no port assigned'))));
    });
  });
}

/**
 * Whether `port` on `host` can be bound right now. Resolves to the errno code when it cannot
 * (EADDRINUSE, EADDRNOTAVAIL, EACCES), undefined when free.
 */
export function portBindError(host: string, port: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.unref();
    srv.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'EUNKNOWN'));
    srv.listen({ host, port, exclusive: true }, () => srv.close(() => resolve(undefined)));
  });
}

/** One TCP connect attempt; true when something accepts on host:port. */
export function canConnect(host: string, port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect({ host, port });
    const done = (ok: boolean) => {
      sock.removeAllListeners();
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}
