import * as grpc from '@grpc/grpc-js';
import { OrchardError, UsageError } from '../shared/errors.ts';

/** gRPC status names the coordinator answers with (also what the OpenAI API maps to HTTP). */
export type CoordinatorCode =
  | 'INVALID_ARGUMENT'
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'PERMISSION_DENIED'
  | 'UNAUTHENTICATED'
  | 'RESOURCE_EXHAUSTED'
  | 'FAILED_PRECONDITION'
  | 'UNAVAILABLE'
  | 'CANCELLED'
  | 'DEADLINE_EXCEEDED'
  | 'INTERNAL';

/** A runtime failure with the status a client should see. */
export class CoordinatorError extends OrchardError {
  override readonly name: string = 'CoordinatorError';
  constructor(
    readonly code: CoordinatorCode,
    message: string,
  ) {
    super(message);
  }
}

export function grpcStatusOf(code: CoordinatorCode): grpc.status {
  return grpc.status[code];
}

/** Any error → a gRPC status + one-line message; usage errors are INVALID_ARGUMENT. */
export function toServiceError(err: unknown): Partial<grpc.ServiceError> {
  if (err instanceof CoordinatorError) return { code: grpcStatusOf(err.code), details: err.message, message: err.message };
  if (err instanceof UsageError) return { code: grpc.status.INVALID_ARGUMENT, details: err.message, message: err.message };
  if (err instanceof OrchardError) return { code: grpc.status.FAILED_PRECONDITION, details: err.message, message: err.message };
  const message = err instanceof Error ? err.message : String(err);
  return { code: grpc.status.INTERNAL, details: `internal error: ${message}`, message };
}
