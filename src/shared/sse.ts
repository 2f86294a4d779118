import { createParser } from 'eventsource-parser';

/**
 * Reading Server-Sent Events: the one parser for every SSE stream Orchard consumes (llama-server's
 * `/completion` in the node agent, the coordinator's OpenAI and load streams in the CLI and the
 * benches). The parsing is `eventsource-parser`'s (spec-exact: CR/LF/CRLF, multi-line `data:`,
 * comments, a BOM, events split anywhere across chunks); this only turns a byte stream into the
 * `data` of each event.
 */

/**
 * Refuse an event larger than this instead of buffering without end: a 16 MiB JSON event is far
 * beyond any token chunk or progress event, so only a broken or hostile peer gets here.
 */
export const MAX_SSE_EVENT_BYTES = 16 * 1024 * 1024;

/**
 * The `data` payload of every complete event in `body`, in order (multi-line data joined with
 * "\n", as the spec says). An unfinished last event — the peer closed mid-event — is dropped,
 * like EventSource does; the caller notices the missing end of stream from its own protocol
 * (no `[DONE]`, no `stop`).
 */
export async function* ssePayloads(body: AsyncIterable<Uint8Array>, maxEventBytes = MAX_SSE_EVENT_BYTES): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  const ready: string[] = [];
  let failure: Error | undefined;
  const parser = createParser({
    maxBufferSize: maxEventBytes,
    // An event whose data is empty carries nothing (the spec does not even dispatch it).
    onEvent: (e) => {
      if (e.data !== '') ready.push(e.data);
    },
    onError: (err) => {
      // Invalid lines are skipped by the spec; only an oversized event is worth stopping for.
      if (err.type === 'max-buffer-size-exceeded') failure = new Error(`SSE event over ${maxEventBytes} bytes`);
    },
  });
  for await (const bytes of body) {
    parser.feed(decoder.decode(bytes, { stream: true }));
    while (ready.length > 0) yield ready.shift() as string;
    if (failure) throw failure;
  }
  parser.feed(decoder.decode());
  while (ready.length > 0) yield ready.shift() as string;
}
