import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { isAbsolute } from 'node:path';
import { z } from 'zod';
import type { TokenLogprob } from '../../../shared/generation.ts';
import type { Logger } from '../../../shared/log.ts';
import type { DiscoveredAgent, Membership } from '../../membership/membership.ts';
import type { NodeEntry } from '../../membership/registry.ts';
import type { GenerateEvent, LoadProgress, Runtime } from '../../instances/runtime.ts';
import type { HttpRouter, RouteParams } from '../router.ts';
import { ApiError, apiErrorOf, invalid } from './errors.ts';
import { DEFAULT_MAX_BODY_BYTES, disconnectSignal, readJsonBody, sendError, sendJson, startSse, write } from './edge.ts';
import { type ModelLimits, type ParsedRequest, parseChatRequest, parseCompletionRequest } from './requests.ts';
import { completionResponse, finishReasonOf, type Kind, modelObject, placementOf, type ResponseMeta, sseData, streamChunk, usageChunk } from './responses.ts';
import { PARALLELISMS } from '../../../shared/placement/parallelism.ts';
import type { LinkMeasurement } from '../../../shared/placement/links.ts';

/**
 * The coordinator's HTTP API: OpenAI-compatible inference routes and the management routes,
 * added to the coordinator's router (which guards every one of them; see ../guard.ts).
 *
 *   GET  /v1/models, /v1/models/{id}          inference  loaded models (+ placement in `orchard`)
 *   POST /v1/chat/completions, /v1/completions inference  stream (SSE) or not
 *   GET  /v1/cluster                           admin      nodes, models, stages
 *   POST /v1/cluster/models                    admin      load (SSE progress with Accept: text/event-stream)
 *   DELETE /v1/cluster/models/{name}           admin      unload
 *
 * Cancellation: the client's disconnect aborts the runtime's generate(), which cancels the head
 * agent's gRPC stream, which aborts its HTTP request to llama-server, which frees the slot.
 */

export interface ApiDeps {
  readonly runtime: Runtime;
  readonly membership: Membership;
  readonly clusterId: string;
  readonly log: Logger;
  /** The link matrix (membership/link-prober.ts), shown in `/v1/cluster` as `orchard status --links` shows it. */
  readonly links?: () => readonly LinkMeasurement[];
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
  readonly maxBodyBytes?: number | undefined;
}

export function installApi(router: HttpRouter, deps: ApiDeps, options: ApiOptions = {}): void {
  const limit = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  router.add('GET', '/v1/models', 'inference', (_req, res) => {
    const data = deps.runtime.models().filter((m) => m.state === 'ready' || m.state === 'loading' || m.state === 'recovering').map(modelObject);
    sendJson(res, 200, { object: 'list', data });
  });
  router.add('GET', '/v1/models/*', 'inference', (_req, res, params) => {
    const name = nameParam(params);
    const m = deps.runtime.model(name);
    if (!m) throw modelNotFound(name, deps.runtime);
    sendJson(res, 200, modelObject(m));
  });
  // Refusals of a generation request are counted by how far it got (the router reports every
  // error answer, its own 401 included; the request's progress is looked up by the request).
  const progressOf = new WeakMap<IncomingMessage, GenerationProgress>();
  const onError = (e: ApiError, req: IncomingMessage) => {
    const progress = progressOf.get(req);
    if (!progress?.reachedRuntime) deps.onRefused?.(progress?.requestedModel, e.status);
  };
  const generation = (kind: Kind) => (req: IncomingMessage, res: ServerResponse) => {
    const progress: GenerationProgress = { requestedModel: undefined, reachedRuntime: false };
    progressOf.set(req, progress);
    return generate(kind, req, res, deps, limit, progress);
  };
  router.add('POST', '/v1/chat/completions', 'inference', generation('chat'), { onError });
  router.add('POST', '/v1/completions', 'inference', generation('completion'), { onError });

  router.add('GET', '/v1/cluster', 'admin', (_req, res) => sendJson(res, 200, clusterJson(deps)));
  router.add('POST', '/v1/cluster/models', 'admin', (req, res) => loadModel(req, res, deps, limit));
  router.add('DELETE', '/v1/cluster/models/*', 'admin', async (_req, res, params) => {
    const name = nameParam(params);
    await deps.runtime.unload(name);
    sendJson(res, 200, { name, unloaded: true });
  });
}

/** The model name of a `/…/*` route (percent-decoded by the router; it may contain "/"). */
function nameParam(params: RouteParams): string {
  return params['*'] ?? '';
}

function modelNotFound(name: string, runtime: Runtime): ApiError {
  const loaded = runtime.models().map((m) => m.name);
  return new ApiError(404, 'invalid_request_error', 'model_not_found', `The model '${name}' does not exist (loaded: ${loaded.join(', ') || 'none'})`, 'model');
}

function limitsFor(runtime: Runtime) {
  return (name: string): ModelLimits => {
    const m = runtime.model(name);
    if (!m) throw modelNotFound(name, runtime);
    // A recovering model takes the request: it waits (bounded) for the healed instance.
    if (m.state !== 'ready' && m.state !== 'recovering') throw new ApiError(503, 'service_unavailable', 'model_not_ready', `model '${name}' is ${m.state}${m.error ? `: ${m.error}` : ''}`);
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
    // Present (and filled) only when the request asked for logprobs: null in the answer otherwise.
    const logprobs: TokenLogprob[] | undefined = parsed.generate.logprobs ? [] : undefined;
    if (!parsed.stream) {
      let text = '';
      while (!next.done) {
        const ev: GenerateEvent = next.value;
        if (ev.kind === 'token') {
          text += ev.text;
          logprobs?.push(...(ev.logprobs ?? []));
        } else return sendJson(res, 200, completionResponse(kind, meta, text, ev, logprobs));
        next = await events.next();
      }
      throw new ApiError(502, 'server_error', 'incomplete', 'the engine ended the stream without a final event');
    }
    startSse(res);
    let first = true;
    let offset = 0;
    if (kind === 'chat') {
      // OpenAI's first chat chunk carries the role and empty content.
      if (!(await write(res, sseData(streamChunk(kind, meta, { text: '', first: true }, parsed.includeUsage))))) return;
      first = false;
    }
    while (!next.done) {
      const ev: GenerateEvent = next.value;
      if (ev.kind === 'token') {
        // A token whose text is held back (part of a character) still brings its logprob.
        const lp = logprobs && (ev.logprobs ?? []);
        const part = { text: ev.text, first, logprobs: lp, offset };
        if ((ev.text !== '' || (lp?.length ?? 0) > 0) && !(await write(res, sseData(streamChunk(kind, meta, part, parsed.includeUsage))))) return;
        for (const l of lp ?? []) offset += l.token.length;
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
    // MLX layout over the ranks, as `orchard load --parallelism`.
    parallelism: z.enum(PARALLELISMS).optional(),
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
  const request = { modelPath: b.model, name: b.name, options: { ctx: b.ctx, cacheType: b.cache_type, parallel: b.parallel, pin: b.pin ?? [], parallelism: b.parallelism } };
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
    budget_bytes: p.budgetBytes,
    wired_limit_bytes: p.wiredLimitBytes,
    bandwidth_bytes_per_second: p.bandwidthBytesPerSecond,
    engines: p.engines,
    live: n.live ? { available_bytes: n.live.availableBytes, memory_pressure: n.live.memoryPressure, thermal_state: n.live.thermalState } : null,
  };
}

/** An agent Bonjour announced that is not a member (no certificate of this cluster): what it claims. */
function discoveredJson(d: DiscoveredAgent, now: number) {
  return { id: d.nodeId, name: d.name, state: 'discovered', address: d.address, discovered_by: 'mdns', last_seen_seconds: (now - d.lastSeenMs) / 1000, chip: d.chip, memory_bytes: d.memoryBytes, reason: d.reason };
}

function clusterJson(deps: ApiDeps): Record<string, unknown> {
  const now = Date.now();
  return {
    cluster_id: deps.clusterId,
    nodes: [...deps.membership.registry.nodes().map((n) => nodeJson(n, now)), ...deps.membership.discovered().map((d) => discoveredJson(d, now))],
    models: deps.runtime.models().map((m) => ({ id: m.name, ...placementOf(m) })),
    links: (deps.links?.() ?? []).map((l) => ({
      from: l.from,
      to: l.to,
      rtt_seconds: l.rttSeconds,
      bytes_per_second: l.bytesPerSecond,
      age_seconds: Math.max(0, now / 1000 - l.measuredAtSeconds),
      error: l.error ?? null,
    })),
  };
}

