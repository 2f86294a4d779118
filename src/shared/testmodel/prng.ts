/**
 * Seeded pseudo-random numbers for test models, byte-identical on every machine and Node
 * version: only 32-bit integer operations (Math.imul, shifts) and exactly rounded IEEE
 * arithmetic are used — no Math.random, no transcendental functions (whose last bits may
 * differ between engines).
 *
 * Generator: xoshiro128** (Blackman & Vigna), seeded through splitmix32 so that nearby seeds
 * give unrelated streams.
 */

function splitmix32(state: { s: number }): number {
  state.s = (state.s + 0x9e3779b9) | 0;
  let z = state.s;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

/** FNV-1a 32-bit of a string's UTF-16 code units: names a stream (e.g. a tensor). */
export function hashName(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

export class Prng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  /** A stream for `seed` (a uint32) and an optional stream name (so tensors are independent of order). */
  constructor(seed: number, stream = '') {
    const st = { s: (seed ^ Math.imul(hashName(stream), 0x27d4eb2f)) | 0 };
    this.a = splitmix32(st);
    this.b = splitmix32(st);
    this.c = splitmix32(st);
    this.d = splitmix32(st);
    if ((this.a | this.b | this.c | this.d) === 0) this.d = 1; // the all-zero state is a fixed point
  }

  /** A generator with an explicit xoshiro128** state (to check against the reference vectors). */
  static fromState(a: number, b: number, c: number, d: number): Prng {
    const p = new Prng(0);
    p.a = a | 0;
    p.b = b | 0;
    p.c = c | 0;
    p.d = d | 0;
    return p;
  }

  /** Next uint32. */
  next(): number {
    const result = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0;
    const t = this.b << 9;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = rotl(this.d, 11);
    return result;
  }

  /** Uniform in [0, 1) with 24 random bits (exactly representable as float32). */
  float(): number {
    return (this.next() >>> 8) * 2 ** -24;
  }

  /** Uniform in [-a, a). */
  symmetric(a: number): number {
    return (this.float() * 2 - 1) * a;
  }

  /** Fill `out` with uniform values of standard deviation `std` around `mean`. */
  fillUniform(out: Float32Array, std: number, mean = 0): void {
    // A uniform on [-a, a) has standard deviation a / sqrt(3).
    const a = std * Math.sqrt(3);
    for (let i = 0; i < out.length; i++) out[i] = mean + this.symmetric(a);
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** Uniform numbers in [0, 1) for `seed`, shaped like Math.random, for randomized tests and benches. */
export function uniformSource(seed: number, stream = ''): () => number {
  const p = new Prng(seed, stream);
  return () => p.float();
}
