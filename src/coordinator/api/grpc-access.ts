import * as grpc from '@grpc/grpc-js';
import { authenticate } from '../../shared/pki/grpc-tls.ts';
import type { ApiKeyScope } from '../state/api-key-store.ts';
import { type AccessControl, bearerKey } from './access.ts';

/**
 * The gRPC Coordinator service's credential check, applied to the whole handler table: every
 * method the service definition has is wrapped, so one added to the proto later needs an admin
 * key until it is listed here with a narrower scope. Join is the only exception: it carries the
 * join token (or the node certificate) and checks that itself (membership/enroll.ts).
 *
 * A credential is an admin client certificate of this cluster (`orchard coordinator
 * credentials`; admin scope) or an API key in metadata. Unlike HTTP, gRPC is enforced even
 * while no operator key exists: it listens on every interface by default, and the CLI on the
 * coordinator's machine sends the local admin key by itself.
 */
export const GRPC_METHOD_SCOPES: Readonly<Record<string, ApiKeyScope | 'join-token'>> = {
  Join: 'join-token',
  Status: 'inference',
  Plan: 'inference',
  Generate: 'inference',
  Load: 'admin',
  Unload: 'admin',
  Drain: 'admin',
  Rebalance: 'admin',
};

export function grpcScopeOf(method: string): ApiKeyScope | 'join-token' {
  return GRPC_METHOD_SCOPES[method] ?? 'admin';
}

type Refusal = Partial<grpc.ServiceError> & { code: grpc.status };

type Call = grpc.ServerUnaryCall<unknown, unknown> & grpc.ServerWritableStream<unknown, unknown>;

async function refusal(access: AccessControl, call: Call, needed: ApiKeyScope, caCertPem: string | undefined): Promise<Refusal | undefined> {
  if (caCertPem !== undefined && authenticate(call, caCertPem, ['admin']).ok) return undefined;
  const raw = call.metadata.get('authorization')[0];
  const d = await access.decide(bearerKey(typeof raw === 'string' ? raw : undefined), needed, caCertPem !== undefined);
  if (d.ok) return undefined;
  if (d.why === 'missing') return { code: grpc.status.UNAUTHENTICATED, details: 'missing credential: an admin client certificate (`orchard coordinator credentials`) or metadata "authorization: Bearer KEY" (--api-key-file, ORCHARD_API_KEY)' };
  if (d.why === 'invalid') return { code: grpc.status.UNAUTHENTICATED, details: 'incorrect API key' };
  return { code: grpc.status.PERMISSION_DENIED, details: `this API key has scope ${d.scope}; this call needs an ${needed} key` };
}

type AnyHandler = (call: Call, cb?: grpc.sendUnaryData<unknown>) => void;

/**
 * The handlers with the credential check in front of each method of `service`. `caCertPem`: the
 * cluster CA when the server speaks TLS (admin certificates count, and keys are always needed).
 */
export function guardService(service: grpc.ServiceDefinition, handlers: grpc.UntypedServiceImplementation, access: AccessControl, caCertPem?: string): grpc.UntypedServiceImplementation {
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
      refusal(access, call, scope, caCertPem).then(
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
