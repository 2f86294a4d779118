import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { GgufError, parseGgufHeader, readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { type GgufHeader, type GgufValue, gv } from '../../src/shared/gguf/types.ts';
import { encodeGgufHeader } from '../../src/shared/gguf/writer.ts';
import { findPreset, presetSpec } from '../../src/shared/testmodel/presets.ts';
import { Prng } from '../../src/shared/testmodel/prng.ts';
import { structuralEnd } from '../helpers/gguf-prefix.ts';

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

const KINDS = ['bit flips', 'truncation', 'count/length set extreme', 'type id overwritten', 'chunk deleted', 'chunk duplicated'] as const;
type Kind = (typeof KINDS)[number];

function mutate(base: Buffer, prng: Prng): Buffer {
  return mutation(base, prng).input;
}

function mutation(base: Buffer, prng: Prng): { kind: Kind; input: Buffer } {
  const pick = (n: number) => prng.next() % n;
  const k = pick(6);
  return { kind: KINDS[k]!, input: mutated(k, base, pick, prng) };
}

function mutated(kind: number, base: Buffer, pick: (n: number) => number, prng: Prng): Buffer {
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

/** What was accepted is a well-formed header: the writer takes it and it reads back the same. */
function expectRoundTrip(h: GgufHeader, what: string): void {
  const again = parseGgufHeader(encodeGgufHeader({ metadata: h.metadata, tensors: h.tensors.map((t) => ({ name: t.name, dims: t.dims, type: t.type.name })) }).headerBytes);
  expect({ metadata: again.metadata, tensors: again.tensors, alignment: again.alignment, dataSize: again.dataSize }, what).toEqual({
    metadata: h.metadata,
    tensors: h.tensors,
    alignment: h.alignment,
    dataSize: h.dataSize,
  });
}

describe('GGUF reader fuzz', () => {
  it('12,000 mutated headers: each mutation class gives what it must, in bounded time and output', () => {
    const bases = seeds();
    const ends = bases.map(structuralEnd);
    const originals = bases.map((b) => parseGgufHeader(b));
    const prng = new Prng(20261122, 'gguf-fuzz');
    const CASES = 12_000;
    const outcomes = new Map<Kind, { accepted: number; rejected: number }>(KINDS.map((k) => [k, { accepted: 0, rejected: 0 }]));
    let slowest = 0;
    const messages = new Set<string>();
    for (let i = 0; i < CASES; i++) {
      const base = bases[i % bases.length]!;
      const end = ends[i % bases.length]!;
      const { kind, input } = mutation(base, prng);
      const what = `case ${i} (${kind}, input ${input.toString('base64').slice(0, 200)})`;
      const count = outcomes.get(kind)!;
      const started = performance.now();
      let h: GgufHeader | undefined;
      try {
        h = parseGgufHeader(input);
      } catch (err) {
        if (!(err instanceof GgufError)) throw new Error(`${what}: ${String(err)}`);
        count.rejected++;
        messages.add(err.message.replace(/\d+/g, 'N').slice(0, 60));
        // A prefix of a valid header can only be refused as too short: nothing else is wrong with it.
        if (kind === 'truncation') expect(err.message, what).toMatch(/truncated|is impossible: the remaining/);
      }
      slowest = Math.max(slowest, performance.now() - started);
      if (kind === 'truncation') {
        // Exactly the prefixes that cut into the header are refused; the rest (padding cut) read the original.
        expect(h === undefined, what).toBe(input.length < end);
        if (h) expect({ metadata: h.metadata, tensors: h.tensors }, what).toEqual({ metadata: originals[i % bases.length]!.metadata, tensors: originals[i % bases.length]!.tensors });
      }
      if (!h) continue;
      count.accepted++;
      let elements = 0;
      for (const v of h.metadata.values()) elements += v.type === 'array' ? v.value.length : 1;
      expect(elements + h.tensors.length, what).toBeLessThanOrEqual(input.length);
      expect(h.dataOffset, what).toBeLessThanOrEqual(input.length + h.alignment);
      expectRoundTrip(h, what);
    }
    // Every class reaches the reader's checks, and the checks are many and distinct.
    for (const [kind, o] of outcomes) expect(o.rejected, kind).toBeGreaterThan(50);
    // Flipped bits in names and values, and small counts, leave valid headers too.
    for (const kind of ['bit flips', 'count/length set extreme', 'type id overwritten'] as const) expect(outcomes.get(kind)!.accepted, kind).toBeGreaterThan(20);
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
