import { randomUUID } from 'node:crypto';
import { errorMessage, OrchardError } from '../../shared/errors.ts';
import type { GenerateParams, TokenLogprob, TopLogprob } from '../../shared/generation.ts';
import { GenerateError, type TokenChunk } from '../generate.ts';
import { type MlxGroup, MlxGroupError } from './group.ts';
import type { DoneMessage, TokenMessage } from './protocol.ts';
import { type MlxRankSpec, mlxRequestOf, StopScanner } from './rank-spec.ts';

/**
 * NodeAgent.Generate for an MLX rank. Every rank of a group must receive the same request (the
 * ranks compare a digest of it and step in lockstep), so the coordinator sends the Generate to
 * every agent of the group with the same request id:
 *  - on rank 0 the agent streams the tokens (only rank 0 emits) and the final counts;
 *  - on any other rank it hands the request to its rank and answers at once with
 *    finish_reason "submitted".
 * Cancellation needs only rank 0: the ranks agree on it collectively at every step.
 */
export interface MlxDone {
  readonly finishReason: 'stop' | 'length' | 'cancelled' | 'submitted';
  readonly promptTokens: number;
  readonly completionTokens: number;
  readonly timings: {
    readonly promptMs: number;
    readonly predictedMs: number;
    readonly promptTokensPerSecond: number;
    readonly predictedTokensPerSecond: number;
    readonly firstTokenMs: number;
  };
}

export interface MlxRelayOptions {
  readonly group: MlxGroup;
  readonly spec: MlxRankSpec;
  readonly params: GenerateParams;
  readonly requestId: string;
  readonly signal: AbortSignal;
  readonly onToken: (chunk: TokenChunk) => void;
}

export async function relayMlx(o: MlxRelayOptions): Promise<MlxDone> {
  const { spec, params } = o;
  if (spec.worldSize > 1 && o.requestId === '') {
    throw new GenerateError('INVALID_ARGUMENT', 'an MLX group needs request_id (the same on every rank’s agent)');
  }
  let req: ReturnType<typeof mlxRequestOf>;
  try {
    req = mlxRequestOf(params, o.requestId || randomUUID(), spec.maxTokens);
  } catch (err) {
    throw new GenerateError('INVALID_ARGUMENT', `bad MLX request: ${errorMessage(err)}`);
  }
  const zero = { promptMs: 0, predictedMs: 0, promptTokensPerSecond: 0, predictedTokensPerSecond: 0, firstTokenMs: 0 };
  if (spec.rank !== 0) {
    try {
      o.group.submit(req);
    } catch (err) {
      throw new GenerateError('UNAVAILABLE', errorMessage(err));
    }
    return { finishReason: 'submitted', promptTokens: 0, completionTokens: 0, timings: zero };
  }
  // A cancel never keeps the request from reaching rank 0: the other ranks may already hold it,
  // and a request they hold that rank 0 never saw would put the group out of step for good. So
  // the request always goes in, and a cancel is a cancel line (the worker notes it even before
  // the request arrives; the ranks then agree to stop at the first step).
  const stops = new StopScanner(params.stop);
  const onAbort = () => o.group.cancel(req.id);
  let stoppedByString = false;
  let pendingIds: number[] = [];
  let pendingLogprobs: TokenLogprob[] = [];
  const chunk = (text: string) => ({ text, tokenIds: pendingIds, ...(params.logprobs ? { logprobs: pendingLogprobs } : {}) });
  const gen = o.group.generate(req);
  o.signal.addEventListener('abort', onAbort, { once: true });
  if (o.signal.aborted) onAbort();
  try {
    for (;;) {
      const next = await gen.next();
      if (next.done) {
        const d = next.value;
        const tail = stoppedByString ? '' : stops.push(d.text_tail).release + stops.flush();
        if (tail !== '' || pendingIds.length > 0) o.onToken(chunk(tail));
        if (o.signal.aborted) throw new GenerateError('CANCELLED', 'generation cancelled by the client');
        return doneOf(d, stoppedByString);
      }
      if (stoppedByString) continue; // draining the tokens emitted before the cancel took effect
      const t = next.value;
      pendingIds.push(t.token);
      if (params.logprobs) pendingLogprobs.push(tokenLogprobOf(t, params.topLogprobs ?? 0));
      const { release, stopped } = stops.push(t.text);
      if (stopped) {
        stoppedByString = true;
        o.group.cancel(req.id); // collective cancel: every rank stops at the same step
      }
      if (release !== '' || stopped) {
        o.onToken(chunk(release));
        pendingIds = [];
        pendingLogprobs = [];
      }
    }
  } catch (err) {
    if (err instanceof GenerateError) throw err;
    if (o.signal.aborted) throw new GenerateError('CANCELLED', 'generation cancelled by the client');
    // The group is dead (a rank or its peer died, or it stalled): UNAVAILABLE, the coordinator
    // restarts the whole group. A bad request leaves the group healthy: INVALID_ARGUMENT.
    if (err instanceof MlxGroupError) throw new GenerateError('UNAVAILABLE', err.message);
    if (err instanceof OrchardError) throw new GenerateError('INVALID_ARGUMENT', err.message);
    throw new GenerateError('INTERNAL', errorMessage(err));
  } finally {
    o.signal.removeEventListener('abort', onAbort);
  }
}

const utf8 = new TextEncoder();

/**
 * A worker token line's logprobs in the shape llama-server reports them: the token's raw bytes
 * where the tokenizer gives them (part of a character stays those bytes, as llama-server gives
 * them), else its text's UTF-8. The alternatives carry their text's UTF-8 (a partial character
 * decodes to U+FFFD there).
 */
export function tokenLogprobOf(t: TokenMessage, topLogprobs: number): TokenLogprob {
  const top = (t.top_logprobs ?? []).slice(0, topLogprobs).map(([tokenId, logprob, token]): TopLogprob => ({ tokenId, token, bytes: [...utf8.encode(token)], logprob }));
  const token = t.token_text ?? t.text;
  const bytes = t.bytes === undefined ? [...utf8.encode(token)] : [...Buffer.from(t.bytes, 'hex')];
  return { tokenId: t.token, token, bytes, logprob: t.logprob ?? Number.NaN, topLogprobs: top };
}

/** Rank 0's done line as the agent reports it; a stop string found by the relay is a "stop". */
function doneOf(d: DoneMessage, stoppedByString: boolean): MlxDone {
  const predictedMs = Math.max(0, d.total_ms - (d.first_token_ms ?? 0));
  return {
    finishReason: stoppedByString ? 'stop' : d.finish_reason,
    promptTokens: d.prompt_tokens,
    completionTokens: d.completion_tokens,
    timings: {
      promptMs: d.first_token_ms ?? 0,
      predictedMs,
      promptTokensPerSecond: d.first_token_ms ? (d.prompt_tokens * 1000) / d.first_token_ms : 0,
      // The first token comes out of prefill; the rest are decode steps.
      predictedTokensPerSecond: predictedMs > 0 && d.completion_tokens > 1 ? ((d.completion_tokens - 1) * 1000) / predictedMs : 0,
      firstTokenMs: d.first_token_ms ?? 0,
    },
  };
}
