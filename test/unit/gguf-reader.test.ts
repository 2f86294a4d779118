import { execFileSync } from 'node:child_process';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GgmlType as NlcGgmlType, readGgufFileInfo } from 'node-llama-cpp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UsageError } from '../../src/shared/errors.ts';
import { GgufError, parseGgufHeader, readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { type GgufValue, gv, metaArray, metaNumber, metaString } from '../../src/shared/gguf/types.ts';
import { type GgufSpec, encodeGgufHeader, writeGguf } from '../../src/shared/gguf/writer.ts';
import { presetSpec, findPreset } from '../../src/shared/testmodel/presets.ts';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-gguf-reader-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** One key of every value type, arrays of every item type, edge values included. */
function everyTypeSpec(): GgufSpec {
  const metadata: Array<[string, GgufValue]> = [
    ['general.architecture', gv.str('llama')],
    ['t.u8', gv.u8(255)],
    ['t.i8', gv.i8(-128)],
    ['t.u16', gv.u16(65535)],
    ['t.i16', gv.i16(-32768)],
    ['t.u32', gv.u32(4294967295)],
    ['t.i32', gv.i32(-2147483648)],
    ['t.f32', gv.f32(Math.fround(0.1))],
    ['t.f64', gv.f64(0.1)],
    ['t.u64', gv.u64(2n ** 64n - 1n)],
    ['t.i64', gv.i64(-(2n ** 63n))],
    ['t.bool', gv.bool(true)],
    ['t.str', gv.str('grüße, 世界 🍎')],
    ['t.empty', gv.str('')],
    ['a.u8', gv.arr('uint8', [0, 1, 255])],
    ['a.i32', gv.arr('int32', [-1, 0, 7])],
    ['a.f32', gv.arr('float32', [1.5, -2.25])],
    ['a.u64', gv.arr('uint64', [0n, 2n ** 60n])],
    ['a.bool', gv.arr('bool', [true, false])],
    ['a.str', gv.arr('string', ['a', '', 'ü'])],
    ['a.empty', gv.arr('float64', [])],
  ];
  return {
    metadata,
    tensors: [
      { name: 'a', dims: [32, 3], type: 'F32' },
      { name: 'b', dims: [256, 2], type: 'Q4_K' },
      { name: 'c', dims: [7], type: 'F16' },
      { name: 'd', dims: [64, 2, 2, 2], type: 'Q8_0' },
    ],
  };
}

describe('GGUF writer → reader round trip', () => {
  it('reads back every value type and the tensor layout exactly', () => {
    const spec = everyTypeSpec();
    const { headerBytes, header: written } = encodeGgufHeader(spec);
    const read = parseGgufHeader(headerBytes);
    expect(read.version).toBe(3);
    expect([...read.metadata]).toEqual(spec.metadata);
    expect(read.alignment).toBe(32);
    expect(read.dataOffset).toBe(headerBytes.length);
    expect(read.dataOffset % 32).toBe(0);
    expect(read.tensors.map((t) => [t.name, t.dims, t.type.name, t.offset, t.bytes])).toEqual([
      ['a', [32, 3], 'F32', 0, 384],
      ['b', [256, 2], 'Q4_K', 384, 288],
      ['c', [7], 'F16', 672, 14],
      ['d', [64, 2, 2, 2], 'Q8_0', 704, 544],
    ]);
    expect(read.dataSize).toBe(written.dataSize);
    expect(read.dataSize).toBe(1248);
  });

  it('honours general.alignment', () => {
    const spec: GgufSpec = {
      metadata: [['general.alignment', gv.u32(64)]],
      tensors: [
        { name: 'x', dims: [3], type: 'F32' },
        { name: 'y', dims: [3], type: 'F32' },
      ],
    };
    const { headerBytes } = encodeGgufHeader(spec);
    const h = parseGgufHeader(headerBytes);
    expect(h.alignment).toBe(64);
    expect(h.dataOffset % 64).toBe(0);
    expect(h.tensors[1]!.offset).toBe(64);
  });

  it('typed accessors check the wire type', () => {
    const h = parseGgufHeader(encodeGgufHeader(everyTypeSpec()).headerBytes);
    expect(metaNumber(h, 't.u32')).toBe(4294967295);
    expect(metaString(h, 'general.architecture')).toBe('llama');
    expect(metaArray(h, 'a.str')?.value).toEqual(['a', '', 'ü']);
    expect(metaNumber(h, 'missing')).toBeUndefined();
    expect(() => metaNumber(h, 't.str')).toThrow(UsageError);
    expect(() => metaNumber(h, 't.u64')).toThrow(/out of range/);
  });

  it('the writer refuses what llama.cpp would refuse', () => {
    const bad = (spec: GgufSpec) => () => encodeGgufHeader(spec);
    expect(bad({ metadata: [['k', gv.u8(256)]], tensors: [] })).toThrow(/not a valid uint8/);
    expect(bad({ metadata: [['k', gv.u32(1)], ['k', gv.u32(2)]], tensors: [] })).toThrow(/duplicate/);
    expect(bad({ metadata: [['general.alignment', gv.u32(48)]], tensors: [] })).toThrow(/power of two/);
    expect(bad({ metadata: [], tensors: [{ name: 'x'.repeat(64), dims: [1], type: 'F32' }] })).toThrow(/1\.\.63 bytes/);
    expect(bad({ metadata: [], tensors: [{ name: 'x', dims: [100], type: 'Q4_K' }] })).toThrow(/block size/);
    expect(bad({ metadata: [], tensors: [{ name: 'x', dims: [1, 1, 1, 1, 1], type: 'F32' }] })).toThrow(/dimensions/);
  });
});

describe('GGUF file reading', () => {
  it('agrees with node-llama-cpp’s own reader on a file with data', async () => {
    const path = join(dir, 'every.gguf');
    const spec = everyTypeSpec();
    const withData: GgufSpec = {
      metadata: spec.metadata,
      tensors: spec.tensors.map((t) => ({ ...t, data: new Uint8Array(encodeGgufHeader({ metadata: [], tensors: [t] }).header.dataSize).slice(0, sizeOf(t)) })),
    };
    await writeGguf(path, withData);
    const mine = await readGgufHeader(path);
    const theirs = await readGgufFileInfo(path, { readTensorInfo: true, logWarnings: false });
    expect(mine.hasData).toBe(true);
    expect(theirs.version).toBe(mine.version);
    expect(theirs.tensorCount).toBe(mine.tensors.length);
    expect(theirs.tensorInfo?.map((t) => [t.name, t.dimensions.map(Number), NlcGgmlType[t.ggmlType], Number(t.offset), Number(t.fileOffset)])).toEqual(
      mine.tensors.map((t) => [t.name, t.dims, t.type.name, t.offset, mine.dataOffset + t.offset]),
    );
    // node-llama-cpp nests keys by dots; compare a value of every type.
    const m = theirs.metadata as unknown as Record<string, Record<string, unknown>>;
    expect(m.t).toMatchObject({ u8: 255, i8: -128, u16: 65535, i16: -32768, u32: 4294967295, i32: -2147483648, bool: true, str: 'grüße, 世界 🍎' });
    expect(BigInt(m.t!.u64 as bigint)).toBe(2n ** 64n - 1n);
    expect(m.a).toMatchObject({ u8: [0, 1, 255], i32: [-1, 0, 7], f32: [1.5, -2.25], bool: [true, false], str: ['a', '', 'ü'] });
  });

  it('agrees with node-llama-cpp on a header-only Mixtral preset (3-D expert tensors, mixed types)', async () => {
    const path = join(dir, 'mixtral.gguf');
    await writeGguf(path, presetSpec(findPreset('mixtral-8x7b'), 'q4_k_m'), { headerOnly: true });
    const mine = await readGgufHeader(path);
    const theirs = await readGgufFileInfo(path, { readTensorInfo: true, logWarnings: false });
    expect(mine.hasData).toBe(false);
    expect(theirs.tensorInfo?.map((t) => [t.name, t.dimensions.map(Number), NlcGgmlType[t.ggmlType], Number(t.offset)])).toEqual(
      mine.tensors.map((t) => [t.name, t.dims, t.type.name, t.offset]),
    );
    expect(theirs.architectureMetadata).toMatchObject({ expert_count: 8, block_count: 32 });
  });

  it('reads only the header of a large file, growing its read as needed', async () => {
    const path = join(dir, 'big.gguf');
    const payload = new Uint8Array(4 * 1024 * 1024);
    const tokens = Array.from({ length: 20000 }, (_, i) => `token-${i}`);
    await writeGguf(path, {
      metadata: [['tokenizer.ggml.tokens', gv.arr('string', tokens)]],
      tensors: [{ name: 'w', dims: [1024, 1024], type: 'F32', data: payload }],
    });
    const h = await readGgufHeader(path, { initialBytes: 1024 });
    expect(metaArray(h, 'tokenizer.ggml.tokens')?.value.length).toBe(20000);
    expect(h.bytesRead).toBeGreaterThanOrEqual(h.dataOffset - 32);
    // Reads grow by doubling, so at most twice the header is read — never the 4 MiB of data.
    expect(h.bytesRead).toBeLessThanOrEqual(2 * h.dataOffset);
    expect(h.fileSize).toBe(h.dataOffset + 4 * 1024 * 1024);
  });

  it('names the file in errors and refuses a header larger than the limit', async () => {
    const path = join(dir, 'text.gguf');
    await writeFile(path, 'hello world, not a model');
    await expect(readGgufHeader(path)).rejects.toThrow(`${path}: not a valid GGUF file: bad magic "hell"`);
    await expect(readGgufHeader(join(dir, 'missing.gguf'))).rejects.toThrow(/cannot read GGUF file .*missing\.gguf/);
    await expect(readGgufHeader(dir)).rejects.toThrow(/not a regular file/);
    const big = join(dir, 'big-header.gguf');
    await writeGguf(big, { metadata: [['k', gv.str('x'.repeat(100_000))]], tensors: [] });
    await expect(readGgufHeader(big, { maxHeaderBytes: 10_000, initialBytes: 1000 })).rejects.toThrow(/header needs more than 10000 bytes/);
  });

  it('refuses a FIFO at once instead of blocking on it', async () => {
    const fifo = join(dir, 'model.fifo');
    execFileSync('mkfifo', [fifo]);
    const started = Date.now();
    await expect(readGgufHeader(fifo)).rejects.toThrow(`cannot read GGUF file ${fifo}: not a regular file`);
    expect(Date.now() - started).toBeLessThan(2000);
  });

  it('refuses a huge array before reading or allocating it, even when the file is large enough', async () => {
    // A sparse 1 GiB file whose header claims a 512 Mi-element uint8 array: as JS numbers that
    // would be 4 GiB, eight times the bytes that encode it.
    const path = join(dir, 'huge-array.gguf');
    const fh = await open(path, 'w');
    await fh.write(Buffer.concat([head(3, 0, 1), str('k'), u32(9), u32(0), u64(2 ** 29)]));
    await fh.truncate(2 ** 30);
    await fh.close();
    const err = await readGgufHeader(path).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GgufError);
    expect((err as Error).message).toMatch(/array of key 'k' would take about 4294967\d+ bytes of memory, more than 4 times/);
  });
});

function sizeOf(t: GgufSpec['tensors'][number]): number {
  return encodeGgufHeader({ metadata: [], tensors: [t] }).header.tensors[0]!.bytes;
}

/** Little-endian builders for hand-made hostile headers. */
const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
};
const u64 = (n: bigint | number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
};
const str = (s: string) => Buffer.concat([u64(Buffer.byteLength(s)), Buffer.from(s)]);
const head = (version: number, tensors: bigint | number, kvs: bigint | number) => Buffer.concat([Buffer.from('GGUF'), u32(version), u64(tensors), u64(kvs)]);
const tensorInfo = (name: string, dims: number[], type: number, offset: number) =>
  Buffer.concat([str(name), u32(dims.length), ...dims.map((d) => u64(d)), u32(type), u64(offset)]);

describe('GGUF reader on hostile input', () => {
  const cases: Array<[string, Buffer, RegExp]> = [
    ['empty file', Buffer.alloc(0), /truncated: magic at offset 0 needs 4 bytes but only 0 remain/],
    ['bad magic', Buffer.from('GGML\x03\x00\x00\x00'), /bad magic "GGML"/],
    ['version 1', head(1, 0, 0), /v1 is no longer supported/],
    ['version 0', head(0, 0, 0), /version 0/],
    ['future version', head(4, 0, 0), /version 4 is newer/],
    ['big-endian file', Buffer.concat([Buffer.from('GGUF'), Buffer.from([0, 0, 0, 3]), u64(0), u64(0)]), /byte-swapped/],
    ['truncated counts', head(3, 0, 0).subarray(0, 15), /truncated: tensor count/],
    ['absurd tensor count', head(3, 2n ** 62n, 0), /tensor count 4611686018427387904 is impossible/],
    ['absurd metadata count', head(3, 0, 2n ** 64n - 1n), /metadata count .* is impossible/],
    ['absurd key length', Buffer.concat([head(3, 0, 1), u64(2n ** 63n), Buffer.alloc(8)]), /key 0 length 9223372036854775808 exceeds/],
    ['key longer than the file', Buffer.concat([head(3, 0, 1), u64(1000), Buffer.from('abcdefgh')]), /truncated: key 0 at offset 32 needs 1000 bytes but only \d+ remain/],
    ['empty key', Buffer.concat([head(3, 0, 1), str(''), u32(4), u32(1)]), /metadata key 0 is empty/],
    ['unknown value type', Buffer.concat([head(3, 0, 1), str('k'), u32(13), u32(0)]), /key 'k' has invalid GGUF value type 13/],
    ['nested array', Buffer.concat([head(3, 0, 1), str('k'), u32(9), u32(9), u64(0)]), /array of arrays/],
    ['absurd array length', Buffer.concat([head(3, 0, 1), str('k'), u32(9), u32(10), u64(2n ** 40n)]), /array of key 'k' has 1099511627776 elements/],
    ['array longer than the file', Buffer.concat([head(3, 0, 1), str('k'), u32(9), u32(4), u64(1000), u32(1)]), /array length of key 'k' 1000 is impossible/],
    ['duplicate key', Buffer.concat([head(3, 0, 2), str('k'), u32(4), u32(1), str('k'), u32(4), u32(1)]), /duplicate metadata key 'k'/],
    ['alignment of wrong type', Buffer.concat([head(3, 0, 1), str('general.alignment'), u32(10), u64(32)]), /general\.alignment must be uint32/],
    ['alignment not a power of two', Buffer.concat([head(3, 0, 1), str('general.alignment'), u32(4), u32(24)]), /alignment 24 is not a power of two/],
    ['unknown ggml type', Buffer.concat([head(3, 1, 0), tensorInfo('w', [32], 99, 0)]), /tensor 'w' has unknown ggml type 99/],
    ['removed ggml type', Buffer.concat([head(3, 1, 0), tensorInfo('w', [32], 31, 0)]), /uses type Q4_0_4_4 \(31\), which ggml no longer supports/],
    ['too many dimensions', Buffer.concat([head(3, 1, 0), tensorInfo('w', [1, 1, 1, 1, 1], 0, 0)]), /5 dimensions, at most 4/],
    ['negative dimension', Buffer.concat([head(3, 1, 0), str('w'), u32(1), u64(2n ** 64n - 1n), u32(0), u64(0)]), /dimension 0 is negative \(-1\)/],
    ['element count overflow', Buffer.concat([head(3, 1, 0), tensorInfo('w', [2 ** 31, 2 ** 31, 2 ** 31], 0, 0)]), /too many to be real/],
    ['row not a multiple of the block', Buffer.concat([head(3, 1, 0), tensorInfo('w', [100], 12, 0)]), /rows of 100 elements, not a multiple of the block size 256/],
    ['tensor name too long', Buffer.concat([head(3, 1, 0), tensorInfo('n'.repeat(64), [1], 0, 0)]), /name is 64 bytes, ggml allows at most 63/],
    ['duplicate tensor name', Buffer.concat([head(3, 2, 0), tensorInfo('w', [8], 0, 0), tensorInfo('w', [8], 0, 32)]), /duplicate tensor name 'w'/],
    ['overlapping data offsets', Buffer.concat([head(3, 2, 0), tensorInfo('w', [8], 0, 0), tensorInfo('v', [8], 0, 0)]), /tensor 'v' has data offset 0, expected 32/],
  ];
  for (const [what, bytes, message] of cases) {
    it(`rejects ${what} with a clear UsageError`, () => {
      let err: unknown;
      try {
        parseGgufHeader(bytes);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(GgufError);
      expect(err).toBeInstanceOf(UsageError);
      expect((err as Error).message).toMatch(/^not a valid GGUF file: /);
      expect((err as Error).message).toMatch(message);
      expect((err as Error).message).not.toContain('\n');
    });
  }

  it('bounds decoded memory by the header bytes: byte arrays past the slack are refused, a vocabulary is not', () => {
    const bytes = (n: number) => Buffer.concat([head(3, 0, 1), str('k'), u32(9), u32(7), u64(n), Buffer.alloc(n)]);
    expect(() => parseGgufHeader(bytes(1024 * 1024))).not.toThrow();
    expect(() => parseGgufHeader(bytes(8 * 1024 * 1024))).toThrow(/array of key 'k' would take about \d+ bytes of memory/);
    // Checked as soon as the count is read, though only a prefix of the file is at hand.
    const claim = Buffer.concat([head(3, 0, 1), str('k'), u32(9), u32(0), u64(2 ** 29)]);
    expect(() => parseGgufHeader(claim, { fileSize: 2 ** 40 })).toThrow(GgufError);
    const vocab = Array.from({ length: 200_000 }, (_, i) => `tok${i}`);
    const spec: GgufSpec = {
      metadata: [
        ['tokenizer.ggml.tokens', gv.arr('string', vocab)],
        ['tokenizer.ggml.scores', gv.arr('float32', vocab.map((_, i) => -i))],
        ['tokenizer.ggml.token_type', gv.arr('int32', vocab.map(() => 1))],
      ],
      tensors: [],
    };
    const h = parseGgufHeader(encodeGgufHeader(spec).headerBytes);
    expect(metaArray(h, 'tokenizer.ggml.tokens')?.value.length).toBe(200_000);
  });

  it('accepts the smallest valid file (no tensors, no metadata) and a GGUF v2 file', () => {
    expect(parseGgufHeader(head(3, 0, 0))).toMatchObject({ version: 3, tensors: [], dataOffset: 24, dataSize: 0 });
    expect(parseGgufHeader(head(2, 0, 0)).version).toBe(2);
  });
});
