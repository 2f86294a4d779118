import type { IncomingMessage } from 'node:http';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { checkApiKey } from '../../src/coordinator/api/guard.ts';
import { readJsonBody } from '../../src/coordinator/api/openai/edge.ts';
import { ApiError } from '../../src/coordinator/api/openai/errors.ts';

function req(chunks: string[], headers: Record<string, string> = {}): IncomingMessage {
  const r = Readable.from(chunks.map((c) => Buffer.from(c))) as unknown as IncomingMessage;
  (r as { headers: Record<string, string> }).headers = headers;
  return r;
}

async function refusal(p: Promise<unknown>): Promise<ApiError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof ApiError) return err;
    throw err;
  }
  throw new Error('expected a refusal');
}

describe('request bodies', () => {
  it('parses JSON split over chunks', async () => {
    expect(await readJsonBody(req(['{"a":', '1}']), 100)).toEqual({ a: 1 });
  });
  it('refuses a declared Content-Length over the limit before reading', async () => {
    const e = await refusal(readJsonBody(req(['{}'], { 'content-length': '101' }), 100));
    expect([e.status, e.code]).toEqual([413, 'request_too_large']);
  });
  it('cuts off an undeclared (chunked) body once it crosses the limit', async () => {
    const e = await refusal(readJsonBody(req(Array.from({ length: 20 }, () => 'x'.repeat(10))), 100));
    expect(e.status).toBe(413);
  });
  it('exactly the limit is fine', async () => {
    const body = JSON.stringify({ p: 'x'.repeat(92) });
    expect(body.length).toBe(100);
    await expect(readJsonBody(req([body]), 100)).resolves.toMatchObject({ p: expect.any(String) });
  });
  it.each([
    ['', 'invalid_request'],
    ['   ', 'invalid_request'],
    ['{"a":', 'invalid_json'],
    ['nope', 'invalid_json'],
  ])('%j → 400 %s', async (text, code) => {
    const e = await refusal(readJsonBody(req([text]), 100));
    expect([e.status, e.code]).toEqual([400, code]);
  });
});

describe('API key', () => {
  const withHeaders = (h: Record<string, string>) => req([], h);
  it('nothing is needed when no key is set', () => {
    expect(() => checkApiKey(withHeaders({}), undefined)).not.toThrow();
  });
  it('accepts Bearer and x-api-key', () => {
    expect(() => checkApiKey(withHeaders({ authorization: 'Bearer k1' }), 'k1')).not.toThrow();
    expect(() => checkApiKey(withHeaders({ 'x-api-key': 'k1' }), 'k1')).not.toThrow();
  });
  it.each([
    [{}, 'missing_api_key'],
    [{ authorization: 'Basic k1' }, 'missing_api_key'],
    [{ authorization: 'Bearer k2' }, 'invalid_api_key'],
    [{ authorization: 'Bearer k1x' }, 'invalid_api_key'],
    [{ authorization: 'Bearer ' }, 'invalid_api_key'],
  ])('%j → 401 %s', (h, code) => {
    try {
      checkApiKey(withHeaders(h), 'k1');
      throw new Error('expected 401');
    } catch (err) {
      expect(err).toBeInstanceOf(ApiError);
      expect([(err as ApiError).status, (err as ApiError).code]).toEqual([401, code]);
    }
  });
});
