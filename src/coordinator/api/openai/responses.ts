import type { TokenLogprob, TopLogprob } from '../../../shared/generation.ts';
import type { GenerateEvent, ModelStatus } from '../../instances/runtime.ts';

/**
 * OpenAI response objects, built from runtime events. Pure: the HTTP layer decides when to send
 * them; these functions only decide what they look like. Shapes follow the OpenAI API reference
 * (chat.completion, chat.completion.chunk, text_completion, model list).
 */

export type Kind = 'chat' | 'completion';

export interface Usage {
  readonly prompt_tokens: number;
  readonly completion_tokens: number;
  readonly total_tokens: number;
}

export interface ResponseMeta {
  readonly id: string;
  readonly created: number;
  readonly model: string;
}

type Done = Extract<GenerateEvent, { kind: 'done' }>;

export function usageOf(done: Done): Usage {
  return { prompt_tokens: done.promptTokens, completion_tokens: done.completionTokens, total_tokens: done.promptTokens + done.completionTokens };
}

/** OpenAI knows "stop", "length", "content_filter", "tool_calls"; map anything else to "stop". */
export function finishReasonOf(done: Done): 'stop' | 'length' {
  return done.finishReason === 'length' ? 'length' : 'stop';
}

/** Orchard's timings as an extension field (clients ignore unknown fields). */
function timingsOf(done: Done) {
  return {
    prompt_ms: done.timings.promptMs,
    predicted_ms: done.timings.predictedMs,
    prompt_tokens_per_second: done.timings.promptTokensPerSecond,
    predicted_tokens_per_second: done.timings.predictedTokensPerSecond,
    first_token_ms: done.timings.firstTokenMs,
  };
}

/** The fields every OpenAI response object and stream chunk starts with. */
function envelope(meta: ResponseMeta, object: string) {
  return { id: meta.id, object, created: meta.created, model: meta.model, system_fingerprint: 'orchard' };
}

const chunkObject = (kind: Kind) => (kind === 'chat' ? 'chat.completion.chunk' : 'text_completion');

/** Chat `choices[].logprobs`: one entry per token with its alternatives. */
export function chatLogprobs(list: readonly TokenLogprob[]) {
  const entry = (l: TopLogprob) => ({ token: l.token, logprob: l.logprob, bytes: [...l.bytes] });
  return { content: list.map((l) => ({ ...entry(l), top_logprobs: l.topLogprobs.map(entry) })), refusal: null };
}

/**
 * Legacy completions `choices[].logprobs`: parallel arrays. `top_logprobs` maps token text to
 * logprob and always holds the chosen token (OpenAI: "up to logprobs+1 elements");
 * `text_offset` counts from the completion's start, `offset` being the text before this part.
 */
export function completionLogprobs(list: readonly TokenLogprob[], offset: number) {
  const out = { tokens: [] as string[], token_logprobs: [] as number[], top_logprobs: [] as Record<string, number>[], text_offset: [] as number[] };
  let at = offset;
  for (const l of list) {
    out.tokens.push(l.token);
    out.token_logprobs.push(l.logprob);
    out.top_logprobs.push(Object.fromEntries([...l.topLogprobs.map((t) => [t.token, t.logprob] as const), [l.token, l.logprob] as const]));
    out.text_offset.push(at);
    at += l.token.length;
  }
  return out;
}

/** The logprobs of a choice: null unless the request asked for them. */
function logprobsOf(kind: Kind, list: readonly TokenLogprob[] | undefined, offset: number) {
  if (!list) return null;
  return kind === 'chat' ? chatLogprobs(list) : completionLogprobs(list, offset);
}

/** The whole answer of a non-streaming request; `logprobs` when the request asked for them. */
export function completionResponse(kind: Kind, meta: ResponseMeta, text: string, done: Done, logprobs?: readonly TokenLogprob[]): Record<string, unknown> {
  const finish_reason = finishReasonOf(done);
  const lp = logprobsOf(kind, logprobs, 0);
  const choice =
    kind === 'chat'
      ? { index: 0, message: { role: 'assistant', content: text, refusal: null }, logprobs: lp, finish_reason }
      : { index: 0, text, logprobs: lp, finish_reason };
  return {
    ...envelope(meta, kind === 'chat' ? 'chat.completion' : 'text_completion'),
    choices: [choice],
    usage: usageOf(done),
    orchard: { timings: timingsOf(done) },
  };
}

/**
 * One streamed chunk. `text` undefined + `finish` set = the final chunk (empty delta);
 * `first` adds the assistant role to a chat delta, as OpenAI does on the first chunk. With
 * `include_usage`, every chunk carries `usage: null` and a last extra chunk carries the usage.
 */
export function streamChunk(
  kind: Kind,
  meta: ResponseMeta,
  part: {
    text?: string | undefined;
    first?: boolean;
    finish?: 'stop' | 'length' | undefined;
    /** This chunk's tokens' logprobs, and (completions) the completion text before them. */
    logprobs?: readonly TokenLogprob[] | undefined;
    offset?: number;
  },
  includeUsage: boolean,
): Record<string, unknown> {
  const finish_reason = part.finish ?? null;
  let choice: Record<string, unknown>;
  if (kind === 'chat') {
    const delta: Record<string, unknown> = {};
    if (part.first) delta.role = 'assistant';
    if (part.text !== undefined) delta.content = part.text;
    choice = { index: 0, delta, logprobs: logprobsOf(kind, part.logprobs, 0), finish_reason };
  } else {
    choice = { index: 0, text: part.text ?? '', logprobs: logprobsOf(kind, part.logprobs, part.offset ?? 0), finish_reason };
  }
  return {
    ...envelope(meta, chunkObject(kind)),
    choices: [choice],
    ...(includeUsage ? { usage: null } : {}),
  };
}

/** The extra last chunk of `stream_options.include_usage`: no choices, the usage. */
export function usageChunk(kind: Kind, meta: ResponseMeta, done: Done): Record<string, unknown> {
  return {
    ...envelope(meta, chunkObject(kind)),
    choices: [],
    usage: usageOf(done),
    orchard: { timings: timingsOf(done) },
  };
}

/** One SSE event. JSON.stringify never emits a raw newline, so one `data:` line suffices. */
export function sseData(payload: unknown): string {
  return `data: ${typeof payload === 'string' ? payload : JSON.stringify(payload)}\n\n`;
}

/** Where a loaded model lives: the `orchard` extension field of /v1/models entries. */
export function placementOf(m: ModelStatus) {
  return {
    state: m.state,
    engine: m.engine,
    path: m.path,
    ctx: m.options.ctx,
    parallel: m.options.parallel,
    cache_type: m.options.cacheType,
    predicted_tokens_per_second: m.predictedTokensPerSecond,
    error: m.error || null,
    heal: m.heal ?? 'auto',
    // MLX over several ranks: pipeline or tensor, and why (null otherwise).
    parallelism: m.parallelism ? { mode: m.parallelism.mode, reason: m.parallelism.reason } : null,
    recoveries: m.recoveries ?? 0,
    recovery: m.recovery
      ? { cause: m.recovery.cause, attempt: m.recovery.attempt, max_attempts: m.recovery.maxAttempts, phase: m.recovery.phase, message: m.recovery.message, since_seconds: (Date.now() - m.recovery.sinceMs) / 1000 }
      : null,
    stages: m.stages.map((s, i) => ({
      stage: i,
      role: i === m.stages.length - 1 ? 'head' : 'worker',
      node: s.nodeName,
      node_id: s.nodeId,
      first_layer: s.firstLayer,
      last_layer: s.lastLayer,
      endpoint: s.endpoint || null,
      bytes: s.bytes,
      budget_bytes: s.budgetBytes,
    })),
    // What llama.cpp itself reported per device after the load (checked against the plan).
    verification: m.verification
      ? {
          ok: m.verification.ok,
          problems: m.verification.problems,
          devices: m.verification.devices.map((d) => ({
            device: d.device,
            node: d.nodeName,
            planned_layers: d.plannedLayers,
            actual_layers: d.actualLayers,
            predicted_bytes: d.predicted ?? null,
            actual_bytes: d.actual,
          })),
        }
      : null,
  };
}

export function modelObject(m: ModelStatus): Record<string, unknown> {
  return {
    id: m.name,
    object: 'model',
    created: Math.floor((m.loadedAtMs ?? Date.now()) / 1000),
    owned_by: 'orchard',
    orchard: placementOf(m),
  };
}
