import type { IncomingMessage, ServerResponse } from 'node:http';
import { isAbsolute } from 'node:path';
import { z } from 'zod';
import type { Logger } from '../../../shared/log.ts';
import { PlanDoesNotFitError } from '../../instances/planner-adapter.ts';
import { DEFAULT_MAX_BODY_BYTES, readJsonBody, sendJson, startSse, write } from '../openai/edge.ts';
import { grantedScope } from '../guard.ts';
import { invalid } from '../openai/errors.ts';
import { ConsoleFeed, type FeedOptions } from './feed.ts';
import { CONSOLE_ASSET_PATHS, ConsoleAssets } from './static.ts';
import { PARALLELISMS } from '../../../shared/placement/parallelism.ts';

/**
 * The console's HTTP surface, as routes for the coordinator's router (its guard checks the key
 * by each route's scope). Public: the page and its static modules (without a key the page shows
 * only the login). Everything with data needs a key:
 *
 *   GET  /v1/console/session      the key's scope ({scope}: admin or inference)
 *   GET  /v1/console/stream       SSE: `events` (backlog), then `snapshot` and `event` as they happen
 *   POST /v1/console/plan         the live plan the gRPC Plan returns ({plan}; fits:false with remedies)
 *   GET  /v1/console/model-files  model files the nodes report (--models-dir), for the load form
 *
 * Load, unload and chat use the API's own routes (POST/DELETE /v1/cluster/models, POST
 * /v1/chat/completions): one implementation, the console is just another client of it.
 */

/** The feed's sources plus what the routes need on their own. */
export interface ConsoleDeps extends Pick<FeedOptions, 'runtime' | 'membership' | 'clusterId' | 'metrics'> {
  readonly log: Logger;
  readonly maxBodyBytes?: number | undefined;
  /** SSE keep-alive comment period (proxies drop idle streams). */
  readonly heartbeatMs?: number | undefined;
}

export interface ConsoleRoute {
  readonly method: 'GET' | 'HEAD' | 'POST';
  readonly path: string;
  /**
   * `public` only for the page and its static files. The live view is `inference`: a key that
   * may chat may watch the cluster; what changes it (plan for a load, the file list) is `admin`.
   */
  readonly scope: 'public' | 'inference' | 'admin';
  readonly handler: (req: IncomingMessage, res: ServerResponse, params: Readonly<Record<string, string | undefined>>) => Promise<void>;
}

export interface Console {
  readonly routes: readonly ConsoleRoute[];
  readonly feed: ConsoleFeed;
  close(): void;
}

/** The scope of the key the console was opened with (see ../access.ts). */
export type ConsoleScope = 'admin' | 'inference';

const planSchema = z
  .object({
    model: z.string({ error: 'model (the GGUF path on the head node) is required' }).min(1, 'model is required'),
    ctx: z.number().int().min(16).max(16_777_216).optional(),
    cache_type: z.enum(['f16', 'q8_0', 'q4_0', 'f32', 'bf16']).optional(),
    parallel: z.number().int().min(1).max(256).optional(),
    pin: z.array(z.string().min(1)).optional(),
    // MLX layout over the ranks, as `orchard load --parallelism`.
    parallelism: z.enum(PARALLELISMS).optional(),
    // The load form sends the same body to the preview and to the load.
    name: z.string().optional(),
  })
  .strict();

export function createConsole(deps: ConsoleDeps): Console {
  const feed = new ConsoleFeed({ membership: deps.membership, runtime: deps.runtime, clusterId: deps.clusterId, metrics: deps.metrics });
  const assets = new ConsoleAssets();
  const streams = new Set<ServerResponse>();
  const staticRoutes = CONSOLE_ASSET_PATHS.flatMap((path): ConsoleRoute[] => {
    const handler: ConsoleRoute['handler'] = (req, res) => assets.serve(req, res, path);
    return [
      { method: 'GET', path, scope: 'public', handler },
      { method: 'HEAD', path, scope: 'public', handler },
    ];
  });
  const routes: ConsoleRoute[] = [
    ...staticRoutes,
    {
      method: 'GET',
      path: '/v1/console/session',
      scope: 'inference',
      // The scope the guard granted this key: the page hides what it may not do (the API refuses it anyway).
      handler: async (req, res) => sendJson(res, 200, { scope: (grantedScope(req) ?? 'inference') satisfies ConsoleScope, clusterId: deps.clusterId }),
    },
    { method: 'GET', path: '/v1/console/stream', scope: 'inference', handler: (req, res) => stream(req, res, feed, streams, deps.heartbeatMs ?? 15_000) },
    { method: 'POST', path: '/v1/console/plan', scope: 'admin', handler: (req, res) => plan(req, res, deps) },
    { method: 'GET', path: '/v1/console/model-files', scope: 'admin', handler: (_req, res) => modelFiles(res, deps) },
  ];
  return {
    routes,
    feed,
    close() {
      feed.close();
      for (const s of streams) s.end();
    },
  };
}

const sse = (event: string, data: unknown) => `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;

async function stream(req: IncomingMessage, res: ServerResponse, feed: ConsoleFeed, streams: Set<ServerResponse>, heartbeatMs: number): Promise<void> {
  startSse(res);
  streams.add(res);
  await write(res, sse('events', feed.events.list()));
  const unsubscribe = await feed.subscribe({
    snapshot: (s) => void write(res, sse('snapshot', s)),
    event: (e) => void write(res, sse('event', e)),
  });
  const heartbeat = setInterval(() => void write(res, ': keep-alive\n\n'), heartbeatMs);
  heartbeat.unref();
  const done = () => {
    clearInterval(heartbeat);
    unsubscribe();
    streams.delete(res);
  };
  if (res.destroyed || req.destroyed) done();
  else res.once('close', done);
}

async function plan(req: IncomingMessage, res: ServerResponse, deps: ConsoleDeps): Promise<void> {
  const parsed = planSchema.safeParse(await readJsonBody(req, deps.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES));
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw invalid(issue?.message ?? 'invalid plan request', issue?.path.map(String).join('.') || null);
  }
  const b = parsed.data;
  if (!isAbsolute(b.model)) throw invalid(`model must be an absolute path on the head node: ${b.model}`, 'model');
  const options = { ctx: b.ctx, cacheType: b.cache_type, parallel: b.parallel, pin: b.pin ?? [], parallelism: b.parallelism };
  try {
    const p = await deps.runtime.plan(b.model, options);
    sendJson(res, 200, { plan: p.raw });
  } catch (err) {
    // As in the gRPC Plan: "does not fit" is an answer (fits: false, shortfall, remedies).
    if (err instanceof PlanDoesNotFitError) return sendJson(res, 200, { plan: err.plan });
    throw err;
  }
}

async function modelFiles(res: ServerResponse, deps: ConsoleDeps): Promise<void> {
  const up = deps.membership.registry.upNodes();
  const perNode = await Promise.all(
    up.map(async (n) => {
      const client = deps.membership.client(n.nodeId);
      // A node that does not answer in time just lists nothing; the form also takes a typed path.
      const files = client ? await client.describe(3000).then((d) => d.modelFiles, () => []) : [];
      return files.map((f) => ({ node: n.profile.name, path: f.path, sizeBytes: f.sizeBytes }));
    }),
  );
  sendJson(res, 200, { files: perNode.flat() });
}
