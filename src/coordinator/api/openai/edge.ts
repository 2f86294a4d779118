import type { IncomingMessage, ServerResponse } from 'node:http';
import { ApiError, errorBody, invalid } from './errors.ts';

/** HTTP edge helpers for the API routes: body limit, JSON parsing, JSON/SSE replies (the API key: ../guard.ts). */

export const DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024;

const tooLarge = (limit: number) => new ApiError(413, 'invalid_request_error', 'request_too_large', `request body is larger than ${limit} bytes`);

/**
 * Read a JSON body, refusing more than `limit` bytes: a declared Content-Length over the limit
 * is refused before a byte is read; a chunked body is cut off as soon as it crosses the limit.
 */
export async function readJsonBody(req: IncomingMessage, limit: number): Promise<unknown> {
  const declared = Number(req.headers['content-length'] ?? Number.NaN);
  if (Number.isFinite(declared) && declared > limit) throw tooLarge(limit);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req as AsyncIterable<Buffer>) {
    size += c.length;
    if (size > limit) throw tooLarge(limit);
    chunks.push(c);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (text.trim() === '') throw invalid('request body is empty; send a JSON object');
  try {
    return JSON.parse(text);
  } catch (err) {
    throw invalid(`request body is not valid JSON: ${(err as Error).message}`, null, 'invalid_json');
  }
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(text)), ...headers });
  res.end(text);
}

export function sendError(res: ServerResponse, e: ApiError): void {
  if (res.headersSent) {
    // Mid-stream: the status is already 200; say it in the stream (the openai SDK raises it).
    if (!res.writableEnded) res.end(`data: ${JSON.stringify(errorBody(e))}\n\n`);
    return;
  }
  const headers: Record<string, string> = {};
  if (e.status === 429 || e.status === 503) headers['retry-after'] = '1';
  // A refused oversized body is not drained: tell the client the connection will not be reused.
  if (e.status === 413) headers.connection = 'close';
  sendJson(res, e.status, errorBody(e), headers);
}

export function startSse(res: ServerResponse): void {
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
    // Reverse proxies (nginx) must not buffer tokens.
    'x-accel-buffering': 'no',
  });
  res.flushHeaders();
}

/** Write and wait for the socket to take it (backpressure); false once the client is gone. */
export async function write(res: ServerResponse, data: string): Promise<boolean> {
  if (res.destroyed || res.writableEnded) return false;
  if (res.write(data)) return true;
  return new Promise<boolean>((resolve) => {
    const done = (ok: boolean) => {
      res.off('drain', onDrain);
      res.off('close', onClose);
      resolve(ok);
    };
    const onDrain = () => done(true);
    const onClose = () => done(false);
    res.on('drain', onDrain);
    res.on('close', onClose);
  });
}

/** An AbortSignal that fires when the client goes away before the response is complete. */
export function disconnectSignal(res: ServerResponse): AbortSignal {
  const ac = new AbortController();
  res.on('close', () => {
    if (!res.writableFinished) ac.abort();
  });
  return ac.signal;
}
