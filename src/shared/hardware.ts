import type { PortRange } from './engine-port-range.ts';

/**
 * What a node is and can hold — the TypeScript twin of `orchard.v1.HardwareProfile`.
 * Produced by the node agent's probe (src/node/hardware), consumed by the planner and the
 * coordinator. Bytes and bytes/second everywhere; plain numbers (all sizes fit in 2^53).
 */
export interface NetworkInterfaceInfo {
  readonly name: string;
  readonly addresses: readonly string[];
  readonly thunderbolt: boolean;
  readonly rdma: boolean;
}

export interface HardwareProfile {
  readonly nodeId: string;
  readonly name: string;
  readonly hostname: string;
  readonly os: 'macos' | 'linux';
  readonly osVersion: string;
  readonly chip: string;
  readonly performanceCores: number;
  readonly efficiencyCores: number;
  readonly gpuCores: number;
  readonly memoryBytes: number;
  readonly bandwidthBytesPerSecond: number;
  /** GPU wired-memory limit; on macOS with `iogpu.wired_limit_mb` = 0 this is the modelled OS default. */
  readonly wiredLimitBytes: number;
  /** Model-memory budget the planner may use on this node. */
  readonly budgetBytes: number;
  readonly engines: readonly string[];
  readonly interfaces: readonly NetworkInterfaceInfo[];
  readonly protocolVersion: string;
  readonly agentVersion: string;
  /**
   * Port of the agent's Prometheus `/metrics`, served on the same host as its gRPC API (the
   * coordinator lists `<agent host>:<metricsPort>` in its HTTP-SD answer). Absent until the
   * metrics server listens, and from agents that predate the field.
   */
  readonly metricsPort?: number | undefined;
  /**
   * What the node measured of its llama.cpp engine (`orchard node --calibrate`, cached): decode
   * read bandwidth and prompt-processing FLOP/s in the cost model's accounting. Absent (0 on the
   * wire) until measured; the planner then uses the spec bandwidth × the engine's efficiency.
   */
  readonly effectiveBandwidthBytesPerSecond?: number | undefined;
  readonly prefillFlopsPerSecond?: number | undefined;
  /**
   * Seconds per decoded token the engine pays as the head whatever the bytes it reads (the
   * calibration's two-depth fit: placement/decode-fit.ts; 0 when it found none). Absent until
   * measured (on the wire: no measured bandwidth); the planner then charges
   * PlacementOptions.headOverheadSeconds.
   */
  readonly decodeFixedSecondsPerToken?: number | undefined;
  /**
   * Seconds a llama.cpp stage boundary whose worker is this node costs per round trip beyond the
   * link probe's round trip (the calibration's loopback tunnel, calibrate.ts). Absent until
   * measured (on the wire 0, the planner's default, which reads back as absent).
   */
  readonly boundaryOverheadSeconds?: number | undefined;
  /**
   * FLOP/s of attention in decode (the calibration's windows at two prompt lengths, calibrate.ts;
   * cost.ts layerAttentionFlops). Absent until measured (on the wire 0); the planner then prices a
   * token's attention as the KV bytes it reads alone.
   */
  readonly decodeAttentionFlopsPerSecond?: number | undefined;
  /**
   * Port of the agent's TLS 1.3 tunnel listener, on the same host as its gRPC API: how engine
   * traffic (a head's ggml-rpc connections) reaches this node's loopback-only engines. Absent
   * while the node holds no cluster credentials (it then runs no tunnel).
   */
  readonly tunnelPort?: number | undefined;
  /**
   * The ports this agent hands its engines (all bound on 127.0.0.1), outside the machine's
   * ephemeral range (engine-port-range.ts); the coordinator picks MLX ring ports from it. Absent
   * from an older agent.
   */
  readonly enginePorts?: PortRange | undefined;
}

export interface LiveStats {
  readonly availableBytes: number;
  readonly memoryPressure: 'normal' | 'warn' | 'critical' | 'unknown';
  readonly thermalState: 'nominal' | 'fair' | 'serious' | 'critical' | 'unknown';
  readonly timestampSeconds: number;
}

/** Bumped when the control-plane contract changes incompatibly; advertised in Bonjour TXT. */
export const PROTOCOL_VERSION = '1';
