import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { CONSOLE_ASSET_PATHS } from './console/static.ts';
import { ApiError } from './openai/errors.ts';

/**
 * Who may call a route. Every route of the coordinator's HTTP router declares one:
 *   public     answered without a key; only the routes in PUBLIC_ROUTES may say so
 *   inference  the OpenAI routes (models, completions)
 *   admin      cluster management and everything operators read (status, load, unload, SD)
 * Today one API key opens both `inference` and `admin`; keys limited to one scope are the next
 * step, and only the guard changes for it.
 */
export type RouteScope = 'public' | 'inference' | 'admin';

/**
 * The routes anyone may call, also with an API key set: liveness probes and Prometheus scrapes
 * (neither can send a key by default, and neither reveals more than counters and "ok").
 * Everything else, including any route added later, needs the key.
 */
export const PUBLIC_ROUTES: readonly string[] = [
  'GET /healthz',
  'HEAD /healthz',
  'GET /metrics',
  'HEAD /metrics',
  // The console's page and static modules: no data, and without a key the page shows only its login.
  ...CONSOLE_ASSET_PATHS.flatMap((p) => [`GET ${p}`, `HEAD ${p}`]),
];

/** Lets a request through for a scope or throws the ApiError (401) that refuses it. */
export type Guard = (req: IncomingMessage, scope: Exclude<RouteScope, 'public'>) => void;

const digest = (s: string) => createHash('sha256').update(s).digest();

/** Constant-time API key check (`Authorization: Bearer KEY`, or `x-api-key: KEY`). */
export function checkApiKey(req: IncomingMessage, apiKey: string | undefined): void {
  if (!apiKey) return;
  const auth = req.headers.authorization;
  const given = auth?.startsWith('Bearer ') ? auth.slice(7).trim() : typeof req.headers['x-api-key'] === 'string' ? req.headers['x-api-key'] : undefined;
  if (given === undefined) throw new ApiError(401, 'authentication_error', 'missing_api_key', 'missing API key: send "Authorization: Bearer KEY"');
  if (!timingSafeEqual(digest(given), digest(apiKey))) throw new ApiError(401, 'authentication_error', 'invalid_api_key', 'incorrect API key');
}

/** The guard of one optional API key for every non-public scope (no key configured: open). */
export function apiKeyGuard(apiKey: string | undefined): Guard {
  return (req) => checkApiKey(req, apiKey);
}
