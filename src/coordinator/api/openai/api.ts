import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { isAbsolute } from 'node:path';
import { z } from 'zod';
import type { Logger } from '../../../shared/log.ts';
import type { Membership } from '../../membership/membership.ts';
import type { NodeEntry } from '../../membership/registry.ts';
import type { GenerateEvent, LoadProgress, Runtime } from '../../instances/runtime.ts';
import { ApiError, apiErrorOf, invalid } from './errors.ts';
import { checkApiKey, DEFAULT_MAX_BODY_BYTES, disconnectSignal, readJsonBody, sendError, sendJson, startSse, write } from './edge.ts';
import { type ModelLimits, type ParsedRequest, parseChatRequest, parseCompletionRequest } from './requests.ts';
import { completionResponse, finishReasonOf, type Kind, modelObject, placementOf, type ResponseMeta, sseData, streamChunk, usageChunk } from './responses.ts';

/**
 * The coordinator's HTTP API: OpenAI-compatible inference routes and the management routes,
 * installed into the coordinator's route table (`httpRoutes`, keyed "METHOD /path"; a key
 * ending in `*` matches a path prefix).
 *
 *   GET  /v1/models, /v1/models/{id}          loaded models (+ placement in `orchard`)
 *   POST /v1/chat/completions, /v1/completions stream (SSE) or not
 *   GET  /v1/cluster                           nodes, models, stages
 *   POST /v1/cluster/models                    load (SSE progress with Accept: text/event-stream)
 *   DELETE /v1/cluster/models/{name}           unload
 *   GET  /healthz                              liveness (never needs the API key)
 *
 * Cancellation: the client's disconnect aborts the runtime's generate(), which cancels the head
 * agent's gRPC stream, which aborts its HTTP request to llama-server, which frees the slot.
 */

export type RouteTable = Map<string, (req: IncomingMessage, res: ServerResponse) => void>;

export interface ApiDeps {
  readonly runtime: Runtime;
  readonly membership: Membership;
  readonly clusterId: string;
  readonly log: Logger;
  /**
   * A generation request (chat/completions) refused before it reached the runtime, with the HTTP
   * status: the coordinator counts it in orchard_requests_total (`CoordinatorMetrics.refused`);
   * requests that reach the runtime are counted by MeteredRuntime, never here. `requestedModel`
   * is the body's `model` ("" if it names none), undefined when no JSON body was read.
   */
  readonly onRefused?: ((requestedModel: string | undefined, status: number) => void) | undefined;
}

/** How far a generation request got: refusals before the runtime are counted by the API. */
interface GenerationProgress {
  requestedModel: string | undefined;
  reachedRuntime: boolean;
}

export interface ApiOptions {
  /** When set, every route but /healthz needs `Authorization: Bearer <apiKey>`. */
  readonly apiKey?: string | undefined;
  readonly maxBodyBytes?: number | undefined;
}

type Handler = (req: IncomingMessage, res: ServerResponse) => Promise<void>;

export function installApi(routes: RouteTable, deps: ApiDeps, options: ApiOptions = {}): void {
  const limit = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  const guarded = (h: Handler, onError?: (e: ApiError) => void) => (req: IncomingMessage, res: ServerResponse) => {
    const run = async () => {
      checkApiKey(req, options.apiKey);
      await h(req, res);
    };
    run().catch((err: unknown) => {
      const e = apiErrorOf(err);
      onError?.(e);
      if (e.status >= 500) deps.log.warn({ url: req.url, status: e.status, err: e.message }, 'API request failed');
      else deps.log.debug({ url: req.url, status: e.status, err: e.message }, 'API request refused');
      sendError(res, e);
    });
  };

  routes.set('GET /v1/models', guarded(async (_req, res) => {
    const data = deps.runtime.models().filter((m) => m.state === 'ready' || m.state === 'loading').map(modelObject);
    sendJson(res, 200, { object: 'list', data });
  }));
  routes.set('GET /v1/models/*', guarded(async (req, res) => {
    const name = pathTail(req, '/v1/models/');
    const m = deps.runtime.model(name);
    if (!m) throw modelNotFound(name, deps.runtime);
    sendJson(res, 200, modelObject(m));
  }));
  const generation = (kind: Kind) => (req: IncomingMessage, res: ServerResponse) => {
    const progress: GenerationProgress = { requestedModel: undefined, reachedRuntime: false };
    const refused = (e: ApiError) => {
      if (!progress.reachedRuntime) deps.onRefused?.(progress.requestedModel, e.status);
    };
    guarded((rq, rs) => generate(kind, rq, rs, deps, limit, progress), refused)(req, res);
  };
  routes.set('POST /v1/chat/completions', generation('chat'));
  routes.set('POST /v1/completions', generation('completion'));

  routes.set('GET /v1/cluster', guarded(async (_req, res) => sendJson(res, 200, clusterJson(deps))));
  routes.set('POST /v1/cluster/models', guarded((req, res) => loadModel(req, res, deps, limit)));
  routes.set('DELETE /v1/cluster/models/*', guarded(async (req, res) => {
    const name = pathTail(req, '/v1/cluster/models/');
    await deps.runtime.unload(name);
    sendJson(res, 200, { name, unloaded: true });
  }));
  routes.set('GET /healthz', (_req, res) => {
    sendJson(res, 200, { ok: true, nodesUp: deps.membership.registry.upNodes().length, modelsReady: deps.runtime.models().filter((m) => m.state === 'ready').length });
  });
  // Routes other modules installed before us (e.g. /status) expose the cluster too.
  if (options.apiKey) {
    for (const [key, route] of routes) {
      if (key.includes(' /v1/') || key === 'GET /healthz' || key === 'GET /health' || key === 'GET /metrics') continue;
      routes.set(key, (req, res) => {
        try {
          checkApiKey(req, options.apiKey);
        } catch (err) {
          sendError(res, apiErrorOf(err));
          return;
        }
        route(req, res);
      });
    }
  }
}

function pathTail(req: IncomingMessage, prefix: string): string {
  const path = (req.url ?? '/').split('?')[0] ?? '/';
  try {
    return decodeURIComponent(path.slice(prefix.length));
  } catch {
    throw invalid('malformed model name in the path');
  }
}

function modelNotFound(name: string, runtime: Runtime): ApiError {
  const loaded = runtime.models().map((m) => m.name);
  return new ApiError(404, 'invalid_request_error', 'model_not_found', `The model '${name}' does not exist (loaded: ${loaded.join(', ') || 'none'})`, 'model');
}

function limitsFor(runtime: Runtime) {
  return (name: string): ModelLimits => {
    const m = runtime.model(name);
    if (!m) throw modelNotFound(name, runtime);
    if (m.state !== 'ready') throw new ApiError(503, 'service_unavailable', 'model_not_ready', `model '${name}' is ${m.state}${m.error ? `: ${m.error}` : ''}`);
    return { ctx: m.options.ctx };
  };
}

/** The body's `model` as the metrics label source: "" when it names none, undefined if not a string. */
export function requestedModelOf(body: unknown): string | undefined {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return undefined;
  const m = (body as Record<string, unknown>).model;
  return m === undefined || m === null ? '' : typeof m === 'string' ? m : undefined;
}

async function generate(kind: Kind, req: IncomingMessage, res: ServerResponse, deps: ApiDeps, limit: number, progress: GenerationProgress): Promise<void> {
  const body = await readJsonBody(req, limit);
  progress.requestedModel = requestedModelOf(body);
  const parsed: ParsedRequest = kind === 'chat' ? parseChatRequest(body, limitsFor(deps.runtime)) : parseCompletionRequest(body, limitsFor(deps.runtime));
  const meta: ResponseMeta = { id: `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replace(/-/g, '')}`, created: Math.floor(Date.now() / 1000), model: parsed.model };
  const signal = disconnectSignal(res);
  const events = deps.runtime.generate(parsed.generate, signal)[Symbol.asyncIterator]();
  // From here on the runtime (MeteredRuntime) counts the request, whatever happens.
  progress.reachedRuntime = true;
  try {
    // The first event decides the status: queue refusals, unknown models and engine refusals
    // (prompt over the context) become proper HTTP errors, not a 200 with an error inside.
    let next = await events.next();
    if (!parsed.stream) {
      let text = '';
      while (!next.done) {
        const ev: GenerateEvent = next.value;
        if (ev.kind === 'token') text += ev.text;
        else return sendJson(res, 200, completionResponse(kind, meta, text, ev));
        next = await events.next();
      }
      throw new ApiError(502, 'server_error', 'incomplete', 'the engine ended the stream without a final event');
    }
    startSse(res);
    let first = true;
    if (kind === 'chat') {
      // OpenAI's first chat chunk carries the role and empty content.
      if (!(await write(res, sseData(streamChunk(kind, meta, { text: '', first: true }, parsed.includeUsage))))) return;
      first = false;
    }
    while (!next.done) {
      const ev: GenerateEvent = next.value;
      if (ev.kind === 'token') {
        if (ev.text !== '' && !(await write(res, sseData(streamChunk(kind, meta, { text: ev.text, first }, parsed.includeUsage))))) return;
        first = false;
      } else {
        await write(res, sseData(streamChunk(kind, meta, { finish: finishReasonOf(ev), first }, parsed.includeUsage)));
        if (parsed.includeUsage) await write(res, sseData(usageChunk(kind, meta, ev)));
        await write(res, sseData('[DONE]'));
        res.end();
        return;
      }
      next = await events.next();
    }
    throw new ApiError(502, 'server_error', 'incomplete', 'the engine ended the stream without a final event');
  } catch (err) {
    if (signal.aborted) {
      deps.log.debug({ id: meta.id }, 'client went away; generation cancelled');
      return;
    }
    throw err;
  } finally {
    // Releases the slot and cancels the engine's stream if we stopped early.
    await events.return?.(undefined);
  }
}

const loadSchema = z
  .object({
    model: z.string({ error: 'model (the GGUF path on the head node) is required' }).min(1, 'model is required'),
    name: z.string().min(1).optional(),
    ctx: z.number().int().min(16).max(16_777_216).optional(),
    cache_type: z.enum(['f16', 'q8_0', 'q4_0', 'f32', 'bf16']).optional(),
    parallel: z.number().int().min(1).max(256).optional(),
    pin: z.array(z.string().min(1)).optional(),
  })
  .strict();

function progressJson(p: LoadProgress): Record<string, unknown> {
  return {
    phase: p.phase,
    message: p.message,
    bytes_done: p.bytesDone,
    bytes_total: p.bytesTotal,
    elapsed_seconds: p.elapsedSeconds,
    ...(p.model ? { model: { id: p.model.name, ...placementOf(p.model) } } : {}),
  };
}

async function loadModel(req: IncomingMessage, res: ServerResponse, deps: ApiDeps, limit: number): Promise<void> {
  const parsed = loadSchema.safeParse(await readJsonBody(req, limit));
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw invalid(issue?.message ?? 'invalid load request', issue?.path.map(String).join('.') || null);
  }
  const b = parsed.data;
  if (!isAbsolute(b.model)) throw invalid(`model must be an absolute path on the head node: ${b.model}`, 'model');
  const request = { modelPath: b.model, name: b.name, options: { ctx: b.ctx, cacheType: b.cache_type, parallel: b.parallel, pinnedNodes: b.pin ?? [] } };
  const sse = String(req.headers.accept ?? '').includes('text/event-stream');
  if (!sse) {
    const m = await deps.runtime.load(request);
    return sendJson(res, 200, modelObject(m));
  }
  // Progress as SSE. The load is not tied to this connection: a client that goes away does not
  // cancel it (unload does); the result stays visible in /v1/cluster.
  startSse(res);
  try {
    const m = await deps.runtime.load(request, (p) => {
      if (p.phase !== 'failed') void write(res, sseData(progressJson(p)));
    });
    await write(res, sseData({ phase: 'done', model: modelObject(m) }));
    await write(res, sseData('[DONE]'));
    res.end();
  } catch (err) {
    sendError(res, apiErrorOf(err));
  }
}

function nodeJson(n: NodeEntry, now: number) {
  const p = n.profile;
  return {
    id: n.nodeId,
    name: p.name,
    state: n.state,
    address: n.address,
    discovered_by: n.discoveredBy,
    last_seen_seconds: (now - n.lastSeenMs) / 1000,
    chip: p.chip,
    os: `${p.os} ${p.osVersion}`,
    memory_bytes: p.memoryBytes,
    usable_bytes: p.usableBytes,
    wired_limit_bytes: p.wiredLimitBytes,
    bandwidth_bytes_per_second: p.bandwidthBytesPerSecond,
    engines: p.engines,
    live: n.live ? { available_bytes: n.live.availableBytes, memory_pressure: n.live.memoryPressure, thermal_state: n.live.thermalState } : null,
  };
}

function clusterJson(deps: ApiDeps): Record<string, unknown> {
  const now = Date.now();
  return {
    cluster_id: deps.clusterId,
    nodes: deps.membership.registry.nodes().map((n) => nodeJson(n, now)),
    models: deps.runtime.models().map((m) => ({ id: m.name, ...placementOf(m) })),
  };
}

