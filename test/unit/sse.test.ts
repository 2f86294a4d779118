import { describe, expect, it } from 'vitest';
import { ssePayloads } from '../../src/shared/sse.ts';

/** Feed text as byte chunks, split wherever the test says (SSE events may be cut anywhere). */
async function* chunks(...parts: (string | Uint8Array)[]): AsyncGenerator<Uint8Array> {
  for (const p of parts) yield typeof p === 'string' ? new TextEncoder().encode(p) : p;
}
async function all(body: AsyncIterable<Uint8Array>, max?: number): Promise<string[]> {
  const out: string[] = [];
  for await (const p of ssePayloads(body, max)) out.push(p);
  return out;
}

describe('ssePayloads (the one SSE reader)', () => {
  it('yields the data of complete events across any chunking, LF or CRLF', async () => {
    expect(await all(chunks('data: {"a":1}\n\ndata: {"b":2}\r\n\r\ndata: {"c"', ':3}\n', '\n'))).toEqual(['{"a":1}', '{"b":2}', '{"c":3}']);
  });

  it('joins multi-line data, skips comments, other fields and empty events', async () => {
    expect(await all(chunks(': keep-alive\n\nevent: x\nid: 7\ndata: one\ndata: two\n\ndata:\n\nretry: 10\n\ndata:[DONE]\n\n'))).toEqual(['one\ntwo', '[DONE]']);
  });

  it('decodes UTF-8 split inside a character', async () => {
    const bytes = new TextEncoder().encode('data: "héllo 🍐"\n\n');
    const cut = bytes.indexOf(0xf0) + 2;
    expect(await all(chunks(bytes.slice(0, cut), bytes.slice(cut)))).toEqual(['"héllo 🍐"']);
  });

  it('drops an unfinished last event (the peer closed mid-event)', async () => {
    expect(await all(chunks('data: 1\n\ndata: 2'))).toEqual(['1']);
  });

  it('refuses an event larger than the bound instead of buffering it', async () => {
    await expect(all(chunks('data: ', 'x'.repeat(64), 'x'.repeat(64)), 100)).rejects.toThrow(/SSE event over 100 bytes/);
    expect(await all(chunks(`data: ${'x'.repeat(80)}\n\n`), 100)).toEqual(['x'.repeat(80)]);
  });
});
