import { ENGINE_KIND_TO_PROTO } from './engine-spec.ts';
import { logprobsToWire } from '../shared/generation.ts';
import type { GenerateDone, TokenChunk } from './generate.ts';
import type { EngineExit, EngineInfo } from './supervisor.ts';

/**
 * Agent-side conversion to proto-loader objects (camelCase, enums as names, uint64 as decimal
 * strings so no size ever passes through a lossy double on the wire side). Profiles and live
 * stats: src/shared/hardware-wire.ts, shared with the coordinator that reads them.
 */
type Wire = Record<string, unknown>;

export function engineToWire(e: EngineInfo): Wire {
  return {
    engineId: e.engineId,
    kind: ENGINE_KIND_TO_PROTO[e.kind],
    host: e.host,
    port: e.port,
    pid: e.pid,
    model: e.model,
    startedAtSeconds: e.startedAtSeconds,
    argv: [...e.argv],
    socket: e.socket ?? '',
  };
}

export function exitToWire(e: EngineExit): Wire {
  return {
    engineId: e.engineId,
    kind: ENGINE_KIND_TO_PROTO[e.kind],
    exitCode: e.exitCode,
    signal: e.signal,
    expected: e.expected,
    lastStderrLines: [...e.lastStderrLines],
    port: e.port,
  };
}

export function tokenToWire(c: TokenChunk): Wire {
  return { token: { text: c.text, tokenIds: [...c.tokenIds], logprobs: logprobsToWire(c.logprobs ?? []) } };
}

export function doneToWire(d: GenerateDone): Wire {
  return { done: { finishReason: d.finishReason, promptTokens: d.promptTokens, completionTokens: d.completionTokens, timings: { ...d.timings } } };
}
