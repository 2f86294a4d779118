import { z } from 'zod';

/**
 * The Generate contract both gRPC services share (`NodeAgent.Generate` on the head agent,
 * `Coordinator.Generate` for the CLI): the sampling fields, how they are validated, and the
 * timings every finished generation reports. Written once so the agent and the coordinator refuse
 * the same requests with the same words.
 */

/** Times and rates of one finished generation, as the engine measured them (proto `Timings`). */
/** What one generation asks of an engine, on every hop (coordinator → agent → engine). */
export interface GenerateParams {
  readonly prompt: string;
  readonly maxTokens: number;
  readonly temperature: number;
  readonly topP: number;
  /** 0 = not set (proto3 cannot tell unset from 0): the engine picks a random seed. */
  readonly seed: number;
  readonly stop: readonly string[];
  /** Chat messages as JSON ([{role, content}]): the prompt comes from the model's chat template. */
  readonly messagesJson?: string | undefined;
  /** Tokens already delivered by an engine that was lost: the prompt continues with them (a resumed stream). */
  readonly continueTokenIds?: readonly number[] | undefined;
  /** Report each generated token's log probability (OpenAI `logprobs`). */
  readonly logprobs?: boolean | undefined;
  /** With `logprobs`: also the this-many most likely tokens at each step, 0–20 (OpenAI `top_logprobs`). */
  readonly topLogprobs?: number | undefined;
}

/** The most OpenAI's API lets a request ask for (`top_logprobs` ≤ 20). */
export const MAX_TOP_LOGPROBS = 20;

/**
 * One token's log probability under the engine's full distribution (before sampling), as
 * llama-server's `completion_probabilities` and the MLX rank report it (proto `TokenLogprob`).
 */
export interface TopLogprob {
  readonly tokenId: number;
  /** The token's text. */
  readonly token: string;
  /** Its UTF-8 bytes (a token may hold part of a character, which `token` cannot show). */
  readonly bytes: readonly number[];
  readonly logprob: number;
}

/** The generated token's logprob and the most likely alternatives at its step, most likely first. */
export interface TokenLogprob extends TopLogprob {
  readonly topLogprobs: readonly TopLogprob[];
}

export interface Timings {
  readonly promptMs: number;
  readonly predictedMs: number;
  readonly promptTokensPerSecond: number;
  readonly predictedTokensPerSecond: number;
  /** Request start → first token, measured by the head agent (queue + prefill). */
  readonly firstTokenMs: number;
}

/** Sampling fields of both GenerateRequest messages as proto-loader hands them over (int64 seed as a string). */
const samplingShape = {
  prompt: z.string().default(''),
  maxTokens: z.number().int().nonnegative().default(0),
  temperature: z.number().default(0),
  topP: z.number().default(0),
  seed: z.union([z.string(), z.number()]).default('0'),
  stop: z.array(z.string()).default([]),
  logprobs: z.boolean().default(false),
  topLogprobs: z.number().int().nonnegative().default(0),
};

/** `orchard.v1.GenerateRequest` (NodeAgent): one head engine, a prompt or chat messages. */
export const nodeGenerateRequestSchema = z.object({
  ...samplingShape,
  engineId: z.string().default(''),
  requestId: z.string().default(''),
  messagesJson: z.string().default(''),
  continueTokenIds: z.array(z.number().int().nonnegative()).default([]),
});

/** `orchard.v1.CoordinatorGenerateRequest`: a loaded model by name ("" = the only one). */
export const coordinatorGenerateRequestSchema = z.object({ ...samplingShape, model: z.string().default('') });

type Sampling = z.infer<z.ZodObject<typeof samplingShape>>;

/** A request whose sampling fields passed: the seed as a number (0 = the engine picks one). */
export type Checked<T extends Sampling> = Omit<T, 'seed'> & { readonly seed: number };

/**
 * Parse a Generate request with `schema` and check its sampling ranges. Returns the request, or
 * the one-line reason to refuse it (each side wraps that in its own INVALID_ARGUMENT error).
 */
export function checkGenerateRequest<T extends Sampling>(schema: z.ZodType<T>, raw: unknown): { ok: true; request: Checked<T> } | { ok: false; problem: string } {
  const parsed = schema.safeParse(raw ?? {});
  if (!parsed.success) return { ok: false, problem: `malformed Generate request: ${parsed.error.issues[0]?.message ?? 'invalid'}` };
  const r = parsed.data;
  if (!Number.isFinite(r.temperature) || r.temperature < 0 || r.temperature > 10) return { ok: false, problem: `invalid temperature ${r.temperature}: 0–10 (0 = greedy)` };
  if (!Number.isFinite(r.topP) || r.topP < 0 || r.topP > 1) return { ok: false, problem: `invalid top_p ${r.topP}: 0–1 (0 = engine default)` };
  if (r.topLogprobs > MAX_TOP_LOGPROBS) return { ok: false, problem: `invalid top_logprobs ${r.topLogprobs}: 0–${MAX_TOP_LOGPROBS}` };
  if (r.topLogprobs > 0 && !r.logprobs) return { ok: false, problem: 'top_logprobs needs logprobs' };
  const seed = Number(r.seed);
  if (!Number.isSafeInteger(seed) || seed < 0 || seed > 0xffffffff) return { ok: false, problem: `invalid seed ${r.seed}: 0–4294967295 (0 = random)` };
  return { ok: true, request: { ...r, seed } };
}

/** `TokenChunk.logprobs` as proto-loader takes it (bytes as a Buffer). */
export function logprobsToWire(list: readonly (TopLogprob & { readonly topLogprobs?: readonly TopLogprob[] })[]): Record<string, unknown>[] {
  return list.map((l) => ({ tokenId: l.tokenId, token: l.token, bytes: Buffer.from(l.bytes), logprob: l.logprob, topLogprobs: logprobsToWire(l.topLogprobs ?? []) }));
}

const wireTopSchema = z.object({ tokenId: z.number().int(), token: z.string(), bytes: z.instanceof(Uint8Array), logprob: z.number() });
const wireLogprobsSchema = z.array(wireTopSchema.extend({ topLogprobs: z.array(wireTopSchema).default([]) })).default([]);

/** `TokenChunk.logprobs` from proto-loader; a malformed list is a broken peer, named in the throw. */
export function logprobsFromWire(raw: unknown): TokenLogprob[] {
  const parsed = wireLogprobsSchema.safeParse(raw ?? []);
  if (!parsed.success) throw new Error(`malformed TokenChunk.logprobs: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
  const top = (t: z.infer<typeof wireTopSchema>): TopLogprob => ({ tokenId: t.tokenId, token: t.token, bytes: [...t.bytes], logprob: t.logprob });
  return parsed.data.map((l) => ({ ...top(l), topLogprobs: l.topLogprobs.map(top) }));
}
