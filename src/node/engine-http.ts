import http from 'node:http';

/**
 * One streaming POST to the local engine with node:http instead of fetch. Why: on the token path
 * fetch (undici + WHATWG streams) costs ~0.5 ms more to the first token than node:http on
 * loopback (measured side by side, /tmp experiment noted in bench/ttft-path.ts), and Nagle is
 * turned off explicitly. No keep-alive: on loopback the handshake is ~0.1 ms, measured no gain,
 * and a fresh connection per request keeps cancellation simple — destroying the socket is how
 * llama-server learns a client went away and frees the slot.
 */
export interface EngineResponse {
  readonly status: number;
  /** The body as it arrives (aborting the signal destroys the socket and ends this with an error). */
  readonly body: http.IncomingMessage;
  text(): Promise<string>;
}

export function postToEngine(url: string, json: string, signal: AbortSignal, headers: Record<string, string> = {}): Promise<EngineResponse> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = http.request(
      {
        host: u.hostname,
        port: u.port,
        path: u.pathname + u.search,
        method: 'POST',
        agent: false,
        signal,
        headers: { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(json)), ...headers },
      },
      (res) => {
        resolve({
          status: res.statusCode ?? 0,
          body: res,
          text: async () => {
            let s = '';
            res.setEncoding('utf8');
            for await (const c of res as AsyncIterable<string>) s += c;
            return s;
          },
        });
      },
    );
    req.setNoDelay(true);
    req.once('error', reject);
    req.end(json);
  });
}
