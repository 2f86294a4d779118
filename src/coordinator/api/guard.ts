import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { ApiKeyScope } from '../state/api-key-store.ts';
import { type AccessControl, bearerKey } from './access.ts';
import { CONSOLE_ASSET_PATHS } from './console/static.ts';
import { ApiError } from './openai/errors.ts';

/**
 * Who may call a route. Every route of the coordinator's HTTP router declares one:
 *   public     answered without a key; only the routes in PUBLIC_ROUTES may say so
 *   inference  the OpenAI routes (models, completions)
 *   admin      cluster management and everything operators read (status, load, unload, SD)
 * An admin key opens both; an inference key gets 403 on admin routes (see access.ts).
 */
export type RouteScope = 'public' | 'inference' | 'admin';

/**
 * The routes anyone may call, also with an API key set: liveness probes (which cannot send a key
 * and learn no more than "ok"). Everything else, including any route added later, needs a key.
 */
export const PUBLIC_ROUTES: readonly string[] = [
  'GET /healthz',
  'HEAD /healthz',
  // The console's page and static modules: no data, and without a key the page shows only its login.
  ...CONSOLE_ASSET_PATHS.flatMap((p) => [`GET ${p}`, `HEAD ${p}`]),
];

/**
 * Public only with `--metrics-public` (a Prometheus that cannot send a credential); otherwise the
 * scrape sends an inference key (`authorization: {credentials_file: …}`, deploy/prometheus/).
 */
export const METRICS_ROUTES: readonly string[] = ['GET /metrics', 'HEAD /metrics'];

/** Lets a request through for a scope (resolving to the scope its key has) or throws the ApiError (401/403) that refuses it. */
export type Guard = (req: IncomingMessage, scope: Exclude<RouteScope, 'public'>) => ApiKeyScope | Promise<ApiKeyScope>;

const digest = (s: string) => createHash('sha256').update(s).digest();

/** Constant-time API key check (`Authorization: Bearer KEY`, or `x-api-key: KEY`). */
export function checkApiKey(req: IncomingMessage, apiKey: string | undefined): void {
  if (!apiKey) return;
  const auth = req.headers.authorization;
  const given = auth?.startsWith('Bearer ') ? auth.slice(7).trim() : typeof req.headers['x-api-key'] === 'string' ? req.headers['x-api-key'] : undefined;
  if (given === undefined) throw new ApiError(401, 'authentication_error', 'missing_api_key', 'missing API key: send "Authorization: Bearer KEY"');
  if (!timingSafeEqual(digest(given), digest(apiKey))) throw new ApiError(401, 'authentication_error', 'invalid_api_key', 'incorrect API key');
}

/** The guard of one optional admin API key for every non-public scope (no key configured: open). */
export function apiKeyGuard(apiKey: string | undefined): Guard {
  return (req) => {
    checkApiKey(req, apiKey);
    return 'admin';
  };
}

/** The guard of the coordinator's access control: 401 without a known key, 403 (OpenAI-shaped) when its scope is too narrow. */
export function accessGuard(access: AccessControl): Guard {
  return async (req, needed) => {
    const xKey = req.headers['x-api-key'];
    const d = await access.decide(bearerKey(req.headers.authorization) ?? (typeof xKey === 'string' ? xKey : undefined), needed);
    if (d.ok) return d.scope;
    if (d.why === 'missing') throw new ApiError(401, 'authentication_error', 'missing_api_key', 'missing API key: send "Authorization: Bearer KEY"');
    if (d.why === 'invalid') throw new ApiError(401, 'authentication_error', 'invalid_api_key', 'incorrect API key');
    throw new ApiError(403, 'permission_error', 'insufficient_scope', `this API key has scope ${d.scope}; this route needs an ${needed} key`);
  };
}

const granted = new WeakMap<IncomingMessage, ApiKeyScope>();

/** The scope the guard granted this request (set by the router before the handler runs). */
export function grantedScope(req: IncomingMessage): ApiKeyScope | undefined {
  return granted.get(req);
}

export function recordGrantedScope(req: IncomingMessage, scope: ApiKeyScope): void {
  granted.set(req, scope);
}
