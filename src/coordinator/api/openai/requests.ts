import { z } from 'zod';
import { MAX_TOP_LOGPROBS } from '../../../shared/generation.ts';
import type { ChatMessage, GenerateRequest } from '../../instances/runtime.ts';
import { type ApiError, invalid } from './errors.ts';

/**
 * OpenAI request bodies → the runtime's GenerateRequest. Validated once, here, with zod; every
 * refusal is a 400 naming the parameter (`param`), like OpenAI's own answers. Fields Orchard
 * does not implement but clients commonly send with their default value (n = 1, presence
 * penalty 0, …) are accepted; non-default values of them are refused rather than ignored, so
 * nobody gets silently different sampling than they asked for.
 */

/** What the request handler needs to know about the target model. */
export interface ModelLimits {
  /** The loaded context size (llama-server -c): max_tokens beyond it can never be honoured. */
  readonly ctx: number;
}

export interface ParsedRequest {
  readonly model: string;
  readonly stream: boolean;
  readonly includeUsage: boolean;
  readonly generate: GenerateRequest;
}

/** OpenAI's limits: chat `top_logprobs` 0–20, the legacy completions' `logprobs` 0–5. */
const MAX_COMPLETION_LOGPROBS = 5;

const stopSchema = z.union([z.string(), z.array(z.string()).max(4, 'at most 4 stop sequences')]).nullish();

const common = {
  model: z.string({ error: 'model is required' }).min(1, 'model is required'),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().nullish() }).loose().nullish(),
  max_tokens: z.number().int().nonnegative().nullish(),
  temperature: z.number().min(0).max(2).nullish(),
  top_p: z.number().min(0).max(1).nullish(),
  seed: z.number().int().nullish(),
  stop: stopSchema,
  n: z.number().int().nullish(),
  user: z.string().nullish(),
  presence_penalty: z.number().nullish(),
  frequency_penalty: z.number().nullish(),
};

const contentPart = z.object({ type: z.string(), text: z.string().optional() }).loose();
const messageSchema = z
  .object({
    role: z.enum(['system', 'developer', 'user', 'assistant', 'tool']),
    content: z.union([z.string(), z.array(contentPart), z.null()]).optional(),
    name: z.string().optional(),
  })
  .loose();

export const chatRequestSchema = z
  .object({
    ...common,
    messages: z.array(messageSchema, { error: 'messages is required (a non-empty array)' }).min(1, 'messages must not be empty'),
    max_completion_tokens: z.number().int().nonnegative().nullish(),
    logprobs: z.boolean().nullish(),
    top_logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).nullish(),
  })
  .loose();

export const completionRequestSchema = z
  .object({
    ...common,
    prompt: z.union([z.string(), z.array(z.string()).length(1, 'only one prompt per request'), z.array(z.number())], { error: 'prompt is required' }),
    echo: z.boolean().nullish(),
    suffix: z.string().nullish(),
    best_of: z.number().int().nullish(),
    // The legacy API's logprobs is the number of alternatives (0 = the chosen token's alone).
    logprobs: z.number().int().min(0).max(MAX_COMPLETION_LOGPROBS).nullish(),
  })
  .loose();

function firstIssue(err: z.ZodError): ApiError {
  const issue = err.issues[0];
  const path = issue?.path.map(String).join('.') ?? '';
  const param = path === '' ? null : path;
  let message = issue?.message ?? 'invalid request';
  if (issue && param && !message.includes(param.split('.')[0]!)) message = `${param}: ${message}`;
  return invalid(message, param);
}

function commonChecks(r: z.infer<z.ZodObject<typeof common>>): void {
  if (r.n != null && r.n !== 1) throw invalid('only n = 1 is supported', 'n');
  if (r.presence_penalty) throw invalid('presence_penalty is not supported (use 0)', 'presence_penalty');
  if (r.frequency_penalty) throw invalid('frequency_penalty is not supported (use 0)', 'frequency_penalty');
  if (r.seed != null && (r.seed < 0 || r.seed > 0xffffffff)) throw invalid('seed must be 0–4294967295', 'seed');
  if (r.stream_options != null && !r.stream) throw invalid('stream_options is only allowed with stream: true', 'stream_options');
}

function maxTokensOf(value: number | null | undefined, param: string, limits: ModelLimits): number {
  if (value == null) return 0; // until a stop condition or the context is full
  if (value === 0) throw invalid(`${param} must be at least 1`, param);
  if (value > limits.ctx) {
    throw invalid(`${param} = ${value} is more than the model's context of ${limits.ctx} tokens`, param, 'context_length_exceeded');
  }
  return value;
}

function sampling(r: z.infer<z.ZodObject<typeof common>>): Pick<GenerateRequest, 'temperature' | 'topP' | 'seed' | 'stop'> {
  const stop = r.stop == null ? [] : typeof r.stop === 'string' ? [r.stop] : r.stop;
  if (stop.some((s) => s === '')) throw invalid('stop sequences must not be empty', 'stop');
  return {
    // OpenAI's default temperature is 1; 0 is greedy (exactly argmax on the engine).
    temperature: r.temperature ?? 1,
    topP: r.top_p ?? undefined,
    // The engine treats seed 0 as "random"; OpenAI's seed 0 is a real seed. Map it to a fixed
    // non-zero value so `seed: 0` is still reproducible.
    seed: r.seed == null ? undefined : r.seed === 0 ? 0xffffffff : r.seed,
    stop,
  };
}

/** Flatten OpenAI message content (string or text parts) to the text llama.cpp templates take. */
export function messageText(content: z.infer<typeof messageSchema>['content'], index: number): string {
  if (content == null) return '';
  if (typeof content === 'string') return content;
  return content
    .map((p, j) => {
      if (p.type !== 'text' || typeof p.text !== 'string') throw invalid(`content part of type "${p.type}" is not supported (text only)`, `messages.${index}.content.${j}`);
      return p.text;
    })
    .join('');
}

/** Parse a /v1/chat/completions body. `limitsOf` looks the model up (throws 404 for unknown models). */
export function parseChatRequest(body: unknown, limitsOf: (model: string) => ModelLimits): ParsedRequest {
  const parsed = chatRequestSchema.safeParse(body);
  if (!parsed.success) throw firstIssue(parsed.error);
  const r = parsed.data;
  commonChecks(r);
  const limits = limitsOf(r.model);
  if (r.max_tokens != null && r.max_completion_tokens != null && r.max_tokens !== r.max_completion_tokens) {
    throw invalid('max_tokens and max_completion_tokens disagree; give one', 'max_tokens');
  }
  const maxParam = r.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens';
  if (r.top_logprobs != null && r.logprobs !== true) throw invalid('top_logprobs needs logprobs: true', 'top_logprobs');
  const messages: ChatMessage[] = r.messages.map((m, i) => ({ role: m.role === 'developer' ? 'system' : m.role, content: messageText(m.content, i) }));
  return {
    model: r.model,
    stream: r.stream === true,
    includeUsage: r.stream_options?.include_usage === true,
    generate: {
      model: r.model,
      prompt: '',
      messages,
      maxTokens: maxTokensOf(r.max_completion_tokens ?? r.max_tokens, maxParam, limits),
      ...sampling(r),
      ...(r.logprobs ? { logprobs: true, topLogprobs: r.top_logprobs ?? 0 } : {}),
    },
  };
}

/** Parse a /v1/completions body. */
export function parseCompletionRequest(body: unknown, limitsOf: (model: string) => ModelLimits): ParsedRequest {
  const parsed = completionRequestSchema.safeParse(body);
  if (!parsed.success) throw firstIssue(parsed.error);
  const r = parsed.data;
  commonChecks(r);
  if (r.echo) throw invalid('echo is not supported', 'echo');
  if (r.suffix) throw invalid('suffix is not supported', 'suffix');
  if (r.best_of != null && r.best_of !== 1) throw invalid('only best_of = 1 is supported', 'best_of');
  const prompt = typeof r.prompt === 'string' ? r.prompt : r.prompt.length === 1 && typeof r.prompt[0] === 'string' ? r.prompt[0] : undefined;
  if (prompt === undefined) throw invalid('token-array prompts are not supported; send text', 'prompt');
  if (prompt === '') throw invalid('prompt must not be empty', 'prompt');
  const limits = limitsOf(r.model);
  return {
    model: r.model,
    stream: r.stream === true,
    includeUsage: r.stream_options?.include_usage === true,
    generate: { model: r.model, prompt, maxTokens: maxTokensOf(r.max_tokens, 'max_tokens', limits), ...sampling(r), ...(r.logprobs != null ? { logprobs: true, topLogprobs: r.logprobs } : {}) },
  };
}
