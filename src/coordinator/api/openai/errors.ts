import { OrchardError, UsageError } from '../../../shared/errors.ts';
import { type CoordinatorCode, CoordinatorError } from '../../errors.ts';

/**
 * OpenAI-shaped errors: `{"error": {"message", "type", "code", "param"}}` with the HTTP status
 * clients (the openai SDKs, LangChain, Open WebUI) branch on. The SDKs retry 429 and 5xx by
 * themselves, so "busy" must be 429 and "try again later" must be 503 — never a 500.
 */
export type ApiErrorType = 'invalid_request_error' | 'authentication_error' | 'permission_error' | 'not_found_error' | 'rate_limit_error' | 'server_error' | 'service_unavailable';

export class ApiError extends Error {
  override readonly name = 'ApiError';
  constructor(
    readonly status: number,
    readonly type: ApiErrorType,
    readonly code: string,
    message: string,
    readonly param: string | null = null,
  ) {
    super(message);
  }
}

export interface ApiErrorBody {
  readonly error: { readonly message: string; readonly type: string; readonly code: string; readonly param: string | null };
}

export function errorBody(e: ApiError): ApiErrorBody {
  return { error: { message: e.message, type: e.type, code: e.code, param: e.param } };
}

export const invalid = (message: string, param: string | null = null, code = 'invalid_request') => new ApiError(400, 'invalid_request_error', code, message, param);

/** How each runtime status reaches an HTTP client. */
const BY_CODE: Record<CoordinatorCode, { status: number; type: ApiErrorType; code: string }> = {
  INVALID_ARGUMENT: { status: 400, type: 'invalid_request_error', code: 'invalid_request' },
  NOT_FOUND: { status: 404, type: 'invalid_request_error', code: 'model_not_found' },
  ALREADY_EXISTS: { status: 409, type: 'invalid_request_error', code: 'model_exists' },
  PERMISSION_DENIED: { status: 403, type: 'authentication_error', code: 'permission_denied' },
  UNAUTHENTICATED: { status: 401, type: 'authentication_error', code: 'invalid_api_key' },
  RESOURCE_EXHAUSTED: { status: 429, type: 'rate_limit_error', code: 'busy' },
  // "not loaded yet", "does not fit", "no live nodes": capacity problems a retry may fix.
  FAILED_PRECONDITION: { status: 503, type: 'service_unavailable', code: 'no_capacity' },
  UNAVAILABLE: { status: 503, type: 'service_unavailable', code: 'unavailable' },
  CANCELLED: { status: 499, type: 'invalid_request_error', code: 'cancelled' },
  DEADLINE_EXCEEDED: { status: 504, type: 'server_error', code: 'timeout' },
  INTERNAL: { status: 500, type: 'server_error', code: 'internal_error' },
};

/** Any error → an ApiError; unknown errors are 500 with their message (one line, no stack). */
export function apiErrorOf(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof CoordinatorError) {
    const m = BY_CODE[err.code];
    return new ApiError(m.status, m.type, m.code, err.message);
  }
  if (err instanceof UsageError) return invalid(err.message);
  if (err instanceof OrchardError) return new ApiError(503, 'service_unavailable', 'unavailable', err.message);
  // gRPC errors from the head agent (e.g. llama-server refusing a prompt over the context).
  const g = err as { code?: unknown; details?: unknown; message?: unknown };
  if (typeof g?.code === 'number' && typeof g.details === 'string') {
    if (g.code === 3) return invalid(g.details, null, 'context_length_exceeded');
    if (g.code === 8) return new ApiError(429, 'rate_limit_error', 'busy', g.details);
    if (g.code === 14 || g.code === 9) return new ApiError(503, 'service_unavailable', 'unavailable', g.details);
  }
  const message = err instanceof Error ? err.message : String(err);
  return new ApiError(500, 'server_error', 'internal_error', `internal error: ${message}`);
}
