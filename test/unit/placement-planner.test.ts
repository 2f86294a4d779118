import { describe, expect, it } from 'vitest';
import { stageBytes, memoryModel } from '../../src/shared/memory/stage.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { presetHeader } from '../../src/shared/model/shapes.ts';
import { PRESETS } from '../../src/shared/testmodel/presets.ts';
import { resolveNode } from '../../src/shared/placement/nodes-file.ts';
import { DECODE_EFFICIENCY, layerPrefillFlops, objectiveWeights } from '../../src/shared/placement/cost.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { planFixedSplit } from '../../src/shared/placement/fixed.ts';
import { evaluateCounts } from '../../src/shared/placement/baselines.ts';
import type { PlacementNode, Plan } from '../../src/shared/placement/types.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../../src/shared/placement/types.ts';
import { uniformSource } from '../../src/shared/testmodel/prng.ts';

const GB = 1e9;
const GiB = 2 ** 30;
const CLUSTER: PlacementNode[] = [
  resolveNode({ name: 'air', chip: 'Apple M3', memoryBytes: 24 * GiB }),
  resolveNode({ name: 'max-1', chip: 'Apple M4 Max', gpuCores: 40, memoryBytes: 128 * GiB }),
  resolveNode({ name: 'ultra', chip: 'Apple M2 Ultra', memoryBytes: 192 * GiB }),
  resolveNode({ name: 'max-2', chip: 'Apple M4 Max', gpuCores: 40, memoryBytes: 128 * GiB }),
];
const profile = (name: string, quant: 'q4_k_m' | 'f16' | 'q8_0' = 'q4_k_m') => modelProfile(presetHeader(name, quant));

function expectCoverage(plan: Plan, layers: number): void {
  let next = 0;
  for (const s of plan.stages) {
    expect(s.firstLayer).toBe(next);
    expect(s.lastLayer).toBeGreaterThanOrEqual(s.firstLayer - 1);
    next = s.lastLayer + 1;
  }
  expect(next).toBe(layers);
  expect(plan.stages.at(-1)!.role).toBe('head');
  expect(new Set(plan.stages.map((s) => s.node)).size).toBe(plan.stages.length);
}

describe('the head\'s fixed seconds per token', () => {
  const p = profile('llama-3-8b', 'q8_0');
  const twin = (name: string, fixed?: number): PlacementNode => ({ name, budgetBytes: 64 * GiB, bandwidthBytesPerSecond: 400 * GB, ...(fixed === undefined ? {} : { decodeFixedSecondsPerToken: fixed }) });

  it('a node that measured it is charged its own; one that did not, the assumed head overhead', () => {
    const measured = planPlacement(p, [twin('a', 0.004)], {});
    const assumed = planPlacement(p, [twin('a')], {});
    expect(measured.predicted.secondsPerToken - assumed.predicted.secondsPerToken).toBeCloseTo(0.004 - DEFAULT_PLACEMENT_OPTIONS.headOverheadSeconds, 12);
    // On TTFT too: the first token is a token.
    const ttft = (n: PlacementNode) => planPlacement(p, [n], { promptTokens: 512, objective: 'ttft' }).predicted.ttftSeconds;
    expect(ttft(twin('a', 0.004)) - ttft(twin('a'))).toBeCloseTo(0.004 - DEFAULT_PLACEMENT_OPTIONS.headOverheadSeconds, 12);
  });

  it('of two otherwise equal nodes, the one with the smaller fixed cost heads the plan', () => {
    for (const names of [['a', 'b'], ['b', 'a']]) {
      const nodes = names.map((n) => twin(n, n === 'a' ? 0.009 : 0.002));
      const plan = planPlacement(p, nodes, {});
      expect(plan.stages.map((s) => s.node)).toEqual(['b']);
      expect(plan.predicted.secondsPerToken).toBeCloseTo(plan.stages[0]!.secondsPerToken + 0.002, 12);
    }
  });

  it('a fixed split and the baselines charge their head\'s', () => {
    const nodes = [twin('a', 0.009), twin('b', 0.002)];
    const onA = planFixedSplit(p, nodes, [{ node: 'a', firstLayer: 0, lastLayer: p.layerCount - 1 }]);
    expect(onA.predicted.secondsPerToken).toBeCloseTo(onA.stages[0]!.secondsPerToken + 0.009, 12);
    // The same two twins in either order: only the head's fixed cost differs.
    const half = p.layerCount / 2;
    const headB = evaluateCounts(p, nodes, [half, half]).secondsPerToken;
    const headA = evaluateCounts(p, [...nodes].reverse(), [half, half]).secondsPerToken;
    expect(headA - headB).toBeCloseTo(0.009 - 0.002, 12);
  });
});

describe('planner acceptance scenarios', () => {
  it('chip table fills the nodes: bandwidth and a wired-limit budget', () => {
    const ultra = CLUSTER.find((n) => n.name === 'ultra')!;
    // Spec 800 GB/s × llama.cpp's decode efficiency (cost.ts).
    expect(ultra.bandwidthBytesPerSecond).toBe(800 * GB * DECODE_EFFICIENCY['llama.cpp']);
    // 3/4 of 192 GiB minus 5% margin.
    expect(ultra.budgetBytes).toBeCloseTo(144 * GiB * 0.95, -6);
  });

  it('70B Q4_K_M at 8k context plans onto the M2 Ultra alone', () => {
    const p = profile('llama-3-70b');
    const plan = planPlacement(p, CLUSTER, { ctx: 8192 });
    expect(plan.fits).toBe(true);
    expect(plan.stages).toHaveLength(1);
    expect(plan.stages[0]!.node).toBe('ultra');
    expectCoverage(plan, 80);
    expect(plan.stages[0]!.bytes.kv).toBe(80 * 8192 * 2048 * 2);
    expect(plan.predicted.tokensPerSecond).toBeGreaterThan(10);
    expect(plan.predicted.tokensPerSecond).toBeLessThan(800e9 / p.fileTensorBytes);
    expect(plan.reasons[0]).toMatch(/ultra holds the whole model/);
  });

  it('405B Q4_K_M at 4k fills the fastest node first and respects every budget', () => {
    const p = profile('llama-3.1-405b');
    const plan = planPlacement(p, CLUSTER, { ctx: 4096 });
    expect(plan.fits).toBe(true);
    expectCoverage(plan, 126);
    for (const s of plan.stages) expect(s.bytes.total).toBeLessThanOrEqual(s.budgetBytes);
    const ultra = plan.stages.find((s) => s.node === 'ultra')!;
    // The Ultra is filled: too little room left for even one more layer.
    const oneLayer = p.layers[0]!.weightBytes;
    expect(ultra.headroomBytes).toBeLessThan(oneLayer + 2 ** 30);
    // The two equal M4 Max nodes share the rest evenly instead of one packed to the brim.
    const maxes = plan.stages.filter((s) => s.node.startsWith('max'));
    expect(maxes).toHaveLength(2);
    expect(Math.abs(maxes[0]!.headroomBytes - maxes[1]!.headroomBytes)).toBeLessThan(4 * GiB);
    // The slow Air is not needed.
    expect(plan.stages.map((s) => s.node)).not.toContain('air');
    // Predicted time is the bandwidth cost model.
    const cost = plan.stages.reduce((t, s) => t + s.readBytesPerToken / s.bandwidthBytesPerSecond, 0);
    expect(plan.predicted.secondsPerToken).toBeCloseTo(
      cost +
        // per boundary: 2 activation rows, llama.cpp's f16 mask over half the 4096 cells, 20 B of positions and cell indices
        (plan.stages.length - 1) * (DEFAULT_PLACEMENT_OPTIONS.hopSeconds + (2 * p.embd * 4 + 2 * 2048 + 20) / DEFAULT_PLACEMENT_OPTIONS.linkBytesPerSecond) +
        DEFAULT_PLACEMENT_OPTIONS.headOverheadSeconds,
      9,
    );
  });

  it('sees the network and the prompt: a long prompt over a slow link changes the plan that decode alone would pick', () => {
    const p = profile('llama-3-70b');
    // Two fast-memory nodes that can only hold the model together, one slow-memory node that holds
    // it alone; all compute alike (prefill is compute-bound).
    const nodes = (linkGBps: number): PlacementNode[] => [
      { name: 'fast-1', budgetBytes: 30 * GiB, bandwidthBytesPerSecond: 400 * GB, prefillFlopsPerSecond: 10e12, linkBytesPerSecond: linkGBps * GB },
      { name: 'fast-2', budgetBytes: 30 * GiB, bandwidthBytesPerSecond: 400 * GB, prefillFlopsPerSecond: 10e12, linkBytesPerSecond: linkGBps * GB },
      { name: 'slow-big', budgetBytes: 100 * GiB, bandwidthBytesPerSecond: 150 * GB, prefillFlopsPerSecond: 10e12, linkBytesPerSecond: linkGBps * GB },
    ];
    const plan = (linkGBps: number, objective: 'decode' | 'ttft', pipelinedPrefill = true) =>
      planPlacement(p, nodes(linkGBps), { ctx: 8192, promptTokens: 8192, objective, pipelinedPrefill });
    // 1 GbE: the 16 ubatches of an 8192-token prompt overlap on the last stage, so the fast split
    // is also first to the first token; costed without the overlap it would not be.
    expect(plan(0.125, 'decode').stages.map((s) => s.node).sort()).toEqual(['fast-1', 'fast-2']);
    expect(plan(0.125, 'ttft').stages.map((s) => s.node).sort()).toEqual(['fast-1', 'fast-2']);
    expect(plan(0.125, 'ttft', false).stages.map((s) => s.node)).toEqual(['slow-big']);
    // 50 Mbit/s (Wi-Fi): the 8192 × 8192 × 4 B of activations (268 MB, twice per boundary) take
    // ~86 s, so the TTFT objective moves layers onto slow-big; decode still prefers the fast split.
    const decode = plan(0.00625, 'decode');
    const ttft = plan(0.00625, 'ttft');
    expect(decode.stages.map((s) => s.node).sort()).toEqual(['fast-1', 'fast-2']);
    expect(ttft.stages.map((s) => s.node)).toContain('slow-big');
    // Each choice is best at what it optimises.
    expect(decode.predicted.secondsPerToken).toBeLessThan(ttft.predicted.secondsPerToken);
    expect(decode.predicted.ttftSeconds - ttft.predicted.ttftSeconds).toBeGreaterThan(1);
  });

  it('a model that fits nowhere says so with numbers and remedies', () => {
    const p = profile('llama-3.1-405b', 'f16');
    const plan = planPlacement(p, CLUSTER, { ctx: 4096 });
    expect(plan.fits).toBe(false);
    expect(plan.stages).toHaveLength(0);
    expect(plan.shortfall!.shortfallBytes).toBeGreaterThan(400 * GiB);
    expect(plan.shortfall!.need.weights).toBe(p.fileTensorBytes);
    expect(plan.shortfall!.capacityBytes).toBe(CLUSTER.reduce((t, n) => t + n.budgetBytes, 0));
    expect(plan.remedies!.some((r) => /smaller quant/.test(r))).toBe(true);
    expect(plan.remedies!.some((r) => /another node with ≥/.test(r))).toBe(true);
  });

  it('suggests a shorter context or quantized KV when only the cache is too big', () => {
    const p = profile('llama-3-8b');
    const weights = p.fileTensorBytes;
    const node = { name: 'small', budgetBytes: weights + 2 * GiB, bandwidthBytesPerSecond: 100 * GB };
    const plan = planPlacement(p, [node], { ctx: 32768 });
    expect(plan.fits).toBe(false);
    const ctxRemedy = plan.remedies!.find((r) => r.startsWith('shorter context'));
    expect(ctxRemedy).toBeDefined();
    const ctx = Number(/--ctx (\d+)/.exec(ctxRemedy!)![1]);
    expect(planPlacement(p, [node], { ctx }).fits).toBe(true);
    expect(planPlacement(p, [node], { ctx: ctx + 256 }).fits).toBe(false);
    expect(plan.remedies!.some((r) => /--cache-type q(8|4)_0 fits/.test(r))).toBe(true);
  });

  it('pinned nodes always hold a stage', () => {
    const p = profile('llama-3-70b');
    const plan = planPlacement(p, CLUSTER, { ctx: 8192, pinned: ['air'] });
    expect(plan.fits).toBe(true);
    expect(plan.stages.map((s) => s.node)).toContain('air');
    expectCoverage(plan, 80);
  });

  it('rejects invalid nodes', () => {
    const p = profile('llama-3-8b');
    expect(() => planPlacement(p, [], {})).toThrow(/no nodes/);
    expect(() => planPlacement(p, [{ name: 'a', budgetBytes: -1, bandwidthBytesPerSecond: 1 }], {})).toThrow(/budget/);
    expect(() => planPlacement(p, [{ name: 'a', budgetBytes: 1, bandwidthBytesPerSecond: 0 }], {})).toThrow(/bandwidth/);
    expect(() => planPlacement(p, [{ name: 'a', budgetBytes: 1, bandwidthBytesPerSecond: 1 }], { pinned: ['x'] })).toThrow(/pinned/);
  });
});

describe('planner invariants over random inputs', () => {
  const shapes = PRESETS.map((p) => p.id);
  it('every plan covers each layer exactly once, contiguously, within every budget; deterministic', () => {
    const r = uniformSource(42);
    let fits = 0;
    for (let trial = 0; trial < 300; trial++) {
      const p = profile(shapes[Math.floor(r() * shapes.length)]!, (['q4_k_m', 'q8_0', 'f16'] as const)[Math.floor(r() * 3)]!);
      const n = 1 + Math.floor(r() * 8);
      const nodes: PlacementNode[] = Array.from({ length: n }, (_, i) => ({
        name: `n${i}`,
        budgetBytes: Math.floor(r() * 200 * GiB),
        bandwidthBytesPerSecond: (50 + Math.floor(r() * 800)) * GB,
      }));
      const ctx = [512, 4096, 8192, 32768][Math.floor(r() * 4)]!;
      const plan = planPlacement(p, nodes, { ctx });
      expect(planPlacement(p, nodes, { ctx })).toEqual(plan);
      if (!plan.fits) {
        expect(plan.shortfall).toBeDefined();
        continue;
      }
      fits++;
      expectCoverage(plan, p.layerCount);
      const mm = memoryModel(p, { ...DEFAULT_PLACEMENT_OPTIONS, ctx });
      for (const s of plan.stages) {
        expect(s.bytes.total).toBeLessThanOrEqual(s.budgetBytes);
        expect(s.bytes).toEqual(stageBytes(mm, s.firstLayer, s.lastLayer, s.role === 'head', plan.stages.length > 1));
      }
    }
    expect(fits).toBeGreaterThan(50);
  });

  it.each([
    ['decode', 0],
    ['ttft', 2048],
    ['balanced', 512],
    ['balanced', 2048],
  ] as const)('matches exhaustive search on small cases (optimal under the cost model, objective %s)', (objective, promptTokens) => {
    const r = uniformSource(7);
    const p = profile('llama-3-8b', 'q8_0');
    const L = p.layerCount;
    const mm = memoryModel(p, { ...DEFAULT_PLACEMENT_OPTIONS });
    const o = { ...DEFAULT_PLACEMENT_OPTIONS, objective, promptTokens };
    const { wd, wt } = objectiveWeights(o);
    const flops = layerPrefillFlops(p, promptTokens);
    const headRead = p.outputBytes + p.outputNormBytes + p.otherBytes + p.tokenEmbdRowBytes;
    for (let trial = 0; trial < 30; trial++) {
      const n = 1 + Math.floor(r() * 3);
      const nodes: PlacementNode[] = Array.from({ length: n }, (_, i) => ({
        name: `n${i}`,
        budgetBytes: Math.floor((0.2 + r()) * 6 * GiB),
        bandwidthBytesPerSecond: (50 + Math.floor(r() * 800)) * GB,
        prefillFlopsPerSecond: (1 + r() * 30) * 1e12,
        linkBytesPerSecond: (0.1 + r() * 2) * GB,
        // Odd nodes measured their fixed seconds per token as the head (0–8 ms), even ones charge the default.
        ...(i % 2 === 1 ? { decodeFixedSecondsPerToken: (trial % 5) * 2e-3 } : {}),
        // Every third node measured what a boundary with it as the worker costs beyond the link (0–3 ms).
        ...(i % 3 === 2 || trial % 3 === 0 ? { boundaryOverheadSeconds: (trial % 4) * 1e-3 } : {}),
      }));
      // Every other trial: some pairs measured (links.ts), so a worker's hop depends on the head.
      const measured = trial % 2 === 1;
      const linked: PlacementNode[] = nodes.map((nd) => {
        if (!measured) return nd;
        const links = Object.fromEntries(nodes.filter((x) => x.name !== nd.name && r() < 0.7).map((x) => [x.name, { rttSeconds: r() * 5e-3, bytesPerSecond: (0.05 + r() * 2) * GB }]));
        return { ...nd, links };
      });
      // Half the trials price llama.cpp's default host prompt cache, half Orchard's engines (--cache-ram 0).
      const hostPromptCache = Math.floor(trial / 2) % 2 === 0;
      const plan = planPlacement(p, linked, { objective, promptTokens, hostPromptCache });
      // Brute force: every ordered subset and every contiguous split, costed from first principles.
      let best = Number.POSITIVE_INFINITY;
      const perms = (items: number[]): number[][] =>
        items.length <= 1 ? [items] : items.flatMap((x, i) => perms([...items.slice(0, i), ...items.slice(i + 1)]).map((rest) => [x, ...rest]));
      const subsets: number[][] = [];
      for (let mask = 1; mask < 1 << n; mask++) subsets.push([...Array(n).keys()].filter((i) => mask & (1 << i)));
      const U = Math.ceil(promptTokens / o.ubatch);
      // What else llama.cpp RPC sends a worker (rpc-wire.ts), from the engine's facts: an f16 mask of
      // tokens × n_kv (used cells padded to 256) and 20 B per token, per decoded token and per ubatch;
      // a new graph per ubatch here (n_kv grows by 512 each): 12 + 5 × 296 B per stage and
      // 31 × 8 + 42 × 296 B per layer; before the prompt, the previous like request's K and V
      // (P + 255 output − 1 cells × 2 × 1024 f16 per layer) in two round trips per layer.
      const nKv = (used: number) => Math.min(o.ctx, Math.max(256, Math.ceil(used / 256) * 256));
      const tokenInputs = 2 * nKv(o.kvFill * o.ctx) + 20;
      let promptInputs = 20 * promptTokens + U * (12 + 5 * 296);
      for (let s = 0; s < promptTokens; s += o.ubatch) promptInputs += 2 * Math.min(o.ubatch, promptTokens - s) * nKv(Math.min(promptTokens, s + o.ubatch));
      const graphPerLayer = U * (31 * 8 + 42 * 296);
      const savePerLayer = hostPromptCache ? (promptTokens + o.outputTokens - 1) * 2 * 1024 * 2 : 0;
      const costOf = (order: number[], bounds: number[]): number | undefined => {
        const headFixed = linked[order.at(-1)!]!.decodeFixedSecondsPerToken ?? o.headOverheadSeconds;
        let decode = headFixed;
        let save = 0;
        // Prefill: the workers' compute and boundaries (chain), the head's layers (last), its logits (once).
        let chain = 0;
        let last = 0;
        let once = 0;
        let first = 0;
        for (let s = 0; s < order.length; s++) {
          const end = bounds[s]!;
          const head = s === order.length - 1;
          const node = linked[order[s]!]!;
          const bytes = stageBytes(mm, first, end - 1, head, order.length > 1);
          // The planner sizes every stage's compute buffer for its widest layer, an empty head too.
          const compute = end === first ? stageBytes(mm, L - 1, L - 1, head, order.length > 1).compute : bytes.compute;
          if (bytes.total - bytes.compute + compute > node.budgetBytes || (!head && end === first)) return undefined;
          let read = 0;
          let f = 0;
          for (let l = first; l < end; l++) {
            read += mm.layerRead[l]!;
            f += promptTokens * flops[l]!;
          }
          if (head && promptTokens > 0) once = (2 * p.embd * p.vocab) / node.prefillFlopsPerSecond!;
          decode += (read + (head ? headRead : 0)) / node.bandwidthBytesPerSecond;
          if (head) last = f / node.prefillFlopsPerSecond!;
          else chain += f / node.prefillFlopsPerSecond!;
          if (!head) {
            // activations cross twice (the head relays each worker stage's input and output), on the link to the head
            const link = node.links?.[linked[order[order.length - 1]!]!.name];
            // a round trip also pays the worker's tunnel and split overhead (0 where not measured)
            const rtt = (link?.rttSeconds ?? o.hopSeconds) + (node.boundaryOverheadSeconds ?? 0);
            const rate = link?.bytesPerSecond ?? node.linkBytesPerSecond!;
            decode += rtt + (2 * p.embd * 4 + tokenInputs) / rate;
            if (promptTokens > 0) {
              chain += U * rtt + (2 * promptTokens * p.embd * 4 + promptInputs + (end - first) * graphPerLayer) / rate;
              if (hostPromptCache) save += (end - first) * (savePerLayer / rate + 2 * rtt);
            }
          }
          first = end;
        }
        // llama.cpp overlaps ubatch i + 1's chain with the last stage's ubatch i: (A + c + (U − 1)·max(A, c)) per ubatch.
        const prefill = order.length > 1 && U > 1 ? (chain + last + (U - 1) * Math.max(chain, last)) / U : chain + last;
        const ttft = promptTokens > 0 ? headFixed + save + prefill + once : 0;
        return wd * decode + wt * ttft;
      };
      for (const sub of subsets) {
        for (const order of perms(sub)) {
          const cuts = (start: number, idx: number, acc: number[]): void => {
            if (idx === order.length - 1) {
              const c = costOf(order, [...acc, L]);
              if (c !== undefined) best = Math.min(best, c);
              return;
            }
            for (let c = start; c <= L; c++) cuts(c, idx + 1, [...acc, c]);
          };
          cuts(1, 0, []);
        }
      }
      if (!Number.isFinite(best)) {
        expect(plan.fits).toBe(false);
      } else {
        expect(plan.fits).toBe(true);
        // The DP bounds stage memory with the widest layer's compute buffer; for uniform
        // layers that equals the exact figure, so the optimum must match.
        expect((wd * plan.predicted.secondsPerToken + wt * plan.predicted.ttftSeconds) / best).toBeCloseTo(1, 9);
      }
    }
  });
});
