import { describe, expect, it } from 'vitest';
import { kvGeometry, layerKvBytes } from '../../src/shared/memory/kv.ts';
import { DEFAULT_MEMORY_OPTIONS, deviceBytes, hostBytes, memoryModel, stageBytes } from '../../src/shared/memory/stage.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { presetHeader } from '../../src/shared/model/shapes.ts';

const MiB = 2 ** 20;
const kvo = (o: Partial<Parameters<typeof kvGeometry>[1]>) => ({
  ctx: 4096,
  cacheTypeK: 'f16' as const,
  cacheTypeV: 'f16' as const,
  parallel: 1,
  unified: true,
  ubatch: 512,
  ...o,
});

describe('KV geometry follows llama.cpp padding rules', () => {
  it('pads n_ctx to 256', () => {
    expect(kvGeometry({ swa: undefined }, kvo({ ctx: 1000 }))).toEqual({ nCtx: 1024, cellsFull: 1024, cellsSwa: 1024, streams: 1 });
    expect(kvGeometry({ swa: undefined }, kvo({ ctx: 4096 })).nCtx).toBe(4096);
  });
  it('non-unified: n_ctx_seq = pad(n_ctx / n_seq, 256), one stream per sequence', () => {
    // 4096 / 3 = 1365 → 1536 per stream; n_ctx becomes 4608.
    expect(kvGeometry({ swa: undefined }, kvo({ ctx: 4096, parallel: 3, unified: false }))).toEqual({
      nCtx: 4608,
      cellsFull: 1536,
      cellsSwa: 1536,
      streams: 3,
    });
  });
  it('SWA: pad(min(cells, n_swa·(unified ? n_seq : 1) + n_ubatch), 256)', () => {
    const swa = { swa: { window: 4096, layers: 1 } };
    expect(kvGeometry(swa, kvo({ ctx: 32768 })).cellsSwa).toBe(4608);
    expect(kvGeometry(swa, kvo({ ctx: 32768, parallel: 4 })).cellsSwa).toBe(16896);
    expect(kvGeometry(swa, kvo({ ctx: 2048 })).cellsSwa).toBe(2048);
    expect(kvGeometry({ swa: { window: 1000, layers: 1 } }, kvo({ ctx: 32768 })).cellsSwa).toBe(1536);
  });
});

describe('KV bytes match what this llama.cpp allocated (bench/memory.ts runs)', () => {
  const layer = { index: 0, weightBytes: 1, readBytesPerToken: 1, swa: false, routedExperts: false, kEmbdGqa: 256, vEmbdGqa: 256, largestTensorBytes: 1 };
  it('12 layers × 4096 cells × (256 + 256) f16 = 48 MiB (llama_kv_cache: size = 48.00 MiB)', () => {
    const g = kvGeometry({ swa: undefined }, kvo({}));
    expect(12 * layerKvBytes(layer, g, { cacheTypeK: 'f16', cacheTypeV: 'f16' })).toBe(48 * MiB);
  });
  it('q8_0 uses 34-byte blocks of 32: 8 layers at ctx 4096 = 17.00 MiB (reported 17.00)', () => {
    const g = kvGeometry({ swa: undefined }, kvo({}));
    expect(8 * layerKvBytes(layer, g, { cacheTypeK: 'q8_0', cacheTypeV: 'q8_0' })).toBe(17 * MiB);
  });
  it('q4_0 (18-byte blocks) is 18/64 of f16', () => {
    const g = kvGeometry({ swa: undefined }, kvo({}));
    const f16 = layerKvBytes(layer, g, { cacheTypeK: 'f16', cacheTypeV: 'f16' });
    expect(layerKvBytes(layer, g, { cacheTypeK: 'q4_0', cacheTypeV: 'q4_0' })).toBe((f16 * 18) / 64);
  });
  it('a layer without KV heads has no cache', () => {
    const g = kvGeometry({ swa: undefined }, kvo({}));
    expect(layerKvBytes({ ...layer, kEmbdGqa: 0, vEmbdGqa: 0 }, g, { cacheTypeK: 'f16', cacheTypeV: 'f16' })).toBe(0);
  });
});

describe('stage memory', () => {
  const p = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
  const mm = memoryModel(p, { ...DEFAULT_MEMORY_OPTIONS, ctx: 8192 });
  it('the head holds the output layer on its device and token_embd on its CPU', () => {
    const dev = deviceBytes(mm, 16, 31, true, true);
    let layers = 0;
    for (let i = 16; i < 32; i++) layers += p.layers[i]!.weightBytes;
    expect(dev.model).toBe(layers + p.outputBytes + p.outputNormBytes);
    expect(hostBytes(mm, true).model).toBe(p.tokenEmbdBytes);
    const head = stageBytes(mm, 16, 31, true, true);
    const worker = stageBytes(mm, 0, 15, false, true);
    expect(head.weights).toBe(dev.model + p.tokenEmbdBytes);
    expect(worker.weights + head.weights).toBe(p.fileTensorBytes);
    expect(head.kv + worker.kv).toBe(32 * 8192 * 2048 * 2);
    expect(head.total).toBe(head.weights + head.kv + head.compute + head.overhead);
  });
  it('pipeline parallelism (several devices) costs compute-buffer copies', () => {
    expect(deviceBytes(mm, 0, 31, true, true).compute).toBeGreaterThan(deviceBytes(mm, 0, 31, true, false).compute);
  });
  it('compute buffer grows with context (KQ mask) and does not grow with layer count', () => {
    const small = memoryModel(p, { ...DEFAULT_MEMORY_OPTIONS, ctx: 2048 });
    expect(deviceBytes(mm, 0, 3, false, true).compute).toBeGreaterThan(deviceBytes(small, 0, 3, false, true).compute);
    expect(deviceBytes(mm, 0, 3, false, true).compute).toBe(deviceBytes(mm, 0, 20, false, true).compute);
  });
});
