// The console's only door to the coordinator: the API key (kept in sessionStorage, so it dies
// with the tab and is never written to disk by us), JSON requests, and Server-Sent Events read
// with fetch — EventSource cannot send an Authorization header.

const KEY = 'orchard.apiKey';

export const apiKey = {
  get: () => sessionStorage.getItem(KEY) ?? '',
  set: (k) => sessionStorage.setItem(KEY, k),
  clear: () => sessionStorage.removeItem(KEY),
};

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  const k = apiKey.get();
  return { ...(k ? { authorization: `Bearer ${k}` } : {}), ...extra };
}

async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    message = body?.error?.message ?? message;
  } catch {}
  return new HttpError(res.status, message);
}

/** fetch with the key; JSON body in, the Response out (throws HttpError on non-2xx). */
export async function request(path, { method = 'GET', body, accept, signal } = {}) {
  const res = await fetch(path, {
    method,
    signal,
    headers: headers({ ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...(accept ? { accept } : {}) }),
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  if (!res.ok) throw await errorOf(res);
  return res;
}

export const getJson = async (path, opts) => (await request(path, opts)).json();

/** Read an SSE response; calls onMessage(event, data) per message (data as text). */
export async function readSse(res, onMessage) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut = buf.indexOf('\n\n');
    while (cut >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      cut = buf.indexOf('\n\n');
      let event = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) event = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) onMessage(event, data.join('\n'));
    }
  }
}

/**
 * The live feed: snapshots and events from /v1/console/stream, reconnecting with a capped
 * backoff (0.5 s → 5 s) when the stream ends. Returns a function that stops it.
 */
export function openFeed({ onSnapshot, onEvents, onEvent, onStatus, onUnauthorized }) {
  const ac = new AbortController();
  let delay = 500;
  const loop = async () => {
    while (!ac.signal.aborted) {
      try {
        const res = await request('/v1/console/stream', { accept: 'text/event-stream', signal: ac.signal });
        onStatus('live');
        delay = 500;
        await readSse(res, (event, data) => {
          const v = JSON.parse(data);
          if (event === 'snapshot') onSnapshot(v);
          else if (event === 'events') onEvents(v);
          else if (event === 'event') onEvent(v);
        });
      } catch (err) {
        if (ac.signal.aborted) return;
        if (err instanceof HttpError && err.status === 401) return onUnauthorized();
      }
      onStatus('reconnecting');
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 5000);
    }
  };
  loop();
  return () => ac.abort();
}
