import { createServer, request, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Membership } from '../../src/coordinator/membership/membership.ts';
import { CoordinatorMetrics, observeGeneration, refusalOutcome } from '../../src/coordinator/api/metrics.ts';
import { apiKeyGuard } from '../../src/coordinator/api/guard.ts';
import { installApi, requestedModelOf } from '../../src/coordinator/api/openai/api.ts';
import { HttpRouter } from '../../src/coordinator/api/router.ts';
import type { GenerateEvent, GenerateRequest, ModelStatus, Runtime } from '../../src/coordinator/instances/runtime.ts';
import { createLogger } from '../../src/shared/log.ts';

/**
 * Generation requests the OpenAI layer refuses before the runtime are counted in
 * orchard_requests_total through the real CoordinatorMetrics; requests that reach the runtime are
 * counted there (observeGeneration, as MeteredRuntime does) and never a second time.
 */

describe('refusalOutcome / requestedModelOf', () => {
  it('maps refusal statuses to bounded outcomes', () => {
    expect(refusalOutcome(400)).toBe('invalid');
    expect(refusalOutcome(422)).toBe('invalid');
    expect(refusalOutcome(401)).toBe('unauthorized');
    expect(refusalOutcome(404)).toBe('not_found');
    expect(refusalOutcome(413)).toBe('too_large');
    expect(refusalOutcome(503)).toBe('rejected');
    expect(refusalOutcome(429)).toBe('rejected');
    expect(refusalOutcome(500)).toBe('error');
  });
  it('reads the model a body names', () => {
    expect(requestedModelOf({ model: 'm8' })).toBe('m8');
    expect(requestedModelOf({ prompt: 'x' })).toBe('');
    expect(requestedModelOf({ model: 42 })).toBeUndefined();
    expect(requestedModelOf([1])).toBeUndefined();
    expect(requestedModelOf('text')).toBeUndefined();
    expect(requestedModelOf(null)).toBeUndefined();
  });
});

const log = createLogger('test', 'silent');
const KEY = 'sekret';
const MAX_BODY = 4096;

function readyModel(name: string, state: ModelStatus['state'] = 'ready'): ModelStatus {
  return { name, path: `/m/${name}.gguf`, state, engine: 'llama', stages: [], error: '', predictedTokensPerSecond: 0, options: { ctx: 512, cacheType: 'f16', parallel: 1, pin: [], parallelism: 'auto' } };
}

describe('installApi onRefused → orchard_requests_total (the router guard\'s 401 included)', () => {
  let server: Server;
  let base: string;
  let membership: Membership;
  let metrics: CoordinatorMetrics;
  const models = [readyModel('m8'), readyModel('warming', 'loading')];
  const refusals: [string | undefined, number][] = [];

  beforeAll(async () => {
    membership = new Membership({ suspectAfterMs: 2000, downAfterMs: 5000 }, log);
    // The runtime part the API uses: models for limits, generate as a metered two-token stream.
    const runtime = {
      models: () => models,
      model: (n: string) => models.find((m) => m.name === n),
      slotUsage: () => [],
      generate(req: GenerateRequest): AsyncIterable<GenerateEvent> {
        async function* stream(): AsyncGenerator<GenerateEvent> {
          yield { kind: 'token', text: 'hi', tokenIds: [1] };
          yield { kind: 'done', finishReason: 'length', promptTokens: 1, completionTokens: 1, timings: { promptMs: 1, predictedMs: 1, promptTokensPerSecond: 1, predictedTokensPerSecond: 1, firstTokenMs: 1 } };
        }
        return observeGeneration(metrics.metrics, req.model ?? '', stream());
      },
    } as unknown as Runtime;
    metrics = new CoordinatorMetrics({ version: '1', membership, processMetrics: false, runtime: () => runtime });
    const router = new HttpRouter(apiKeyGuard(KEY), log);
    installApi(
      router,
      {
        runtime,
        membership,
        clusterId: 'c0ffee00',
        log,
        onRefused: (m, s) => {
          refusals.push([m, s]);
          metrics.refused(m, s);
        },
      },
      { maxBodyBytes: MAX_BODY },
    );
    server = createServer(router.handle);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
    membership.close();
  });

  const post = (path: string, body: string, key: string | null = KEY): Promise<number> =>
    new Promise((resolve, reject) => {
      const headers: Record<string, string> = { 'content-type': 'application/json' };
      if (key !== null) headers.authorization = `Bearer ${key}`;
      const req = request(`${base}${path}`, { method: 'POST', headers }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('error', reject);
      req.end(body);
    });
  const count = async (model: string, outcome: string): Promise<number> => {
    const m = (await metrics.registry.getSingleMetric('orchard_requests_total')?.get())?.values.find((v) => v.labels.model === model && v.labels.outcome === outcome);
    return m?.value ?? 0;
  };

  it('counts each refusal with its outcome and a bounded model label, and an accepted request once', async () => {
    const chat = '/v1/chat/completions';
    const ok = JSON.stringify({ model: 'm8', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 });
    expect(await post(chat, ok, null)).toBe(401);
    expect(await post(chat, ok, 'wrong')).toBe(401);
    expect(await post(chat, '{"model": "m8", ')).toBe(400);
    expect(await post('/v1/completions', JSON.stringify({ model: 'no-such-model-xyz', prompt: 'x' }))).toBe(404);
    expect(await post(chat, JSON.stringify({ model: 'm8', messages: [{ role: 'user', content: 'hi' }], max_tokens: 100_000 }))).toBe(400);
    expect(await post(chat, JSON.stringify({ model: 'm8', messages: [{ role: 'user', content: 'x'.repeat(MAX_BODY) }] }))).toBe(413);
    expect(await post(chat, JSON.stringify({ model: 'warming', messages: [{ role: 'user', content: 'hi' }] }))).toBe(503);
    expect(await post(chat, ok)).toBe(200);

    expect(await count('', 'unauthorized')).toBe(2);
    expect(await count('', 'invalid')).toBe(1); // not JSON: no model known
    expect(await count('m8', 'invalid')).toBe(1); // over the context of a model that exists
    expect(await count('', 'not_found')).toBe(1); // the unknown name never becomes a label
    expect(await count('', 'too_large')).toBe(1);
    expect(await count('warming', 'rejected')).toBe(1);
    expect(await count('m8', 'ok')).toBe(1);
    const text = await metrics.registry.metrics();
    expect(text).not.toContain('no-such-model-xyz');
    // The accepted request reached the runtime: counted there, not by the refusal hook.
    expect(refusals.map(([, s]) => s)).toEqual([401, 401, 400, 404, 400, 413, 503]);
  });

  it('does not count non-generation routes', async () => {
    const before = refusals.length;
    const status = await new Promise<number>((resolve, reject) => {
      const req = request(`${base}/v1/models`, { method: 'GET' }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('error', reject);
      req.end();
    });
    expect(status).toBe(401);
    expect(refusals.length).toBe(before);
  });
});
