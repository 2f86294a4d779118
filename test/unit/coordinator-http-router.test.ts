import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { apiKeyGuard, PUBLIC_ROUTES } from '../../src/coordinator/api/guard.ts';
import { HttpRouter, type RouteInfo } from '../../src/coordinator/api/router.ts';
import { type CoordinatorHandle, startCoordinator } from '../../src/coordinator/coordinator.ts';
import { createLogger } from '../../src/shared/log.ts';
import { serveMetrics } from '../../src/shared/metrics/http.ts';

/**
 * The coordinator's HTTP router guards every route it has, whoever added it and whenever: a
 * real coordinator on 127.0.0.1 with an API key, every route it lists asked without a key.
 */

const log = createLogger('test', 'silent');
const KEY = 'k-router-test';

/** A concrete URL for a route pattern (`:param` and `*` filled in). */
const urlOf = (path: string) => path.replace(/:[^/]+/g, 'x').replace(/\*$/, 'x');

describe('HttpRouter registration', () => {
  const router = () => new HttpRouter(apiKeyGuard(KEY), log);
  it('only PUBLIC_ROUTES may be public, and they must say so', () => {
    expect(() => router().add('GET', '/v1/secret', 'public', () => undefined)).toThrow(/not in PUBLIC_ROUTES/);
    expect(() => router().add('GET', '/healthz', 'admin', () => undefined)).toThrow(/is in PUBLIC_ROUTES/);
    const r = router();
    r.add('GET', '/healthz', 'public', () => undefined);
    r.add('DELETE', '/v1/things/*', 'admin', () => undefined);
    expect(r.routes()).toEqual([
      { method: 'GET', path: '/healthz', scope: 'public' },
      { method: 'DELETE', path: '/v1/things/*', scope: 'admin' },
    ]);
  });
});

describe('a coordinator with an API key', () => {
  let dir: string;
  let c: CoordinatorHandle;
  let base: string;
  const call = (method: string, path: string, key?: string) =>
    fetch(`${base}${path}`, { method, headers: key ? { authorization: `Bearer ${key}` } : {} }).then(async (r) => ({ status: r.status, body: await r.text() }));
  /** Status only: with the key a route may answer with a stream that does not end (SSE). */
  const statusOf = (method: string, path: string, key: string) =>
    fetch(`${base}${path}`, { method, headers: { authorization: `Bearer ${key}` } }).then(async (r) => {
      await r.body?.cancel();
      return r.status;
    });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'orchard-router-'));
    c = await startCoordinator({ stateDir: dir, host: '127.0.0.1', grpcPort: 0, httpPort: 0, mdns: false, api: { apiKey: KEY }, log });
    base = `http://127.0.0.1:${c.httpPort}`;
  });
  afterAll(async () => {
    await c?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('lists its routes: the OpenAI and management API, operator routes, and exactly the public ones', () => {
    const keys = c.routes().map((r) => `${r.method} ${r.path}`);
    for (const k of ['GET /v1/models', 'POST /v1/chat/completions', 'POST /v1/completions', 'GET /v1/cluster', 'POST /v1/cluster/models', 'DELETE /v1/cluster/models/*', 'GET /status', 'GET /v1/prometheus/targets']) {
      expect(keys).toContain(k);
    }
    expect(c.routes().filter((r) => r.scope === 'public').map((r) => `${r.method} ${r.path}`).sort()).toEqual([...PUBLIC_ROUTES].sort());
    expect(keys).not.toContain('GET /health');
  });

  it('every route but the public list answers 401 without a key, and not 401 with it', async () => {
    const seen: string[] = [];
    for (const r of c.routes()) {
      const path = urlOf(r.path);
      const without = await call(r.method, path);
      const withKey = await statusOf(r.method, path, KEY);
      seen.push(`${r.method} ${r.path} → ${without.status}/${withKey}`);
      if (PUBLIC_ROUTES.includes(`${r.method} ${r.path}`)) expect(without.status, seen.at(-1)).toBe(200);
      else {
        expect(without.status, seen.at(-1)).toBe(401);
        if (r.method !== 'HEAD') expect(JSON.parse(without.body).error.code).toBe('missing_api_key');
        expect(await statusOf(r.method, path, 'wrong'), seen.at(-1)).toBe(401);
      }
      expect(withKey, seen.at(-1)).not.toBe(401);
    }
    expect(seen.length).toBe(c.routes().length);
  });

  it('POST /v1/cluster/models takes parallelism (pipeline, tensor, auto) and refuses anything else at the edge', async () => {
    const load = (body: unknown) =>
      fetch(`${base}/v1/cluster/models`, { method: 'POST', headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' }, body: JSON.stringify(body) }).then(async (r) => ({ status: r.status, body: JSON.parse(await r.text()) as { error: { param: string | null; message: string } } }));
    const bad = await load({ model: '/no/such/model.gguf', parallelism: 'data' });
    expect(bad.status).toBe(400);
    expect(bad.body.error.param).toBe('parallelism');
    // A valid value passes the edge and reaches the runtime, which refuses tensor for a GGUF.
    const ok = await load({ model: '/no/such/model.gguf', parallelism: 'tensor' });
    expect(ok.body.error.param).not.toBe('parallelism');
    expect(ok.body.error.message).toMatch(/--parallelism tensor is for MLX model/);
  });

  it('a route added after start is guarded too; unknown paths are 401 before 404', async () => {
    const late: RouteInfo = { method: 'GET', path: '/v1/late/:id', scope: 'admin' };
    c.router.add(late.method, late.path, late.scope, (_req, res, params) => {
      res.end(params.id);
    });
    expect((await call('GET', '/v1/late/7')).status).toBe(401);
    expect(await call('GET', '/v1/late/7', KEY)).toEqual({ status: 200, body: '7' });
    expect((await call('GET', '/nope')).status).toBe(401);
    expect((await call('GET', '/nope', KEY)).status).toBe(404);
    expect((await call('POST', '/healthz')).status).toBe(401);
  });

  it('/healthz has the body shape of every Orchard process (the node agent\'s metrics server too)', async () => {
    const coordinator = await call('GET', '/healthz');
    expect(JSON.parse(coordinator.body)).toEqual({ ok: true, detail: '0 nodes up, 0 models ready' });
    const agentLike = await serveMetrics({ registry: new Registry(), host: '127.0.0.1', port: 0 });
    try {
      const agent = await fetch(`${agentLike.url}/healthz`).then((r) => r.json());
      expect(Object.keys(agent as object).sort()).toEqual(Object.keys(JSON.parse(coordinator.body)).sort());
      expect(agent).toEqual({ ok: true, detail: 'ok' });
    } finally {
      await agentLike.close();
    }
  });

  it('a model name with a slash or percent-escapes reaches the route decoded; a broken escape is a 400', async () => {
    const r = await call('GET', '/v1/models/org%2Fmodel%20v2', KEY);
    expect(r.status).toBe(404);
    expect(JSON.parse(r.body).error.message).toContain("'org/model v2'");
    expect((await call('GET', '/v1/models/%E0%A4%A', KEY)).status).toBe(400);
    expect((await call('GET', '/v1/models/%E0%A4%A')).status).toBe(401);
  });
});
