import { createHash } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EventRing, membershipEvent, type ModelSighting, modelTransitions } from '../../src/coordinator/api/console/events.ts';
import { histogramQuantile, tokensPerSecondFromItl, usedByEngines } from '../../src/coordinator/api/console/snapshot.ts';
import { CONSOLE_PREFIX, ConsoleAssets } from '../../src/coordinator/api/console/static.ts';
import type { ModelStatus } from '../../src/coordinator/instances/runtime.ts';
import type { NodeEntry } from '../../src/coordinator/membership/registry.ts';

describe('console: histogram quantile', () => {
  it('interpolates inside the bucket that holds the rank (as histogram_quantile)', () => {
    // 10 observations: 4 ≤ 0.1, 8 ≤ 0.5, 10 ≤ 1.
    const b = [
      { le: 0.1, count: 4 },
      { le: 0.5, count: 8 },
      { le: 1, count: 10 },
      { le: Number.POSITIVE_INFINITY, count: 10 },
    ];
    expect(histogramQuantile(0.5, b)).toBeCloseTo(0.1 + (0.4 * 1) / 4);
    expect(histogramQuantile(0.2, b)).toBeCloseTo(0.05);
    expect(histogramQuantile(1, b)).toBeCloseTo(1);
  });
  it('is null without observations and the highest finite bound when the rank is in +Inf', () => {
    expect(histogramQuantile(0.5, [{ le: 1, count: 0 }, { le: Number.POSITIVE_INFINITY, count: 0 }])).toBeNull();
    expect(histogramQuantile(0.5, [{ le: 1, count: 0 }, { le: Number.POSITIVE_INFINITY, count: 3 }])).toBe(1);
  });
  it('decode speed is the inverse of the mean inter-token latency', () => {
    expect(tokensPerSecondFromItl(2, 50)).toBe(25);
    expect(tokensPerSecondFromItl(0, 0)).toBeNull();
  });
});

const stage = (nodeId: string, total: number) => ({ nodeId, nodeName: nodeId, firstLayer: 0, lastLayer: 1, bytes: { weights: total, kv: 0, compute: 0, overhead: 0, total }, budgetBytes: total, endpoint: '' });
const model = (name: string, state: ModelStatus['state'], stages: ReturnType<typeof stage>[]): ModelStatus =>
  ({ name, path: `/m/${name}.gguf`, state, engine: 'llama', stages, error: '', predictedTokensPerSecond: 1, options: { ctx: 16, cacheType: 'f16', parallel: 1, pin: [], parallelism: 'auto' } }) as ModelStatus;

describe('console: used by engines', () => {
  it('sums planned stage totals per node, leaving failed models out', () => {
    const used = usedByEngines([model('a', 'ready', [stage('n1', 100), stage('n2', 50)]), model('b', 'loading', [stage('n1', 7)]), model('c', 'failed', [stage('n2', 1000)])]);
    expect(Object.fromEntries(used)).toEqual({ n1: 107, n2: 50 });
  });
});

describe('console: events', () => {
  it('the ring keeps the newest events up to its capacity, numbered', () => {
    const r = new EventRing(3);
    for (let i = 0; i < 5; i++) r.push({ kind: 'node-joined', level: 'info', subject: `n${i}`, message: `m${i}` }, i);
    expect(r.list().map((e) => [e.seq, e.subject])).toEqual([
      [3, 'n2'],
      [4, 'n3'],
      [5, 'n4'],
    ]);
    expect(r.list(4).map((e) => e.seq)).toEqual([5]);
    expect(() => new EventRing(0)).toThrow(RangeError);
  });

  it('model transitions: load started, ready, failed with the reason, a load that vanished, unloaded', () => {
    const m = (entries: [string, ModelSighting['state'], string?][]) => new Map(entries.map(([name, state, error]) => [name, { name, state, error: error ?? '' }]));
    expect(modelTransitions(m([]), m([['a', 'loading']])).map((e) => e.kind)).toEqual(['load-started']);
    expect(modelTransitions(m([['a', 'loading']]), m([['a', 'ready']])).map((e) => e.kind)).toEqual(['model-ready']);
    const failed = modelTransitions(m([['a', 'ready']]), m([['a', 'failed', 'node x is unavailable']]));
    expect(failed).toEqual([{ kind: 'model-failed', level: 'error', subject: 'a', message: 'a failed: node x is unavailable' }]);
    expect(modelTransitions(m([['a', 'loading']]), m([])).map((e) => e.kind)).toEqual(['load-ended']);
    expect(modelTransitions(m([['a', 'ready']]), m([])).map((e) => e.kind)).toEqual(['model-unloaded']);
    expect(modelTransitions(m([['a', 'ready']]), m([['a', 'ready']]))).toEqual([]);
  });

  it('membership changes name the node and, for a state change, the reason', () => {
    const node = { nodeId: 'id1', address: '10.0.0.2:50151', profile: { name: 'studio', chip: 'Apple M2 Ultra' } } as unknown as NodeEntry;
    expect(membershipEvent({ kind: 'added', node }).message).toBe('studio joined (Apple M2 Ultra, 10.0.0.2:50151)');
    const down = membershipEvent({ kind: 'state', node, from: 'up', to: 'down', reason: 'watch stream ended' });
    expect(down).toEqual({ kind: 'node-state', level: 'error', subject: 'studio', message: 'studio up → down: watch stream ended' });
  });
});

describe('console: static assets', () => {
  let server: Server;
  let base = '';
  beforeAll(async () => {
    const assets = new ConsoleAssets();
    server = createServer((req, res) => void assets.serve(req, res, (req.url ?? '/').split('?')[0]!));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const a = server.address();
    base = `http://127.0.0.1:${typeof a === 'object' && a ? a.port : 0}`;
  });
  afterAll(() => new Promise<void>((r) => server.close(() => r())));

  it('serves the page with a CSP that allows exactly its import map, and the modules as JavaScript', async () => {
    const page = await fetch(`${base}/`);
    expect(page.headers.get('content-type')).toBe('text/html; charset=utf-8');
    const html = await page.text();
    const map = /<script type="importmap">([\s\S]*?)<\/script>/.exec(html)![1]!;
    const hash = createHash('sha256').update(map).digest('base64');
    expect(page.headers.get('content-security-policy')).toContain(`script-src 'self' 'sha256-${hash}'`);
    for (const url of Object.values((JSON.parse(map) as { imports: Record<string, string> }).imports)) {
      const r = await fetch(`${base}${url}`);
      expect(r.status, url).toBe(200);
      expect(r.headers.get('content-type')).toBe('text/javascript; charset=utf-8');
    }
    // Everything the page links and every relative import of its modules is served.
    const wanted = new Set([...html.matchAll(/(?:href|src)="(\/console\/[^"]+)"/g)].map((m) => m[1]!));
    for (const url of [...wanted]) {
      const r = await fetch(`${base}${url}`);
      expect(r.status, url).toBe(200);
      if (url.endsWith('.js')) for (const m of (await r.text()).matchAll(/from '\.\/([^']+)'/g)) wanted.add(`${CONSOLE_PREFIX}${m[1]}`);
    }
    for (const url of wanted) expect((await fetch(`${base}${url}`)).status, url).toBe(200);
    expect(wanted.size).toBeGreaterThan(10);
  });

  it('revalidates with the ETag (304) and answers 404 for anything it does not ship', async () => {
    const first = await fetch(`${base}${CONSOLE_PREFIX}style.css`);
    expect(first.headers.get('cache-control')).toBe('no-cache');
    const etag = first.headers.get('etag')!;
    expect((await fetch(`${base}${CONSOLE_PREFIX}style.css`, { headers: { 'if-none-match': etag } })).status).toBe(304);
    expect((await fetch(`${base}${CONSOLE_PREFIX}../../package.json`)).status).toBe(404);
    expect((await fetch(`${base}${CONSOLE_PREFIX}nope.js`)).status).toBe(404);
  });
});
