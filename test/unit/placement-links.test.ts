import { describe, expect, it } from 'vitest';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { presetHeader } from '../../src/shared/model/shapes.ts';
import { boundarySeconds } from '../../src/shared/placement/cost.ts';
import { LinkMatrix, linksByName } from '../../src/shared/placement/links.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { DEFAULT_PLACEMENT_OPTIONS, type PlacementNode } from '../../src/shared/placement/types.ts';

const GB = 1e9;
const GiB = 2 ** 30;
const m = (from: string, to: string, rttSeconds: number, bytesPerSecond: number, at = 100, error?: string) => ({
  from,
  to,
  rttSeconds,
  bytesPerSecond,
  measuredAtSeconds: at,
  ...(error ? { error } : {}),
});

describe('link matrix', () => {
  it('a boundary uses the slower direction and the longer round trip; one measured direction is enough', () => {
    const x = new LinkMatrix();
    expect(x.between('a', 'b')).toBeUndefined();
    x.record(m('a', 'b', 0.002, 1e8));
    expect(x.between('b', 'a')).toEqual({ rttSeconds: 0.002, bytesPerSecond: 1e8 });
    x.record(m('b', 'a', 0.003, 2e8));
    expect(x.between('a', 'b')).toEqual({ rttSeconds: 0.003, bytesPerSecond: 1e8 });
  });

  it('a failed probe keeps the last good numbers and is retried sooner than a good one is renewed', () => {
    const x = new LinkMatrix();
    x.record(m('a', 'b', 0.001, 1e9, 100));
    x.record(m('a', 'b', 0, 0, 200, 'session closed'));
    expect(x.get('a', 'b')).toMatchObject({ rttSeconds: 0.001, bytesPerSecond: 1e9, error: 'session closed', measuredAtSeconds: 100 });
    expect(x.between('a', 'b')).toEqual({ rttSeconds: 0.001, bytesPerSecond: 1e9 });
    // never-measured pairs are due at once; a good sample after maxAge; a failure after retrySeconds
    x.record(m('b', 'a', 0, 0, 200, 'refused'));
    x.record(m('a', 'c', 0.001, 1e9, 200));
    expect(x.due(['a', 'b', 'c'], 210, 600, 30).sort()).toEqual([['b', 'c'], ['c', 'a'], ['c', 'b']]);
    expect(x.due(['a', 'b', 'c'], 240, 600, 30)).toContainEqual(['b', 'a']);
    expect(x.due(['a', 'c'], 850, 600, 30)).toEqual([['a', 'c'], ['c', 'a']]);
  });

  it('forgets every link of a node that left, and lists links in a stable order', () => {
    const x = new LinkMatrix();
    for (const [f, t] of [['b', 'a'], ['a', 'c'], ['a', 'b'], ['c', 'a']] as const) x.record(m(f, t, 0.001, 1e9));
    expect(x.list().map((l) => `${l.from}>${l.to}`)).toEqual(['a>b', 'a>c', 'b>a', 'c>a']);
    x.forget('c');
    expect(x.list().map((l) => `${l.from}>${l.to}`)).toEqual(['a>b', 'b>a']);
  });

  it('maps ids to planner names, with only measured pairs', () => {
    const x = new LinkMatrix();
    x.record(m('id-a', 'id-b', 0.004, 5e8));
    const rows = linksByName(x, new Map([['alpha', 'id-a'], ['bravo', 'id-b'], ['charlie', 'id-c']]));
    expect(rows.get('alpha')).toEqual({ bravo: { rttSeconds: 0.004, bytesPerSecond: 5e8 } });
    expect(rows.get('bravo')).toEqual({ alpha: { rttSeconds: 0.004, bytesPerSecond: 5e8 } });
    expect(rows.get('charlie')).toEqual({});
  });
});

describe('measured links in the cost model', () => {
  const p = modelProfile(presetHeader('llama-3-70b', 'q4_k_m'));
  const o = { ...DEFAULT_PLACEMENT_OPTIONS, promptTokens: 4096 };

  it('a worker boundary costs its measured link to the head: rtt + 2 activation crossings + llama.cpp inputs, per token and per prompt', () => {
    const worker: PlacementNode = { name: 'w', budgetBytes: GiB, bandwidthBytesPerSecond: GB, links: { h: { rttSeconds: 0.0005, bytesPerSecond: 117e6 } } };
    const row = p.embd * 4;
    // a decoded token also sends the f16 mask over half the 4096 cells (kvFill) + 20 B of positions and cell indices
    const tokenInputs = 2 * 2048 + 20;
    // a 4096-token prompt: 8 ubatches of 512 over 512, 1024 … 4096 cells, each a new graph (12 + 5 × 296 B per stage)
    let promptInputs = 20 * 4096 + 8 * (12 + 5 * 296);
    for (let u = 1; u <= 8; u++) promptInputs += 2 * 512 * (512 * u);
    const b = boundarySeconds(p, worker, o, 'h');
    expect(b.decode).toBeCloseTo(0.0005 + (2 * row + tokenInputs) / 117e6, 12);
    expect(b.prefill).toBeCloseTo(Math.ceil(4096 / o.ubatch) * 0.0005 + (2 * 4096 * row + promptInputs) / 117e6, 12);
    // 4k tokens on dim 8192 over 1 GbE: over 2 s per hop (~1.1 s per direction, as the issue reckons)
    expect(b.prefill).toBeGreaterThan(2);
    // without a measurement toward that head: the node's or the options' assumed figures
    expect(boundarySeconds(p, worker, o, 'other').decode).toBeCloseTo(o.hopSeconds + (2 * row + tokenInputs) / o.linkBytesPerSecond, 12);
    // an MLX rank gets the activations alone
    const mlx = { ...o, engine: 'mlx' as const, activationCrossings: 1 };
    expect(boundarySeconds(p, worker, mlx, 'h').decode).toBeCloseTo(0.0005 + row / 117e6, 12);
    expect(boundarySeconds(p, worker, mlx, 'h').prefill).toBeCloseTo(8 * 0.0005 + (4096 * row) / 117e6, 12);
  });

  it('the planner picks the head with the fast link and charges what was measured', () => {
    // Three nodes, the model needs two. alpha–bravo is 10 GbE-like, charlie hangs off 1 GbE.
    const base = { budgetBytes: 30 * GiB, bandwidthBytesPerSecond: 400 * GB, prefillFlopsPerSecond: 20e12 };
    const slow = { rttSeconds: 0.002, bytesPerSecond: 0.11 * GB };
    const fast = { rttSeconds: 0.0002, bytesPerSecond: 1.1 * GB };
    const nodes: PlacementNode[] = [
      // charlie reads memory a little faster: on assumed links it would be in the plan
      { name: 'charlie', ...base, bandwidthBytesPerSecond: 420 * GB, links: { alpha: slow, bravo: slow } },
      { name: 'alpha', ...base, links: { bravo: fast, charlie: slow } },
      { name: 'bravo', ...base, links: { alpha: fast, charlie: slow } },
    ];
    const opts = { promptTokens: 1024, objective: 'balanced' } as const;
    const assumed = planPlacement(p, nodes.map(({ links: _, ...n }) => n), opts);
    expect(assumed.stages.map((s) => s.node)).toContain('charlie');
    const plan = planPlacement(p, nodes, opts);
    expect(plan.fits).toBe(true);
    expect(plan.stages.map((s) => s.node).sort()).toEqual(['alpha', 'bravo']);
    // 2 activation rows + the f16 mask over half the 4096 cells + 20 B of positions and cell indices
    const row = 2 * p.embd * 4 + 2 * 2048 + 20;
    expect(plan.predicted.hopSeconds).toBeCloseTo(fast.rttSeconds + row / fast.bytesPerSecond, 12);
    // every link equally slow: charlie's faster memory wins again, and the hop is the slow link's
    const allSlow = nodes.map((n) => ({ ...n, links: Object.fromEntries(Object.keys(n.links!).map((k) => [k, slow])) }));
    const slowPlan = planPlacement(p, allSlow, opts);
    expect(slowPlan.stages.map((s) => s.node)).toContain('charlie');
    expect(slowPlan.predicted.hopSeconds).toBeCloseTo(slow.rttSeconds + row / slow.bytesPerSecond, 12);
  });
});
