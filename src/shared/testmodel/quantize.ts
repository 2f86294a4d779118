import { UsageError } from '../errors.ts';

/**
 * Float32 → GGUF tensor bytes for the types test models use, bit-exact with ggml's reference
 * code so a generated file equals what llama.cpp's own tools would write from the same floats:
 *  - F16: `ggml_compute_fp32_to_fp16` (ggml-impl.h), round-to-nearest-even incl. subnormals.
 *  - Q8_0: `quantize_row_q8_0_ref` (ggml-quants.c): per 32 values, d = amax/127 as fp16,
 *    q = roundf(x · (1/d)), all in float32 arithmetic.
 * Float32 arithmetic is reproduced with Math.fround after each operation; for a single +, ×, /
 * of float32 operands, computing in double and rounding once gives the float32 result exactly.
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

function bitsOf(x: number): number {
  f32[0] = x;
  return u32[0]!;
}
function fromBits(b: number): number {
  u32[0] = b >>> 0;
  return f32[0]!;
}

const SCALE_TO_INF = 2 ** 112;
const SCALE_TO_ZERO = 2 ** -110;

/** ggml_compute_fp32_to_fp16: the fp16 bit pattern of a float32 value. */
export function fp32ToFp16Bits(value: number): number {
  const f = Math.fround(value);
  let base = Math.fround(Math.fround(Math.abs(f) * SCALE_TO_INF) * SCALE_TO_ZERO);
  const w = bitsOf(f);
  const shl1w = (w + w) >>> 0;
  const sign = (w & 0x80000000) >>> 0;
  let bias = (shl1w & 0xff000000) >>> 0;
  if (bias < 0x71000000) bias = 0x71000000;
  base = Math.fround(fromBits((bias >>> 1) + 0x07800000) + base);
  const bits = bitsOf(base);
  const expBits = (bits >>> 13) & 0x00007c00;
  const mantissaBits = bits & 0x00000fff;
  const nonsign = expBits + mantissaBits;
  return ((sign >>> 16) | (shl1w > 0xff000000 ? 0x7e00 : nonsign)) & 0xffff;
}

/**
 * The same function on the float32's bit pattern with integer arithmetic only (no float
 * round trips): about 3× faster, used for bulk conversion. Must stay bit-identical to
 * fp32ToFp16Bits — the golden ggml test runs every kind of value through both.
 */
export function fp32BitsToFp16Bits(w: number): number {
  const sign = (w >>> 16) & 0x8000;
  const a = w & 0x7fffffff;
  if (a > 0x7f800000) return sign | 0x7e00; // NaN: ggml returns a quiet NaN, payload dropped
  if (a >= 0x477ff000) return sign | 0x7c00; // ≥ 65520 rounds to infinity
  if (a >= 0x38800000) {
    // normal half: rebias the exponent, round the 13 dropped mantissa bits to nearest even
    const r = a - 0x38000000;
    return sign | ((r + 0xfff + ((r >>> 13) & 1)) >>> 13);
  }
  const e = a >>> 23;
  if (e < 102) return sign; // below half of the smallest subnormal: zero
  // subnormal half: value in units of 2^-24 is mant · 2^(e-126), rounded to nearest even
  const mant = (a & 0x7fffff) | 0x800000;
  const shift = 126 - e;
  const half = 1 << (shift - 1);
  const rest = mant & ((1 << shift) - 1);
  let q = mant >>> shift;
  if (rest > half || (rest === half && (q & 1) === 1)) q += 1;
  return sign | q;
}

/** ggml_compute_fp16_to_fp32 (exact: every fp16 is a float32). */
export function fp16BitsToFp32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** C roundf: halves away from zero (JS Math.round rounds them up). */
function roundf(x: number): number {
  return x < 0 ? -Math.floor(-x + 0.5) : Math.floor(x + 0.5);
}

export const QK8_0 = 32;
const Q8_0_BLOCK_BYTES = 34;

/** quantize_row_q8_0_ref: `src.length` must be a multiple of 32; writes 34 bytes per block. */
export function quantizeQ8_0(src: Float32Array, out: Uint8Array, outOffset = 0): void {
  if (src.length % QK8_0 !== 0) throw new UsageError(`Q8_0 needs multiples of ${QK8_0} values, got ${src.length}`);
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const qs = new Int8Array(out.buffer, out.byteOffset, out.byteLength);
  let o = outOffset;
  for (let i = 0; i < src.length; i += QK8_0) {
    let amax = 0;
    for (let j = 0; j < QK8_0; j++) {
      const v = Math.abs(src[i + j]!);
      if (v > amax) amax = v;
    }
    const d = Math.fround(amax / 127);
    const id = d ? Math.fround(1 / d) : 0;
    view.setUint16(o, fp32ToFp16Bits(d), true);
    for (let j = 0; j < QK8_0; j++) qs[o + 2 + j] = roundf(Math.fround(src[i + j]! * id));
    o += Q8_0_BLOCK_BYTES;
  }
}

export type TestModelType = 'f32' | 'f16' | 'q8_0';

/** Bytes `n` float32 values take as `type`. */
export function encodedBytes(type: TestModelType, n: number): number {
  if (type === 'f32') return n * 4;
  if (type === 'f16') return n * 2;
  return (n / QK8_0) * Q8_0_BLOCK_BYTES;
}

/** Encode float32 values (little-endian) as `type`. */
export function encodeValues(type: TestModelType, src: Float32Array): Uint8Array {
  const out = new Uint8Array(encodedBytes(type, src.length));
  if (type === 'f32') {
    const view = new DataView(out.buffer);
    for (let i = 0; i < src.length; i++) view.setFloat32(i * 4, src[i]!, true);
  } else if (type === 'f16') {
    const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
    const view = new DataView(out.buffer);
    for (let i = 0; i < src.length; i++) view.setUint16(i * 2, fp32BitsToFp16Bits(bits[i]!), true);
  } else {
    quantizeQ8_0(src, out);
  }
  return out;
}
