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
  const seed = Number(r.seed);
  if (!Number.isSafeInteger(seed) || seed < 0 || seed > 0xffffffff) return { ok: false, problem: `invalid seed ${r.seed}: 0–4294967295 (0 = random)` };
  return { ok: true, request: { ...r, seed } };
}
