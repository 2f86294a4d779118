import { describe, expect, it } from 'vitest';
import { UsageError } from '../../src/shared/errors.ts';
import { allReduceBytesPerToken, allReduceLink, chooseParallelism, parallelismCosts, parseParallelism, ringLinks, tensorDivisibility } from '../../src/shared/placement/parallelism.ts';

// A small MLX-like model: 16 layers, 8 heads / 4 KV heads, hidden 512.
const profile = { heads: 8, kvHeads: new Array<number>(16).fill(4), moe: undefined, ffn: 1024, layerCount: 16, embd: 512 };
const base = { ranks: 2, profile, readBytesPerToken: 8e9, bandwidthBytesPerSecond: 400e9, linkBytesPerSecond: 1.25e9, linkSource: 'assumed: test link' };

describe('MLX parallelism: pipeline or tensor', () => {
  it('auto picks pipeline on a link with a millisecond round trip and says why with both predictions', () => {
    const c = chooseParallelism({ ...base, requested: 'auto', linkSeconds: 1e-3 });
    expect(c.mode).toBe('pipeline');
    // 2 × 16 layers × 512 f32 × the ring's 2(n−1)/n = 1 share: 64 KiB per token.
    expect(c.reason).toMatch(/^auto: pipeline, predicted [\d.]+ ms\/token pipeline vs [\d.]+ ms\/token tensor \(32 all-reduces, 64\.0 KiB per token, at 1\.00 ms per link round trip, assumed: test link\)$/);
  });

  it('per-token all-reduce bytes grow with layers and width, and towards twice the hidden state per all-reduce with more ranks', () => {
    expect(allReduceBytesPerToken(profile, 2)).toBe(2 * 16 * 4 * 512);
    expect(allReduceBytesPerToken(profile, 4)).toBe(2 * 16 * 4 * 512 * 1.5);
    // Loopback-with-latency: at 1 ms per round trip the 32 round trips alone outweigh reading the
    // whole 8 GB at 400 GB/s (20 ms) only when the model is small; the payload counts at 1.25 GB/s.
    const small = { ...base, readBytesPerToken: 0.5e9, requested: 'auto' as const, linkSeconds: 1e-3 };
    const c = parallelismCosts(small);
    expect(c.tensor - c.pipeline).toBeCloseTo(32e-3 - 1e-3 + allReduceBytesPerToken(profile, 2) / 1.25e9 - 0.5e9 / 400e9 / 2, 9);
    expect(chooseParallelism(small).mode).toBe('pipeline');
  });

  it('auto picks tensor on an RDMA-class link, where halving the bytes read wins', () => {
    const c = chooseParallelism({ ...base, requested: 'auto', linkSeconds: 10e-6, linkBytesPerSecond: 10e9 });
    const costs = parallelismCosts({ ...base, requested: 'auto', linkSeconds: 10e-6, linkBytesPerSecond: 10e9 });
    expect(costs.tensor).toBeLessThan(costs.pipeline);
    expect(c.mode).toBe('tensor');
  });

  it('divisibility: heads, KV heads, experts and intermediate size must divide by the rank count', () => {
    expect(tensorDivisibility(profile, 2)).toEqual([]);
    const odd = { ...profile, heads: 12, kvHeads: new Array<number>(16).fill(3), moe: { experts: 10, expertsUsed: 2, expertFfn: 64, shared: 0 }, ffn: 1000 };
    // 12 heads and intermediate 1000 divide by 4; 3 KV heads and 10 experts do not.
    expect(tensorDivisibility(odd, 4)).toEqual(['3 KV heads are not divisible by 4 ranks', '10 experts are not divisible by 4 ranks']);
    expect(tensorDivisibility(odd, 3)).toEqual(['10 experts are not divisible by 3 ranks', 'intermediate size 1000 is not divisible by 3 ranks']);
    // An explicit tensor request that breaks a rule is refused naming it; auto falls back to pipeline.
    expect(() => chooseParallelism({ ...base, profile: odd, ranks: 4, requested: 'tensor', linkSeconds: 1e-6 })).toThrow(UsageError);
    expect(() => chooseParallelism({ ...base, profile: odd, ranks: 4, requested: 'tensor', linkSeconds: 1e-6 })).toThrow(/3 KV heads are not divisible by 4 ranks/);
    const auto = chooseParallelism({ ...base, profile: odd, ranks: 4, requested: 'auto', linkSeconds: 1e-6 });
    expect(auto.mode).toBe('pipeline');
    expect(auto.reason).toMatch(/tensor parallel is impossible \(3 KV heads/);
  });

  it('explicit requests are honoured; one rank is never split; the flag is validated', () => {
    expect(chooseParallelism({ ...base, requested: 'tensor', linkSeconds: 1 }).mode).toBe('tensor');
    expect(chooseParallelism({ ...base, requested: 'pipeline', linkSeconds: 0 }).mode).toBe('pipeline');
    expect(chooseParallelism({ ...base, ranks: 1, requested: 'tensor', linkSeconds: 0 }).reason).toMatch(/one rank/);
    expect(parseParallelism('')).toBe('auto');
    expect(parseParallelism('tensor')).toBe('tensor');
    expect(() => parseParallelism('data')).toThrow(/pipeline, tensor or auto/);
  });
});

describe('auto decides from the measured links', () => {
  const fast = { rttSeconds: 20e-6, bytesPerSecond: 5e9 };
  const slow = { rttSeconds: 30e-3, bytesPerSecond: 50e6 };
  const measured = (m: Record<string, { rttSeconds: number; bytesPerSecond: number }>) => (a: string, b: string) => m[`${a}-${b}`];

  it('the ring links are each rank to the next and the last back to the first (2 ranks: one link)', () => {
    expect(ringLinks(['a', 'b'], measured({ 'a-b': fast })).map((l) => [l.from, l.to, l.measured])).toEqual([['a', 'b', fast]]);
    expect(ringLinks(['a', 'b', 'c'], () => undefined).map((l) => `${l.from}-${l.to}`)).toEqual(['a-b', 'b-c', 'c-a']);
    expect(ringLinks(['a'], () => fast)).toEqual([]);
  });

  it('the slowest measured ring link decides: same model and nodes, tensor on a fast link, pipeline once one link has latency, with the reason naming it', () => {
    const decide = (m: Record<string, { rttSeconds: number; bytesPerSecond: number }>) => chooseParallelism({ ...base, requested: 'auto', ...allReduceLink('ring', ringLinks(['a', 'b', 'c', 'd'], measured(m))) });
    const allFast = { 'a-b': fast, 'b-c': fast, 'c-d': fast, 'd-a': fast };
    const t = decide(allFast);
    expect(t.mode).toBe('tensor');
    expect(t.reason).toMatch(/at 0\.02 ms per link round trip, measured: slowest ring link a↔b, 5000 MB\/s lowest throughput\)$/);
    const p = decide({ ...allFast, 'c-d': slow });
    expect(p.mode).toBe('pipeline');
    expect(p.reason).toMatch(/^auto: pipeline, .* at 30\.00 ms per link round trip, measured: slowest ring link c↔d, 50 MB\/s lowest throughput\)$/);
  });

  it('an unmeasured ring link is an assumption and says so; JACCL is always assumed (its links bypass the probed tunnels)', () => {
    const l = allReduceLink('ring', ringLinks(['a', 'b', 'c'], measured({ 'a-b': fast, 'b-c': fast })));
    expect(l.linkSeconds).toBe(1e-3);
    expect(l.linkSource).toBe("assumed: the planner's hop cost for a TCP ring; not measured yet: c↔a");
    expect(allReduceLink('jaccl', ringLinks(['a', 'b'], measured({ 'a-b': slow })))).toMatchObject({ linkSeconds: 10e-6, linkSource: expect.stringMatching(/^assumed: JACCL/) });
    expect(allReduceLink('none', []).linkSource).toBe('one host');
  });
});
