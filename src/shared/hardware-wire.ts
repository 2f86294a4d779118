import type { PortRange } from './engine-port-range.ts';
import type { HardwareProfile, LiveStats } from './hardware.ts';

/**
 * HardwareProfile and LiveStats to and from proto-loader objects (camelCase, uint64 as decimal
 * strings so no size passes through a lossy double on the wire side). The agent sends what the
 * coordinator reads, so both directions live here, once.
 *
 * `profileToWire` names every field of the message instead of spreading the profile: a spread
 * would pass along whatever else an object carries (the agent's and the coordinator's copies had
 * drifted exactly there), and the mapped type makes a field added to HardwareProfile a compile
 * error until it is put on the wire.
 */
export type Wire = Record<string, unknown>;

/** A proto-loader number field (uint64 arrives as a decimal string); unset reads as 0. */
export const num = (v: unknown): number => {
  if (typeof v === 'number') return v;
  if (typeof v === 'string' && v !== '') return Number(v);
  return 0;
};
/** A proto-loader string field; unset reads as ''. */
export const str = (v: unknown): string => (typeof v === 'string' ? v : '');

export function profileToWire(p: HardwareProfile): { [K in keyof Required<HardwareProfile>]: unknown } {
  return {
    nodeId: p.nodeId,
    name: p.name,
    hostname: p.hostname,
    os: p.os,
    osVersion: p.osVersion,
    chip: p.chip,
    performanceCores: p.performanceCores,
    efficiencyCores: p.efficiencyCores,
    gpuCores: p.gpuCores,
    memoryBytes: String(p.memoryBytes),
    bandwidthBytesPerSecond: String(p.bandwidthBytesPerSecond),
    wiredLimitBytes: String(p.wiredLimitBytes),
    budgetBytes: String(p.budgetBytes),
    engines: [...p.engines],
    interfaces: p.interfaces.map((i) => ({ name: i.name, addresses: [...i.addresses], thunderbolt: i.thunderbolt, rdma: i.rdma })),
    protocolVersion: p.protocolVersion,
    agentVersion: p.agentVersion,
    // proto3 has no "unset" for a scalar: 0 means "no metrics server yet" (read back as undefined).
    metricsPort: p.metricsPort ?? 0,
    effectiveBandwidthBytesPerSecond: String(Math.round(p.effectiveBandwidthBytesPerSecond ?? 0)),
    prefillFlopsPerSecond: String(Math.round(p.prefillFlopsPerSecond ?? 0)),
    decodeFixedSecondsPerToken: p.decodeFixedSecondsPerToken ?? 0,
    boundaryOverheadSeconds: p.boundaryOverheadSeconds ?? 0,
    decodeAttentionFlopsPerSecond: p.decodeAttentionFlopsPerSecond ?? 0,
    tunnelPort: p.tunnelPort ?? 0,
    enginePorts: p.enginePorts ? { first: p.enginePorts[0], last: p.enginePorts[1] } : null,
  };
}

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
    budgetBytes: num(w.budgetBytes),
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
    effectiveBandwidthBytesPerSecond: num(w.effectiveBandwidthBytesPerSecond) || undefined,
    prefillFlopsPerSecond: num(w.prefillFlopsPerSecond) || undefined,
    // A calibrated node's fixed part is a measurement even when its fit found none (0).
    decodeFixedSecondsPerToken: num(w.effectiveBandwidthBytesPerSecond) ? num(w.decodeFixedSecondsPerToken) : undefined,
    // 0 is "none measured", which the planner assumes anyway: a measured 0 reads back the same.
    boundaryOverheadSeconds: (num(w.effectiveBandwidthBytesPerSecond) && num(w.boundaryOverheadSeconds)) || undefined,
    decodeAttentionFlopsPerSecond: (num(w.effectiveBandwidthBytesPerSecond) && num(w.decodeAttentionFlopsPerSecond)) || undefined,
    tunnelPort: num(w.tunnelPort) || undefined,
    enginePorts: enginePortsFromWire(w.enginePorts as Wire | null | undefined),
  };
}

/** A range an agent sent, if it is one (an older agent sends none). */
function enginePortsFromWire(w: Wire | null | undefined): PortRange | undefined {
  const first = num(w?.first);
  const last = num(w?.last);
  return first >= 1 && first <= last && last <= 65535 ? [first, last] : undefined;
}

const PRESSURES = new Set(['normal', 'warn', 'critical', 'unknown']);
const THERMALS = new Set(['nominal', 'fair', 'serious', 'critical', 'unknown']);

export function liveToWire(l: LiveStats): { [K in keyof LiveStats]: unknown } {
  return { availableBytes: String(l.availableBytes), memoryPressure: l.memoryPressure, thermalState: l.thermalState, timestampSeconds: l.timestampSeconds };
}

export function liveFromWire(l: Wire | undefined | null): LiveStats | undefined {
  if (!l) return undefined;
  return {
    availableBytes: num(l.availableBytes),
    memoryPressure: (PRESSURES.has(str(l.memoryPressure)) ? l.memoryPressure : 'unknown') as LiveStats['memoryPressure'],
    thermalState: (THERMALS.has(str(l.thermalState)) ? l.thermalState : 'unknown') as LiveStats['thermalState'],
    timestampSeconds: num(l.timestampSeconds),
  };
}
