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
