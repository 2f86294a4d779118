import { createServer, type Server } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { EnginePortAllocator, ephemeralPortRange, portBindError } from '../../src/node/ports.ts';
import { DEFAULT_ENGINE_PORT_RANGE, drawPorts, parseEphemeralRange, parsePortRange, portWasTaken, usableEngineRange } from '../../src/shared/engine-port-range.ts';
import { uniformSource } from '../../src/shared/testmodel/prng.ts';

/*
 * The engine port range (shared/engine-port-range.ts): engines get ports outside the kernel's
 * ephemeral range, so no outgoing connection can take one between the check and the engine's bind.
 */

describe('engine port range: pure parts', () => {
  it('the default lies outside Linux\'s and macOS\'s default ephemeral ranges', () => {
    for (const eph of [[32768, 60999], [49152, 65535]] as const) expect(usableEngineRange(DEFAULT_ENGINE_PORT_RANGE, eph)).toEqual(DEFAULT_ENGINE_PORT_RANGE);
  });

  it('parses the platform\'s range: /proc ip_local_port_range (tab) and sysctl -n first last (lines)', () => {
    expect(parseEphemeralRange('32768\t60999\n')).toEqual([32768, 60999]);
    expect(parseEphemeralRange('49152\n65535\n')).toEqual([49152, 65535]);
    expect(parseEphemeralRange('')).toBeUndefined();
    expect(parseEphemeralRange('60999 32768')).toBeUndefined();
    expect(parseEphemeralRange('1 2 3')).toBeUndefined();
    expect(parseEphemeralRange('0 70000')).toBeUndefined();
  });

  it('parses a configured range and refuses nonsense', () => {
    expect(parsePortRange('20000-32767')).toEqual([20000, 32767]);
    expect(parsePortRange(' 40000 – 40100 ')).toEqual([40000, 40100]);
    for (const bad of ['', '20000', '32767-20000', '80-9000', '20000-70000', 'a-b', '20000-32767-1']) expect(() => parsePortRange(bad, 'X')).toThrow(/X must be FIRST-LAST/);
  });

  it('cuts the ephemeral part off: the largest piece left, or an error naming both ranges', () => {
    expect(usableEngineRange([20000, 40000], [32768, 60999])).toEqual([20000, 32767]);
    expect(usableEngineRange([30000, 50000], [32768, 40999])).toEqual([41000, 50000]);
    expect(usableEngineRange([10000, 20000], undefined)).toEqual([10000, 20000]);
    expect(usableEngineRange([61000, 61999], [32768, 60999])).toEqual([61000, 61999]);
    expect(() => usableEngineRange([33000, 34000], [32768, 60999])).toThrow(/20000|lies \(almost\) inside .* 32768-60999/);
    // a sliver left beside the ephemeral range is not a range
    expect(() => usableEngineRange([32760, 40000], [32768, 60999])).toThrow(/ORCHARD_NODE_ENGINE_PORTS|--engine-ports/);
  });

  it('draws distinct ports in the range, never a taken one, and says when none are left', () => {
    const p = drawPorts(40, [30000, 30049], uniformSource(2), (x) => x % 5 === 0);
    expect(new Set(p).size).toBe(40);
    for (const x of p) expect(x >= 30000 && x <= 30049 && x % 5 !== 0).toBe(true);
    // a nearly full range is still found by the scan
    expect(drawPorts(1, [30000, 30999], uniformSource(3), (x) => x !== 30777)).toEqual([30777]);
    expect(() => drawPorts(2, [30000, 30001], uniformSource(1), (x) => x === 30000)).toThrow(/no 2 free port/);
  });

  it('recognises an engine that lost its port (Linux 98, macOS 48, the agent\'s own check)', () => {
    expect(portWasTaken("MLX rank 1 on bravo failed to start: [ring] Couldn't bind socket (error: 98)")).toBe(true);
    expect(portWasTaken("[ring] Couldn't bind socket (error: 48)")).toBe(true);
    expect(portWasTaken('port 23456 on 127.0.0.1 is already in use')).toBe(true);
    expect(portWasTaken("[ring] Couldn't bind socket (error: 13)")).toBe(false);
    expect(portWasTaken('MLX rank 1 did not start within 60 s')).toBe(false);
  });
});

describe('EnginePortAllocator (real binds on 127.0.0.1)', () => {
  const servers: Server[] = [];
  afterAll(() => {
    for (const s of servers) s.close();
  });
  const listen = (port: number) =>
    new Promise<Server>((resolve, reject) => {
      const s = createServer();
      s.once('error', reject);
      s.listen(port, '127.0.0.1', () => resolve(s));
    });

  it('reads this machine\'s ephemeral range', async () => {
    const r = await ephemeralPortRange();
    if (process.platform === 'linux' || process.platform === 'darwin') {
      expect(r).toBeDefined();
      expect(r![0]).toBeLessThanOrEqual(r![1]);
    }
  });

  it('hands each port once while held, skips one another process listens on, reuses it after release', async () => {
    // A free block of 4 ports in the default range (other engines on this machine use it too):
    // bind a listener on one of them.
    let base = 0;
    for (let i = 0; i < 50 && base === 0; i++) {
      const b = 20000 + Math.floor(Math.random() * 12000);
      if ((await Promise.all([0, 1, 2, 3].map((k) => portBindError('127.0.0.1', b + k)))).every((c) => c === undefined)) base = b;
    }
    expect(base).toBeGreaterThan(0);
    const busy = await listen(base + 1);
    servers.push(busy);
    const a = new EnginePortAllocator([base, base + 3], uniformSource(9));
    const got = [await a.take('127.0.0.1'), await a.take('127.0.0.1'), await a.take('127.0.0.1')];
    expect(new Set(got).size).toBe(3);
    expect(got).not.toContain(base + 1);
    await expect(a.take('127.0.0.1')).rejects.toThrow(/has no 1 free port/);
    // a requested port: refused while held or bound elsewhere, held once free
    await expect(a.claim('127.0.0.1', got[0]!)).rejects.toThrow(/already in use by an engine of this node/);
    await expect(a.claim('127.0.0.1', base + 1)).rejects.toThrow(new RegExp(`port ${base + 1} on 127.0.0.1 is already in use`));
    a.release(got[0]!);
    expect(await a.take('127.0.0.1')).toBe(got[0]);
  });
});
