import type { LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { DEFAULT_MEMORY_OPTIONS } from '../../src/shared/memory/stage.ts';
import { llamaMemoryArgs } from '../../src/shared/placement/llama-args.ts';
import { freePort, killGroup, sleep, spawnProc } from './processes.ts';

/** The prompt the cluster tests compare greedy tokens on (a short, ordinary English start). */
export const ORACLE_PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time';

export interface OracleRequest {
  readonly model: string;
  readonly ctx: number;
  readonly prompt: string;
  readonly nPredict: number;
  readonly threads: number;
  /** How long llama-server may take to load the model (2-core CI machines are slow under load). */
  readonly readyTimeoutMs?: number;
}

/**
 * The oracle the cluster tests compare with: one plain llama-server on 127.0.0.1, no RPC, same
 * file and context, greedy decoding; returns its token ids and stops it (process group), also
 * when the request fails. It gets the head's numerics-relevant arguments (llamaMemoryArgs with the
 * load defaults the cluster tests use: -fa on, -ub, --kv-unified, -ctk/-ctv, --no-repack), so a
 * difference is the split's, not a flag's: with llama.cpp's defaults the weights land in the AMX
 * buffer type on CPUs that have it, which no ggml-rpc-server uses.
 */
export async function plainLlamaTokens(bins: Pick<LlamaBinaries, 'llamaServer'>, req: OracleRequest): Promise<number[]> {
  const server = await plainLlamaServer(bins, req);
  try {
    const res = await fetch(`${server.url}/completion`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: req.prompt, n_predict: req.nPredict, temperature: 0, return_tokens: true, cache_prompt: false }),
    });
    return ((await res.json()) as { tokens: number[] }).tokens;
  } finally {
    await server.stop();
  }
}

/** The oracle's llama-server, healthy, for tests that send it requests of their own; `stop` kills its process group. */
export async function plainLlamaServer(bins: Pick<LlamaBinaries, 'llamaServer'>, req: Pick<OracleRequest, 'model' | 'ctx' | 'threads' | 'readyTimeoutMs'>): Promise<{ url: string; stop(): Promise<void> }> {
  const port = await freePort();
  const memory = llamaMemoryArgs({ ...DEFAULT_MEMORY_OPTIONS, ctx: req.ctx });
  const args = ['-m', req.model, ...memory, '--port', String(port), '--host', '127.0.0.1', '-t', String(req.threads)];
  const p = spawnProc('oracle llama-server', args, process.env, bins.llamaServer);
  const url = `http://127.0.0.1:${port}`;
  try {
    const deadline = Date.now() + (req.readyTimeoutMs ?? 120_000);
    for (;;) {
      if (await fetch(`${url}/health`).then((r) => r.status === 200, () => false)) break;
      if (p.child.exitCode !== null) throw new Error(`oracle llama-server exited: ${p.err.slice(-2000)}`);
      if (Date.now() > deadline) throw new Error(`oracle llama-server not healthy in time: ${p.err.slice(-2000)}`);
      await sleep(200);
    }
  } catch (err) {
    await killGroup(p);
    throw err;
  }
  return { url, stop: () => killGroup(p) };
}
