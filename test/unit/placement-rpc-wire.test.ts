import { describe, expect, it } from 'vitest';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { presetHeader } from '../../src/shared/model/shapes.ts';
import { boundarySeconds, layerWire, prefillSeconds, promptBoundaryBytes } from '../../src/shared/placement/cost.ts';
import { DEFAULT_MEMORY_OPTIONS } from '../../src/shared/memory/stage.ts';
import { planFixedSplit } from '../../src/shared/placement/fixed.ts';
import { llamaMemoryArgs } from '../../src/shared/placement/llama-args.ts';
import {
  decodeInputBytes,
  graphBytes,
  layerSave,
  maskBytes,
  maskCells,
  newGraphs,
  promptInputBytes,
  ubatchShapes,
} from '../../src/shared/placement/rpc-wire.ts';
import { DEFAULT_PLACEMENT_OPTIONS, type PlacementNode } from '../../src/shared/placement/types.ts';
import type { LayerProfile } from '../../src/shared/model/profile.ts';

/**
 * The engine facts below were read off llama.cpp de3ff81 itself: rpc-servers with GGML_RPC_DEBUG=1
 * behind a llama-server with bench:lan's model (36 layers, dim 1024, 4 KV heads of 64, f16 KV,
 * ctx 1024, one slot), split 17 / 10 / 9 + output, and the server's own `prompt_save` log line.
 */
const FA = { flashAttention: true, cacheType: 'f16' as const, ubatch: 512 };
const layer = (o: Partial<LayerProfile> = {}): LayerProfile => ({
  index: 0,
  weightBytes: 0,
  readBytesPerToken: 0,
  swa: false,
  routedExperts: false,
  kEmbdGqa: 256,
  vEmbdGqa: 256,
  largestTensorBytes: 0,
  ...o,
});
const cells = { full: 1024, swa: 1024 };

describe('what llama.cpp RPC sends a worker besides activations (rpc-wire.ts)', () => {
  it('graph bytes reproduce the serialized graphs the rpc-servers received', () => {
    // graph_compute: n_nodes / n_tensors per worker stage; serialize_graph = 12 + 8·nodes + 296·tensors
    const measured = [
      { fa: true, layers: 10, nodes: 310, tensors: 425 },
      { fa: true, layers: 17, nodes: 527, tensors: 719 },
      { fa: true, layers: 24, nodes: 744, tensors: 1013 },
      { fa: false, layers: 10, nodes: 360, tensors: 475 },
      { fa: false, layers: 17, nodes: 612, tensors: 804 },
    ];
    for (const m of measured) {
      const g = graphBytes(m.fa);
      expect(g.perStage + m.layers * g.perLayer).toBe(12 + 8 * m.nodes + 296 * m.tensors);
    }
  });

  it('the mask spans the used cells padded to 256, at least 256, at most the cache', () => {
    expect(maskCells(1, 1024)).toBe(256);
    expect(maskCells(256, 1024)).toBe(256);
    expect(maskCells(257, 1024)).toBe(512);
    expect(maskCells(5000, 1024)).toBe(1024);
    expect(maskCells(100, 128)).toBe(128);
    // measured: 183 new tokens on an empty cache sent a 93 696-byte mask (f16), 50 tokens without flash attention 51 200 (f32)
    expect(maskBytes(183, maskCells(183, 1024), true)).toBe(93_696);
    expect(maskBytes(50, maskCells(50, 1024), false)).toBe(51_200);
  });

  it("a prompt's ubatches and the graphs they make the head send", () => {
    expect(ubatchShapes(185, 512, 1024)).toEqual([{ tokens: 185, nKv: 256 }]);
    expect(newGraphs(ubatchShapes(185, 512, 1024))).toBe(1);
    expect(ubatchShapes(1024, 512, 4096)).toEqual([
      { tokens: 512, nKv: 512 },
      { tokens: 512, nKv: 1024 },
    ]);
    // ubatch 128 over 960 tokens: n_kv steps every second ubatch, and the short last one is new too
    const shapes = ubatchShapes(960, 128, 1024);
    expect(shapes.map((s) => s.nKv)).toEqual([256, 256, 512, 512, 768, 768, 1024, 1024]);
    expect(shapes.at(-1)!.tokens).toBe(64);
    expect(newGraphs(shapes)).toBe(5);
    // the cache caps n_kv: equal full ubatches at the cap reuse one graph
    expect(newGraphs(ubatchShapes(2048, 256, 512))).toBe(2);
    expect(newGraphs([])).toBe(0);
  });

  it('inputs per prompt and per decoded token: masks, 20 B per token, the per-stage part of each new graph', () => {
    const dense = { swa: undefined };
    // measured per worker for 183 tokens: 749 568 B of activations, then 732 + 1464 + 1464 B of positions and K/V cell indices and the 93 696 B mask
    expect(promptInputBytes(dense, 183, cells, FA)).toBe(732 + 1464 + 1464 + 93_696 + graphBytes(true).perStage);
    expect(promptInputBytes(dense, 960, cells, { ...FA, ubatch: 128 })).toBe(20 * 960 + 5 * graphBytes(true).perStage + 2 * 128 * 2 * (256 + 512 + 768) + 2 * 128 * 1024 + 2 * 64 * 1024);
    // a model with sliding-window layers gets a second mask over its (smaller) SWA cache
    const swa = { swa: { window: 128, layers: 10 } };
    expect(promptInputBytes(swa, 183, { full: 1024, swa: 512 }, FA) - promptInputBytes(dense, 183, { full: 1024, swa: 512 }, FA)).toBe(183 * 256 * 2);
    expect(decodeInputBytes(dense, 512, cells, true)).toBe(20 + 512 * 2);
    expect(decodeInputBytes(dense, 512, cells, false)).toBe(20 + 512 * 4);
    expect(decodeInputBytes(swa, 900, { full: 1024, swa: 256 }, true)).toBe(20 + 1024 * 2 + 256 * 2);
  });

  it("the prompt-cache save reads every cell of the previous sequence, K and V, per layer", () => {
    // measured: get_tensor of 94 720 B (185 cells × 256 × f16) for K and for V of every worker layer
    expect(layerSave(layer(), 185, cells, FA)).toEqual({ bytes: 2 * 94_720, roundTrips: 2 });
    // without flash attention V is transposed: one get per V row (measured 17 × 257 gets + 4 for the activations)
    expect(layerSave(layer(), 185, cells, { ...FA, flashAttention: false })).toEqual({ bytes: 2 * 94_720, roundTrips: 257 });
    // the server's log: "saving prompt with length 185, total state size = 6.507 MiB" for all 36 layers (a few KiB of it is cell metadata)
    const whole = 36 * layerSave(layer(), 185, cells, FA).bytes;
    expect(whole / 2 ** 20).toBeCloseTo(6.504, 3);
    expect(whole).toBeLessThan(6.507 * 2 ** 20);
    // a sliding-window layer holds its window only; a layer without KV and an empty slot save nothing
    expect(layerSave(layer({ swa: true }), 900, { full: 1024, swa: 256 }, FA).bytes).toBe(256 * 1024);
    expect(layerSave(layer({ kEmbdGqa: 0, vEmbdGqa: 0 }), 185, cells, FA)).toEqual({ bytes: 0, roundTrips: 0 });
    expect(layerSave(layer(), 0, cells, FA)).toEqual({ bytes: 0, roundTrips: 0 });
    // a quantised cache moves its blocks: q8_0 is 34 B per 32 values
    expect(layerSave(layer(), 10, cells, { flashAttention: true, cacheType: 'q8_0' }).bytes).toBe(10 * 2 * (256 / 32) * 34);
  });
});

describe('the cost model charges them (cost.ts layerWire, planner)', () => {
  const p = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
  // llama.cpp's default (--cache-ram 8192): the save is priced; Orchard's engines run without it.
  const o = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: 4096, promptTokens: 1000, outputTokens: 1, hostPromptCache: true };

  it("Orchard's engines (--cache-ram 0, the default here) save nothing before a prompt", () => {
    const w = layerWire(p, { ...o, hostPromptCache: undefined });
    expect([...w.saveBytes, ...w.saveRoundTrips].every((x) => x === 0)).toBe(true);
    expect(w.chainBytes).toEqual(layerWire(p, o).chainBytes);
    expect(llamaMemoryArgs(DEFAULT_MEMORY_OPTIONS).join(' ')).toContain('--cache-ram 0');
  });

  it('per layer: each new graph, and the previous like request of P + output − 1 cells', () => {
    const w = layerWire(p, o);
    // 1000 tokens = 2 ubatches of 512 / 488 over 512 and 1024 cells: two graphs
    expect(w.chainBytes[0]).toBe(2 * graphBytes(true).perLayer);
    expect(w.saveBytes[0]).toBe(1000 * 2 * 1024 * 2);
    expect(w.saveRoundTrips[0]).toBe(2);
    expect(layerWire(p, { ...o, outputTokens: 256 }).saveBytes[0]).toBe(1255 * 2 * 1024 * 2);
    // no prompt, or MLX ranks (activations only): nothing
    for (const none of [layerWire(p, { ...o, promptTokens: 0 }), layerWire(p, { ...o, engine: 'mlx' })]) {
      expect([...none.chainBytes, ...none.saveBytes, ...none.saveRoundTrips].every((x) => x === 0)).toBe(true);
    }
  });

  it('a split over a slow link: the save comes before the prompt, the graph in the chain', () => {
    const link = { rttSeconds: 0.0002, bytesPerSecond: 2.4e6 };
    const nodes: PlacementNode[] = [
      { name: 'w', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9, prefillFlopsPerSecond: 1e12, links: { h: link } },
      { name: 'h', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 100e9, prefillFlopsPerSecond: 1e12, links: { w: link } },
    ];
    const split = [
      { node: 'w', firstLayer: 0, lastLayer: 19 },
      { node: 'h', firstLayer: 20, lastLayer: 31 },
    ];
    const plan = planFixedSplit(p, nodes, split, o);
    expect(plan.predicted.promptCacheSaveSeconds).toBeCloseTo(20 * ((1000 * 4096) / 2.4e6 + 2 * 0.0002), 9);
    const alone = planFixedSplit(p, nodes, [{ node: 'h', firstLayer: 0, lastLayer: 31 }], o);
    expect(alone.predicted.promptCacheSaveSeconds).toBe(0);
    // The split's TTFT is the single node's compute + boundary (rows, inputs, graphs) + the save.
    const row = 1000 * p.embd * 4;
    const inputs = 20 * 1000 + 2 * (12 + 5 * 296) + 2 * 512 * 512 + 2 * 488 * 1024 + 20 * (2 * graphBytes(true).perLayer);
    const boundary = 2 * 0.0002 + (2 * row + inputs) / 2.4e6;
    // two ubatches overlap the head's layers with the worker's next (cost.ts prefillSeconds); the save is not overlapped
    const logits = (2 * p.embd * p.vocab) / 1e12;
    const prefill = prefillSeconds(plan.stages.map((st) => st.prefillSeconds), [boundary], 2, logits, true);
    expect(plan.predicted.ttftSeconds).toBeCloseTo(plan.predicted.promptCacheSaveSeconds + prefill + o.headOverheadSeconds, 12);
    expect(plan.predicted.ttftSeconds - alone.predicted.ttftSeconds).toBeGreaterThan(plan.predicted.promptCacheSaveSeconds + boundary / 2);
  });
});

describe('the bytes behind those seconds (cost.ts promptBoundaryBytes), for a link counter to check', () => {
  it('are what boundarySeconds and layerWire charge, each way', () => {
    const p = modelProfile(presetHeader('llama-3-8b', 'q8_0'));
    const o = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: 4096, promptTokens: 700, outputTokens: 1, hostPromptCache: true };
    const link = { rttSeconds: 0.001, bytesPerSecond: 1e6 };
    const w: PlacementNode = { name: 'w', budgetBytes: 2 ** 40, bandwidthBytesPerSecond: 1e9, links: { h: link } };
    const b = promptBoundaryBytes(p, o, 3, 9);
    const wire = layerWire(p, o);
    // every byte of the boundary, the layers' graphs and their save, at 1 MB/s; round trips apart
    const seconds = boundarySeconds(p, w, o, 'h').prefill - 2 * 0.001 + (7 * (wire.chainBytes[0]! + wire.saveBytes[0]!)) / 1e6;
    expect((b.toWorker + b.toHead) / 1e6).toBeCloseTo(seconds, 9);
    // to the head: the prompt's activations and the 7 layers' saved K and V of 700 cells
    expect(b.toHead).toBe(700 * p.embd * 4 + 7 * 700 * 4096);
    expect(promptBoundaryBytes(p, { ...o, promptTokens: 0 }, 3, 9)).toEqual({ toWorker: 0, toHead: 0 });
    // Orchard's engines (--cache-ram 0): the activations alone come back
    expect(promptBoundaryBytes(p, { ...o, hostPromptCache: false }, 3, 9)).toEqual({ toWorker: b.toWorker, toHead: 700 * p.embd * 4 });
  });
});
