import { createServer, type Server } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { postToEngine } from '../../src/node/engine-http.ts';

// A local HTTP server on 127.0.0.1 standing in for llama-server's transport behaviour only.
let server: Server;
let base = '';
let closedByClient: () => void = () => {};
const sawClose = new Promise<void>((r) => {
  closedByClient = r;
});

beforeAll(async () => {
  server = createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => {
      body += c.toString();
    });
    req.on('end', () => {
      if (req.url === '/fail') {
        res.writeHead(500, { 'content-type': 'application/json' });
        res.end('{"error":{"message":"boom","code":500}}');
        return;
      }
      if (req.url === '/echo') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ body, contentType: req.headers['content-type'], accept: req.headers.accept }));
        return;
      }
      // /stream: one event now, then nothing until the client goes away
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write('data: {"content":"a"}\n\n');
      res.on('close', () => closedByClient());
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const a = server.address();
  base = `http://127.0.0.1:${typeof a === 'object' && a ? a.port : 0}`;
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise<void>((r) => server.close(() => r()));
});

describe('postToEngine', () => {
  it('posts JSON with a content length and extra headers', async () => {
    const r = await postToEngine(`${base}/echo`, '{"x":"é"}', new AbortController().signal, { accept: 'text/event-stream' });
    expect(r.status).toBe(200);
    expect(JSON.parse(await r.text())).toEqual({ body: '{"x":"é"}', contentType: 'application/json', accept: 'text/event-stream' });
  });

  it('returns non-2xx statuses with their body (the relay turns them into engine errors)', async () => {
    const r = await postToEngine(`${base}/fail`, '{}', new AbortController().signal);
    expect(r.status).toBe(500);
    expect(await r.text()).toMatch(/boom/);
  });

  it('aborting mid-stream closes the connection (how llama-server learns to free the slot) and ends the body with an error', async () => {
    const ac = new AbortController();
    const r = await postToEngine(`${base}/stream`, '{}', ac.signal);
    const it = (r.body as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
    const first = await it.next();
    expect(String(first.value)).toContain('"content":"a"');
    ac.abort();
    await expect(it.next()).rejects.toThrow();
    await sawClose;
  });

  it('an unreachable engine rejects', async () => {
    const probe = createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', () => r()));
    const a = probe.address();
    const port = typeof a === 'object' && a ? a.port : 0;
    await new Promise<void>((r) => probe.close(() => r()));
    await expect(postToEngine(`http://127.0.0.1:${port}/completion`, '{}', new AbortController().signal)).rejects.toThrow(/ECONNREFUSED/);
  });
});
