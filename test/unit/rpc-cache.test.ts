import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GgufTensorInfo } from '../../src/shared/gguf/types.ts';
import { writeGguf } from '../../src/shared/gguf/writer.ts';
import { llamaSourceFile } from '../../src/shared/llama-source.ts';
import { readTensorLayout, seedTensorCache } from '../../src/node/llama/tensor-cache.ts';
import { FileMemo } from '../../src/shared/file-memo.ts';
import { Fnv1a64, Fnv1a64Js, fnv1a64Hex } from '../../src/shared/rpc-cache/fnv.ts';
import { hashesOfStage, knownHashesFileText, tensorHashesFromWire, tensorHashesToWire } from '../../src/shared/rpc-cache/known-hashes.ts';
import { HASH_THRESHOLD_BYTES, RPC_CACHE_MIN_SIZE_BYTES, cacheEntryName, rpcCacheDir, rpcCacheMinSizeEnv, stageCachePlan, stageTensors } from '../../src/shared/rpc-cache/plan.ts';

let dir = '';
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-rpc-cache-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/**
 * ggml-rpc's `fnv_hash`, cut out of the ggml-rpc.cpp that `orchard setup` keeps from the llama.cpp
 * source the engines are built from: the test compiles the real function, so a change upstream
 * (another seed, another prime, another loop) fails here instead of silently disagreeing.
 */
async function cFnvFunction(): Promise<string> {
  const path = await llamaSourceFile('ggml/src/ggml-rpc/ggml-rpc.cpp');
  const src = await readFile(path, 'utf8');
  const start = src.indexOf('static uint64_t fnv_hash(');
  if (start < 0) throw new Error(`${path} has no fnv_hash function`);
  const end = src.indexOf('\n}\n', start);
  if (end < 0) throw new Error(`${path}: fnv_hash has no closing brace at the start of a line`);
  return src.slice(start, end + 2);
}

describe('FNV-1a 64 (ggml-rpc fnv_hash)', () => {
  it('matches the published FNV-1a 64 vectors', () => {
    expect(fnv1a64Hex(new Uint8Array())).toBe('cbf29ce484222325');
    expect(fnv1a64Hex(Buffer.from('a'))).toBe('af63dc4c8601ec8c');
    expect(fnv1a64Hex(Buffer.from('foobar'))).toBe('85944171f73967e8');
  });

  it('is the same fed in chunks of any size', () => {
    const b = randomBytes(100_003);
    const whole = fnv1a64Hex(b);
    for (const step of [1, 7, 4096, 65_536]) {
      const h = new Fnv1a64();
      for (let i = 0; i < b.length; i += step) h.update(b.subarray(i, i + step));
      expect(h.hex()).toBe(whole);
    }
    expect(new Fnv1a64().update(b).value()).toBe(BigInt(`0x${whole}`));
    // the WebAssembly and the JS implementations agree, across the wasm copy window too
    const big = randomBytes(4 * 1024 * 1024 + 12_345);
    expect(new Fnv1a64Js().update(big).hex()).toBe(fnv1a64Hex(big));
  });

  // c++ is what `orchard setup` builds with: a machine without it cannot run the engines either.
  it('equals the C implementation on random buffers (compiled from the llama.cpp source)', async () => {
    const fn = await cFnvFunction();
    const prog = `#include <cstdint>\n#include <cstdio>\n#include <cinttypes>\n#include <vector>\n${fn}\nint main(int argc, char** argv) {\n  for (int a = 1; a < argc; a++) {\n    FILE* f = fopen(argv[a], "rb"); std::vector<uint8_t> d; int c; while ((c = fgetc(f)) != EOF) d.push_back((uint8_t)c); fclose(f);\n    char s[17]; snprintf(s, sizeof(s), "%016" PRIx64, fnv_hash(d.data(), d.size())); printf("%s\\n", s);\n  }\n  return 0;\n}\n`;
    await writeFile(join(dir, 'fnv.cpp'), prog);
    execFileSync('c++', ['-O1', '-o', join(dir, 'fnv'), join(dir, 'fnv.cpp')]);
    const sizes = [0, 1, 2, 15, 255, 4096, 1_000_001];
    const files: string[] = [];
    const buffers: Buffer[] = [];
    for (const [i, n] of sizes.entries()) {
      const b = randomBytes(n);
      const p = join(dir, `buf${i}`);
      await writeFile(p, b);
      files.push(p);
      buffers.push(b);
    }
    const out = execFileSync(join(dir, 'fnv'), files, { encoding: 'utf8' }).trim().split('\n');
    expect(out).toEqual(buffers.map((b) => fnv1a64Hex(b)));
    expect(out).toEqual(buffers.map((b) => new Fnv1a64Js().update(b).hex()));
  });
});

const MiB = 1024 * 1024;
function t(name: string, bytes: number, offset = 0): GgufTensorInfo {
  return { name, dims: [bytes / 2], type: 'F16' as unknown as GgufTensorInfo['type'], offset, bytes };
}

describe('which tensors a stage is offered by hash', () => {
  const header = {
    dataOffset: 1000,
    tensors: [
      t('token_embd.weight', 40 * MiB, 0),
      t('blk.0.attn_q.weight', 12 * MiB, 100),
      t('blk.0.attn_k.weight', HASH_THRESHOLD_BYTES, 200),
      t('blk.0.attn_norm.weight', 8192, 300),
      t('blk.1.ffn_up.weight', HASH_THRESHOLD_BYTES + 1, 400),
      t('blk.10.ffn_up.weight', 30 * MiB, 500),
      t('output_norm.weight', 8192, 600),
      t('output.weight', 50 * MiB, 700),
    ],
  };

  it('takes exactly its layer range (blk.1 is not blk.10), with absolute file offsets', () => {
    expect(stageTensors(header, { firstLayer: 1, lastLayer: 1, holdsOutput: false }).map((x) => [x.name, x.fileOffset])).toEqual([['blk.1.ffn_up.weight', 1400]]);
    expect(stageTensors(header, { firstLayer: 2, lastLayer: 10, holdsOutput: false }).map((x) => x.name)).toEqual(['blk.10.ffn_up.weight']);
  });

  it('uses > threshold, not ≥ (10 MiB exactly is always sent by a stock engine)', () => {
    const p = stageCachePlan(header, { firstLayer: 0, lastLayer: 1, holdsOutput: false }, HASH_THRESHOLD_BYTES);
    expect(p.cached.map((x) => x.name)).toEqual(['blk.0.attn_q.weight', 'blk.1.ffn_up.weight']);
    expect(p.sent.map((x) => x.name)).toEqual(['blk.0.attn_k.weight', 'blk.0.attn_norm.weight']);
    expect(p.sentBytes).toBe(HASH_THRESHOLD_BYTES + 8192);
    expect(p.cachedBytes).toBe(12 * MiB + HASH_THRESHOLD_BYTES + 1);
  });

  it("by default uses Orchard's 64 KiB threshold (the patched engine): every matrix is offered, 1-D norms are sent", () => {
    const p = stageCachePlan(header, { firstLayer: 0, lastLayer: 1, holdsOutput: false });
    expect(RPC_CACHE_MIN_SIZE_BYTES).toBe(64 * 1024);
    expect(p.cached.map((x) => x.name)).toEqual(['blk.0.attn_q.weight', 'blk.0.attn_k.weight', 'blk.1.ffn_up.weight']);
    expect(p.sent.map((x) => x.name)).toEqual(['blk.0.attn_norm.weight']);
    expect(rpcCacheMinSizeEnv()).toEqual({ GGML_RPC_CACHE_MIN_SIZE: '65536' });
  });

  it('gives the output stage output.weight and output_norm, never token_embd when output exists', () => {
    const p = stageCachePlan(header, { firstLayer: 11, lastLayer: 11, holdsOutput: true });
    expect(p.cached.map((x) => x.name)).toEqual(['output.weight']);
    expect(p.sent.map((x) => x.name)).toEqual(['output_norm.weight']);
  });

  it('with tied embeddings the output stage gets token_embd (llama.cpp duplicates it onto the output device)', () => {
    const tied = { ...header, tensors: header.tensors.filter((x) => x.name !== 'output.weight') };
    expect(stageCachePlan(tied, { firstLayer: 11, lastLayer: 11, holdsOutput: true }).cached.map((x) => x.name)).toEqual(['token_embd.weight']);
    expect(stageCachePlan(tied, { firstLayer: 0, lastLayer: 10, holdsOutput: false }).cached.map((x) => x.name)).not.toContain('token_embd.weight');
  });

  it('lays entries out as <LLAMA_CACHE>/rpc/<16 hex>', () => {
    expect(rpcCacheDir('/x/cache/')).toBe('/x/cache/rpc');
    expect(cacheEntryName('0123456789abcdef')).toBe('0123456789abcdef');
    expect(() => cacheEntryName('0123')).toThrow();
    expect(() => cacheEntryName('0123456789ABCDEF')).toThrow();
  });
});

describe('seeding from a GGUF file', () => {
  it('writes one entry per qualifying tensor, named by its hash, holding its bytes; a second seed reads nothing', async () => {
    const blobs = [randomBytes(4096), randomBytes(2048), randomBytes(6000), randomBytes(512)];
    const model = join(dir, 'm.gguf');
    await writeGguf(model, {
      metadata: [['general.architecture', { type: 'string', value: 'llama' }]],
      tensors: [
        { name: 'token_embd.weight', dims: [2048], type: 'F16', data: blobs[0]! },
        { name: 'blk.0.attn_q.weight', dims: [1024], type: 'F16', data: blobs[1]! },
        { name: 'blk.1.ffn_up.weight', dims: [3000], type: 'F16', data: blobs[2]! },
        { name: 'blk.1.attn_norm.weight', dims: [128], type: 'F32', data: blobs[3]! },
      ],
    });
    const cache = join(dir, 'llama-cache');
    const progress: number[] = [];
    const r = await seedTensorCache({
      modelPath: model,
      llamaCacheDir: cache,
      stage: { firstLayer: 1, lastLayer: 1, holdsOutput: false },
      thresholdBytes: 1024,
      chunkBytes: 1000,
      onProgress: (p) => progress.push(p.bytesDone),
    });
    expect(r.entries).toEqual({ 'blk.1.ffn_up.weight': fnv1a64Hex(blobs[2]!) });
    expect(r.hashes).toEqual([{ name: 'blk.1.ffn_up.weight', bytes: 6000, hash: fnv1a64Hex(blobs[2]!) }]);
    expect(r.sentTensors).toEqual(['blk.1.attn_norm.weight']);
    expect(progress).toEqual([0, 6000]);
    const names = (await readdir(join(cache, 'rpc'))).filter((n) => /^[0-9a-f]{16}$/.test(n));
    expect(names).toEqual([fnv1a64Hex(blobs[2]!)]);
    const written = await readFile(join(cache, 'rpc', names[0]!));
    expect(createHash('sha256').update(written).digest('hex')).toBe(createHash('sha256').update(blobs[2]!).digest('hex'));
    const again = await seedTensorCache({ modelPath: model, llamaCacheDir: cache, stage: { firstLayer: 1, lastLayer: 1, holdsOutput: false }, thresholdBytes: 1024 });
    expect(again.bytesWritten).toBe(0);
    expect(again.entries).toEqual(r.entries);
    // an entry deleted behind the manifest's back is rewritten, not trusted
    await rm(join(cache, 'rpc', names[0]!));
    const third = await seedTensorCache({ modelPath: model, llamaCacheDir: cache, stage: { firstLayer: 1, lastLayer: 1, holdsOutput: false }, thresholdBytes: 1024 });
    expect(third.bytesWritten).toBe(6000);
    expect(await readdir(join(cache, 'rpc'))).toContain(names[0]!);
    expect((await readdir(join(cache, 'rpc'))).filter((n) => n.endsWith('.tmp'))).toEqual([]);
  });
});

describe('tensor layouts kept between seeds', () => {
  const tensor = (name: string, bytes: number) => ({ name, dims: [bytes / 2], type: 'F16' as const, data: randomBytes(bytes) });

  it('reads a file’s header once while its size and mtime stay, again once it changes', async () => {
    const model = join(dir, 'layouts.gguf');
    const write = (names: string[]) => writeGguf(model, { metadata: [['general.architecture', { type: 'string', value: 'llama' }]], tensors: names.map((n) => tensor(n, 4096)) });
    await write(['blk.0.attn_q.weight', 'blk.1.attn_q.weight']);
    let reads = 0;
    const layouts = new FileMemo((p) => {
      reads++;
      return readTensorLayout(p);
    });
    const stage = { firstLayer: 1, lastLayer: 1, holdsOutput: false };
    const seed = () => seedTensorCache({ modelPath: model, llamaCacheDir: join(dir, 'layouts-cache'), stage, thresholdBytes: 1024, layouts });
    const first = await seed();
    const again = await seed();
    expect(reads).toBe(1);
    expect(again.entries).toEqual(first.entries);
    expect(again.bytesWritten).toBe(0);
    // same size, other tensor names, a later mtime: the layout is read again, not trusted
    await write(['blk.0.attn_k.weight', 'blk.1.attn_k.weight']);
    const st = await stat(model);
    await utimes(model, st.atime, new Date(st.mtimeMs + 5000));
    const changed = await seed();
    expect(reads).toBe(2);
    expect(Object.keys(changed.entries)).toEqual(['blk.1.attn_k.weight']);
    expect(changed.bytesWritten).toBe(4096);
  });
});

describe('known tensor hashes handed to the head', () => {
  const h = (name: string, hash = '0123456789abcdef', bytes = 4096) => ({ name, bytes, hash });

  it("keeps of a node's hashes only those of the stage it serves (blk.1 is not blk.10)", () => {
    const all = [h('blk.0.attn_q.weight'), h('blk.1.attn_q.weight'), h('blk.10.attn_q.weight'), h('output.weight'), h('token_embd.weight'), h('rope_freqs.weight')];
    expect(hashesOfStage(all, { firstLayer: 1, lastLayer: 1, holdsOutput: false }).map((x) => x.name)).toEqual(['blk.1.attn_q.weight']);
    expect(hashesOfStage(all, { firstLayer: 10, lastLayer: 10, holdsOutput: true }).map((x) => x.name)).toEqual(['blk.10.attn_q.weight', 'output.weight', 'token_embd.weight']);
  });

  it('drops what the engine could misread: white space in a name, a bad hash, no size', () => {
    const bad = [h('blk.1.a b'), h('blk.1.w', 'XYZ'), h('blk.1.w', '0123456789abcdef', 0), h(`blk.1.${'x'.repeat(60)}`)];
    expect(hashesOfStage(bad, { firstLayer: 0, lastLayer: 5, holdsOutput: true })).toEqual([]);
  });

  it('writes one "<name> <bytes> <hash>" line per tensor, the first of a repeated name only', () => {
    expect(knownHashesFileText([h('blk.0.w', '00000000000000aa', 10), h('blk.0.w', '00000000000000bb', 10), h('output.weight', '00000000000000cc', 20)])).toBe(
      'blk.0.w 10 00000000000000aa\noutput.weight 20 00000000000000cc\n',
    );
  });

  it('round-trips the proto shape (uint64 as a decimal string) and drops malformed entries', () => {
    const hs = [h('blk.0.w', '00000000000000aa', 2 ** 40)];
    expect(tensorHashesFromWire(tensorHashesToWire(hs))).toEqual(hs);
    expect(tensorHashesFromWire([{ name: 'blk.0.w', bytes: 'x', hash: '00000000000000aa' }, null, 7])).toEqual([]);
    expect(tensorHashesFromWire(undefined)).toEqual([]);
  });
});
