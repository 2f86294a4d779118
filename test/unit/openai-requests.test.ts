import { describe, expect, it } from 'vitest';
import { CoordinatorError } from '../../src/coordinator/errors.ts';
import { ApiError, apiErrorOf, errorBody } from '../../src/coordinator/api/openai/errors.ts';
import { messageText, parseChatRequest, parseCompletionRequest } from '../../src/coordinator/api/openai/requests.ts';
import { completionResponse, sseData, streamChunk, usageChunk } from '../../src/coordinator/api/openai/responses.ts';
import { OrchardError, UsageError } from '../../src/shared/errors.ts';

const limits = (model: string) => {
  if (model !== 'm') throw new ApiError(404, 'invalid_request_error', 'model_not_found', `The model '${model}' does not exist`, 'model');
  return { ctx: 1024 };
};

function refusal(fn: () => unknown): ApiError {
  try {
    fn();
  } catch (err) {
    if (err instanceof ApiError) return err;
    throw err;
  }
  throw new Error('expected a refusal');
}

describe('chat request parsing', () => {
  it('maps an ordinary request onto the runtime request', () => {
    const p = parseChatRequest(
      { model: 'm', messages: [{ role: 'system', content: 's' }, { role: 'user', content: 'u' }], max_tokens: 10, temperature: 0.5, top_p: 0.9, seed: 3, stop: 'x', stream: true, stream_options: { include_usage: true } },
      limits,
    );
    expect(p).toEqual({
      model: 'm',
      stream: true,
      includeUsage: true,
      generate: { model: 'm', prompt: '', messages: [{ role: 'system', content: 's' }, { role: 'user', content: 'u' }], maxTokens: 10, temperature: 0.5, topP: 0.9, seed: 3, stop: ['x'] },
    });
  });

  it('uses OpenAI defaults: temperature 1, no limit, no stream', () => {
    const p = parseChatRequest({ model: 'm', messages: [{ role: 'user', content: 'u' }] }, limits);
    expect(p.stream).toBe(false);
    expect(p.generate.temperature).toBe(1);
    expect(p.generate.maxTokens).toBe(0);
    expect(p.generate.seed).toBeUndefined();
    expect(p.generate.stop).toEqual([]);
  });

  it('keeps seed 0 reproducible (the engine reads 0 as "random")', () => {
    expect(parseChatRequest({ model: 'm', messages: [{ role: 'user', content: 'u' }], seed: 0 }, limits).generate.seed).toBe(0xffffffff);
  });

  it('takes max_completion_tokens, flattens text parts, maps developer to system', () => {
    const p = parseChatRequest({ model: 'm', messages: [{ role: 'developer', content: [{ type: 'text', text: 'a' }, { type: 'text', text: 'b' }] }], max_completion_tokens: 7 }, limits);
    expect(p.generate.messages).toEqual([{ role: 'system', content: 'ab' }]);
    expect(p.generate.maxTokens).toBe(7);
  });

  it.each([
    [{ model: 'm' }, 'messages'],
    [{ model: 'm', messages: [] }, 'messages'],
    [{ messages: [{ role: 'user', content: 'u' }] }, 'model'],
    [{ model: 'm', messages: [{ role: 'wizard', content: 'u' }] }, 'messages.0.role'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], temperature: 3 }, 'temperature'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], top_p: 1.5 }, 'top_p'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], n: 2 }, 'n'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], max_tokens: 0 }, 'max_tokens'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], max_tokens: 1025 }, 'max_tokens'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], stop: '' }, 'stop'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], seed: -1 }, 'seed'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], stream_options: { include_usage: true } }, 'stream_options'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], logprobs: 3 }, 'logprobs'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], top_logprobs: 2 }, 'top_logprobs'],
    [{ model: 'm', messages: [{ role: 'user', content: 'u' }], logprobs: true, top_logprobs: 21 }, 'top_logprobs'],
    [{ model: 'm', messages: [{ role: 'user', content: [{ type: 'image_url' }] }] }, 'messages.0.content.0'],
  ])('refuses %j with a 400 naming %s', (body, param) => {
    const e = refusal(() => parseChatRequest(body, limits));
    expect(e.status).toBe(400);
    expect(e.type).toBe('invalid_request_error');
    expect(e.param).toBe(param);
  });

  it('max_tokens over the context is context_length_exceeded', () => {
    const e = refusal(() => parseChatRequest({ model: 'm', messages: [{ role: 'user', content: 'u' }], max_tokens: 5000 }, limits));
    expect(e.code).toBe('context_length_exceeded');
    expect(e.message).toContain('1024');
  });

  it('an unknown model is the lookup’s 404', () => {
    expect(refusal(() => parseChatRequest({ model: 'x', messages: [{ role: 'user', content: 'u' }] }, limits)).status).toBe(404);
  });

  it('null content is empty text', () => {
    expect(messageText(null, 0)).toBe('');
  });
});

describe('completion request parsing', () => {
  it('accepts a string or a one-string array', () => {
    expect(parseCompletionRequest({ model: 'm', prompt: 'p' }, limits).generate.prompt).toBe('p');
    expect(parseCompletionRequest({ model: 'm', prompt: ['q'] }, limits).generate.prompt).toBe('q');
  });
  it.each([
    [{ model: 'm' }, 'prompt'],
    [{ model: 'm', prompt: '' }, 'prompt'],
    [{ model: 'm', prompt: [1, 2] }, 'prompt'],
    [{ model: 'm', prompt: ['a', 'b'] }, 'prompt'],
    [{ model: 'm', prompt: 'p', echo: true }, 'echo'],
    [{ model: 'm', prompt: 'p', best_of: 3 }, 'best_of'],
    [{ model: 'm', prompt: 'p', logprobs: 6 }, 'logprobs'],
    [{ model: 'm', prompt: 'p', logprobs: true }, 'logprobs'],
  ])('refuses %j (%s)', (body, param) => {
    const e = refusal(() => parseCompletionRequest(body, limits));
    expect(e.status).toBe(400);
    expect(e.param).toBe(param);
  });
});

describe('logprobs requests', () => {
  it('chat: logprobs true with top_logprobs; completions: logprobs is the number of alternatives', () => {
    const chat = parseChatRequest({ model: 'm', messages: [{ role: 'user', content: 'u' }], logprobs: true, top_logprobs: 3 }, limits).generate;
    expect(chat).toMatchObject({ logprobs: true, topLogprobs: 3 });
    expect(parseChatRequest({ model: 'm', messages: [{ role: 'user', content: 'u' }], logprobs: false }, limits).generate.logprobs).toBeUndefined();
    expect(parseCompletionRequest({ model: 'm', prompt: 'p', logprobs: 0 }, limits).generate).toMatchObject({ logprobs: true, topLogprobs: 0 });
    expect(parseCompletionRequest({ model: 'm', prompt: 'p' }, limits).generate.logprobs).toBeUndefined();
  });
});

describe('errors', () => {
  it.each([
    ['NOT_FOUND', 404],
    ['RESOURCE_EXHAUSTED', 429],
    ['FAILED_PRECONDITION', 503],
    ['UNAVAILABLE', 503],
    ['INVALID_ARGUMENT', 400],
    ['INTERNAL', 500],
  ] as const)('%s → %d', (code, status) => {
    expect(apiErrorOf(new CoordinatorError(code, 'x')).status).toBe(status);
  });
  it('usage errors are 400, other Orchard errors 503, anything else 500', () => {
    expect(apiErrorOf(new UsageError('u')).status).toBe(400);
    expect(apiErrorOf(new OrchardError('o')).status).toBe(503);
    expect(apiErrorOf(new Error('boom'))).toMatchObject({ status: 500, message: 'internal error: boom' });
  });
  it('has the OpenAI body shape', () => {
    expect(errorBody(new ApiError(401, 'authentication_error', 'invalid_api_key', 'no'))).toEqual({
      error: { message: 'no', type: 'authentication_error', code: 'invalid_api_key', param: null },
    });
  });
});

describe('responses', () => {
  const meta = { id: 'cmpl-1', created: 1, model: 'm' };
  const done = { kind: 'done' as const, finishReason: 'length', promptTokens: 3, completionTokens: 4, timings: { promptMs: 1, predictedMs: 2, promptTokensPerSecond: 3, predictedTokensPerSecond: 4, firstTokenMs: 5 } };

  it('chat and text completions carry usage and finish_reason', () => {
    const chat = completionResponse('chat', meta, 'hi', done);
    expect(chat).toMatchObject({ object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content: 'hi' }, finish_reason: 'length' }], usage: { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 } });
    const text = completionResponse('completion', meta, 'hi', { ...done, finishReason: 'stop' });
    expect(text).toMatchObject({ object: 'text_completion', choices: [{ text: 'hi', finish_reason: 'stop' }] });
  });

  it('stream chunks: role first, content deltas, empty final delta, usage chunk without choices', () => {
    expect(streamChunk('chat', meta, { text: '', first: true }, false)).toMatchObject({ object: 'chat.completion.chunk', choices: [{ delta: { role: 'assistant', content: '' }, finish_reason: null }] });
    expect(streamChunk('chat', meta, { text: 'a' }, true)).toMatchObject({ choices: [{ delta: { content: 'a' } }], usage: null });
    expect(streamChunk('chat', meta, { finish: 'stop' }, false)).toMatchObject({ choices: [{ delta: {}, finish_reason: 'stop' }] });
    expect(streamChunk('chat', meta, { text: 'a' }, false)).not.toHaveProperty('usage');
    expect(usageChunk('completion', meta, done)).toMatchObject({ object: 'text_completion', choices: [], usage: { total_tokens: 7 } });
  });

  it("logprobs in OpenAI's shapes: chat content entries, completions' parallel arrays", () => {
    const a = { tokenId: 1, token: 'Hi', bytes: [72, 105], logprob: -0.25 };
    const b = { tokenId: 2, token: ' there', bytes: [...Buffer.from(' there')], logprob: -1.5 };
    const lps = [
      { ...a, topLogprobs: [a, b] },
      { ...b, topLogprobs: [a] },
    ];
    expect(completionResponse('chat', meta, 'Hi there', done, lps)).toMatchObject({
      choices: [{ logprobs: { refusal: null, content: [{ token: 'Hi', logprob: -0.25, bytes: [72, 105], top_logprobs: [{ token: 'Hi', logprob: -0.25, bytes: [72, 105] }, { token: ' there', logprob: -1.5 }] }, { token: ' there', top_logprobs: [{ token: 'Hi' }] }] } }],
    });
    expect(completionResponse('chat', meta, 'Hi', done)).toMatchObject({ choices: [{ logprobs: null }] });
    // The chosen token is always in top_logprobs (OpenAI: up to logprobs + 1 entries).
    expect(completionResponse('completion', meta, 'Hi there', done, lps)).toMatchObject({
      choices: [{ logprobs: { tokens: ['Hi', ' there'], token_logprobs: [-0.25, -1.5], top_logprobs: [{ Hi: -0.25, ' there': -1.5 }, { Hi: -0.25, ' there': -1.5 }], text_offset: [0, 2] } }],
    });
    expect(streamChunk('completion', meta, { text: ' there', logprobs: [lps[1]!], offset: 2 }, false)).toMatchObject({ choices: [{ logprobs: { tokens: [' there'], text_offset: [2] } }] });
    expect(streamChunk('chat', meta, { text: 'a' }, false)).toMatchObject({ choices: [{ logprobs: null }] });
  });

  it('SSE events are one data line each', () => {
    expect(sseData({ a: 'x\ny' })).toBe('data: {"a":"x\\ny"}\n\n');
    expect(sseData('[DONE]')).toBe('data: [DONE]\n\n');
  });
});
