import { randomBytes } from 'node:crypto';
import { type Server, type Socket, connect, createServer } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { RELAY_MAX_BUFFERED_BYTES, relay } from '../../src/node/tunnel/relay.ts';
import { waitFor } from '../helpers/node-agent.ts';

/** client → [a | relay | b] → engine, all real sockets on 127.0.0.1; the engine starts paused. */
async function relayed() {
  const engineSockets: Socket[] = [];
  const engine = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => engineSockets.push(s));
  await listen(engine);
  let relaySides: { a: Socket; b: Socket } | undefined;
  const bytes = { toEngine: 0, fromEngine: 0 };
  const front = createServer({ allowHalfOpen: true }, (a) => {
    const b = connect({ host: '127.0.0.1', port: port(engine), allowHalfOpen: true });
    b.once('connect', () => {
      relaySides = { a, b };
      void relay(a, b, bytes);
    });
  });
  await listen(front);
  servers.push(engine, front);
  const client = connect({ host: '127.0.0.1', port: port(front), allowHalfOpen: true });
  await waitFor('the relayed connection', () => (relaySides !== undefined && engineSockets.length === 1) || undefined);
  return { client, sides: relaySides as { a: Socket; b: Socket }, engine: engineSockets[0] as Socket, bytes };
}

const servers: Server[] = [];
afterEach(() => {
  for (const s of servers.splice(0)) s.close();
});

const listen = (s: Server) => new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
const port = (s: Server) => (s.address() as { port: number }).port;
describe('tunnel relay', () => {
  it('a reader that stops makes the relay stop reading: it buffers at most its bound, then delivers every byte in order', async () => {
    const { client, sides, engine, bytes } = await relayed();
    const payload = randomBytes(48 * 2 ** 20);
    client.end(payload);
    // the engine reads nothing: the relay must pause its source instead of buffering all 48 MiB
    await waitFor('the relay to pause its source', () => sides.a.isPaused() || undefined);
    await new Promise((r) => setTimeout(r, 300));
    expect(sides.b.writableLength).toBeGreaterThan(0);
    // the check runs once per event-loop turn, and one turn reads at most 32 × 64 KiB (libuv's
    // read loop): the bound can be overshot by that much, never more
    expect(sides.b.writableLength).toBeLessThanOrEqual(RELAY_MAX_BUFFERED_BYTES + 32 * 64 * 2 ** 10);
    expect(bytes.toEngine).toBeLessThan(payload.length / 2);
    const chunks: Buffer[] = [];
    engine.on('data', (d: Buffer) => chunks.push(d));
    engine.resume();
    await new Promise<void>((r) => engine.once('end', () => r()));
    expect(Buffer.concat(chunks).equals(payload)).toBe(true);
    expect(bytes.toEngine).toBe(payload.length);
    engine.end();
    client.destroy();
  }, 30_000);

  it('small messages cross at once, both ways, while the other direction is idle (no wait for more input)', async () => {
    const { client, engine } = await relayed();
    engine.resume();
    engine.on('data', (d: Buffer) => engine.write(d));
    const got: Buffer[] = [];
    client.on('data', (d: Buffer) => got.push(d));
    for (let i = 0; i < 20; i++) {
      const before = got.length;
      const t0 = performance.now();
      client.write(Buffer.from([i]));
      await waitFor('the echo', () => got.length > before || undefined, 2_000);
      expect(performance.now() - t0).toBeLessThan(1_000);
    }
    expect(Buffer.concat(got)).toEqual(Buffer.from([...Array(20).keys()]));
    client.destroy();
  }, 30_000);
});
