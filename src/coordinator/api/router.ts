import type { IncomingMessage, ServerResponse } from 'node:http';
import FindMyWay from 'find-my-way';
import type { Logger } from '../../shared/log.ts';
import { type Guard, METRICS_ROUTES, PUBLIC_ROUTES, type RouteScope, recordGrantedScope } from './guard.ts';
import { sendError } from './openai/edge.ts';
import { ApiError, apiErrorOf, invalid } from './openai/errors.ts';

/**
 * The coordinator's one HTTP router. Routes are matched by find-my-way (path parameters such as
 * `/v1/models/:id`, wildcards); the guard runs here, in dispatch, for every request — so a route
 * added by any module at any time is guarded unless it is one of PUBLIC_ROUTES, and an unknown
 * path is refused (401) before it is told it does not exist (404).
 */

export type HttpMethod = 'GET' | 'HEAD' | 'POST' | 'DELETE';

/** Path parameters by name; a wildcard `*` as `params['*']`. Already percent-decoded. */
export type RouteParams = Readonly<Record<string, string | undefined>>;

export type RouteHandler = (req: IncomingMessage, res: ServerResponse, params: RouteParams) => void | Promise<void>;

export interface RouteOptions {
  /**
   * Called with every error answer this route gives, the guard's 401 included (the generation
   * routes count refusals in orchard_requests_total this way).
   */
  readonly onError?: ((e: ApiError, req: IncomingMessage) => void) | undefined;
}

export interface RouteInfo {
  readonly method: HttpMethod;
  readonly path: string;
  readonly scope: RouteScope;
}

interface Route extends RouteInfo {
  readonly handler: RouteHandler;
  readonly options: RouteOptions;
}

/** Model names may be long paths-like ids; find-my-way's default limit is 100 characters. */
const MAX_PARAM_LENGTH = 1024;

export class HttpRouter {
  readonly #matcher = FindMyWay({ maxParamLength: MAX_PARAM_LENGTH, onBadUrl: () => undefined });
  readonly #routes: Route[] = [];
  readonly #guard: Guard;
  readonly #log: Logger;
  readonly #public: readonly string[];

  /** `metricsPublic`: /metrics joins the public list (`--metrics-public`). */
  constructor(guard: Guard, log: Logger, o: { metricsPublic?: boolean | undefined } = {}) {
    this.#guard = guard;
    this.#log = log;
    this.#public = o.metricsPublic ? [...PUBLIC_ROUTES, ...METRICS_ROUTES] : PUBLIC_ROUTES;
  }

  /** The routes this router lets through without a key ("GET /healthz", …). */
  publicRoutes(): readonly string[] {
    return this.#public;
  }

  /** The scope a route gets: `public` when it is on this router's public list, else `otherwise`. */
  scopeFor(method: HttpMethod, path: string, otherwise: Exclude<RouteScope, 'public'>): RouteScope {
    return this.#public.includes(`${method} ${path}`) ? 'public' : otherwise;
  }

  /** Register a route. `public` is accepted only for the public list, and those must say `public`. */
  add(method: HttpMethod, path: string, scope: RouteScope, handler: RouteHandler, options: RouteOptions = {}): void {
    const listed = this.#public.includes(`${method} ${path}`);
    if (listed !== (scope === 'public')) {
      throw new Error(listed ? `${method} ${path} is in PUBLIC_ROUTES but declares scope ${scope}` : `${method} ${path} declares scope public but is not in PUBLIC_ROUTES`);
    }
    const route: Route = { method, path, scope, handler, options };
    // The route itself travels as find-my-way's store; its handler slot is unused.
    this.#matcher.on(method, path, () => undefined, route);
    this.#routes.push(route);
  }

  /** Every registered route (method, path, scope), in registration order. */
  routes(): RouteInfo[] {
    return this.#routes.map(({ method, path, scope }) => ({ method, path, scope }));
  }

  /** The node:http request listener. */
  readonly handle = (req: IncomingMessage, res: ServerResponse): void => {
    const found = this.#matcher.find((req.method ?? 'GET') as HttpMethod, req.url ?? '/');
    const route = (found?.store ?? undefined) as Route | undefined;
    const run = async () => {
      // Unknown paths are guarded like admin routes: without a key nobody learns which exist.
      if (route?.scope !== 'public') recordGrantedScope(req, await this.#guard(req, route?.scope === 'inference' ? 'inference' : 'admin'));
      // find-my-way found the path but could not decode it (bad percent-encoding): no store.
      if (found && !route) throw invalid('malformed path: bad percent-encoding');
      if (!route || !found) throw new ApiError(404, 'not_found_error', 'not_found', `no route ${req.method} ${req.url}`);
      await route.handler(req, res, found.params);
    };
    run().catch((err: unknown) => {
      const e = apiErrorOf(err);
      route?.options.onError?.(e, req);
      if (e.status >= 500) this.#log.warn({ url: req.url, status: e.status, err: e.message }, 'HTTP request failed');
      else this.#log.debug({ url: req.url, status: e.status, err: e.message }, 'HTTP request refused');
      sendError(res, e);
    });
  };
}
