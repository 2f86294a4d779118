import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/** Where the `.proto` contracts live (package `orchard.v1`). */
export const PROTO_ROOT = fileURLToPath(new URL('../../proto', import.meta.url));

// Loaded once per process. 64-bit integers arrive as strings and enums as names; convert them
// at the edge (servers/clients), never deeper inside.
let cached: grpc.GrpcObject | undefined;

export function loadOrchardProto(): grpc.GrpcObject {
  if (!cached) {
    const def = protoLoader.loadSync(
      ['orchard/v1/common.proto', 'orchard/v1/node_agent.proto', 'orchard/v1/coordinator.proto'],
      { includeDirs: [PROTO_ROOT], longs: String, enums: String, defaults: true, oneofs: true, keepCase: false },
    );
    cached = grpc.loadPackageDefinition(def);
  }
  return cached;
}

export function orchardV1(): Record<string, grpc.ServiceClientConstructor & { service: grpc.ServiceDefinition }> {
  const pkg = loadOrchardProto() as { orchard: { v1: Record<string, unknown> } };
  return pkg.orchard.v1 as Record<string, grpc.ServiceClientConstructor & { service: grpc.ServiceDefinition }>;
}
