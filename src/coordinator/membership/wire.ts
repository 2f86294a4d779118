import type { HardwareProfile, LiveStats } from '../../shared/hardware.ts';

/**
 * Conversions between proto-loader objects (longs as strings, enums as names, camelCase) and
 * Orchard's TypeScript types. Done once here, at the edge, so nothing deeper sees strings
 * for sizes.
 */
type Wire = Record<string, unknown>;

const num = (v: unknown): number => {
  if (typeof v === 'number') return v;
  if (typeof v === 'string' && v !== '') return Number(v);
  return 0;
};
const str = (v: unknown): string => (typeof v === 'string' ? v : '');

export function profileFromWire(p: Wire | undefined | null): HardwareProfile {
  const w = p ?? {};
  return {
    nodeId: str(w.nodeId),
    name: str(w.name),
    hostname: str(w.hostname),
    os: w.os === 'linux' ? 'linux' : 'macos',
    osVersion: str(w.osVersion),
    chip: str(w.chip),
    performanceCores: num(w.performanceCores),
    efficiencyCores: num(w.efficiencyCores),
    gpuCores: num(w.gpuCores),
    memoryBytes: num(w.memoryBytes),
    bandwidthBytesPerSecond: num(w.bandwidthBytesPerSecond),
    wiredLimitBytes: num(w.wiredLimitBytes),
    usableBytes: num(w.usableBytes),
    engines: Array.isArray(w.engines) ? w.engines.map(String) : [],
    interfaces: Array.isArray(w.interfaces)
      ? (w.interfaces as Wire[]).map((i) => ({
          name: str(i.name),
          addresses: Array.isArray(i.addresses) ? i.addresses.map(String) : [],
          thunderbolt: i.thunderbolt === true,
          rdma: i.rdma === true,
        }))
      : [],
    protocolVersion: str(w.protocolVersion),
    agentVersion: str(w.agentVersion),
    metricsPort: num(w.metricsPort) || undefined,
  };
}

export function profileToWire(p: HardwareProfile): Wire {
  return {
    ...p,
    memoryBytes: String(p.memoryBytes),
    bandwidthBytesPerSecond: String(p.bandwidthBytesPerSecond),
    wiredLimitBytes: String(p.wiredLimitBytes),
    usableBytes: String(p.usableBytes),
    engines: [...p.engines],
    interfaces: p.interfaces.map((i) => ({ ...i, addresses: [...i.addresses] })),
  };
}

const PRESSURES = new Set(['normal', 'warn', 'critical', 'unknown']);
const THERMALS = new Set(['nominal', 'fair', 'serious', 'critical', 'unknown']);

export function liveFromWire(l: Wire | undefined | null): LiveStats | undefined {
  if (!l) return undefined;
  return {
    availableBytes: num(l.availableBytes),
    memoryPressure: (PRESSURES.has(str(l.memoryPressure)) ? l.memoryPressure : 'unknown') as LiveStats['memoryPressure'],
    thermalState: (THERMALS.has(str(l.thermalState)) ? l.thermalState : 'unknown') as LiveStats['thermalState'],
    timestampSeconds: num(l.timestampSeconds),
  };
}

export function liveToWire(l: LiveStats | undefined): Wire | undefined {
  return l ? { ...l, availableBytes: String(l.availableBytes) } : undefined;
}

export type EngineKindName = 'ENGINE_KIND_RPC_SERVER' | 'ENGINE_KIND_LLAMA_SERVER' | 'ENGINE_KIND_MLX_RANK' | 'ENGINE_KIND_UNSPECIFIED';

export interface EngineInfo {
  readonly engineId: string;
  readonly kind: EngineKindName;
  readonly host: string;
  readonly port: number;
  readonly pid: number;
  readonly model: string;
  readonly startedAtSeconds: number;
}

export function engineFromWire(e: Wire | undefined | null): EngineInfo {
  const w = e ?? {};
  return {
    engineId: str(w.engineId),
    kind: (str(w.kind) || 'ENGINE_KIND_UNSPECIFIED') as EngineKindName,
    host: str(w.host),
    port: num(w.port),
    pid: num(w.pid),
    model: str(w.model),
    startedAtSeconds: num(w.startedAtSeconds),
  };
}
