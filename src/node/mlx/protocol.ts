import { z } from 'zod';

/**
 * The JSON-lines protocol between a driver (node agent, tests) and an MLX rank worker
 * (`mlx_worker.py`). Worker → driver lines are validated here, once, at the edge.
 */

/**
 * MLX's own allocator counters of one rank (mx.get_active_memory / mx.get_peak_memory), which
 * MLX keeps on its CPU backend as on Metal. In `ready`: after the load (peak = the load's own
 * peak). In `memory`: after a request, peak since that request began.
 */
const rankMemorySchema = z.object({ active_bytes: z.number().int().nonnegative(), peak_bytes: z.number().int().nonnegative() });
export type RankMemory = z.infer<typeof rankMemorySchema>;

export const workerMessageSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('starting'), rank: z.number().int(), pid: z.number().int() }),
  z.object({
    type: z.literal('ready'),
    rank: z.number().int(),
    size: z.number().int(),
    mode: z.enum(['single', 'pipeline', 'tensor']),
    layers: z.array(z.number().int()),
    load_ms: z.number(),
    pid: z.number().int(),
    mlx: z.string(),
    device: z.string(),
    memory: rankMemorySchema,
  }),
  z.object({ type: z.literal('memory'), id: z.string(), rank: z.number().int(), ...rankMemorySchema.shape }),
  z.object({
    type: z.literal('token'),
    id: z.string(),
    index: z.number().int(),
    token: z.number().int(),
    text: z.string(),
    logprob: z.number().optional(),
    /** The token's raw bytes (hex) when the tokenizer's tokens are bytes: the agent decodes the text from them (token-text.ts). */
    bytes: z.string().regex(/^(?:[0-9a-f]{2})*$/).optional(),
    /** With logprobs: this token's own text (`text` is the detokenizer's running segment). */
    token_text: z.string().optional(),
    /** With logprobs: [token id, logprob, its text], most likely first. */
    top_logprobs: z.array(z.tuple([z.number().int(), z.number(), z.string()])).optional(),
  }),
  z.object({
    type: z.literal('done'),
    id: z.string(),
    finish_reason: z.enum(['stop', 'length', 'cancelled']),
    prompt_tokens: z.number().int(),
    completion_tokens: z.number().int(),
    text_tail: z.string(),
    ranks: z.number().int(),
    ranks_agree: z.boolean(),
    first_token_ms: z.number().nullable(),
    total_ms: z.number(),
  }),
  z.object({ type: z.literal('error'), id: z.string().optional(), message: z.string(), fatal: z.boolean() }),
]);

export type WorkerMessage = z.infer<typeof workerMessageSchema>;
export type ReadyMessage = Extract<WorkerMessage, { type: 'ready' }>;
export type TokenMessage = Extract<WorkerMessage, { type: 'token' }>;
export type DoneMessage = Extract<WorkerMessage, { type: 'done' }>;
export type MemoryMessage = Extract<WorkerMessage, { type: 'memory' }>;

/** Parse one stdout line of a worker; undefined for anything that is not a protocol line. */
export function parseWorkerLine(line: string): WorkerMessage | undefined {
  const trimmed = line.trim();
  if (!trimmed.startsWith('{')) return undefined;
  try {
    const parsed = workerMessageSchema.safeParse(JSON.parse(trimmed));
    return parsed.success ? parsed.data : undefined;
  } catch {
    return undefined;
  }
}

/** A generation request. Exactly one of tokens, prompt, messages. Greedy unless temperature > 0. */
export interface MlxRequest {
  id: string;
  tokens?: number[];
  prompt?: string;
  messages?: { role: string; content: string }[];
  /** Tokens already delivered by a lost group: appended after the prompt (a resumed stream). */
  continueTokens?: number[];
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  /** Same seed on every rank keeps sampled tokens identical across ranks. */
  seed?: number;
  ignoreEos?: boolean;
  /** Report the chosen token's logprob and this many top logprobs per token. */
  logprobs?: number;
}

/** The request line every rank of the group must receive, byte for byte. */
export function requestLine(req: MlxRequest): string {
  const sources = [req.tokens, req.prompt, req.messages].filter((v) => v !== undefined).length;
  if (sources !== 1) throw new Error('an MLX request needs exactly one of tokens, prompt, messages');
  const wire: Record<string, unknown> = {
    type: 'request',
    id: req.id,
    tokens: req.tokens,
    prompt: req.prompt,
    messages: req.messages,
    ...(req.continueTokens?.length ? { continue_tokens: req.continueTokens } : {}),
    max_tokens: req.maxTokens ?? 64,
    temperature: req.temperature ?? 0,
    top_p: req.topP ?? 1,
    seed: req.seed ?? 0,
    ignore_eos: req.ignoreEos ?? false,
    logprobs: req.logprobs ?? 0,
  };
  return `${JSON.stringify(wire)}\n`;
}

export function cancelLine(id: string): string {
  return `${JSON.stringify({ type: 'cancel', id })}\n`;
}

export const SHUTDOWN_LINE = `${JSON.stringify({ type: 'shutdown' })}\n`;
