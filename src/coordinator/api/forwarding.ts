import type { IncomingMessage, ServerResponse } from 'node:http';
import * as grpc from '@grpc/grpc-js';
import { createProxyServer } from 'http-proxy-3';
import { errorMessage } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import { CLUSTER_CHANNEL_OPTIONS, clusterChannelCredentials, type TlsCredentials } from '../../shared/pki/grpc-tls.ts';
import { orchardV1 } from '../../shared/proto.ts';
import type { LeaseHolder } from '../leader/lease.ts';
import type { RoleView } from '../leader/roles.ts';
import { sendJson } from './openai/edge.ts';

/**
 * A standby coordinator serves the same API as the leader by forwarding to it, so a client
 * keeps working through any coordinator's address:
 *
 *   gRPC  every method but Join is relayed to the leader (unary and server-streaming, statuses
 *         passed through unchanged). The caller's credential was checked here first (the guard
 *         wraps these handlers); the relay presents this coordinator's admin certificate from the
 *         shared cluster CA, since API keys live in each coordinator's state dir. Status is
 *         relayed and then says this coordinator is a standby and who leads. Join stays local
 *         and is refused with the leader's address: the join token was made by one coordinator
 *         and the agent must announce its address to the one that dials it.
 *   HTTP  every route but /healthz, /metrics and /status is proxied to the leader's HTTP address
 *         (http-proxy-3; SSE streams through unbuffered); the leader's own guard decides.
 *
 * With no leader known yet (an election in progress) a request fails UNAVAILABLE / 503 with
 * Retry-After instead of waiting: clients that retry on any coordinator keep working.
 */
export interface ForwardingOptions {
  readonly roles: () => RoleView;
  /** An admin client certificate of this cluster, for relayed gRPC calls. */
  readonly adminTls: () => Promise<TlsCredentials>;
  readonly log: Logger;
}

const LOCAL_HTTP = new Set(['/healthz', '/metrics', '/status']);

function standbyLeader(roles: () => RoleView): LeaseHolder | null | undefined {
  const v = roles();
  return v.role === 'standby' ? v.leader : undefined;
}

function noLeader(): grpc.ServiceError {
  return Object.assign(new Error('no leader'), { code: grpc.status.UNAVAILABLE, details: 'this coordinator is a standby and no leader is known yet (an election takes up to the lease TTL): retry', metadata: new grpc.Metadata() });
}

type Call = grpc.ServerUnaryCall<unknown, unknown> & grpc.ServerWritableStream<unknown, unknown>;
type Relay = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export class GrpcRelay {
  #client: { address: string; client: Relay } | undefined;

  constructor(private readonly o: ForwardingOptions) {}

  /** The handlers: local while this coordinator leads (or is the only one), relayed while it is a standby. */
  wrap(service: grpc.ServiceDefinition, local: grpc.UntypedServiceImplementation): grpc.UntypedServiceImplementation {
    const out: grpc.UntypedServiceImplementation = {};
    for (const [method, def] of Object.entries(service)) {
      const handler = local[method] as ((call: Call, cb?: grpc.sendUnaryData<unknown>) => void) | undefined;
      if (!handler) continue;
      const wrapped = (call: Call, cb?: grpc.sendUnaryData<unknown>) => {
        const leader = standbyLeader(this.o.roles);
        if (leader === undefined || (method === 'Status' && leader === null)) return handler(call, cb);
        const fail = (e: grpc.ServiceError) => (def.responseStream ? call.emit('error', e) : cb?.(e, null));
        if (leader === null) return fail(noLeader());
        if (method === 'Join') {
          return fail(Object.assign(new Error('standby'), { code: grpc.status.UNAVAILABLE, details: `this coordinator is a standby: join through the leader at ${leader.addresses.grpc}`, metadata: new grpc.Metadata() }));
        }
        this.#relay(leader, method, def, call, cb).catch((err: unknown) => fail(Object.assign(new Error('relay'), { code: grpc.status.UNAVAILABLE, details: `relay to the leader failed: ${errorMessage(err)}`, metadata: new grpc.Metadata() })));
      };
      out[method] = wrapped as grpc.UntypedHandleCall;
    }
    return out;
  }

  async #relay(leader: LeaseHolder, method: string, def: grpc.MethodDefinition<unknown, unknown>, call: Call, cb?: grpc.sendUnaryData<unknown>): Promise<void> {
    const client = await this.#clientFor(leader.addresses.grpc);
    if (!def.responseStream) {
      client[method]?.(call.request, new grpc.Metadata(), { deadline: call.getDeadline() }, (err: grpc.ServiceError | null, res: unknown) => {
        if (err) return cb?.(err, null);
        // Status answered by the leader, told from this coordinator's side.
        cb?.(null, method === 'Status' ? { ...(res as object), role: 'standby', leader: leaderToWire(leader) } : res);
      });
      return;
    }
    const up = client[method]?.(call.request, new grpc.Metadata()) as grpc.ClientReadableStream<unknown>;
    call.on('cancelled', () => up.cancel());
    up.on('data', (m: unknown) => {
      // Back-pressure: a slow client slows the relay instead of buffering without bound.
      if (!call.write(m)) {
        up.pause();
        call.once('drain', () => up.resume());
      }
    });
    up.on('end', () => call.end());
    up.on('error', (err: grpc.ServiceError) => {
      if (!call.cancelled) call.emit('error', err);
    });
  }

  async #clientFor(address: string): Promise<Relay> {
    if (this.#client?.address === address) return this.#client.client;
    this.#client?.client.close();
    const Ctor = orchardV1().Coordinator!;
    const tls = await this.o.adminTls();
    const client = new Ctor(address, clusterChannelCredentials(tls, { role: 'coordinator' }), CLUSTER_CHANNEL_OPTIONS) as Relay;
    this.#client = { address, client };
    return client;
  }

  close(): void {
    this.#client?.client.close();
    this.#client = undefined;
  }
}

export function leaderToWire(l: LeaseHolder | null): Record<string, string> | undefined {
  return l ? { coordinatorId: l.coordinatorId, grpc: l.addresses.grpc, http: l.addresses.http } : undefined;
}

/** HTTP in front of the router: proxied to the leader while this coordinator is a standby. */
export class HttpRelay {
  readonly #proxy = createProxyServer({ xfwd: true });

  constructor(private readonly o: ForwardingOptions) {}

  /** Handled here (true), or left to the local router (false). */
  handle(req: IncomingMessage, res: ServerResponse): boolean {
    const leader = standbyLeader(this.o.roles);
    const path = (req.url ?? '/').split('?')[0] ?? '/';
    if (leader === undefined || LOCAL_HTTP.has(path)) return false;
    if (leader === null) {
      res.setHeader('retry-after', '1');
      sendJson(res, 503, { error: { message: 'this coordinator is a standby and no leader is known yet: retry', type: 'unavailable' } });
      return true;
    }
    this.#proxy.web(req, res, { target: `http://${leader.addresses.http}` }, (err: Error) => {
      this.o.log.warn({ path, leader: leader.addresses.http, err: errorMessage(err) }, 'forwarding to the leader failed');
      if (res.headersSent) return res.destroy();
      res.setHeader('retry-after', '1');
      sendJson(res, 502, { error: { message: `the leader at ${leader.addresses.http} did not answer: retry`, type: 'unavailable' } });
    });
    return true;
  }

  /** The leader's /status, said from this coordinator's side (undefined: not a standby, or no leader). */
  async leaderStatus(req: IncomingMessage): Promise<Record<string, unknown> | undefined> {
    const leader = standbyLeader(this.o.roles);
    if (!leader) return undefined;
    const headers: Record<string, string> = {};
    if (req.headers.authorization) headers.authorization = req.headers.authorization;
    const r = await fetch(`http://${leader.addresses.http}/status`, { headers, signal: AbortSignal.timeout(5000) });
    if (!r.ok) return undefined;
    return { ...((await r.json()) as Record<string, unknown>), role: 'standby', leader: leaderToWire(leader) };
  }

  close(): void {
    this.#proxy.close();
  }
}
