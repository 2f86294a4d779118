import { z } from 'zod';
import type { RpcTarget } from '../shared/placement/llama-args.ts';

const NODE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
// A tunnel host: an IP literal or a DNS name, nothing a parser could widen (no scheme, no port).
const TUNNEL_HOST = /^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:]{2,39}|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$/;

/**
 * proto RpcTarget: a node, its tunnel (tunnel_port 0 = none) and an engine's loopback port there.
 * One schema for every engine port a node reaches on another (llama.rpc, mlx.ring_ranks), so
 * none of them can carry a free-form address. `what` names the field in refusals.
 */
export function rpcTargetSchema(what: string) {
  return z
    .object({
      nodeId: z.string().regex(NODE_ID, `${what}.node_id: invalid node id`),
      tunnelHost: z.string().regex(TUNNEL_HOST, `${what}.tunnel_host: an IP address or host name`).or(z.literal('')).default(''),
      tunnelPort: z.number().int().min(0).max(65535).default(0),
      enginePort: z.number().int().min(1).max(65535),
    })
    .strict()
    .refine((t) => (t.tunnelPort === 0) === (t.tunnelHost === ''), `${what}: tunnel_host and tunnel_port go together`)
    .transform((t): RpcTarget => ({ nodeId: t.nodeId, enginePort: t.enginePort, ...(t.tunnelPort > 0 ? { tunnel: { host: t.tunnelHost, port: t.tunnelPort } } : {}) }));
}
