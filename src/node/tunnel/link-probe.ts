import type { Duplex } from 'node:stream';
import { type TunnelDial, dialTunnel } from './forwarder.ts';
import { encodeProbeRequest } from './preamble.ts';

/**
 * Link measurement over the tunnel path itself: the same TLS session setup, listener and network
 * as engine traffic, so shaping, TLS cost and the relay's CPU all count, as they do for the
 * activations the planner charges per hop. A probe session carries frames `[u32 length][bytes]`;
 * the listener answers each complete frame with its length. Tiny frames give the round trip, a
 * few MiB the throughput. Bounded on both sides: frames ≤ 16 MiB, ≤ 64 MiB and 20 s per session.
 */
export const MAX_PROBE_FRAME_BYTES = 16 * 2 ** 20;
export const MAX_PROBE_SESSION_BYTES = 64 * 2 ** 20;
export const PROBE_SESSION_MS = 20_000;

/** The listener side: acknowledge frames until the peer closes or a bound is crossed. */
export function serveProbe(s: Duplex): Promise<void> {
  return new Promise((resolve) => {
    let header = Buffer.alloc(0);
    let remaining = 0;
    let frame = 0;
    let total = 0;
    const timer = setTimeout(() => s.destroy(), PROBE_SESSION_MS);
    const done = () => {
      clearTimeout(timer);
      resolve();
    };
    s.on('data', (chunk: Buffer) => {
      let at = 0;
      while (at < chunk.length) {
        if (remaining === 0) {
          const take = Math.min(4 - header.length, chunk.length - at);
          header = Buffer.concat([header, chunk.subarray(at, at + take)]);
          at += take;
          if (header.length < 4) return;
          frame = header.readUInt32BE(0);
          header = Buffer.alloc(0);
          total += frame;
          if (frame < 1 || frame > MAX_PROBE_FRAME_BYTES || total > MAX_PROBE_SESSION_BYTES) return void s.destroy();
          remaining = frame;
          continue;
        }
        const take = Math.min(remaining, chunk.length - at);
        remaining -= take;
        at += take;
        if (remaining === 0) {
          const ack = Buffer.alloc(4);
          ack.writeUInt32BE(frame, 0);
          s.write(ack);
        }
      }
    });
    s.once('close', done);
    s.on('error', () => s.destroy());
    s.resume();
  });
}

/** What one probe found: payload round trip and payload throughput toward the peer. */
export interface LinkSample {
  readonly rttSeconds: number;
  readonly bytesPerSecond: number;
}

export interface ProbeOptions {
  readonly pings?: number;
  readonly bulkBytes?: number;
  readonly bulkRounds?: number;
}

/**
 * The head side: the median of `pings` one-byte round trips, then a 1 MiB warm-up (TCP window)
 * and `bulkRounds` frames of `bulkBytes`, the best rate of them after taking out one round trip
 * (the ack's). About 25 MiB per peer by default: 0.2 s on 1 GbE, and repeated rarely. With
 * `bulkRounds: 0` only the round trip is measured (no warm-up either; bytesPerSecond is then 0).
 */
export async function measureLink(d: TunnelDial, o: ProbeOptions = {}): Promise<LinkSample> {
  const tls = await dialTunnel(d, encodeProbeRequest());
  const acks: ((n: number) => void)[] = [];
  let pending = Buffer.alloc(0);
  tls.on('data', (chunk: Buffer) => {
    pending = Buffer.concat([pending, chunk]);
    while (pending.length >= 4) {
      const n = pending.readUInt32BE(0);
      pending = pending.subarray(4);
      acks.shift()?.(n);
    }
  });
  const failed = new Promise<never>((_, reject) => {
    tls.once('close', () => reject(new Error(`link probe to ${d.remote.host}:${d.remote.port}: session closed`)));
    tls.once('error', (err) => reject(new Error(`link probe to ${d.remote.host}:${d.remote.port}: ${err.message}`)));
  });
  failed.catch(() => {});
  tls.resume();
  const frame = async (bytes: number): Promise<number> => {
    const header = Buffer.alloc(4);
    header.writeUInt32BE(bytes, 0);
    const t0 = process.hrtime.bigint();
    const acked = new Promise<number>((resolve) => acks.push(resolve));
    tls.write(Buffer.concat([header, Buffer.alloc(bytes)]));
    const n = await Promise.race([acked, failed]);
    if (n !== bytes) throw new Error(`link probe: acknowledged ${n} bytes of ${bytes}`);
    return Number(process.hrtime.bigint() - t0) / 1e9;
  };
  try {
    const rtts: number[] = [];
    for (let i = 0; i < (o.pings ?? 7); i++) rtts.push(await frame(1));
    rtts.sort((a, b) => a - b);
    const rttSeconds = rtts[Math.floor(rtts.length / 2)]!;
    const bulk = o.bulkBytes ?? 8 * 2 ** 20;
    if ((o.bulkRounds ?? 2) > 0) await frame(2 ** 20);
    let bytesPerSecond = 0;
    for (let i = 0; i < (o.bulkRounds ?? 2); i++) {
      const seconds = await frame(bulk);
      bytesPerSecond = Math.max(bytesPerSecond, bulk / Math.max(seconds - rttSeconds, 1e-6));
    }
    return { rttSeconds, bytesPerSecond };
  } finally {
    tls.destroy();
  }
}
