import { createServer } from 'node:net';

/**
 * `count` distinct TCP ports that were free on `host` a moment ago (bound to port 0 together,
 * then released). MLX ring sockets use SO_REUSEPORT, so a stale worker on a reused port could
 * silently steal connections: every launch takes fresh ports from here.
 */
export async function freeTcpPorts(count: number, host = '127.0.0.1'): Promise<number[]> {
  const servers = await Promise.all(
    Array.from(
      { length: count },
      () =>
        new Promise<import('node:net').Server>((resolve, reject) => {
          const s = createServer();
          s.once('error', reject);
          s.listen(0, host, () => resolve(s));
        }),
    ),
  );
  const ports = servers.map((s) => {
    const addr = s.address();
    return typeof addr === 'object' && addr ? addr.port : 0;
  });
  await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  return ports;
}

/** A ring launch for `count` ranks on one host with fresh ports, one endpoint per rank. */
export async function localRingEndpoints(count: number, host = '127.0.0.1'): Promise<string[][]> {
  return (await freeTcpPorts(count, host)).map((p) => [`${host}:${p}`]);
}
