import { existsSync, readdirSync } from 'node:fs';
import { isIPv4 } from 'node:net';
import { DEFAULT_ENGINE_PORT_RANGE, drawPorts, type PortRange } from '../../../shared/engine-port-range.ts';
import { UsageError } from '../../../shared/errors.ts';
import type { NetworkInterfaceInfo } from '../../../shared/hardware.ts';

/**
 * How the coordinator lays out one MLX model instance over its nodes. Pure: the runtime hands in
 * the plan's stages (plan order, first layers first), each node's reachable address and
 * interfaces, and a random source; out come the per-rank StartEngine `mlx` fields.
 *
 * Rank order follows mlx-lm: plan stage s runs on rank N-1-s, so rank 0 holds the LAST layers
 * (the plan's head stage, with the output) and is the one that emits tokens; Generate goes to
 * rank 0's agent. Start order: ranks 0..N-2 first, rank N-1 once they all reported "starting"
 * (rank N-1 dials with ~31 s of retries; the others accept without a timeout).
 *
 * Backend: the TCP ring, every link between two nodes through their agents' TLS 1.3 tunnels
 * (each rank binds 127.0.0.1; `ring_ranks` name the rank's node, that node's tunnel and the ring
 * port; the agents write the hostfiles). JACCL (RDMA over Thunderbolt 5) cannot be tunnelled: it
 * is chosen only when the load allows untunnelled RDMA (`--allow-untunnelled-rdma`) and every pair
 * of nodes is linked by RDMA-capable Thunderbolt interfaces. JACCL cannot run on Linux: only this
 * generation is tested here. Link detection is by IPv4 subnet: macOS gives each Thunderbolt cable its own
 * bridge interface, and two ends of one cable share a subnet (self-assigned 169.254/16 or a
 * configured /24); we compare /24 prefixes, or 169.254/16 as a whole, which is a heuristic a user
 * with odd addressing can sidestep with the ring. RDMA device names follow macOS: `rdma_<if>`.
 */
export interface MlxStageNode {
  readonly nodeId: string;
  readonly nodeName: string;
  /** The agent's address as the coordinator reaches it ("ip:port" or "[v6]:port"). */
  readonly agentAddress: string;
  readonly interfaces: readonly NetworkInterfaceInfo[];
  /** The agent's tunnel listener port (HardwareProfile.tunnelPort); undefined = it runs none. */
  readonly tunnelPort?: number | undefined;
  /** Layers of this plan stage. */
  readonly layers: number;
  /** The agent's engine port range (HardwareProfile.enginePorts); undefined (an older agent) = the default. */
  readonly enginePorts?: PortRange | undefined;
}

export interface MlxRankWire {
  readonly modelDir: string;
  readonly rank: number;
  readonly worldSize: number;
  readonly backend: string;
  /** Ring: one proto RpcTarget per rank, rank order. */
  readonly ringRanks: RingRankWire[];
  readonly jacclDevices: { devices: string[] }[];
  readonly jacclCoordinator: string;
  readonly split: number[];
  readonly mode: string;
  readonly maxTokens: number;
  readonly stallTimeoutSeconds: number;
  readonly returnWhenStarting: boolean;
}

/** proto RpcTarget as the ring sends it: the rank's node, its tunnel (0/"" = none), the ring port on its 127.0.0.1. */
export interface RingRankWire {
  readonly nodeId: string;
  readonly tunnelHost: string;
  readonly tunnelPort: number;
  readonly enginePort: number;
}

export interface MlxRankLaunch {
  readonly rank: number;
  /** Plan stage index (rank = N-1-stage). */
  readonly stage: number;
  readonly nodeId: string;
  readonly nodeName: string;
  readonly mlx: MlxRankWire;
}

export interface MlxInstanceLaunch {
  readonly backend: 'ring' | 'jaccl' | 'none';
  /** JACCL: links between nodes bypass the TLS tunnels (allowed by the load, shown in status). */
  readonly untunnelledRdma: boolean;
  /** Why this backend (for logs and the load progress). */
  readonly reason: string;
  /** Rank order: ranks[r] is rank r. */
  readonly ranks: readonly MlxRankLaunch[];
}

export interface MlxLaunchOptions {
  readonly modelDir: string;
  readonly mode?: 'pipeline' | 'tensor';
  readonly maxTokens: number;
  readonly stallTimeoutSeconds: number;
  /** In [0, 1); Math.random in production, seeded in tests. */
  readonly random: () => number;
  /** `--allow-untunnelled-rdma`: JACCL may carry this instance's links outside the tunnels. */
  readonly allowUntunnelledRdma?: boolean | undefined;
}

/** Literal IPv4 of an agent address ("127.0.0.1:50151" → "127.0.0.1"); the ring takes nothing else. */
export function ipv4Of(agentAddress: string): string {
  const h = agentAddress.startsWith('[')
    ? agentAddress.slice(1, agentAddress.indexOf(']'))
    : agentAddress.includes(':')
      ? agentAddress.slice(0, agentAddress.lastIndexOf(':'))
      : agentAddress;
  if (!isIPv4(h)) throw new UsageError(`MLX ring needs literal IPv4 node addresses; this node is reached at "${agentAddress}" (join it by IPv4)`);
  return h;
}

/**
 * One port per rank from its node's engine port range (outside that machine's ephemeral range:
 * shared/engine-port-range.ts), all distinct, drawn at random. Fresh per launch: ring sockets use
 * SO_REUSEPORT, so a stale worker on a reused port could steal connections.
 */
export function freshPorts(nodes: readonly Pick<MlxStageNode, 'enginePorts'>[], random: () => number): number[] {
  const out: number[] = [];
  for (const n of nodes) out.push(...drawPorts(1, n.enginePorts ?? DEFAULT_ENGINE_PORT_RANGE, random, (p) => out.includes(p)));
  return out;
}

function subnetKey(ip: string): string | undefined {
  if (!isIPv4(ip)) return undefined;
  const [a, b, c] = ip.split('.');
  return a === '169' && b === '254' ? '169.254' : `${a}.${b}.${c}`;
}

/**
 * The RDMA device on node `from` that reaches node `to`, or undefined: an RDMA-capable
 * Thunderbolt interface of `from` sharing a subnet with a Thunderbolt interface of `to`.
 */
export function rdmaDeviceBetween(from: readonly NetworkInterfaceInfo[], to: readonly NetworkInterfaceInfo[]): { device: string; address: string } | undefined {
  const theirs = new Set(to.filter((i) => i.thunderbolt).flatMap((i) => i.addresses.map(subnetKey).filter((k): k is string => !!k)));
  for (const i of from) {
    if (!i.thunderbolt || !i.rdma) continue;
    for (const a of i.addresses) {
      const k = subnetKey(a);
      if (k && theirs.has(k)) return { device: `rdma_${i.name}`, address: a };
    }
  }
  return undefined;
}

/** The N×N JACCL device matrix (rank order), or undefined when some pair has no RDMA link. */
export function jacclMatrix(nodesByRank: readonly { interfaces: readonly NetworkInterfaceInfo[] }[]): (string | null)[][] | undefined {
  const n = nodesByRank.length;
  const m: (string | null)[][] = [];
  for (let i = 0; i < n; i++) {
    const row: (string | null)[] = [];
    for (let j = 0; j < n; j++) {
      if (i === j) {
        row.push(null);
        continue;
      }
      const d = rdmaDeviceBetween(nodesByRank[i]!.interfaces, nodesByRank[j]!.interfaces);
      if (!d) return undefined;
      row.push(d.device);
    }
    m.push(row);
  }
  return m;
}

/** The ring as `ring_ranks`: each rank's node, that node's tunnel (at the address its agent answers on), its fresh port. */
export function ringRanks(nodesByRank: readonly MlxStageNode[], ports: readonly number[]): RingRankWire[] {
  return nodesByRank.map((node, r) => ({
    nodeId: node.nodeId,
    tunnelHost: node.tunnelPort ? hostOfAgent(node.agentAddress) : '',
    tunnelPort: node.tunnelPort ?? 0,
    enginePort: ports[r]!,
  }));
}

/** "ip:port" / "[v6]:port" / "host:port" → the host. */
function hostOfAgent(agentAddress: string): string {
  if (agentAddress.startsWith('[')) return agentAddress.slice(1, agentAddress.indexOf(']'));
  const i = agentAddress.lastIndexOf(':');
  return i > 0 ? agentAddress.slice(0, i) : agentAddress;
}

/**
 * The backend ranks on these nodes use: JACCL only when every pair has an RDMA Thunderbolt link
 * and the load allows untunnelled RDMA, else the TCP ring through the tunnels (one node: none).
 */
export function mlxBackendOf(nodes: readonly Pick<MlxStageNode, 'nodeId' | 'interfaces'>[], allowUntunnelledRdma: boolean): MlxInstanceLaunch['backend'] {
  if (nodes.length <= 1) return 'none';
  const distinct = new Set(nodes.map((s) => s.nodeId)).size === nodes.length;
  return distinct && allowUntunnelledRdma && jacclMatrix(nodes) ? 'jaccl' : 'ring';
}

/** Lay out one instance: ranks in plan order reversed, backend, fresh ports, per-rank wire spec. */
export function mlxInstanceLaunch(stages: readonly MlxStageNode[], o: MlxLaunchOptions): MlxInstanceLaunch {
  const n = stages.length;
  if (n === 0) throw new UsageError('an MLX instance needs at least one stage');
  const ids = new Set(stages.map((s) => s.nodeId));
  // The ring takes one listening endpoint per rank; two ranks of one node are fine (distinct
  // ports), but the planner gives each node one stage anyway.
  const byRank = stages.map((_, r) => ({ ...stages[n - 1 - r]!, stage: n - 1 - r }));
  const split = stages.map((s) => s.layers);
  const mode = o.mode ?? 'pipeline';
  const base = (rank: number): Omit<MlxRankWire, 'backend' | 'ringRanks' | 'jacclDevices' | 'jacclCoordinator'> => ({
    modelDir: o.modelDir,
    rank,
    worldSize: n,
    split: n > 1 && mode === 'pipeline' ? split : [],
    mode: n === 1 ? 'single' : mode,
    maxTokens: o.maxTokens,
    stallTimeoutSeconds: o.stallTimeoutSeconds,
    returnWhenStarting: false,
  });
  const rankOf = (r: number, mlx: MlxRankWire): MlxRankLaunch => ({ rank: r, stage: byRank[r]!.stage, nodeId: byRank[r]!.nodeId, nodeName: byRank[r]!.nodeName, mlx });
  if (n === 1) {
    return {
      backend: 'none',
      untunnelledRdma: false,
      reason: 'one stage: a single MLX process',
      ranks: [rankOf(0, { ...base(0), backend: '', ringRanks: [], jacclDevices: [], jacclCoordinator: '' })],
    };
  }
  const matrix = ids.size === n ? jacclMatrix(byRank) : undefined;
  if (matrix && o.allowUntunnelledRdma) {
    const [port] = freshPorts([byRank[0]!], o.random);
    const coordinator = `${ipv4Of(byRank[0]!.agentAddress)}:${port}`;
    const devices = matrix.map((row) => ({ devices: row.map((d) => d ?? '') }));
    return {
      backend: 'jaccl',
      untunnelledRdma: true,
      reason: 'every pair of nodes has an RDMA-capable Thunderbolt link and the load allows untunnelled RDMA (JACCL bypasses the TLS tunnels)',
      ranks: byRank.map((_, r) => rankOf(r, { ...base(r), backend: 'jaccl', ringRanks: [], jacclDevices: devices, jacclCoordinator: coordinator })),
    };
  }
  const ring = ringRanks(byRank, freshPorts(byRank, o.random));
  const why = matrix
    ? 'RDMA links exist, but JACCL cannot be tunnelled: load with --allow-untunnelled-rdma to use it'
    : ids.size < n
      ? 'a node holds more than one rank'
      : 'not every pair of nodes has an RDMA Thunderbolt link';
  return {
    backend: 'ring',
    untunnelledRdma: false,
    reason: `TCP ring through the TLS tunnels (${why})`,
    ranks: byRank.map((_, r) => rankOf(r, { ...base(r), backend: 'ring', ringRanks: ring, jacclDevices: [], jacclCoordinator: '' })),
  };
}

/**
 * Same test as `isMlxModelDir` (config.json + a .safetensors file), synchronous so the runtime
 * can pick the engine without yielding between "is the name free" and reserving it.
 */
export function looksLikeMlxModelDir(path: string): boolean {
  try {
    if (!existsSync(path)) return false;
    const names = readdirSync(path);
    return names.includes('config.json') && names.some((n) => n.endsWith('.safetensors'));
  } catch {
    return false; // not a directory (a .gguf file) or unreadable
  }
}

/** Model format → engine: a directory with config.json is MLX, a .gguf file is llama.cpp. */
export function engineForModel(path: string, isMlxDir: boolean, requested: string | undefined): 'mlx' | 'llama' {
  const r = (requested ?? '').trim();
  if (r !== '' && r !== 'auto' && r !== 'mlx' && r !== 'llama') throw new UsageError(`unknown engine "${requested}": mlx, llama or auto`);
  const auto = isMlxDir ? 'mlx' : 'llama';
  if (r === 'mlx' && !isMlxDir) throw new UsageError(`--engine mlx needs an MLX model directory (config.json + safetensors): ${path}`);
  if (r === 'llama' && isMlxDir) throw new UsageError(`--engine llama needs a .gguf file; ${path} is an MLX model directory`);
  return r === 'mlx' || r === 'llama' ? r : auto;
}
