import * as grpc from '@grpc/grpc-js';

/**
 * A grpc-js Server whose accepted TCP connections have Nagle's algorithm off (TCP_NODELAY).
 *
 * Why: tokens are small messages written one by one. grpc-js turns Nagle off on the client side
 * (transport.js `setNoDelay()`), but its server uses `http2.createServer(commonServerOptions)`,
 * and on Node 20 a net.Server's `noDelay` defaults to false — so each streamed token can wait
 * for the ACK of the previous segment (delayed ACK) before it leaves. Node's net.Server accepts
 * `noDelay` and http2.createServer passes its options through; grpc-js exposes no option for
 * it, so it is set on the options object grpc-js builds in its constructor. If a future grpc-js
 * renames that field this silently does nothing (the server still works, only slower) —
 * bench/ttft-path.ts shows the difference.
 */
export function createGrpcServer(options?: grpc.ServerOptions): grpc.Server {
  const server = new grpc.Server(options);
  const common = (server as unknown as { commonServerOptions?: Record<string, unknown> }).commonServerOptions;
  if (common && typeof common === 'object') common.noDelay = true;
  return server;
}
