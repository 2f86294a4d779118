import * as grpc from '@grpc/grpc-js';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { CLUSTER_CHANNEL_OPTIONS, clusterChannelCredentials } from '../../shared/pki/grpc-tls.ts';
import { orchardV1 } from '../../shared/proto.ts';

/** Where the CLI finds the coordinator: --coordinator, ORCHARD_COORDINATOR, or this machine. */
export const DEFAULT_COORDINATOR_GRPC_PORT = 7420;
export const DEFAULT_COORDINATOR_HTTP_PORT = 8420;

export function coordinatorAddress(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): string {
  const a = flag ?? env.ORCHARD_COORDINATOR ?? `127.0.0.1:${DEFAULT_COORDINATOR_GRPC_PORT}`;
  if (!/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$/.test(a)) throw new UsageError(`invalid coordinator address "${a}": use HOST:PORT`);
  return /:\d+$/.test(a) && !a.endsWith(']') ? a : `${a}:${DEFAULT_COORDINATOR_GRPC_PORT}`;
}

type Wire = Record<string, unknown>;

/** A gRPC failure as the one-line CLI error it should be. */
export function cliError(err: unknown, address: string): OrchardError {
  const e = err as grpc.ServiceError;
  // grpc-js appends resolver notes to connection errors; the user needs the first sentence.
  const details = (e?.details || e?.message || String(err)).replace(/\.?\s*Resolution note:.*$/s, '').replace(/\. Last error: Error:/, ':');
  switch (e?.code) {
    case grpc.status.UNAVAILABLE:
      if (/No connection established|ECONNREFUSED|connect|Name resolution/i.test(details)) {
        return new OrchardError(`cannot reach the coordinator at ${address}: ${details} (is \`orchard coordinator\` running? use --coordinator HOST:PORT)`);
      }
      return new OrchardError(details);
    case grpc.status.INVALID_ARGUMENT:
      return new UsageError(details);
    case grpc.status.PERMISSION_DENIED:
      return new OrchardError(details);
    case grpc.status.UNAUTHENTICATED:
      return new OrchardError(`the coordinator at ${address} refused the credential: ${details}`);
    case grpc.status.DEADLINE_EXCEEDED:
      return new OrchardError(`the coordinator at ${address} did not answer in time: ${details}`);
    default:
      return new OrchardError(details);
  }
}

export class CoordinatorClient {
  readonly #c: grpc.Client & Record<string, unknown>;
  readonly #apiKey: string | undefined;

  /**
   * `tls`: the cluster CA the coordinator's certificate must chain to (and, for an admin, the
   * client key and certificate); `apiKey`: sent as `authorization: Bearer KEY` metadata.
   */
  constructor(
    readonly address: string,
    o: { readonly tls: { readonly caCertPem: string; readonly keyPem?: string | undefined; readonly certPem?: string | undefined }; readonly apiKey?: string | undefined },
  ) {
    const Ctor = orchardV1().Coordinator!;
    const tls = o.tls.keyPem && o.tls.certPem ? { caCertPem: o.tls.caCertPem, keyPem: o.tls.keyPem, certPem: o.tls.certPem } : { caCertPem: o.tls.caCertPem };
    this.#c = new Ctor(address, clusterChannelCredentials(tls, { role: 'coordinator' }), CLUSTER_CHANNEL_OPTIONS) as grpc.Client & Record<string, unknown>;
    this.#apiKey = o.apiKey;
  }

  #metadata(): grpc.Metadata {
    const md = new grpc.Metadata();
    if (this.#apiKey) md.set('authorization', `Bearer ${this.#apiKey}`);
    return md;
  }

  unary(method: string, req: Wire, timeoutMs = 15_000): Promise<Wire> {
    const fn = this.#c[method] as (r: Wire, md: grpc.Metadata, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r: Wire) => void) => void;
    return new Promise((resolve, reject) =>
      fn.call(this.#c, req, this.#metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(cliError(err, this.address)) : resolve(res))),
    );
  }

  /** Server stream as an async iterable; errors become one-line CLI errors. */
  async *stream(method: string, req: Wire, signal?: AbortSignal): AsyncGenerator<Wire> {
    const call = (this.#c[method] as (r: Wire, md: grpc.Metadata) => grpc.ClientReadableStream<Wire>).call(this.#c, req, this.#metadata());
    const onAbort = () => call.cancel();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for await (const m of call as AsyncIterable<Wire>) yield m;
    } catch (err) {
      throw cliError(err, this.address);
    } finally {
      signal?.removeEventListener('abort', onAbort);
      call.cancel();
    }
  }

  close(): void {
    this.#c.close();
  }
}
