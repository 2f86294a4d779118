import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { GgufError, parseGgufHeader, readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { type GgufValue, gv } from '../../src/shared/gguf/types.ts';
import { encodeGgufHeader } from '../../src/shared/gguf/writer.ts';
import { findPreset, presetSpec } from '../../src/shared/testmodel/presets.ts';
import { Prng } from '../../src/shared/testmodel/prng.ts';

/**
 * Fuzz the GGUF reader with mutated headers: bit flips, truncations, length/count fields set
 * to extreme values, type ids changed, chunks deleted or duplicated. Every case must either
 * parse or throw the reader's own GgufError — never another exception, never a hang (each case
 * is timed; a generous bound catches unbounded loops, it is not a performance assertion), and
 * what parses must be bounded by the input (no count larger than the bytes could hold).
 * Mutations come from a seeded PRNG, so a failure reproduces exactly.
 */

function seeds(): Buffer[] {
  const small: Array<[string, GgufValue]> = [
    ['general.architecture', gv.str('llama')],
    ['general.alignment', gv.u32(32)],
    ['llama.block_count', gv.u32(2)],
    ['k.f32', gv.f32(1.5)],
    ['k.u64', gv.u64(12345678901234n)],
    ['k.i8', gv.i8(-3)],
    ['k.bool', gv.bool(false)],
    ['tokenizer.ggml.tokens', gv.arr('string', Array.from({ length: 40 }, (_, i) => `tok${i}`))],
    ['tokenizer.ggml.scores', gv.arr('float32', Array.from({ length: 40 }, (_, i) => i / 7))],
    ['tokenizer.ggml.token_type', gv.arr('int32', Array.from({ length: 40 }, (_, i) => i % 6))],
    ['k.u64s', gv.arr('uint64', [1n, 2n, 3n])],
    ['k.bools', gv.arr('bool', [true, false, true])],
  ];
  const tensors = [
    { name: 'token_embd.weight', dims: [64, 40], type: 'Q8_0' as const },
    { name: 'blk.0.attn_norm.weight', dims: [64], type: 'F32' as const },
    { name: 'blk.0.attn_q.weight', dims: [256, 64], type: 'Q4_K' as const },
    { name: 'blk.0.ffn_gate_exps.weight', dims: [256, 8, 4], type: 'Q6_K' as const },
    { name: 'output.weight', dims: [64, 40], type: 'F16' as const },
  ];
  const phi = presetSpec(findPreset('phi-3-mini'), 'q4_k_m');
  return [
    encodeGgufHeader({ metadata: small, tensors }).headerBytes,
    encodeGgufHeader({ metadata: small, tensors: [] }).headerBytes,
    // a real-shaped header: 32 layers, 195 tensors of mixed types (about 12 KB)
    encodeGgufHeader({ metadata: phi.metadata, tensors: phi.tensors.slice(0, 60) }).headerBytes,
  ];
}

const INTERESTING_U64 = [0n, 1n, 2n, 31n, 32n, 63n, 64n, 255n, 256n, 4096n, 2n ** 31n - 1n, 2n ** 31n, 2n ** 32n - 1n, 2n ** 32n, 2n ** 53n, 2n ** 63n - 1n, 2n ** 63n, 2n ** 64n - 1n];

function mutate(base: Buffer, prng: Prng): Buffer {
  const pick = (n: number) => prng.next() % n;
  const kind = pick(6);
  if (kind === 0) {
    const b = Buffer.from(base);
    for (let i = 0, n = 1 + pick(8); i < n; i++) {
      const at = pick(b.length);
      b[at] = b[at]! ^ (1 << pick(8));
    }
    return b;
  }
  if (kind === 1) return Buffer.from(base.subarray(0, pick(base.length)));
  if (kind === 2) {
    // Length/count fields are u64s holding small numbers: find such positions and make them extreme.
    const b = Buffer.from(base);
    const candidates: number[] = [];
    for (let p = 8; p + 8 <= b.length; p++) if (b.readBigUInt64LE(p) < 2n ** 24n && b.readBigUInt64LE(p) > 0n) candidates.push(p);
    const at = candidates[pick(candidates.length)] ?? 8;
    const v = prng.next() % 3 === 0 ? b.readBigUInt64LE(at) + BigInt(1 + pick(64)) : INTERESTING_U64[pick(INTERESTING_U64.length)]!;
    b.writeBigUInt64LE(v, at);
    return b;
  }
  if (kind === 3) {
    // Type ids (value types, ggml types, dimension counts) are small u32s.
    const b = Buffer.from(base);
    const at = pick(b.length - 4);
    b.writeUInt32LE(prng.next() % 2 === 0 ? pick(48) : prng.next(), at);
    return b;
  }
  if (kind === 4) {
    const from = pick(base.length);
    const len = 1 + pick(Math.min(64, base.length - from));
    return Buffer.concat([base.subarray(0, from), base.subarray(from + len)]);
  }
  const from = pick(base.length);
  const len = 1 + pick(Math.min(64, base.length - from));
  return Buffer.concat([base.subarray(0, from + len), base.subarray(from)]);
}

describe('GGUF reader fuzz', () => {
  it('survives 12,000 mutated headers with only GgufErrors, bounded time and bounded output', () => {
    const bases = seeds();
    const prng = new Prng(20261122, 'gguf-fuzz');
    const CASES = 12_000;
    let accepted = 0;
    let rejected = 0;
    let slowest = 0;
    const messages = new Set<string>();
    for (let i = 0; i < CASES; i++) {
      const base = bases[i % bases.length]!;
      const input = mutate(base, prng);
      const started = performance.now();
      try {
        const h = parseGgufHeader(input);
        accepted++;
        let elements = 0;
        for (const v of h.metadata.values()) elements += v.type === 'array' ? v.value.length : 1;
        expect(elements + h.tensors.length, `case ${i}`).toBeLessThanOrEqual(input.length);
        expect(h.dataOffset, `case ${i}`).toBeLessThanOrEqual(input.length + h.alignment);
      } catch (err) {
        if (!(err instanceof GgufError)) {
          throw new Error(`case ${i}: ${String(err)} (input ${input.toString('base64')})`);
        }
        rejected++;
        messages.add((err as Error).message.replace(/\d+/g, 'N').slice(0, 60));
      }
      slowest = Math.max(slowest, performance.now() - started);
    }
    expect(accepted + rejected).toBe(CASES);
    // The mutations really exercise both paths and many distinct checks.
    expect(accepted).toBeGreaterThan(200);
    expect(rejected).toBeGreaterThan(CASES / 2);
    expect(messages.size).toBeGreaterThan(15);
    expect(slowest).toBeLessThan(1000); // a hang guard, not a benchmark
  });
});

describe('GGUF file reader fuzz', () => {
  it('reading a file through growing prefixes gives exactly what parsing the whole buffer gives (600 cases)', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'orchard-gguf-fuzz-'));
    try {
      const bases = seeds();
      const prng = new Prng(7, 'gguf-file-fuzz');
      const path = join(dir, 'case.gguf');
      const outcome = (f: () => unknown) => {
        try {
          const h = f() as { tensors: unknown[]; metadata: Map<string, unknown>; dataOffset: number };
          return `ok ${h.tensors.length} ${h.metadata.size} ${h.dataOffset}`;
        } catch (err) {
          if (!(err instanceof GgufError)) throw err;
          return `error ${err.message.replace(`${path}: `, '')}`;
        }
      };
      for (let i = 0; i < 600; i++) {
        const input = mutate(bases[i % bases.length]!, prng);
        await writeFile(path, input);
        const whole = outcome(() => parseGgufHeader(input));
        let viaFile: string;
        try {
          const h = await readGgufHeader(path, { initialBytes: 1 + (i % 97) });
          viaFile = `ok ${h.tensors.length} ${h.metadata.size} ${h.dataOffset}`;
        } catch (err) {
          if (!(err instanceof GgufError)) throw new Error(`case ${i}: ${String(err)}`);
          viaFile = `error ${err.message.replace(`${path}: `, '')}`;
        }
        expect(viaFile, `case ${i}`).toBe(whole);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
