import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GgufHeader, GgufValue } from '../../src/shared/gguf/types.ts';
import { gv } from '../../src/shared/gguf/types.ts';
import { writeGguf } from '../../src/shared/gguf/writer.ts';
import { DEFAULT_MEMORY_OPTIONS, memoryModel } from '../../src/shared/memory/stage.ts';
import { modelProfile, weightTraffic } from '../../src/shared/model/profile.ts';
import { presetHeader } from '../../src/shared/model/shapes.ts';
import { encodeGgufHeader } from '../../src/shared/gguf/writer.ts';
import { FAMILY_ARCHS } from '../../src/shared/testmodel/families.ts';
import { familyTestModelSpec, familyTestShape } from '../../src/shared/testmodel/family-model.ts';
import { anyPresetSpec } from '../../src/shared/testmodel/presets.ts';
import { orchard as runOrchard } from '../helpers/processes.ts';

const GiB = 2 ** 30;
const orchard = (...args: string[]) => runOrchard(args, process.env);

function tensorsOf(h: GgufHeader, il: number) {
  return h.tensors.filter((t) => t.name.startsWith(`blk.${il}.`));
}

describe('mixture-of-experts families: memory math from the tensor table and llama.cpp rules', () => {
  it('deepseek-v3 (MLA): the KV cache holds kv_lora_rank + rope dims per layer and no V; dense lead layers read in full', () => {
    const h = presetHeader('deepseek-v3', 'q4_k_m');
    const p = modelProfile(h);
    expect(p.arch).toBe('deepseek2');
    expect(p.estimated).toEqual([]);
    expect(p.layerCount).toBe(61);
    expect(p.layers.every((l) => l.kEmbdGqa === 512 + 64 && l.vEmbdGqa === 0)).toBe(true);
    const mm = memoryModel(p, { ...DEFAULT_MEMORY_OPTIONS, ctx: 32768 });
    // f16: 576 × 2 bytes × 32768 cells per layer.
    expect(mm.layerKv[10]).toBe(576 * 2 * 32768);
    // Layers 0–2 are dense (leading_dense_block_count = 3): every byte is read.
    for (const il of [0, 1, 2]) expect(p.layers[il]!.readBytesPerToken).toBe(p.layers[il]!.weightBytes);
    // A MoE layer reads the shared expert, attention and router in full, the routed experts 8/256.
    const t = tensorsOf(h, 5);
    const routed = t.filter((x) => x.name.includes('_exps.')).reduce((a, x) => a + x.bytes, 0);
    const rest = t.filter((x) => !x.name.includes('_exps.')).reduce((a, x) => a + x.bytes, 0);
    expect(t.some((x) => x.name.includes('_shexp.'))).toBe(true);
    expect(p.layers[5]!.readBytesPerToken).toBeCloseTo(rest + (routed * 8) / 256, 3);
    expect(p.moe).toMatchObject({ experts: 256, expertsUsed: 8, expertFfn: 2048, shared: 1 });
  });

  it('glm-4.6: the multi-token-prediction block is not loaded (no layer, no KV), its bytes are skipped', () => {
    const h = presetHeader('glm-4.6', 'q4_k_m');
    const p = modelProfile(h);
    expect(p.layerCount).toBe(92);
    const mtp = tensorsOf(h, 92).reduce((a, x) => a + x.bytes, 0);
    expect(mtp).toBeGreaterThan(0);
    expect(p.skippedBytes).toBe(mtp);
    expect(p.layers[0]!.kEmbdGqa).toBe(8 * 128);
  });

  it('gpt-oss-120b: every other layer slides over 128 tokens (attention sinks counted as weights)', () => {
    const h = presetHeader('gpt-oss-120b', 'q4_k_m');
    const p = modelProfile(h);
    expect(p.swa).toEqual({ window: 128, layers: 18 });
    expect(p.layers[0]!.swa).toBe(true);
    expect(p.layers[1]!.swa).toBe(false);
    expect(h.tensors.some((t) => t.name === 'blk.0.attn_sinks.weight')).toBe(true);
    const mm = memoryModel(p, { ...DEFAULT_MEMORY_OPTIONS, ctx: 32768 });
    expect(mm.layerKv[0]).toBeLessThan(mm.layerKv[1]! / 10);
  });

  it('every MoE preset reads far fewer bytes per token than it holds; dense ones read what they hold', () => {
    for (const id of ['deepseek-v3', 'kimi-k2', 'glm-4.6', 'qwen3-235b-a22b', 'gpt-oss-120b']) {
      const { heldBytes, readBytesPerToken } = weightTraffic(modelProfile(presetHeader(id, 'q4_k_m')));
      expect(readBytesPerToken, id).toBeLessThan(heldBytes / 5);
    }
    const dense = modelProfile(presetHeader('llama-3-8b', 'q4_k_m'));
    const t = weightTraffic(dense);
    // Dense: everything but the token_embd rows a token does not look up.
    expect(t.heldBytes - t.readBytesPerToken).toBeCloseTo(dense.tokenEmbdBytes - dense.tokenEmbdRowBytes, 0);
  });

  it('an architecture llama.cpp loads but Orchard has no exact rules for is planned with its estimates named', () => {
    const h = presetHeader('llama-3-8b', 'q4_k_m');
    const metadata = new Map<string, GgufValue>();
    for (const [k, v] of h.metadata) metadata.set(k.startsWith('llama.') ? `olmo2.${k.slice(6)}` : k, v);
    metadata.set('general.architecture', gv.str('olmo2'));
    const p = modelProfile({ ...h, metadata });
    expect(p.arch).toBe('olmo2');
    expect(p.estimated.join(' ')).toMatch(/KV cache.*compute buffer/);
    expect(p.layers[0]!.kEmbdGqa).toBe(8 * 128);
    expect(weightTraffic(p).heldBytes).toBe(weightTraffic(modelProfile(h)).heldBytes);
  });
});

describe('generated runnable family models (orchard testmodel gguf --arch)', () => {
  const vocab = { metadata: new Map<string, GgufValue>(), size: 512, tokenTypes: [] };
  for (const arch of FAMILY_ARCHS) {
    it(`${arch}: the profile reads it with exact rules, experts where the family has them`, () => {
      const shape = familyTestShape(arch, 6);
      const { header } = encodeGgufHeader(familyTestModelSpec(shape, vocab, 'q8_0', 3));
      const p = modelProfile(header);
      expect(p.arch).toBe(arch);
      expect(p.estimated).toEqual([]);
      expect(p.layerCount).toBe(6);
      expect(p.moe?.experts ?? 0).toBe(shape.experts);
      const moeLayers = p.layers.filter((l) => l.routedExperts).length;
      expect(moeLayers).toBe(arch === 'mistral3' ? 0 : arch === 'llama4' ? 3 : 6 - (shape.leadingDense ?? 0));
    });
  }
});

describe('orchard plan of the header-only MoE presets on realistic clusters', () => {
  let dir: string;
  const ultras = (n: number) => Array.from({ length: n }, (_, i) => ({ name: `ultra-${i}`, chip: 'Apple M3 Ultra', gpuCores: 80, memoryBytes: 512 * GiB }));
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'orchard-moe-plan-'));
    await writeFile(join(dir, 'u4.json'), JSON.stringify(ultras(4)));
    await writeFile(join(dir, 'u2.json'), JSON.stringify(ultras(2)));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  for (const [id, nodes, ctx] of [
    ['kimi-k2', 'u4', '32768'],
    ['deepseek-v3', 'u2', '4096'],
    ['glm-4.6', 'u2', '32768'],
    ['qwen3-235b-a22b', 'u2', '32768'],
    ['gpt-oss-120b', 'u2', '32768'],
  ] as const) {
    it(`${id} Q4_K_M on ${nodes === 'u4' ? 4 : 2} × M3 Ultra 512 GB at ctx ${ctx}: fits within budgets, reads < holds`, async () => {
      const path = join(dir, `${id}.gguf`);
      await writeGguf(path, anyPresetSpec(id, 'q4_k_m').spec, { headerOnly: true });
      const r = await orchard('plan', path, '--nodes', join(dir, `${nodes}.json`), '--ctx', ctx, '--json');
      expect(r.stderr).toBe('');
      const plan = JSON.parse(r.stdout) as {
        fits: boolean;
        weightBytes: number;
        readBytesPerToken: number;
        experts: number;
        estimated: string[];
        stages: { bytes: { total: number; weights: number }; budgetBytes: number }[];
      };
      expect(plan.fits).toBe(true);
      expect(plan.estimated).toEqual([]);
      for (const s of plan.stages) expect(s.bytes.total).toBeLessThanOrEqual(s.budgetBytes);
      expect(plan.stages.reduce((a, s) => a + s.bytes.weights, 0)).toBe(plan.weightBytes);
      expect(plan.readBytesPerToken).toBeLessThan(plan.weightBytes);
      expect(plan.experts).toBeGreaterThan(0);
    });
  }
});
