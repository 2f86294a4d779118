import { parseGgufHeader } from '../../src/shared/gguf/reader.ts';

/**
 * Bytes a GGUF header needs before its padding: the shortest prefix of `header` that parses.
 * Found by bisection (a prefix parses exactly when it is at least this long). The fuzz tests use
 * it to say which truncations must be refused.
 */
export function structuralEnd(header: Uint8Array): number {
  let lo = 0;
  let hi = header.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    try {
      parseGgufHeader(header.subarray(0, mid));
      hi = mid;
    } catch {
      lo = mid + 1;
    }
  }
  return lo;
}
