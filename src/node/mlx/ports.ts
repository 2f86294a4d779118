import { EnginePortAllocator, engineRangeOf } from '../ports.ts';

/**
 * `count` distinct TCP ports of the engine port range that were free on `host` a moment ago (a
 * bind each), for a ring launched directly (tests, benches; the agents' ranks get theirs from
 * the coordinator). MLX ring sockets use SO_REUSEPORT, so a stale worker on a reused port could
 * silently steal connections: every launch takes fresh ports from here.
 */
export async function freeTcpPorts(count: number, host = '127.0.0.1'): Promise<number[]> {
  const ports = new EnginePortAllocator(engineRangeOf(undefined));
  const out: number[] = [];
  for (let i = 0; i < count; i++) out.push(await ports.take(host));
  return out;
}

/** A ring launch for `count` ranks on one host with fresh ports, one endpoint per rank. */
export async function localRingEndpoints(count: number, host = '127.0.0.1'): Promise<string[][]> {
  return (await freeTcpPorts(count, host)).map((p) => [`${host}:${p}`]);
}
