import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { readGgufFileInfo } from 'node-llama-cpp';
import { describe, expect, it } from 'vitest';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { metaArray, metaNumber, metaString } from '../../src/shared/gguf/types.ts';
import { writeGguf } from '../../src/shared/gguf/writer.ts';
import { type LlamaTestShape, llamaTestModelSpec } from '../../src/shared/testmodel/llama.ts';
import { fp32ToFp16Bits, quantizeQ8_0 } from '../../src/shared/testmodel/quantize.ts';
import { loadVocab } from '../../src/shared/testmodel/vocab.ts';
import { orchardInProcess } from '../helpers/cli-in-process.ts';
import { tempDir } from '../helpers/temp-dir.ts';

const run = promisify(execFile);
const BIN = new URL('../../bin/orchard.js', import.meta.url).pathname;
const SMALL = ['--layers', '2', '--dim', '64', '--ffn', '128', '--heads', '4', '--kv-heads', '2'];

async function orchard(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [BIN, ...args], { maxBuffer: 1 << 20 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

const sha256 = async (p: string) => createHash('sha256').update(await readFile(p)).digest('hex');

const tmp = tempDir('orchard-testmodel-', 'all');

describe('orchard testmodel gguf', () => {
  it('writes byte-identical files for the same arguments and different ones for another seed', async () => {
    // One run in its own process, the others in this one: the bytes must not depend on either.
    const a = await orchard('testmodel', 'gguf', ...SMALL, '--type', 'q8_0', '--seed', '7', '--out', join(tmp.path, 'a.gguf'), '--json');
    const b = await orchardInProcess('testmodel', 'gguf', ...SMALL, '--type', 'q8_0', '--seed', '7', '--out', join(tmp.path, 'b.gguf'), '--json');
    const c = await orchardInProcess('testmodel', 'gguf', ...SMALL, '--type', 'q8_0', '--seed', '8', '--out', join(tmp.path, 'c.gguf'), '--json');
    for (const r of [a, b, c]) expect(r.code, r.stderr).toBe(0);
    const ja = JSON.parse(a.stdout);
    const jb = JSON.parse(b.stdout);
    const jc = JSON.parse(c.stdout);
    expect(ja.sha256).toBe(jb.sha256);
    expect(ja.sha256).toBe(await sha256(join(tmp.path, 'a.gguf')));
    expect(await sha256(join(tmp.path, 'b.gguf'))).toBe(ja.sha256);
    expect(jc.sha256).not.toBe(ja.sha256);
    // 2 layers × (4 projections + 3 FFN + 2 norms) + embeddings, output, output norm
    expect(ja).toMatchObject({ layers: 2, dim: 64, ffn: 128, heads: 4, kvHeads: 2, type: 'q8_0', seed: 7, tensors: 21, vocabSize: 32000 });
    expect(ja.parameters).toBe(2 * 64 * 32000 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64);
    const header = await readGgufHeader(join(tmp.path, 'a.gguf'));
    expect(header.fileSize).toBe(ja.bytes);
    expect(header.hasData).toBe(true);
  });

  it('writes a llama file llama.cpp can load: real tokenizer, right keys, right types (checked by node-llama-cpp)', async () => {
    const path = join(tmp.path, 'f16.gguf');
    const r = await orchardInProcess('testmodel', 'gguf', ...SMALL, '--type', 'f16', '--ctx', '512', '--out', path);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^wrote .*f16\.gguf: .* parameters, sha256 [0-9a-f]{64}\n$/);
    const info = await readGgufFileInfo(path, { readTensorInfo: true, logWarnings: false });
    expect(info.metadata.general.architecture).toBe('llama');
    const llama = info.architectureMetadata as Record<string, unknown>;
    expect(llama).toMatchObject({ block_count: 2, context_length: 512, embedding_length: 64, feed_forward_length: 128 });
    expect(info.metadata.tokenizer?.ggml.model).toBe('llama');
    expect(info.metadata.tokenizer?.ggml.tokens.length).toBe(32000);
    const types = new Map(info.tensorInfo!.map((t) => [t.name, t.ggmlType]));
    expect(types.get('blk.0.attn_q.weight')).toBe(1); // F16
    expect(types.get('blk.0.attn_norm.weight')).toBe(0); // norms stay F32
    expect(types.get('output.weight')).toBe(1);
  });

  it('a real process exits 2 with one line on bad input', async () => {
    const r = await orchard('testmodel', 'gguf', '--layers', 'abc', '--out', join(tmp.path, 'never.gguf'));
    expect(r.code).toBe(2);
    expect(r.stderr).toBe('orchard: invalid --layers "abc": expected an integer\n');
  });

  it('header-only generated models carry the same header without data', async () => {
    const path = join(tmp.path, 'header-only.gguf');
    const r = await orchardInProcess('testmodel', 'gguf', ...SMALL, '--header-only', '--out', path, '--json');
    expect(r.code, r.stderr).toBe(0);
    const h = await readGgufHeader(path);
    expect(h.hasData).toBe(false);
    expect(h.fileSize).toBe(h.dataOffset);
    expect(JSON.parse(r.stdout)).toMatchObject({ headerOnly: true, bytes: h.dataOffset, tensorBytes: h.dataSize });
  });

  const bad: Array<[string, string[], RegExp]> = [
    ['an unknown preset', ['--shape', 'llama-9-1t', '--header-only'], /unknown model preset "llama-9-1t"; known: llama-3-8b/],
    ['a negative layer count', ['--layers', '-1'], /invalid --layers -1/],
    ['a non-numeric layer count', ['--layers', 'abc'], /invalid --layers "abc": expected an integer/],
    ['a fractional width', ['--dim', '64.5'], /invalid --dim "64\.5"/],
    ['zero width', ['--dim', '0'], /invalid --dim 0/],
    ['a seed beyond uint32', ['--seed', '4294967296'], /invalid --seed 4294967296/],
    ['dim not divisible by heads', ['--dim', '250'], /--dim 250 is not divisible by --heads 8/],
    ['heads not divisible by kv-heads', ['--kv-heads', '3'], /--heads 8 is not divisible by --kv-heads 3/],
    ['a q8_0 width that is not whole blocks', ['--type', 'q8_0', '--dim', '80', '--heads', '4', '--kv-heads', '4'], /--dim 80 must be a multiple of 32 for q8_0/],
    ['an unknown type', ['--type', 'q4_0'], /argument 'q4_0' is invalid/],
    ['a preset without --header-only', ['--shape', 'llama-3-8b'], /add --header-only/],
    ['--quant without a preset', ['--quant', 'q8_0'], /--quant applies to --shape presets/],
    ['shape flags with a preset', ['--shape', 'llama-3-8b', '--header-only', '--layers', '4'], /drop --layers/],
  ];
  it.each(bad)('rejects %s: one line, exit 2, existing file untouched, nothing left behind', async (_what, args, message) => {
    const sub = join(tmp.path, `bad-${_what.replace(/\W+/g, '-')}`);
    await mkdir(sub);
    const out = join(sub, 'model.gguf');
    await writeFile(out, 'keep me');
    const r = await orchardInProcess('testmodel', 'gguf', ...args, '--out', out);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stdout).toBe('');
    expect(await readFile(out, 'utf8')).toBe('keep me');
    expect(await readdir(sub)).toEqual(['model.gguf']);
  });

  it('rejects unwritable paths with exit 2 and leaves no partial file', async () => {
    const file = join(tmp.path, 'plain-file');
    await writeFile(file, 'x');
    const cases: Array<[string, RegExp]> = [
      [join(tmp.path, 'no-such-tmp.path', 'm.gguf'), /directory .*no-such-tmp.path does not exist/],
      [join(file, 'm.gguf'), /plain-file is not a directory/],
      [tmp.path, /it is a directory/],
    ];
    const before = (await readdir(tmp.path)).sort();
    const results: Array<{ code: number; stdout: string; stderr: string }> = [];
    for (const [out] of cases) results.push(await orchardInProcess('testmodel', 'gguf', ...SMALL, '--out', out));
    results.forEach((r, i) => {
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(cases[i]![1]);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    });
    expect((await readdir(tmp.path)).sort()).toEqual(before);
  });
});

describe('generated weights', () => {
  const shape = (type: LlamaTestShape['type']): LlamaTestShape => ({ layers: 1, dim: 64, ffn: 96, heads: 4, kvHeads: 2, ctx: 256, type, seed: 3 });

  async function tensorBytes(path: string, name: string): Promise<Buffer> {
    const h = await readGgufHeader(path);
    const t = h.tensors.find((x) => x.name === name)!;
    const all = await readFile(path);
    return all.subarray(h.dataOffset + t.offset, h.dataOffset + t.offset + t.bytes);
  }

  it('f16 and q8_0 files hold exactly the f32 file’s values, converted the way ggml converts them', async () => {
    const vocab = await loadVocab();
    const paths = { f32: join(tmp.path, 'w-f32.gguf'), f16: join(tmp.path, 'w-f16.gguf'), q8_0: join(tmp.path, 'w-q8.gguf') };
    for (const type of ['f32', 'f16', 'q8_0'] as const) await writeGguf(paths[type], llamaTestModelSpec(shape(type), vocab));
    for (const name of ['blk.0.ffn_down.weight', 'token_embd.weight']) {
      const raw = await tensorBytes(paths.f32, name);
      const f32 = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length));
      const f16 = await tensorBytes(paths.f16, name);
      for (let i = 0; i < f32.length; i += 97) expect(f16.readUInt16LE(i * 2)).toBe(fp32ToFp16Bits(f32[i]!));
      const q8 = new Uint8Array(f32.length / 32 * 34);
      quantizeQ8_0(f32, q8);
      expect(Buffer.compare(await tensorBytes(paths.q8_0, name), Buffer.from(q8))).toBe(0);
    }
  });

  it('is byte-identical across machines: a pinned digest (update only with an intended recipe change)', async () => {
    // Everything that shapes the bytes — PRNG, seeding, recipe, quantisers, metadata order, the
    // bundled vocabulary — feeds this digest, recorded on x86-64 Linux; CI on another machine
    // must reproduce it exactly.
    const vocab = await loadVocab();
    const pinned: Array<[LlamaTestShape['type'], string]> = [
      ['f16', '880ee589300a4abde36926be606e47b9fc9b16fc41fff686d95b6748ae18d61b'],
      ['q8_0', '858f19b94f9fa0c43ef947d49fc552ff9c528bca4f8e5c2eaf2b95a226de982e'],
    ];
    for (const [type, digest] of pinned) {
      const path = join(tmp.path, `pinned-${type}.gguf`);
      const r = await writeGguf(path, llamaTestModelSpec({ ...shape(type), seed: 12345 }, vocab));
      expect(r.sha256, type).toBe(digest);
    }
  });

  it('scales weights as documented and silences control tokens in the output head', async () => {
    const vocab = await loadVocab();
    const path = join(tmp.path, 'scales.gguf');
    await writeGguf(path, llamaTestModelSpec(shape('f32'), vocab));
    const floats = async (name: string) => {
      const b = await tensorBytes(path, name);
      return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
    };
    const std = (v: Float32Array) => Math.sqrt(v.reduce((s, x) => s + x * x, 0) / v.length);
    expect(std(await floats('blk.0.attn_q.weight'))).toBeCloseTo(1 / 8, 2); // 1/sqrt(64)
    expect(std(await floats('token_embd.weight'))).toBeCloseTo(1, 1);
    // residual writers are scaled by 1/sqrt(2 · layers) on top of 1/sqrt(fan_in): layers = 1
    expect(std(await floats('blk.0.attn_output.weight'))).toBeCloseTo(1 / 8 / Math.sqrt(2), 2);
    expect(std(await floats('blk.0.ffn_down.weight'))).toBeCloseTo(1 / Math.sqrt(96) / Math.sqrt(2), 2);
    const out = await floats('output.weight');
    const row = (t: number) => out.subarray(t * 64, (t + 1) * 64);
    const types = vocab.tokenTypes;
    for (const t of [0, 1, 2]) {
      expect(types[t]).toBeGreaterThanOrEqual(2); // <unk>, <s>, </s>
      expect(row(t).every((x) => x === 0)).toBe(true);
    }
    expect(row(1000).some((x) => x !== 0)).toBe(true);
    const h = await readGgufHeader(path);
    expect(metaString(h, 'tokenizer.ggml.model')).toBe('llama');
    expect(metaArray(h, 'tokenizer.ggml.tokens')?.value.length).toBe(32000);
    expect(metaNumber(h, 'llama.rope.dimension_count')).toBe(16);
  });

  it('a failure while writing leaves neither a partial file nor a temp file, and keeps the old file', async () => {
    const sub = join(tmp.path, 'failing');
    await mkdir(sub);
    const out = join(sub, 'm.gguf');
    await writeFile(out, 'old');
    const spec = {
      metadata: [],
      tensors: [
        {
          name: 'w',
          dims: [1024, 1024],
          type: 'F32' as const,
          data: function* () {
            yield new Uint8Array(1 << 20);
            throw new Error('disk on fire');
          },
        },
      ],
    };
    await expect(writeGguf(out, spec)).rejects.toThrow('disk on fire');
    const short = { metadata: [], tensors: [{ name: 'w', dims: [8], type: 'F32' as const, data: new Uint8Array(16) }] };
    await expect(writeGguf(out, short)).rejects.toThrow(/got 16 bytes of data, expected 32/);
    expect(await readFile(out, 'utf8')).toBe('old');
    expect(await readdir(sub)).toEqual(['m.gguf']);
  });
});
