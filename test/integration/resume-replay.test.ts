import { afterAll, beforeAll, expect } from 'vitest';
import { completionBody, relayCompletion } from '../../src/node/generate.ts';
import type { GenerateParams } from '../../src/shared/generation.ts';
import { describeWith, itWith, llamaEngines } from '../helpers/needs.ts';
import { ORACLE_PROMPT, plainLlamaServer } from '../helpers/oracle.ts';
import { testGguf } from '../helpers/test-models.ts';

/*
 * A resumed greedy stream equals the undisturbed one at every point it can be cut. The agent's
 * relay replays the delivered tokens one decode step at a time (generate.ts replayDelivered), on a
 * real llama-server. The naive resume — prompt + delivered tokens prefilled as one batch — is run
 * next to it as the control: llama.cpp's CPU kernels are not batch-invariant, and on this model it
 * flips a near-tie for some cut points (measured: 2 of 47 with 48 tokens), which is what the
 * replay exists to prevent. The cost is logged, not asserted.
 */

const N = 32;
const engines = await llamaEngines();

describeWith([engines], 'resumed greedy streams replay the delivered tokens', () => {
  let server: { url: string; stop(): Promise<void> } | undefined;
  const params: GenerateParams = { prompt: ORACLE_PROMPT, maxTokens: N, temperature: 0, topP: 0, seed: 0, stop: [] };

  beforeAll(async () => {
    if (!engines.ok) return;
    const model = await testGguf(['--layers', '8', '--seed', '7']);
    server = await plainLlamaServer(engines.value, { model, ctx: 2048, threads: 1 });
  }, 120_000);

  afterAll(async () => {
    await server?.stop();
  });

  async function relay(p: GenerateParams): Promise<{ tokens: number[]; ms: number }> {
    const tokens: number[] = [];
    const t0 = performance.now();
    await relayCompletion({ baseUrl: server!.url, params: p, signal: new AbortController().signal, onToken: (c) => tokens.push(...c.tokenIds) });
    return { tokens, ms: performance.now() - t0 };
  }

  /** The naive resume: prompt + delivered as one prefill batch. */
  async function oneBatch(delivered: number[]): Promise<{ tokens: number[]; ms: number }> {
    const t0 = performance.now();
    const body = { ...completionBody({ ...params, maxTokens: N - delivered.length, continueTokenIds: delivered }), stream: false, cache_prompt: false };
    const res = await fetch(`${server!.url}/completion`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    return { tokens: ((await res.json()) as { tokens: number[] }).tokens, ms: performance.now() - t0 };
  }

  itWith([engines], 'cut after any k tokens, the continuation equals the undisturbed run', async () => {
    const undisturbed = await relay(params);
    expect(undisturbed.tokens).toHaveLength(N);
    const flippedByOneBatch: number[] = [];
    let replayMs = 0;
    let oneBatchMs = 0;
    for (let k = 1; k < N; k++) {
      const delivered = undisturbed.tokens.slice(0, k);
      const resumed = await relay({ ...params, maxTokens: N - k, continueTokenIds: delivered });
      expect([...delivered, ...resumed.tokens], `cut after ${k} tokens`).toEqual(undisturbed.tokens);
      const naive = await oneBatch(delivered);
      if ([...delivered, ...naive.tokens].some((t, i) => t !== undisturbed.tokens[i])) flippedByOneBatch.push(k);
      replayMs += resumed.ms;
      oneBatchMs += naive.ms;
    }
    console.info(
      `resume replay: ${N - 1} cut points identical; one-batch resume flipped at cut points [${flippedByOneBatch.join(', ')}]; ` +
        `mean resume request ${(replayMs / (N - 1)).toFixed(0)} ms with replay vs ${(oneBatchMs / (N - 1)).toFixed(0)} ms one batch (undisturbed ${N} tokens: ${undisturbed.ms.toFixed(0)} ms)`,
    );
  }, 300_000);
});
