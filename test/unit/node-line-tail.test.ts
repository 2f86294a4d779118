import { describe, expect, it } from 'vitest';
import { LineTail } from '../../src/node/line-tail.ts';

describe('LineTail', () => {
  it('keeps the last N lines across chunk boundaries', () => {
    const t = new LineTail(3);
    t.push('one\ntw');
    t.push('o\nthree\r\nfour\n');
    expect(t.snapshot()).toEqual(['two', 'three', 'four']);
  });

  it('includes an unterminated last line and skips blank lines', () => {
    const t = new LineTail(5);
    t.push('a\n\n\nb\npartial');
    expect(t.snapshot()).toEqual(['a', 'b', 'partial']);
    t.push(' line\n');
    expect(t.snapshot()).toEqual(['a', 'b', 'partial line']);
  });

  it('bounds memory for a line that never ends', () => {
    const t = new LineTail(2, 10);
    t.push('x'.repeat(1000));
    expect(t.snapshot()[0]!.length).toBe(10);
    t.push(`${'y'.repeat(50)}\n`);
    expect(t.snapshot()[0]!.length).toBeLessThanOrEqual(10);
  });
});

describe('LineTail with a filter', () => {
  it('keeps only accepted lines, so the limit counts only those', () => {
    const t = new LineTail(2, 100, (l) => l.includes('buffer size'));
    t.push('noise\nCPU buffer size = 1 MiB\nnoise\nRPC0 buffer size = 2 MiB\nmore noise\nRPC1 buffer size = 3 MiB\npartial noise');
    expect(t.snapshot()).toEqual(['RPC0 buffer size = 2 MiB', 'RPC1 buffer size = 3 MiB']);
  });
});
