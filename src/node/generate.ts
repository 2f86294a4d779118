import { z } from 'zod';
import { checkGenerateRequest, type GenerateParams, nodeGenerateRequestSchema, type Timings, type TokenLogprob } from '../shared/generation.ts';
import { ssePayloads } from '../shared/sse.ts';
import { type EngineResponse, postToEngine } from './engine-http.ts';

/**
 * Generate relay: turns a NodeAgent.Generate request into a streaming call of the local
 * llama-server's native `/completion` endpoint and its SSE stream back into TokenChunk /
 * GenerateDone. The native endpoint (not /v1/completions) is used because it returns the token
 * ids (`return_tokens`), which the coordinator needs for exact usage counts and for checking
 * distributed output against single-node output token by token.
 *
 * Cancellation: aborting the fetch closes the HTTP connection; llama-server notices the closed
 * socket on its next write and releases the slot.
 */

export interface TokenChunk {
  readonly text: string;
  readonly tokenIds: readonly number[];
  /** One per token id when the request asked for logprobs. */
  readonly logprobs?: readonly TokenLogprob[] | undefined;
}

export interface GenerateDone {
  readonly finishReason: 'stop' | 'length';
  readonly promptTokens: number;
  readonly completionTokens: number;
  readonly timings: Timings;
}

export class GenerateError extends Error {
  override readonly name = 'GenerateError';
  constructor(
    readonly code: 'INVALID_ARGUMENT' | 'UNAVAILABLE' | 'INTERNAL' | 'CANCELLED' | 'RESOURCE_EXHAUSTED',
    message: string,
  ) {
    super(message);
  }
}

const chatMessagesSchema = z.array(z.object({ role: z.string().min(1), content: z.string() }).loose()).min(1);

/** Check a proto-loader GenerateRequest (int64 seed arrives as a string). */
export function generateParamsFromRequest(raw: unknown): GenerateParams & { engineId: string; requestId: string } {
  const checked = checkGenerateRequest(nodeGenerateRequestSchema, raw);
  if (!checked.ok) throw new GenerateError('INVALID_ARGUMENT', checked.problem);
  const r = checked.request;
  if (r.messagesJson !== '') {
    if (r.prompt !== '') throw new GenerateError('INVALID_ARGUMENT', 'give either prompt or messages_json, not both');
    let messages: unknown;
    try {
      messages = JSON.parse(r.messagesJson);
    } catch {
      throw new GenerateError('INVALID_ARGUMENT', 'messages_json is not JSON');
    }
    if (!chatMessagesSchema.safeParse(messages).success) throw new GenerateError('INVALID_ARGUMENT', 'messages_json must be a non-empty array of {role, content}');
  } else if (r.prompt === '') throw new GenerateError('INVALID_ARGUMENT', 'prompt is empty');
  return {
    engineId: r.engineId,
    requestId: r.requestId,
    prompt: r.prompt,
    maxTokens: r.maxTokens,
    temperature: r.temperature,
    topP: r.topP,
    seed: r.seed,
    stop: r.stop,
    ...(r.messagesJson !== '' ? { messagesJson: r.messagesJson } : {}),
    ...(r.continueTokenIds.length > 0 ? { continueTokenIds: r.continueTokenIds } : {}),
    ...(r.logprobs ? { logprobs: true, topLogprobs: r.topLogprobs } : {}),
  };
}

/** The JSON body for llama-server `POST /completion`. */
export function completionBody(p: GenerateParams): Record<string, unknown> {
  const body: Record<string, unknown> = {
    // A resumed stream: llama-server's mixed prompt tokenizes the text (with BOS) and takes the
    // delivered ids as they are, so the context equals the lost engine's token for token.
    prompt: p.continueTokenIds?.length ? [p.prompt, ...p.continueTokenIds] : p.prompt,
    stream: true,
    return_tokens: true,
    // 0 means "until a stop condition or the context is full", llama.cpp's -1.
    n_predict: p.maxTokens > 0 ? p.maxTokens : -1,
    temperature: p.temperature,
    cache_prompt: true,
  };
  // Greedy must be exactly argmax so distributed output can be compared with single-node
  // output token by token: temperature 0 plus top_k 1 leaves no sampler any choice.
  if (p.temperature === 0) body.top_k = 1;
  if (p.topP > 0) body.top_p = p.topP;
  if (p.seed !== 0) body.seed = p.seed;
  if (p.stop.length > 0) body.stop = p.stop;
  // n_probs reports the full distribution's logprobs (not post-sampling): the chosen token's
  // and the n_probs most likely; at least 1 so the chosen token's own logprob comes back.
  if (p.logprobs) body.n_probs = Math.max(1, p.topLogprobs ?? 0);
  return body;
}

const timingsSchema = z
  .object({
    prompt_n: z.number().optional(),
    prompt_ms: z.number().optional(),
    prompt_per_second: z.number().optional(),
    predicted_n: z.number().optional(),
    predicted_ms: z.number().optional(),
    predicted_per_second: z.number().optional(),
  })
  .loose();

const probSchema = z.object({ id: z.number().int(), token: z.string(), bytes: z.array(z.number().int()).nullish(), logprob: z.number() }).loose();
const tokenProbSchema = probSchema.extend({ top_logprobs: z.array(probSchema).default([]) });

const completionChunkSchema = z
  .object({
    content: z.string().optional(),
    completion_probabilities: z.array(tokenProbSchema).optional(),
    tokens: z.array(z.number().int()).optional(),
    stop: z.boolean().optional(),
    stop_type: z.string().optional(),
    tokens_predicted: z.number().optional(),
    tokens_evaluated: z.number().optional(),
    timings: timingsSchema.optional(),
    error: z.unknown().optional(),
  })
  .loose();

const utf8 = new TextEncoder();
const topOf = (p: z.infer<typeof probSchema>) => ({ tokenId: p.id, token: p.token, bytes: p.bytes ?? [...utf8.encode(p.token)], logprob: p.logprob });

export type CompletionEvent = { kind: 'token'; chunk: TokenChunk } | { kind: 'done'; done: Omit<GenerateDone, 'timings'> & { timings: Omit<Timings, 'firstTokenMs'> } };

/**
 * Interpret one `/completion` SSE payload. A chunk may carry both the last tokens and `stop`.
 * `topLogprobs` trims llama-server's list (it sends at least one alternative: n_probs ≥ 1).
 */
export function parseCompletionPayload(payload: string, topLogprobs = 0): CompletionEvent[] {
  let json: unknown;
  try {
    json = JSON.parse(payload);
  } catch {
    throw new GenerateError('INTERNAL', `llama-server sent a stream event that is not JSON: ${payload.slice(0, 120)}`);
  }
  const parsed = completionChunkSchema.safeParse(json);
  if (!parsed.success) throw new GenerateError('INTERNAL', 'llama-server sent an unexpected stream event');
  const c = parsed.data;
  if (c.error !== undefined) throw engineError(c.error);
  const events: CompletionEvent[] = [];
  const text = c.content ?? '';
  const tokenIds = c.tokens ?? [];
  const logprobs = c.completion_probabilities?.map((p) => ({ ...topOf(p), topLogprobs: p.top_logprobs.slice(0, topLogprobs).map(topOf) }));
  if (text !== '' || tokenIds.length > 0) events.push({ kind: 'token', chunk: { text, tokenIds, ...(logprobs ? { logprobs } : {}) } });
  if (c.stop) {
    const t = c.timings ?? {};
    events.push({
      kind: 'done',
      done: {
        // eos and stop words are "stop"; the n_predict limit (and a full context) is "length".
        finishReason: c.stop_type === 'limit' ? 'length' : 'stop',
        promptTokens: c.tokens_evaluated ?? t.prompt_n ?? 0,
        completionTokens: c.tokens_predicted ?? t.predicted_n ?? 0,
        timings: {
          promptMs: t.prompt_ms ?? 0,
          predictedMs: t.predicted_ms ?? 0,
          promptTokensPerSecond: t.prompt_per_second ?? 0,
          predictedTokensPerSecond: t.predicted_per_second ?? 0,
        },
      },
    });
  }
  return events;
}

function engineError(error: unknown): GenerateError {
  const e = (typeof error === 'object' && error !== null ? error : { message: String(error) }) as { message?: unknown; type?: unknown; code?: unknown };
  const message = typeof e.message === 'string' ? e.message : JSON.stringify(error);
  // llama-server uses HTTP-like codes: 400 bad request (e.g. prompt over context), 503 busy/loading.
  if (e.code === 400 || e.type === 'invalid_request_error' || e.type === 'exceed_context_size_error') return new GenerateError('INVALID_ARGUMENT', message);
  if (e.code === 503 || e.type === 'unavailable_error') return new GenerateError('UNAVAILABLE', message);
  return new GenerateError('INTERNAL', `llama-server: ${message}`);
}

export interface RelayOptions {
  readonly baseUrl: string;
  readonly params: GenerateParams;
  readonly signal: AbortSignal;
  readonly onToken: (chunk: TokenChunk) => void;
  readonly now?: () => number;
}

/** Stream one completion from llama-server; resolves with the final GenerateDone. */
export async function relayCompletion(opts: RelayOptions): Promise<GenerateDone> {
  const now = opts.now ?? (() => performance.now());
  const t0 = now();
  let firstTokenMs = 0;
  let params = opts.params;
  if (params.messagesJson) params = { ...params, prompt: await applyChatTemplate(opts.baseUrl, params.messagesJson, opts.signal), messagesJson: undefined };
  // A resumed greedy stream: rebuild the lost engine's context first, then continue on the same
  // slot. A sampled one cannot be identical anyway (the sampler's state is gone): one prefill.
  const body = completionBody(params);
  if (params.continueTokenIds?.length && params.temperature === 0) body.id_slot = await replayDelivered(opts.baseUrl, params, opts.signal);
  const res = await postCompletion(opts.baseUrl, body, opts.signal, { accept: 'text/event-stream' });
  try {
    for await (const payload of ssePayloads(res.body as AsyncIterable<Uint8Array>)) {
      for (const ev of parseCompletionPayload(payload, params.topLogprobs)) {
        if (ev.kind === 'token') {
          if (firstTokenMs === 0 && ev.chunk.tokenIds.length > 0) firstTokenMs = now() - t0;
          opts.onToken(ev.chunk);
        } else {
          return { ...ev.done, timings: { ...ev.done.timings, firstTokenMs } };
        }
      }
    }
  } catch (err) {
    if (opts.signal.aborted) throw new GenerateError('CANCELLED', 'generation cancelled by the client');
    if (err instanceof GenerateError) throw err;
    throw new GenerateError('UNAVAILABLE', `stream from llama-server broke: ${(err as Error).message}`);
  }
  if (opts.signal.aborted) throw new GenerateError('CANCELLED', 'generation cancelled by the client');
  throw new GenerateError('UNAVAILABLE', 'llama-server ended the stream without a final event (did the engine die?)');
}

/** POST /completion; refusals and an unreachable engine become GenerateErrors. */
async function postCompletion(baseUrl: string, body: Record<string, unknown>, signal: AbortSignal, headers: Record<string, string> = {}): Promise<EngineResponse> {
  let res: EngineResponse;
  try {
    res = await postToEngine(`${baseUrl}/completion`, JSON.stringify(body), signal, headers);
  } catch (err) {
    if (signal.aborted) throw new GenerateError('CANCELLED', 'generation cancelled by the client');
    throw new GenerateError('UNAVAILABLE', `llama-server at ${baseUrl} is not reachable: ${(err as Error).message}`);
  }
  if (res.status >= 200 && res.status <= 299) return res;
  const text = await res.text().catch(() => '');
  let error: unknown = { message: text || `HTTP ${res.status}`, code: res.status };
  try {
    error = (JSON.parse(text) as { error?: unknown }).error ?? error;
  } catch {}
  throw engineError(error);
}

const replayStepSchema = z.object({ id_slot: z.number().int() }).loose();

/**
 * A resumed stream's context, computed the way the lost engine computed it: llama.cpp's CPU
 * kernels are not batch-invariant, so prefilling prompt + delivered tokens as one batch gives
 * (slightly) different KV rows than the original prefill + one-token decodes, and a greedy
 * near-tie can flip. So the prompt is prefilled alone and fresh (`cache_prompt` off: as on a new
 * engine), then each delivered token is fed as its own one-token step (`n_predict` 1 on a prompt
 * one token longer: the slot's cache holds the rest and llama-server evaluates only the new
 * token, like a decode step). Every step is pinned to the same slot; returns its id for the
 * continuation. Costs one request per delivered token (a decode step plus a loopback round trip).
 */
async function replayDelivered(baseUrl: string, p: GenerateParams, signal: AbortSignal): Promise<number> {
  const ids = p.continueTokenIds ?? [];
  let slot = -1;
  for (let i = 0; i < ids.length; i++) {
    const step = { ...completionBody({ ...p, maxTokens: 1, continueTokenIds: ids.slice(0, i) }), stream: false, cache_prompt: i > 0, id_slot: slot };
    const res = await postCompletion(baseUrl, step, signal);
    const text = await res.text().catch((err: unknown) => {
      throw signal.aborted ? new GenerateError('CANCELLED', 'generation cancelled by the client') : new GenerateError('UNAVAILABLE', `replay step broke: ${(err as Error).message}`);
    });
    let parsed: ReturnType<typeof replayStepSchema.safeParse> | undefined;
    try {
      parsed = replayStepSchema.safeParse(JSON.parse(text));
    } catch {}
    if (!parsed?.success) throw new GenerateError('INTERNAL', `llama-server answered a replay step with: ${text.slice(0, 120)}`);
    slot = parsed.data.id_slot;
  }
  return slot;
}

/**
 * Chat messages → prompt with the model's own chat template (llama-server `/apply-template`,
 * which uses the GGUF's template or llama.cpp's fallback), so the chat prompt is byte-identical
 * to what llama-server's own /v1/chat/completions would build.
 */
export async function applyChatTemplate(baseUrl: string, messagesJson: string, signal: AbortSignal): Promise<string> {
  let res: Response;
  try {
    res = await fetch(`${baseUrl}/apply-template`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: `{"messages":${messagesJson}}`,
      signal,
    });
  } catch (err) {
    if (signal.aborted) throw new GenerateError('CANCELLED', 'generation cancelled by the client');
    throw new GenerateError('UNAVAILABLE', `llama-server at ${baseUrl} is not reachable: ${(err as Error).message}`);
  }
  const text = await res.text().catch(() => '');
  if (!res.ok) {
    let error: unknown = { message: text || `HTTP ${res.status}`, code: res.status };
    try {
      error = (JSON.parse(text) as { error?: unknown }).error ?? error;
    } catch {}
    throw engineError(error);
  }
  let prompt: unknown;
  try {
    prompt = (JSON.parse(text) as { prompt?: unknown }).prompt;
  } catch {}
  if (typeof prompt !== 'string' || prompt === '') throw new GenerateError('INTERNAL', 'llama-server /apply-template returned no prompt');
  return prompt;
}
