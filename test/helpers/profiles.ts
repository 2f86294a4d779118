import { type HardwareProfile, PROTOCOL_VERSION } from '../../src/shared/hardware.ts';

/**
 * The hardware profile tests and benches start from: a Mac Studio M2 Ultra 192 GB as its agent
 * would describe it. Each test overrides only what it is about, so a new profile field is added in
 * one place.
 */
export function studioProfile(overrides: Partial<HardwareProfile> = {}): HardwareProfile {
  return {
    nodeId: 'n-1',
    name: 'studio',
    hostname: 'studio.local',
    os: 'macos',
    osVersion: '15.1',
    chip: 'Apple M2 Ultra',
    performanceCores: 16,
    efficiencyCores: 8,
    gpuCores: 76,
    memoryBytes: 192 * 2 ** 30,
    bandwidthBytesPerSecond: 800e9,
    wiredLimitBytes: 144 * 2 ** 30,
    budgetBytes: 140 * 2 ** 30,
    engines: ['rpc-server', 'llama-server'],
    interfaces: [],
    protocolVersion: PROTOCOL_VERSION,
    agentVersion: '0.1.0',
    ...overrides,
  };
}
