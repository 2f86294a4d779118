import { describe, expect, it } from 'vitest';
import type { DoneMessage, TokenMessage } from '../../src/node/mlx/protocol.ts';
import { tokenLogprobOf } from '../../src/node/mlx/relay.ts';
import { TokenTextDecoder } from '../../src/node/mlx/token-text.ts';
import { seededRandom } from '../helpers/random.ts';

const b = (...xs: number[]) => Uint8Array.from(xs);

/** What each token releases, fed one after another, and the tail at the end. */
function stream(tokens: readonly Uint8Array[]): { out: string[]; tail: string } {
  const d = new TokenTextDecoder();
  const out = tokens.map((t) => d.push(t));
  return { out, tail: d.flush() };
}

describe('MLX token text: a character split over tokens waits for its last byte', () => {
  it('holds a two-byte character until the token that completes it', () => {
    expect(stream([b(0x68), b(0xc3), b(0xa9), b(0x6c)])).toEqual({ out: ['h', '', 'é', 'l'], tail: '' });
  });

  it('a four-byte character over four tokens, and tokens that end and begin mid-character', () => {
    expect(stream([b(0xf0), b(0x9f), b(0x98), b(0x80)]).out).toEqual(['', '', '', '😀']);
    // "a€b": the euro sign's three bytes straddle two tokens.
    expect(stream([b(0x61, 0xe2), b(0x82, 0xac, 0x62)]).out).toEqual(['a', '€b']);
  });

  it('bytes that can never form a character are U+FFFD as soon as that is certain, not before', () => {
    // A lead byte followed by ASCII: broken at the ASCII token.
    expect(stream([b(0xe2), b(0x41)]).out).toEqual(['', '\ufffdA']);
    // A stray continuation byte: broken at once.
    expect(stream([b(0x80), b(0x41)]).out).toEqual(['\ufffd', 'A']);
    // The generation ends mid-character: the tail says so.
    expect(stream([b(0x41), b(0xf0, 0x9f)])).toEqual({ out: ['A', ''], tail: '\ufffd' });
  });

  it('a byte-order mark is text, as llama-server streams it', () => {
    expect(stream([b(0xef, 0xbb), b(0xbf, 0x41)]).out).toEqual(['', '\ufeffA']);
  });

  it('any valid text cut into tokens at any byte comes out whole and without a replacement character', () => {
    const random = seededRandom(16);
    const samples = ['héllo wörld', '日本語のテキスト', 'emoji 😀🍐🍎 mixed with ASCII', 'ελληνικά и русский', '\u{10ffff}\u0080\u07ff\u0800\uffff'];
    for (const text of samples) {
      const bytes = new TextEncoder().encode(text);
      for (let trial = 0; trial < 200; trial++) {
        const tokens: Uint8Array[] = [];
        for (let i = 0; i < bytes.length; ) {
          const n = 1 + Math.floor(random() * 4);
          tokens.push(bytes.slice(i, i + n));
          i += n;
        }
        const { out, tail } = stream(tokens);
        expect(out.join('') + tail).toBe(text);
        expect(out.some((s) => s.includes('\ufffd'))).toBe(false);
      }
    }
  });

  it('worker lines: a token with bytes gets its text from them; one without keeps the worker’s; the done tail flushes', () => {
    const tok = (bytes: string | undefined, text: string): TokenMessage => ({ type: 'token', id: 'r', index: 0, token: 1, text, ...(bytes === undefined ? {} : { bytes }) });
    const done: DoneMessage = { type: 'done', id: 'r', finish_reason: 'length', prompt_tokens: 1, completion_tokens: 2, text_tail: 'worker tail', ranks: 1, ranks_agree: true, first_token_ms: 1, total_ms: 2 };
    const d = new TokenTextDecoder();
    // The worker's detokenizer text is ignored where bytes say otherwise.
    expect(d.token(tok('c3', '\ufffd')).text).toBe('');
    expect(d.token(tok('a9', '\ufffd')).text).toBe('é');
    expect(d.token(tok('f0', '')).text).toBe('');
    expect(d.done(done).text_tail).toBe('\ufffd');
    const plain = new TokenTextDecoder();
    expect(plain.token(tok(undefined, 'as is')).text).toBe('as is');
    expect(plain.done(done).text_tail).toBe('worker tail');
  });

  it('logprobs carry a token’s raw bytes where the worker gives them, as llama-server does', () => {
    const t: TokenMessage = { type: 'token', id: 'r', index: 0, token: 195, text: '', bytes: 'c3', logprob: -0.5, token_text: '\ufffd', top_logprobs: [[195, -0.5, '\ufffd']] };
    expect(tokenLogprobOf(t, 1)).toMatchObject({ tokenId: 195, token: '\ufffd', bytes: [0xc3], logprob: -0.5 });
    const { bytes: _, ...noBytes } = t;
    expect(tokenLogprobOf(noBytes, 1).bytes).toEqual([0xef, 0xbf, 0xbd]);
  });
});
