import { describe, expect, it } from 'vitest';
import { cancelLine, parseWorkerLine, requestLine } from '../../src/node/mlx/protocol.ts';

describe('MLX worker protocol', () => {
  it('parses every worker message type', () => {
    expect(parseWorkerLine('{"type":"starting","rank":1,"pid":9}')).toEqual({ type: 'starting', rank: 1, pid: 9 });
    const ready = parseWorkerLine(
      '{"type":"ready","rank":0,"size":2,"mode":"pipeline","layers":[0,2],"load_ms":10,"pid":5,"mlx":"0.32.4","device":"Device(cpu, 0)","memory":{"active_bytes":1024,"peak_bytes":2048}}',
    );
    expect(ready).toMatchObject({ type: 'ready', memory: { active_bytes: 1024, peak_bytes: 2048 } });
    expect(parseWorkerLine('{"type":"memory","id":"a","rank":1,"active_bytes":5,"peak_bytes":7}')).toEqual({
      type: 'memory', id: 'a', rank: 1, active_bytes: 5, peak_bytes: 7,
    });
    const tok = parseWorkerLine('{"type":"token","id":"a","index":0,"token":65,"text":"A","logprob":-1.5,"token_text":"A","top_logprobs":[[65,-1.5,"A"],[66,-2,"B"]]}');
    expect(tok).toMatchObject({ type: 'token', token: 65, token_text: 'A', top_logprobs: [[65, -1.5, 'A'], [66, -2, 'B']] });
    const done = parseWorkerLine(
      '{"type":"done","id":"a","finish_reason":"cancelled","prompt_tokens":3,"completion_tokens":5,"text_tail":"","ranks":2,"ranks_agree":true,"first_token_ms":null,"total_ms":4}',
    );
    expect(done).toMatchObject({ finish_reason: 'cancelled' });
    expect(parseWorkerLine('{"type":"error","message":"boom","fatal":true}')).toMatchObject({ fatal: true });
  });
  it('ignores lines that are not protocol messages', () => {
    expect(parseWorkerLine('')).toBeUndefined();
    expect(parseWorkerLine('[ring] Socket 5 was closed by the peer')).toBeUndefined();
    expect(parseWorkerLine('{"type":"token","id":"a"}')).toBeUndefined();
    expect(parseWorkerLine('{"type":"done","id":"a","finish_reason":"eos"}')).toBeUndefined();
    expect(parseWorkerLine('{not json')).toBeUndefined();
    // A ready line without MLX's memory report is not this worker's.
    expect(parseWorkerLine('{"type":"ready","rank":0,"size":1,"mode":"single","layers":[0,2],"load_ms":1,"pid":5,"mlx":"0.32.4","device":"cpu"}')).toBeUndefined();
  });
  it('writes one request line with defaults, the same for every rank', () => {
    const line = requestLine({ id: 'r', tokens: [1, 2] });
    expect(line.endsWith('\n')).toBe(true);
    expect(JSON.parse(line)).toEqual({
      type: 'request', id: 'r', tokens: [1, 2], max_tokens: 64, temperature: 0, top_p: 1, seed: 0, ignore_eos: false, logprobs: 0,
    });
    expect(requestLine({ id: 'r', tokens: [1, 2] })).toBe(line);
  });
  it('needs exactly one prompt source', () => {
    expect(() => requestLine({ id: 'r' })).toThrow(/exactly one/);
    expect(() => requestLine({ id: 'r', tokens: [1], prompt: 'x' })).toThrow(/exactly one/);
  });
  it('cancel lines name the request', () => {
    expect(JSON.parse(cancelLine('x'))).toEqual({ type: 'cancel', id: 'x' });
  });
});
