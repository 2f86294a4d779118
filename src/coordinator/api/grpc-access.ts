import * as grpc from '@grpc/grpc-js';
import type { ApiKeyScope } from '../state/api-key-store.ts';
import { type AccessControl, bearerKey } from './access.ts';

/**
 * The gRPC Coordinator service's credential check, applied to the whole handler table: every
 * method the service definition has is wrapped, so one added to the proto later needs an admin
 * key until it is listed here with a narrower scope. Join is the only exception: it carries the
 * join token in its request and checks that itself.
 */
export const GRPC_METHOD_SCOPES: Readonly<Record<string, ApiKeyScope | 'join-token'>> = {
  Join: 'join-token',
  Status: 'inference',
  Plan: 'inference',
  Generate: 'inference',
  Load: 'admin',
  Unload: 'admin',
};

export function grpcScopeOf(method: string): ApiKeyScope | 'join-token' {
  return GRPC_METHOD_SCOPES[method] ?? 'admin';
}

type Refusal = Partial<grpc.ServiceError> & { code: grpc.status };

async function refusal(access: AccessControl, md: grpc.Metadata, needed: ApiKeyScope): Promise<Refusal | undefined> {
  const raw = md.get('authorization')[0];
  const d = await access.decide(bearerKey(typeof raw === 'string' ? raw : undefined), needed);
  if (d.ok) return undefined;
  if (d.why === 'missing') return { code: grpc.status.UNAUTHENTICATED, details: 'missing credential: send metadata "authorization: Bearer KEY" (--api-key-file, ORCHARD_API_KEY)' };
  if (d.why === 'invalid') return { code: grpc.status.UNAUTHENTICATED, details: 'incorrect API key' };
  return { code: grpc.status.PERMISSION_DENIED, details: `this API key has scope ${d.scope}; this call needs an ${needed} key` };
}

type AnyHandler = (call: grpc.ServerUnaryCall<unknown, unknown> & grpc.ServerWritableStream<unknown, unknown>, cb?: grpc.sendUnaryData<unknown>) => void;

/** The handlers with the credential check in front of each method of `service`. */
export function guardService(service: grpc.ServiceDefinition, handlers: grpc.UntypedServiceImplementation, access: AccessControl): grpc.UntypedServiceImplementation {
  const guarded: grpc.UntypedServiceImplementation = {};
  for (const [method, def] of Object.entries(service)) {
    const handler = handlers[method] as AnyHandler | undefined;
    if (!handler) continue;
    const scope = grpcScopeOf(method);
    if (scope === 'join-token') {
      guarded[method] = handler as grpc.UntypedHandleCall;
      continue;
    }
    if (def.requestStream) throw new Error(`${method}: client-streaming methods need their own guard`);
    const wrapped: AnyHandler = (call, cb) => {
      refusal(access, call.metadata, scope).then(
        (no) => {
          if (!no) handler(call, cb);
          else if (def.responseStream) call.emit('error', no);
          else cb?.(no, null);
        },
        (err: unknown) => {
          const e = { code: grpc.status.INTERNAL, details: `credential check failed: ${(err as Error).message}` };
          if (def.responseStream) call.emit('error', e);
          else cb?.(e, null);
        },
      );
    };
    guarded[method] = wrapped as grpc.UntypedHandleCall;
  }
  return guarded;
}
