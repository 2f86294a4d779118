import { describe, expect, it } from 'vitest';
import { engineRequest } from '../../src/coordinator/instances/driver.ts';
import { attemptFailure, continuation, parseHealMode } from '../../src/coordinator/instances/healing.ts';
import { PlanDoesNotFitError } from '../../src/coordinator/instances/planner-adapter.ts';
import { completionBody, generateParamsFromRequest } from '../../src/node/generate.ts';
import { mlxRequestOf } from '../../src/node/mlx/rank-spec.ts';
import { requestLine } from '../../src/node/mlx/protocol.ts';

const base = engineRequest({ prompt: 'Once upon a time', maxTokens: 48, temperature: 0, seed: 7 });

describe('healing: resuming an interrupted stream', () => {
  it('nothing delivered yet: the request as it was', () => {
    expect(continuation(base, [])).toBe(base);
  });

  it('the delivered tokens continue the prompt, the budget shrinks by them, sampling and seed stay', () => {
    const next = continuation(base, [5, 6, 7])!;
    expect(next).toMatchObject({ prompt: 'Once upon a time', maxTokens: 45, temperature: 0, seed: 7, continueTokenIds: [5, 6, 7], requestId: base.requestId });
    // "until stop" stays "until stop"
    expect(continuation({ ...base, maxTokens: 0 }, [1])!.maxTokens).toBe(0);
  });

  it('nothing left to generate: no request', () => {
    expect(continuation({ ...base, maxTokens: 2 }, [1, 2])).toBeUndefined();
  });

  it('the head agent passes them on as llama-server’s mixed prompt: text (tokenized with BOS) then the ids as they are', () => {
    const p = generateParamsFromRequest({ engineId: 'e', requestId: 'r', prompt: 'Hi', maxTokens: 4, seed: '0', continueTokenIds: [11, 12] });
    expect(p.continueTokenIds).toEqual([11, 12]);
    expect(completionBody(p).prompt).toEqual(['Hi', 11, 12]);
    expect(completionBody(generateParamsFromRequest({ prompt: 'Hi', seed: '0' })).prompt).toBe('Hi');
    expect(() => generateParamsFromRequest({ prompt: 'Hi', seed: '0', continueTokenIds: [-1] })).toThrow(/malformed/);
  });

  it('MLX ranks get them as continue_tokens (part of the request every rank must agree on)', () => {
    const req = mlxRequestOf({ prompt: 'Hi', continueTokenIds: [3, 4], maxTokens: 4, temperature: 0, topP: 0, seed: 0 }, 'id', 64);
    expect(JSON.parse(requestLine(req))).toMatchObject({ prompt: 'Hi', continue_tokens: [3, 4] });
    expect(JSON.parse(requestLine(mlxRequestOf({ prompt: 'Hi', maxTokens: 4, temperature: 0, topP: 0, seed: 0 }, 'id', 64)))).not.toHaveProperty('continue_tokens');
  });
});

describe('healing: why a re-placement failed', () => {
  it('a plan that no longer fits names the missing memory and the nodes to bring back', () => {
    const err = new PlanDoesNotFitError('m.gguf does not fit on 1 live node(s)', { fits: false, shortfall: { shortfallBytes: 12.3 * 2 ** 30 } });
    expect(attemptFailure(err, ['node-b'], 'x')).toBe('needs 12.3 GiB more: bring back node-b or add a node');
    expect(attemptFailure(err, ['a', 'b'], 'x')).toBe('needs 12.3 GiB more: bring back a or b or add a node');
    expect(attemptFailure(err, [], 'x')).toBe('needs 12.3 GiB more: add a node');
  });

  it('any other failure keeps its own words', () => {
    expect(attemptFailure(new Error('boom'), ['b'], 'rpc-server on b exited')).toBe('rpc-server on b exited');
  });

  it('--heal takes auto or off', () => {
    expect(parseHealMode('auto')).toBe('auto');
    expect(parseHealMode('off')).toBe('off');
    expect(parseHealMode('')).toBeUndefined();
    expect(() => parseHealMode('sometimes')).toThrow(/auto or off/);
  });
});
