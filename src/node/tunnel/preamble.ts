import type { Duplex } from 'node:stream';
import { z } from 'zod';

/**
 * The first line a tunnel client sends inside the (already mutually authenticated) TLS session:
 * which local engine port it wants. The worker answers with one line, then the session carries
 * engine bytes only. JSON lines keep it debuggable and versioned; the size cap keeps a peer from
 * making the listener buffer without bound before it has been told yes or no.
 */
export const PREAMBLE_VERSION = 1;
export const MAX_LINE_BYTES = 256;

const EngineRequest = z.strictObject({ v: z.literal(PREAMBLE_VERSION), port: z.number().int().min(1).max(65535) });
/**
 * A link probe (link-probe.ts): the session measures round trip and throughput over the very path
 * engine bytes take (TLS, the listener's host, any shaping on it) and reaches no engine.
 */
const ProbeRequest = z.strictObject({ v: z.literal(PREAMBLE_VERSION), probe: z.literal(true) });
const Request = z.union([EngineRequest, ProbeRequest]);
export type TunnelRequest = z.infer<typeof Request>;

// `pending`: the port is not (yet) an engine that accepts, which a rank starting on the other node
// becomes within seconds; every other refusal is final.
const Reply = z.union([z.strictObject({ ok: z.literal(true) }), z.strictObject({ ok: z.literal(false), error: z.string().max(200), pending: z.literal(true).optional() })]);
export type TunnelReply = z.infer<typeof Reply>;

export function encodeRequest(port: number): string {
  return `${JSON.stringify(EngineRequest.parse({ v: PREAMBLE_VERSION, port }))}\n`;
}

export function encodeProbeRequest(): string {
  return `${JSON.stringify({ v: PREAMBLE_VERSION, probe: true })}\n`;
}

export function encodeReply(reply: TunnelReply): string {
  return `${JSON.stringify(Reply.parse(reply))}\n`;
}

function parseLine<T>(schema: z.ZodType<T>, line: string): T | undefined {
  try {
    const r = schema.safeParse(JSON.parse(line));
    return r.success ? r.data : undefined;
  } catch {
    return undefined;
  }
}

export const parseRequest = (line: string): TunnelRequest | undefined => parseLine(Request, line);
export const parseReply = (line: string): TunnelReply | undefined => parseLine(Reply, line);

export class PreambleError extends Error {
  override readonly name = 'PreambleError';
}

/**
 * Read one `\n`-terminated line (at most MAX_LINE_BYTES) from a stream, then leave the stream
 * paused with any bytes after the line pushed back, so a later pipe sees them first.
 */
export function readLine(stream: Duplex, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const done = (err: Error | undefined, line?: string) => {
      clearTimeout(timer);
      stream.off('data', onData).off('end', onEnd).off('error', onError);
      stream.pause();
      if (err) reject(err);
      else resolve(line ?? '');
    };
    const onData = (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const nl = buf.indexOf(10);
      if (nl < 0) {
        if (buf.length > MAX_LINE_BYTES) done(new PreambleError('preamble line too long'));
        return;
      }
      if (nl > MAX_LINE_BYTES) return done(new PreambleError('preamble line too long'));
      const rest = buf.subarray(nl + 1);
      done(undefined, buf.subarray(0, nl).toString('utf8'));
      if (rest.length > 0) stream.unshift(rest);
    };
    const onEnd = () => done(new PreambleError('peer closed before the preamble'));
    const onError = (err: Error) => done(err);
    const timer = setTimeout(() => done(new PreambleError('preamble timed out')), timeoutMs);
    stream.on('data', onData).once('end', onEnd).once('error', onError);
  });
}
