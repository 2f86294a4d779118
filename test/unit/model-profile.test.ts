import { describe, expect, it } from 'vitest';
import { UsageError } from '../../src/shared/errors.ts';
import { tensorBytes } from '../../src/shared/gguf/ggml-types.ts';
import { GgufError, parseGgufHeader } from '../../src/shared/gguf/reader.ts';
import type { GgufHeader, GgufValue } from '../../src/shared/gguf/types.ts';
import { gv } from '../../src/shared/gguf/types.ts';
import { encodeGgufHeader } from '../../src/shared/gguf/writer.ts';
import { type ModelProfile, modelProfile } from '../../src/shared/model/profile.ts';
import { type ModelShape, presetHeader, shapeHeader } from '../../src/shared/model/shapes.ts';
import { uniformSource } from '../../src/shared/testmodel/prng.ts';
import { structuralEnd } from '../helpers/gguf-prefix.ts';

// Synthetic shapes with a known, simple quant mix (see shapes.ts), so bytes can be recomputed here.
const L70: ModelShape = { name: 'llama-3-70b', arch: 'llama', layers: 80, embd: 8192, ffn: 28672, heads: 64, kvHeads: 8, vocab: 128256, ctx: 8192 };
const L8: ModelShape = { name: 'llama-3-8b', arch: 'llama', layers: 32, embd: 4096, ffn: 14336, heads: 32, kvHeads: 8, vocab: 128256, ctx: 8192 };
const G2: ModelShape = { name: 'g', arch: 'gemma2', layers: 12, embd: 256, ffn: 512, heads: 4, kvHeads: 2, vocab: 256, ctx: 8192, tiedOutput: true };

function withMeta(h: GgufHeader, changes: Record<string, GgufValue | undefined>): GgufHeader {
  const metadata = new Map(h.metadata);
  for (const [k, v] of Object.entries(changes)) {
    if (v === undefined) metadata.delete(k);
    else metadata.set(k, v);
  }
  return { ...h, metadata };
}

describe('model profile from a GGUF header', () => {
  it('llama-3-70b Q4_K_M: exact per-layer bytes from tensor infos', () => {
    const h = shapeHeader(L70, 'q4_k_m');
    const p = modelProfile(h);
    expect(p.arch).toBe('llama');
    expect(p.layerCount).toBe(80);
    expect(p.heads).toBe(64);
    expect(p.kvHeads.every((k) => k === 8)).toBe(true);
    expect(p.headDimK).toBe(128);
    expect(p.layers[0]!.kEmbdGqa).toBe(1024);
    // Layer 0 = the sum of its tensors, computed independently from ggml block sizes.
    const e = 8192;
    const f = 28672;
    const q4k = (n: number) => (n / 256) * 144;
    const q6k = (n: number) => (n / 256) * 210;
    const expected = 2 * e * 4 + q4k(e * e) * 2 + q4k(e * 1024) + q6k(e * 1024) + q4k(e * f) * 2 + q6k(e * f);
    expect(p.layers[0]!.weightBytes).toBe(expected);
    expect(p.tokenEmbdBytes).toBe(q4k(e * 128256));
    expect(p.outputBytes).toBe(q6k(e * 128256));
    expect(p.outputTied).toBe(false);
    expect(p.fileTensorBytes).toBe(h.tensors.reduce((t, x) => t + x.bytes, 0));
    expect(p.fileTensorBytes).toBe(80 * expected + p.tokenEmbdBytes + p.outputBytes + e * 4);
    expect(p.weightType).toBe('Q4_K');
    // 70B Q4_K_M is ~40 GiB.
    expect(p.fileTensorBytes / 2 ** 30).toBeGreaterThan(38);
    expect(p.fileTensorBytes / 2 ** 30).toBeLessThan(44);
  });

  it('tied output: output head duplicates token_embd on the output device', () => {
    const p = modelProfile(presetHeader('gemma-2-27b', 'q8_0'));
    expect(p.outputTied).toBe(true);
    expect(p.outputBytes).toBe(p.tokenEmbdBytes);
  });

  it('gemma-2: every other layer is SWA with the window from the header', () => {
    const p = modelProfile(presetHeader('gemma-2-27b', 'q8_0'));
    expect(p.swa).toEqual({ window: 4096, layers: 23 });
    expect(p.layers.slice(0, 4).map((l) => l.swa)).toEqual([true, false, true, false]);
  });

  it('gemma-3: pattern 6 by default, explicit bool pattern wins, no window means no SWA', () => {
    const base = shapeHeader(G2, 'q8_0');
    const g3 = (extra: Record<string, GgufValue | undefined>) => {
      const m = new Map<string, GgufValue>();
      for (const [k, v] of base.metadata) m.set(k.replace(/^gemma2\./, 'gemma3.'), k === 'general.architecture' ? gv.str('gemma3') : v);
      return withMeta({ ...base, metadata: m }, extra);
    };
    const p = modelProfile(g3({ 'gemma3.attention.sliding_window': gv.u32(1024) }));
    expect(p.layers.map((l) => l.swa)).toEqual([true, true, true, true, true, false, true, true, true, true, true, false]);
    const pattern = Array.from({ length: 12 }, (_, i) => i % 3 !== 0);
    const q = modelProfile(g3({ 'gemma3.attention.sliding_window': gv.u32(512), 'gemma3.attention.sliding_window_pattern': gv.arr('bool', pattern) }));
    expect(q.layers.map((l) => l.swa)).toEqual(pattern);
    expect(modelProfile(g3({ 'gemma3.attention.sliding_window': undefined })).swa).toBeUndefined();
  });

  it('mixtral (llama arch with experts): a token reads only the routed experts', () => {
    const p = modelProfile(presetHeader('mixtral-8x7b', 'q4_k_m'));
    expect(p.moe).toMatchObject({ experts: 8, expertsUsed: 2 });
    const l = p.layers[0]!;
    expect(l.readBytesPerToken).toBeLessThan(l.weightBytes * 0.4);
    expect(l.readBytesPerToken).toBeGreaterThan(l.weightBytes * 0.2);
  });

  it('qwen2 / phi3 / qwen3 / qwen MoE archs are accepted; phi3 SWA is ignored like llama.cpp does', () => {
    const s = { ...L8, layers: 2 };
    const h = shapeHeader(s, 'q8_0');
    for (const arch of ['qwen2', 'qwen3', 'phi3']) {
      const m = new Map<string, GgufValue>();
      for (const [k, v] of h.metadata) m.set(k.replace(/^llama\./, `${arch}.`), k === 'general.architecture' ? gv.str(arch) : v);
      if (arch === 'phi3') m.set('phi3.attention.sliding_window', gv.u32(2047));
      const p = modelProfile({ ...h, metadata: m });
      expect(p.arch).toBe(arch);
      expect(p.swa).toBeUndefined();
    }
    const moe = new Map<string, GgufValue>();
    for (const [k, v] of h.metadata) moe.set(k.replace(/^llama\./, 'qwen3moe.'), k === 'general.architecture' ? gv.str('qwen3moe') : v);
    expect(() => modelProfile({ ...h, metadata: moe })).toThrow(/expert_count/);
    moe.set('qwen3moe.expert_count', gv.u32(128));
    moe.set('qwen3moe.expert_used_count', gv.u32(8));
    expect(modelProfile({ ...h, metadata: moe }).moe).toMatchObject({ experts: 128, expertsUsed: 8 });
  });

  it('per-layer head_count_kv arrays are honoured', () => {
    const h = shapeHeader({ ...L8, layers: 3 }, 'q8_0');
    const p = modelProfile(withMeta(h, { 'llama.attention.head_count_kv': gv.arr('uint32', [8, 0, 4]) }));
    expect(p.layers.map((l) => l.kEmbdGqa)).toEqual([1024, 0, 512]);
  });

  it('rejects what llama.cpp would refuse, naming the problem', () => {
    const h = shapeHeader({ ...L8, layers: 2 }, 'q8_0');
    const bad: [Record<string, GgufValue | undefined>, RegExp][] = [
      [{ 'general.architecture': undefined }, /lacks general.architecture/],
      [{ 'llama.block_count': undefined }, /lacks llama.block_count/],
      [{ 'llama.block_count': gv.u32(1) }, /names layer 1 but the model has 1 layers/],
      [{ 'llama.block_count': gv.u32(3) }, /no tensors for layer 2/],
      [{ 'llama.embedding_length': gv.u32(1024) }, /token_embd.weight has shape/],
      [{ 'llama.embedding_length': gv.u32(1000) }, /not a multiple of head count/],
      [{ 'llama.attention.head_count': gv.str('x') }, /should be a number/],
      [{ 'llama.expert_count': gv.u32(8), 'llama.expert_used_count': gv.u32(9) }, /9 of 8 experts/],
      [{ 'llama.attention.head_count_kv': gv.arr('uint32', [8]) }, /1 entries for 2 layers/],
    ];
    for (const [change, msg] of bad) {
      expect(() => modelProfile(withMeta(h, change))).toThrow(UsageError);
      expect(() => modelProfile(withMeta(h, change))).toThrow(msg);
    }
    expect(() => modelProfile({ ...h, tensors: h.tensors.filter((t) => t.name !== 'token_embd.weight') })).toThrow(/token_embd/);
  });
});

describe('fuzz: mutated GGUF headers through reader + profile', () => {
  it('10,000 mutations: truncations refused as too short, the rest a reader refusal, a named profile refusal or a profile that counts every byte once', () => {
    const shape = { ...L8, layers: 3, vocab: 256, embd: 256, ffn: 512, heads: 4, kvHeads: 2 };
    const spec = shapeHeader(shape, 'q8_0');
    const { headerBytes } = encodeGgufHeader({
      metadata: spec.metadata,
      tensors: spec.tensors.map((t) => ({ name: t.name, dims: t.dims, type: t.type })),
    });
    const base = new Uint8Array(headerBytes);
    // The unmutated header round-trips to the same profile.
    // A header-only file: the whole "file" is the header, as `orchard testmodel --header-only` writes.
    expect(modelProfile(parseGgufHeader(base))).toEqual(modelProfile(spec));
    const end = structuralEnd(base);
    const r = uniformSource(1234);
    const outcomes = { profile: 0, refusedByReader: 0, refusedByProfile: 0 };
    let truncations = 0;
    const started = Date.now();
    for (let i = 0; i < 10_000; i++) {
      const bytes = base.slice();
      const kind = r();
      const truncated = kind >= 0.5 && kind < 0.7;
      let buf: Uint8Array = bytes;
      if (kind < 0.5) {
        // Flip 1–4 random bytes.
        const n = 1 + Math.floor(r() * 4);
        for (let j = 0; j < n; j++) bytes[Math.floor(r() * bytes.length)] = Math.floor(r() * 256);
      } else if (truncated) {
        buf = bytes.subarray(0, Math.floor(r() * bytes.length));
        truncations++;
      } else if (kind < 0.9) {
        // Overwrite a little-endian u32/u64 with an extreme value (counts, lengths, dims, types).
        const at = Math.floor(r() * (bytes.length - 8));
        const v = [0, 1, 0xff, 0xffffffff, 0x7fffffff, 0x80000000][Math.floor(r() * 6)]!;
        new DataView(bytes.buffer).setUint32(at, v, true);
        if (r() < 0.5) new DataView(bytes.buffer).setUint32(at + 4, r() < 0.5 ? 0 : 0xffffffff, true);
      } else {
        // Splice: duplicate or drop a chunk.
        const a = Math.floor(r() * bytes.length);
        const b = Math.min(bytes.length, a + Math.floor(r() * 64));
        buf = r() < 0.5 ? new Uint8Array([...bytes.subarray(0, a), ...bytes.subarray(b)]) : new Uint8Array([...bytes.subarray(0, b), ...bytes.subarray(a)]);
      }
      const what = `mutation ${i}`;
      let h: GgufHeader;
      try {
        h = parseGgufHeader(buf);
      } catch (err) {
        if (!(err instanceof GgufError)) throw new Error(`${what}: the reader threw a non-GgufError: ${String(err)}`);
        outcomes.refusedByReader++;
        if (truncated) {
          // A prefix of a valid header has only one thing wrong with it: it is too short.
          expect(buf.length, what).toBeLessThan(end);
          expect(err.message, what).toMatch(/truncated|is impossible: the remaining/);
        }
        continue;
      }
      // Only the alignment padding may be cut off a header and still parse.
      if (truncated) expect(buf.length, what).toBeGreaterThanOrEqual(end);
      let p: ModelProfile;
      try {
        p = modelProfile(h);
      } catch (err) {
        // The header parsed but does not describe a model Orchard can place: a named refusal.
        if (!(err instanceof UsageError) || err instanceof GgufError) throw new Error(`${what}: modelProfile threw ${String(err)}`);
        expect(err.message.length, what).toBeGreaterThan(10);
        outcomes.refusedByProfile++;
        continue;
      }
      outcomes.profile++;
      // What survives is self-consistent: every tensor byte is counted once, in exactly one place.
      expect(p.layers, what).toHaveLength(p.layerCount);
      for (const l of p.layers) expect(Number.isFinite(l.weightBytes) && l.weightBytes > 0, what).toBe(true);
      const fileBytes = h.tensors.reduce((s, t) => s + t.bytes, 0);
      expect(p.fileTensorBytes, what).toBe(fileBytes);
      const counted = p.layers.reduce((s, l) => s + l.weightBytes, 0) + p.tokenEmbdBytes + p.outputNormBytes + (p.outputTied ? 0 : p.outputBytes) + p.otherBytes;
      expect(counted, what).toBe(fileBytes);
      expect(p.tensorCount, what).toBe(h.tensors.length);
    }
    // Each outcome is reached often with this seed (the counts are in the failure message).
    const seen = JSON.stringify(outcomes);
    expect(outcomes.profile, seen).toBeGreaterThan(100);
    expect(outcomes.refusedByReader, seen).toBeGreaterThan(1000);
    expect(outcomes.refusedByProfile, seen).toBeGreaterThan(20);
    expect(truncations).toBeGreaterThan(1000);
    expect(Date.now() - started).toBeLessThan(120_000); // a hang would hit the test timeout first
  });
});

it('tensorBytes sanity for the shapes helper', () => {
  expect(tensorBytes('Q4_K', [256, 2])).toBe(288);
});
