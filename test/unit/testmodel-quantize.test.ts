import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { Prng, hashName } from '../../src/shared/testmodel/prng.ts';
import { encodeValues, fp16BitsToFp32, fp32BitsToFp16Bits, fp32ToFp16Bits, quantizeQ8_0 } from '../../src/shared/testmodel/quantize.ts';

/** The fuzz-style input the golden hashes below were computed from. */
function goldenInput(): { raw: Float32Array; finite: Float32Array } {
  const p = new Prng(42, 'x');
  const n = 1 << 18;
  const raw = new Float32Array(n);
  const bits = new Uint32Array(raw.buffer);
  for (let i = 0; i < n; i++) {
    const k = i % 4;
    if (k === 0) bits[i] = p.next(); // any bit pattern: NaNs, infinities, subnormals
    else if (k === 1) raw[i] = p.symmetric(1);
    else if (k === 2) raw[i] = p.symmetric(70000); // beyond fp16's range
    else raw[i] = p.symmetric(1e-5); // fp16 subnormals
  }
  const finite = raw.map((v) => (Number.isFinite(v) ? v : 0.5));
  for (let i = 0; i < 64; i++) finite[i] = (i - 32) * 0.5; // exact halves: roundf ties
  return { raw, finite };
}

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

describe('quantisation is bit-exact with ggml', () => {
  // Golden digests produced by ggml itself (libggml-base of the llama.cpp release bundled with
  // node-llama-cpp 3.22.1, v0.5.0+de3ff815ea7d): `ggml_fp32_to_fp16` over every value and
  // `ggml_quantize_chunk(GGML_TYPE_Q8_0, …)` over the finite copy, via a 20-line C harness,
  // on x86-64. Any difference in rounding, subnormals, NaN handling or the PRNG changes them.
  // To reproduce: feed goldenInput().raw (as little-endian float32 bytes) on stdin to
  //   int main(){ static float b[1<<20]; size_t n=fread(b,4,1<<20,stdin);
  //     for(size_t i=0;i<n;i++){ ggml_fp16_t h=ggml_fp32_to_fp16(b[i]); fwrite(&h,2,1,stdout); }
  //     void*q=malloc(n/32*34); ggml_quantize_chunk(GGML_TYPE_Q8_0,b,q,0,n/32,32,NULL);
  //     fwrite(q,34,n/32,stdout); }
  // built with `gcc -Iggml/include -Lbuild/bin -lggml-base`; hash the fp16 part of the output
  // for the first digest, and the q8_0 part of a second run over goldenInput().finite.
  it('F16 matches ggml_fp32_to_fp16 on 262,144 values incl. NaN, ±inf, overflow and subnormals', () => {
    const { raw } = goldenInput();
    expect(sha(encodeValues('f16', raw))).toBe('a6844a787c3be96bedb85412aa25b55698cc312c632c6c4f05f99e6a25ebb34f');
  });

  it('Q8_0 matches ggml’s quantize_row_q8_0_ref on 8,192 blocks incl. exact .5 ties', () => {
    const { finite } = goldenInput();
    expect(sha(encodeValues('q8_0', finite))).toBe('6965c7f68f2ad2c33bad4ed08b2253d61f6617783ff01246f73cc4415778ac45');
  });

  it('F16 edge cases round to nearest even like IEEE', () => {
    const cases: Array<[number, number]> = [
      [0, 0x0000],
      [-0, 0x8000],
      [1, 0x3c00],
      [-2, 0xc000],
      [65504, 0x7bff], // largest finite
      [65519, 0x7bff], // rounds down
      [65520, 0x7c00], // ties to even → infinity
      [Number.POSITIVE_INFINITY, 0x7c00],
      [Number.NEGATIVE_INFINITY, 0xfc00],
      [Number.NaN, 0x7e00],
      [2 ** -24, 0x0001], // smallest subnormal
      [2 ** -25, 0x0000], // tie → even (zero)
      [3 * 2 ** -25, 0x0002], // tie → even
      [2 ** -14, 0x0400], // smallest normal
      [1 + 2 ** -11, 0x3c00], // tie → even
      [1 + 3 * 2 ** -11, 0x3c02],
    ];
    for (const [x, bits] of cases) expect(fp32ToFp16Bits(x), String(x)).toBe(bits);
    for (const [x, bits] of cases) {
      if (Number.isNaN(x)) continue;
      if (Math.abs(x) <= 65504 && bits !== 0x7c00) expect(Math.abs(fp16BitsToFp32(bits) - x)).toBeLessThanOrEqual(Math.abs(x) * 2 ** -11 + 2 ** -25);
    }
  });

  it('Q8_0 stores d = amax/127 as fp16 and rounds halves away from zero', () => {
    const block = new Float32Array(32);
    block[0] = 127;
    block[1] = -63.5;
    block[2] = 0.5;
    block[3] = -0.5;
    block[4] = 0.49999997;
    const out = new Uint8Array(34);
    quantizeQ8_0(block, out);
    const view = new DataView(out.buffer);
    expect(fp16BitsToFp32(view.getUint16(0, true))).toBe(1);
    expect([view.getInt8(2), view.getInt8(3), view.getInt8(4), view.getInt8(5), view.getInt8(6)]).toEqual([127, -64, 1, -1, 0]);
    const zeros = new Uint8Array(34).fill(9);
    quantizeQ8_0(new Float32Array(32), zeros);
    expect([...zeros]).toEqual(new Array(34).fill(0));
    expect(() => quantizeQ8_0(new Float32Array(31), new Uint8Array(34))).toThrow(/multiples of 32/);
  });
});

describe('seeded PRNG', () => {
  it('implements xoshiro128** exactly (reference C code, state {1,2,3,4})', () => {
    const p = Prng.fromState(1, 2, 3, 4);
    expect(Array.from({ length: 6 }, () => p.next())).toEqual([11520, 0, 5927040, 70819200, 2031721883, 1637235492]);
  });

  it('is pinned: the seeding and naming are part of every generated model’s bytes', () => {
    const p = new Prng(1, 'token_embd.weight');
    expect(Array.from({ length: 4 }, () => p.next())).toEqual([501769392, 1575314174, 404604132, 1347775092]);
    expect(hashName('a')).toBe(0xe40c292c); // FNV-1a 32 of "a"
  });

  it('gives independent streams per seed and per name', () => {
    const first = (seed: number, name: string) => new Prng(seed, name).next();
    expect(first(1, 'a')).not.toBe(first(2, 'a'));
    expect(first(1, 'a')).not.toBe(first(1, 'b'));
    expect(first(1, 'a')).toBe(first(1, 'a'));
  });

  it('fills uniforms with the requested mean and standard deviation', () => {
    const v = new Float32Array(200_000);
    new Prng(7, 'stats').fillUniform(v, 0.5, 1);
    let sum = 0;
    let sq = 0;
    let min = Number.POSITIVE_INFINITY;
    let max = Number.NEGATIVE_INFINITY;
    for (const x of v) {
      sum += x;
      sq += x * x;
      min = Math.min(min, x);
      max = Math.max(max, x);
    }
    const mean = sum / v.length;
    const std = Math.sqrt(sq / v.length - mean * mean);
    expect(mean).toBeCloseTo(1, 2);
    expect(std).toBeCloseTo(0.5, 2);
    const a = 0.5 * Math.sqrt(3);
    expect(min).toBeGreaterThanOrEqual(1 - a - 1e-6);
    expect(max).toBeLessThan(1 + a);
  });
});

describe('integer fp16 conversion', () => {
  it('equals the float-arithmetic port on 4 million bit patterns and every exponent boundary', () => {
    const p = new Prng(99, 'fp16-sweep');
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    const check = (w: number) => {
      u[0] = w;
      const want = fp32ToFp16Bits(f[0]!);
      const got = fp32BitsToFp16Bits(u[0]!);
      if (want !== got) throw new Error(`0x${u[0]!.toString(16)}: ${want.toString(16)} vs ${got.toString(16)}`);
    };
    for (let i = 0; i < 4_000_000; i++) check(p.next());
    for (let e = 0; e < 256; e++) {
      for (const m of [0, 1, 0xfff, 0x1000, 0x1001, 0x2000, 0x3fff, 0x7fffff, 0x400000, 0x7ff000]) {
        for (const s of [0, 0x80000000]) {
          for (const d of [-1, 0, 1]) check((s | (e << 23) | m) + d);
        }
      }
    }
  });
});
