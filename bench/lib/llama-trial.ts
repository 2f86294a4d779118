/**
 * bench:tunnel's trial: a fresh head llama-server whose `--rpc` points at one route to the
 * worker's rpc-server (the rpc-server itself, on loopback or across a link, a forwarder, a control relay), timed from spawn to
 * /health (a cold load: every weight crosses that route), then greedy streamed completions with
 * the prompt cache off, timed at the client.
 */
import { rpcCacheMinSizeEnv } from '../../src/shared/rpc-cache/plan.ts';
import { ssePayloads } from '../../src/shared/sse.ts';
import { freePort, start as startChild, stop } from './children.ts';

const PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, there lived';
/** The warm-up request: one decode step after the prefill is enough to set up the graphs. */
const WARM_TOKENS = 2;
/**
 * /health poll interval while loading: the load time's resolution. 5 ms is < 1 % of a 0.6 s load
 * (20 ms, as before, was 3 %, as large as the margin of the load goal); a poll is one
 * keep-alive-less HTTP request, far below the engines' CPU.
 */
const HEALTH_POLL_MS = 5;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface Completion {
  ttftMs: number;
  decodeTokensPerSecond: number;
  tokenIds: number[];
}

/** One greedy streamed completion of `tokens` tokens, timed at the client; every request prefills. */
export async function complete(httpPort: number, tokens: number): Promise<Completion> {
  const t0 = performance.now();
  const res = await fetch(`http://127.0.0.1:${httpPort}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: PROMPT, stream: true, return_tokens: true, n_predict: tokens, temperature: 0, top_k: 1, cache_prompt: false, ignore_eos: true }),
  });
  if (!res.ok || !res.body) throw new Error(`/completion answered ${res.status}`);
  const tokenIds: number[] = [];
  let first = 0;
  let last = 0;
  for await (const payload of ssePayloads(res.body)) {
    const chunk = JSON.parse(payload) as { tokens?: number[] };
    if (!chunk.tokens?.length) continue;
    last = performance.now();
    if (tokenIds.length === 0) first = last;
    tokenIds.push(...chunk.tokens);
  }
  if (tokenIds.length < Math.min(tokens, 2)) throw new Error(`only ${tokenIds.length} tokens generated`);
  return { ttftMs: first - t0, decodeTokensPerSecond: tokenIds.length < 2 ? Number.NaN : ((tokenIds.length - 1) * 1000) / (last - first), tokenIds };
}

export interface HeadSetup {
  readonly model: string;
  readonly llamaServer: string;
  /** Layers on the rpc-server (`-ngl`). */
  readonly ngl: number;
  readonly threads: number;
  /** Tokens per measured request. */
  readonly tokens: number;
  /** Measured requests per trial (after the warm-up). */
  readonly requests: number;
  /**
   * Extra one-token requests per trial, for time to first token only: its per-request noise is
   * ~10 % of it (several ms) where the goal is 2 ms, and such a request costs a prefill, not a decode.
   */
  readonly ttftProbes: number;
}

export interface HeadRun {
  loadSeconds: number;
  /** The decoding requests. */
  completions: Completion[];
  /** Time to first token of every measured request, probes included. */
  ttftMs: number[];
}

/**
 * One trial against the rpc-server (or relay) at endpoint `rpc` (`host:port`, or `unix:<path>`). `loadOnly`: the pre-seeded loads, stopped once up; their head gets
 * the agent's cache threshold, as the agent starts it, so tensors above it are offered by hash
 * (cold trials keep the stock threshold, as in every earlier run of this bench).
 */
export async function headTrial(rpc: string, h: HeadSetup, o: { loadOnly?: boolean; requests?: number; onWarm?: () => void } = {}): Promise<HeadRun> {
  const httpPort = await freePort();
  const t0 = performance.now();
  const head = startChild(
    h.llamaServer,
    [
      ...['-m', h.model, '--rpc', rpc, '-ngl', String(h.ngl), '-c', '1024', '-t', String(h.threads)],
      ...['--no-warmup', '--host', '127.0.0.1', '--port', String(httpPort)],
    ],
    // TCP transport only: RDMA would bypass the relays under test
    { env: { GGML_RPC_NO_RDMA: '1', ...(o.loadOnly ? rpcCacheMinSizeEnv() : {}) }, logBytes: 20_000 },
  );
  try {
    const deadline = Date.now() + 300_000;
    for (;;) {
      if (head.proc.exitCode !== null) throw new Error(`llama-server exited: ${head.log().slice(-2000)}`);
      const ok = await fetch(`http://127.0.0.1:${httpPort}/health`).then(
        (r) => r.status === 200,
        () => false,
      );
      if (ok) break;
      if (Date.now() > deadline) throw new Error(`llama-server not ready: ${head.log().slice(-2000)}`);
      await sleep(HEALTH_POLL_MS);
    }
    const loadSeconds = (performance.now() - t0) / 1000;
    if (o.loadOnly) return { loadSeconds, completions: [], ttftMs: [] };
    await complete(httpPort, WARM_TOKENS); // one-time graph/buffer set-up: not counted
    o.onWarm?.();
    const completions: Completion[] = [];
    for (let i = 0; i < (o.requests ?? h.requests); i++) completions.push(await complete(httpPort, h.tokens));
    const probes: Completion[] = [];
    for (let i = 0; i < (o.requests === undefined ? h.ttftProbes : 0); i++) probes.push(await complete(httpPort, 1));
    return { loadSeconds, completions, ttftMs: [...completions, ...probes].map((c) => c.ttftMs) };
  } finally {
    await stop(head.proc);
  }
}
