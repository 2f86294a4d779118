import { describe, expect, it } from 'vitest';
import { GenerateError, completionBody, generateParamsFromRequest, parseCompletionPayload } from '../../src/node/generate.ts';
import { checkGenerateRequest, coordinatorGenerateRequestSchema, logprobsFromWire, logprobsToWire } from '../../src/shared/generation.ts';

describe('Generate request → llama-server /completion body', () => {
  it('greedy at temperature 0, stream with token ids, seed/stop only when set', () => {
    const p = generateParamsFromRequest({ prompt: 'Hi', maxTokens: 16, temperature: 0, seed: '0', stop: [] });
    expect(completionBody(p)).toEqual({ prompt: 'Hi', stream: true, return_tokens: true, n_predict: 16, temperature: 0, top_k: 1, cache_prompt: true });
  });

  it('sampling settings pass through; max_tokens 0 means no limit', () => {
    const p = generateParamsFromRequest({ prompt: 'Hi', temperature: 0.7, topP: 0.9, seed: '42', stop: ['\n'] });
    expect(completionBody(p)).toEqual({ prompt: 'Hi', stream: true, return_tokens: true, n_predict: -1, temperature: 0.7, top_p: 0.9, seed: 42, stop: ['\n'], cache_prompt: true });
  });

  it.each([
    [{ prompt: '' }, /prompt is empty/],
    [{ prompt: 'x', temperature: -1 }, /invalid temperature/],
    [{ prompt: 'x', topP: 2 }, /invalid top_p/],
    [{ prompt: 'x', seed: '99999999999' }, /invalid seed/],
    [{ prompt: 'x', maxTokens: -3 }, /malformed/],
  ])('refuses %j', (req, message) => {
    expect(() => generateParamsFromRequest(req)).toThrow(message);
  });

  it.each([
    [{ temperature: -1 }, /^invalid temperature -1: 0–10/],
    [{ temperature: 11 }, /^invalid temperature 11/],
    [{ topP: 2 }, /^invalid top_p 2: 0–1/],
    [{ seed: '4294967296' }, /^invalid seed 4294967296/],
    [{ seed: '-1' }, /^invalid seed -1/],
    [{ maxTokens: 1.5 }, /^malformed Generate request/],
    [{ logprobs: true, topLogprobs: 21 }, /^invalid top_logprobs 21: 0–20/],
    [{ topLogprobs: 2 }, /^top_logprobs needs logprobs/],
  ])('Coordinator.Generate refuses %j with the words the agent uses', (fields, message) => {
    const c = checkGenerateRequest(coordinatorGenerateRequestSchema, { model: 'm', prompt: 'x', ...fields });
    expect(c.ok ? 'accepted' : c.problem).toMatch(message);
    expect(() => generateParamsFromRequest({ prompt: 'x', ...fields })).toThrow(message);
  });

  it('Coordinator.Generate: int64 seed as a string becomes a number, defaults fill the rest', () => {
    expect(checkGenerateRequest(coordinatorGenerateRequestSchema, { prompt: 'x', seed: '4294967295' })).toEqual({
      ok: true,
      request: { model: '', prompt: 'x', maxTokens: 0, temperature: 0, topP: 0, seed: 4294967295, stop: [], logprobs: false, topLogprobs: 0 },
    });
  });
});

describe('logprobs', () => {
  it('ask llama-server for at least one alternative (the chosen token comes with its list)', () => {
    expect(completionBody(generateParamsFromRequest({ prompt: 'x', logprobs: true })).n_probs).toBe(1);
    expect(completionBody(generateParamsFromRequest({ prompt: 'x', logprobs: true, topLogprobs: 7 })).n_probs).toBe(7);
    expect(completionBody(generateParamsFromRequest({ prompt: 'x' }))).not.toHaveProperty('n_probs');
  });

  it("llama-server's completion_probabilities become TokenLogprobs, trimmed to what was asked", () => {
    // Recorded from llama-server (n_probs 2) on the demo model.
    const payload =
      '{"index":0,"content":"()`","tokens":[2555],"stop":false,"completion_probabilities":[{"id":2555,"token":"()`","bytes":[40,41,96],"logprob":-6.2368,"top_logprobs":[{"id":2555,"token":"()`","bytes":[40,41,96],"logprob":-6.2368},{"id":24310,"token":"ordinary","bytes":[111,114,100,105,110,97,114,121],"logprob":-6.8281}]}]}';
    const chosen = { tokenId: 2555, token: '()`', bytes: [40, 41, 96], logprob: -6.2368 };
    expect(parseCompletionPayload(payload, 2)).toEqual([
      { kind: 'token', chunk: { text: '()`', tokenIds: [2555], logprobs: [{ ...chosen, topLogprobs: [chosen, { tokenId: 24310, token: 'ordinary', bytes: [...Buffer.from('ordinary')], logprob: -6.8281 }] }] } },
    ]);
    expect(parseCompletionPayload(payload, 0)).toEqual([{ kind: 'token', chunk: { text: '()`', tokenIds: [2555], logprobs: [{ ...chosen, topLogprobs: [] }] } }]);
  });

  it('survive the proto round trip (bytes as a Buffer)', () => {
    const l = [{ tokenId: 5, token: 'é', bytes: [195, 169], logprob: -0.5, topLogprobs: [{ tokenId: 6, token: '\ufffd', bytes: [195], logprob: -1 }] }];
    expect(logprobsFromWire(logprobsToWire(l))).toEqual(l);
    expect(() => logprobsFromWire([{ tokenId: 'x' }])).toThrow(/malformed TokenChunk.logprobs/);
  });
});

describe('llama-server SSE stream', () => {
  it('token chunks carry text and ids; the final chunk maps stop_type to a finish reason', () => {
    expect(parseCompletionPayload('{"content":" the","tokens":[278],"stop":false}')).toEqual([{ kind: 'token', chunk: { text: ' the', tokenIds: [278] } }]);
    const final = JSON.stringify({
      content: '',
      tokens: [],
      stop: true,
      stop_type: 'limit',
      tokens_predicted: 8,
      tokens_evaluated: 5,
      timings: { prompt_n: 5, prompt_ms: 12.5, prompt_per_second: 400, predicted_n: 8, predicted_ms: 80, predicted_per_second: 100 },
    });
    expect(parseCompletionPayload(final)).toEqual([
      {
        kind: 'done',
        done: { finishReason: 'length', promptTokens: 5, completionTokens: 8, timings: { promptMs: 12.5, predictedMs: 80, promptTokensPerSecond: 400, predictedTokensPerSecond: 100 } },
      },
    ]);
    expect(parseCompletionPayload('{"stop":true,"stop_type":"eos"}')[0]).toMatchObject({ kind: 'done', done: { finishReason: 'stop' } });
    expect(parseCompletionPayload('{"stop":true,"stop_type":"word"}')[0]).toMatchObject({ kind: 'done', done: { finishReason: 'stop' } });
  });

  it('a chunk with both the last token and stop yields both, token first', () => {
    const evs = parseCompletionPayload('{"content":"!","tokens":[0],"stop":true,"stop_type":"eos"}');
    expect(evs.map((e) => e.kind)).toEqual(['token', 'done']);
  });

  it('engine errors become gRPC-shaped errors', () => {
    const over = () => parseCompletionPayload('{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error"}}');
    expect(over).toThrow(GenerateError);
    try {
      over();
    } catch (e) {
      expect((e as GenerateError).code).toBe('INVALID_ARGUMENT');
    }
    expect(() => parseCompletionPayload('not json')).toThrow(/not JSON/);
  });
});
