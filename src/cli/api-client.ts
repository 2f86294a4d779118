import { OrchardError } from '../shared/errors.ts';
import { ssePayloads } from '../shared/sse.ts';

/**
 * A small client for the coordinator's HTTP API (what `orchard demo` and `orchard chat` use):
 * JSON requests and SSE streams, API errors turned into one-line OrchardErrors. Plain fetch —
 * the CLI does not depend on the openai package (a dev dependency used by the tests).
 */

export interface ApiClientOptions {
  readonly baseUrl: string;
  readonly apiKey?: string | undefined;
}

function headers(o: ApiClientOptions, extra: Record<string, string> = {}): Record<string, string> {
  return { 'content-type': 'application/json', ...(o.apiKey ? { authorization: `Bearer ${o.apiKey}` } : {}), ...extra };
}

async function failure(res: Response, what: string): Promise<OrchardError> {
  const text = await res.text().catch(() => '');
  let message = text.slice(0, 300) || `HTTP ${res.status}`;
  try {
    message = (JSON.parse(text) as { error?: { message?: string } }).error?.message ?? message;
  } catch {}
  return new OrchardError(`${what}: ${message} (HTTP ${res.status})`);
}

async function send(o: ApiClientOptions, method: string, path: string, body: unknown, signal?: AbortSignal, accept?: string): Promise<Response> {
  try {
    return await fetch(`${o.baseUrl}${path}`, {
      method,
      headers: headers(o, accept ? { accept } : {}),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (signal?.aborted) throw signal.reason ?? err;
    throw new OrchardError(`cannot reach the coordinator's HTTP API at ${o.baseUrl}: ${(err as Error).message} (is it running? --url)`);
  }
}

export async function apiJson<T = Record<string, unknown>>(o: ApiClientOptions, method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<T> {
  const res = await send(o, method, path, body, signal);
  if (!res.ok) throw await failure(res, `${method} ${path}`);
  return (await res.json()) as T;
}

/** POST and iterate the SSE events' JSON payloads until `[DONE]`; an error event throws. */
export async function* apiSse(o: ApiClientOptions, path: string, body: unknown, signal?: AbortSignal): AsyncGenerator<Record<string, unknown>> {
  const res = await send(o, 'POST', path, body, signal, 'text/event-stream');
  if (!res.ok || !res.body) throw await failure(res, `POST ${path}`);
  for await (const p of ssePayloads(res.body as AsyncIterable<Uint8Array>)) {
    if (p === '[DONE]') return;
    const j = JSON.parse(p) as Record<string, unknown>;
    const e = j.error as { message?: string } | undefined;
    if (e) throw new OrchardError(`POST ${path}: ${e.message ?? JSON.stringify(e)}`);
    yield j;
  }
  throw new OrchardError(`POST ${path}: the stream ended without [DONE]`);
}
