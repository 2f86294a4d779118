import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import type { CoordinatorClient } from '../../src/coordinator/api/client.ts';
import { sleep } from '../lib/cluster.ts';
import type { ChaosCluster } from './cluster.ts';

/**
 * The steady load: CLIENTS clients, each asking in a loop for the same greedy completion, one
 * streaming request at a time. A failed request is recorded and the client backs off 1 s with a
 * fresh channel (a real client retries; the new channel skips gRPC's reconnect backoff, so a
 * restarted coordinator is measured, not the client library).
 */
export const CLIENTS = 4;
export const PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time';

export interface Stream {
  readonly startMs: number;
  endMs: number;
  tokens: number[];
  /** When each token arrived. */
  times: number[];
  failed: boolean;
  error?: string;
}

export interface Load {
  readonly streams: Stream[];
  /** Every token's arrival time, all clients. */
  readonly arrivals: number[];
  stop(): Promise<void>;
}

export async function greedy(client: CoordinatorClient, model: string, tokens: number): Promise<number[]> {
  const out: number[] = [];
  for await (const ev of client.stream('generate', { model, prompt: PROMPT, maxTokens: tokens, temperature: 0 })) {
    if (ev.event === 'token') out.push(...((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number));
  }
  return out;
}

async function oneClient(c: ChaosCluster, model: string, tokens: number, load: Load, stop: { done: boolean }): Promise<void> {
  let client = await localCoordinatorClient(c.coordinatorAddress, c.coordinatorDir);
  try {
    while (!stop.done) {
      const s: Stream = { startMs: Date.now(), endMs: 0, tokens: [], times: [], failed: false };
      load.streams.push(s);
      try {
        for await (const ev of client.stream('generate', { model, prompt: PROMPT, maxTokens: tokens, temperature: 0 })) {
          if (ev.event !== 'token') continue;
          const ids = ((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number);
          s.tokens.push(...ids);
          s.times.push(...ids.map(() => Date.now()));
          load.arrivals.push(Date.now());
        }
      } catch (err) {
        s.failed = true;
        s.error = err instanceof Error ? err.message : String(err);
        client.close();
        await sleep(1000);
        client = await localCoordinatorClient(c.coordinatorAddress, c.coordinatorDir);
      }
      s.endMs = Date.now();
    }
  } finally {
    client.close();
  }
}

export function startLoad(c: ChaosCluster, model: string, tokens: number): Load {
  const stop = { done: false };
  const load: Load = {
    streams: [],
    arrivals: [],
    async stop() {
      stop.done = true;
      await running;
    },
  };
  const running = Promise.all(Array.from({ length: CLIENTS }, () => oneClient(c, model, tokens, load, stop)));
  return load;
}
