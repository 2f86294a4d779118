import { describe, expect, it } from 'vitest';
import { llamaDeviceArgs, llamaLayerDevices, llamaMemoryArgs } from '../../src/shared/placement/llama-args.ts';
import { DEFAULT_MEMORY_OPTIONS } from '../../src/shared/memory/stage.ts';
import { uniformSource } from '../../src/shared/testmodel/prng.ts';

describe('plan → llama-server device arguments', () => {
  it('counts per stage, +1 unit for the output layer on the last device', () => {
    const a = llamaDeviceArgs(
      [
        { firstLayer: 0, lastLayer: 12, rpc: '10.0.0.2:50052' },
        { firstLayer: 13, lastLayer: 15 },
      ],
      16,
    );
    expect(a.rpc).toEqual(['10.0.0.2:50052']);
    expect(a.tensorSplit).toEqual([13, 4]);
    expect(a.args).toEqual(['--rpc', '10.0.0.2:50052', '-ngl', '17', '--tensor-split', '13,4']);
    // The note's observation: 16 layers with 3,1 → 13 layers on the first device, 3 + output on the second.
    const d = llamaLayerDevices([3, 1], 16);
    expect(d.filter((x) => x === 0)).toHaveLength(13);
    expect(d.at(-1)).toBe(1);
  });

  it('maps every layer to its planned stage for thousands of random plans (llama.cpp float32 rule)', () => {
    const r = uniformSource(99);
    for (let trial = 0; trial < 5000; trial++) {
      const layers = 1 + Math.floor(r() * 200);
      const n = 1 + Math.floor(r() * Math.min(16, layers));
      // Random cut points.
      const cuts = new Set<number>();
      while (cuts.size < n - 1) cuts.add(1 + Math.floor(r() * (layers - 1)));
      const bounds = [0, ...[...cuts].sort((a, b) => a - b), layers];
      const stages = bounds.slice(0, -1).map((first, i) => ({ firstLayer: first, lastLayer: bounds[i + 1]! - 1, rpc: `h${i}:1` }));
      const a = llamaDeviceArgs(stages, layers);
      const devices = llamaLayerDevices(a.tensorSplit, layers);
      stages.forEach((s, i) => {
        for (let l = s.firstLayer; l <= s.lastLayer; l++) expect(devices[l]).toBe(i);
      });
      expect(devices[layers]).toBe(n - 1);
    }
  });

  it('a head with no layers still takes the output layer', () => {
    const a = llamaDeviceArgs(
      [
        { firstLayer: 0, lastLayer: 9, rpc: 'a:1' },
        { firstLayer: 10, lastLayer: 9 },
      ],
      10,
    );
    expect(a.tensorSplit).toEqual([10, 1]);
    expect(llamaLayerDevices(a.tensorSplit, 10)).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
  });

  it('rejects plans that do not cover the layers or lack endpoints', () => {
    expect(() => llamaDeviceArgs([], 4)).toThrow(/at least one stage/);
    expect(() => llamaDeviceArgs([{ firstLayer: 1, lastLayer: 3 }], 4)).toThrow(/starts at layer 1/);
    expect(() => llamaDeviceArgs([{ firstLayer: 0, lastLayer: 2 }], 4)).toThrow(/cover layers 0–2/);
    expect(() =>
      llamaDeviceArgs(
        [
          { firstLayer: 0, lastLayer: 1 },
          { firstLayer: 2, lastLayer: 3 },
        ],
        4,
      ),
    ).toThrow(/no RPC endpoint/);
  });

  it('memory arguments pin what the math assumes', () => {
    const a = llamaMemoryArgs({ ...DEFAULT_MEMORY_OPTIONS, ctx: 8192, cacheType: 'q8_0', parallel: 2 });
    expect(a.join(' ')).toBe('-c 8192 -np 2 --kv-unified -ctk q8_0 -ctv q8_0 -ub 512 -fa on -fit off --no-repack --cache-ram 0');
  });
});
