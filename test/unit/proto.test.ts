import { describe, expect, it } from 'vitest';
import type { HardwareProfile, LiveStats } from '../../src/shared/hardware.ts';
import { liveFromWire, liveToWire, profileFromWire, profileToWire } from '../../src/shared/hardware-wire.ts';
import { orchardV1 } from '../../src/shared/proto.ts';
import { studioProfile } from '../helpers/profiles.ts';

describe('proto contracts', () => {
  it('load with proto-loader and expose both services', () => {
    const v1 = orchardV1();
    expect(Object.keys(v1.NodeAgent!.service)).toEqual(
      expect.arrayContaining(['Describe', 'Watch', 'StartEngine', 'StopEngine', 'Generate']),
    );
    expect(Object.keys(v1.Coordinator!.service)).toEqual(
      expect.arrayContaining(['Join', 'Status', 'Plan', 'Load', 'Unload', 'Generate']),
    );
    expect(v1.NodeAgent!.service.Watch!.responseStream).toBe(true);
  });
});

describe('hardware profile on the wire (one converter, both sides)', () => {
  const profile: HardwareProfile = studioProfile({
    nodeId: 'n1',
    // A calibrated node (orchard node --calibrate): the measurement travels too.
    effectiveBandwidthBytesPerSecond: 512_000_000_000,
    prefillFlopsPerSecond: 16_000_000_000_000,
    decodeFixedSecondsPerToken: 0.0042,
    boundaryOverheadSeconds: 0.0013,
    decodeAttentionFlopsPerSecond: 2.1e9,
    memoryBytes: 206_158_430_208,
    wiredLimitBytes: 154_618_822_656,
    budgetBytes: 9_007_199_254_740_991,
    engines: ['rpc-server', 'mlx'],
    interfaces: [{ name: 'en0', addresses: ['10.0.0.2', 'fe80::1'], thunderbolt: true, rdma: false }],
    protocolVersion: '1',
    metricsPort: 9151,
    tunnelPort: 9152,
    enginePorts: [20000, 32767],
  });
  // The real contract: what the agent's Describe serializes is what the coordinator reads back.
  const describe_ = orchardV1().NodeAgent!.service.Describe!;
  const roundTrip = (wire: unknown) => describe_.responseDeserialize(describe_.responseSerialize({ profile: wire })) as { profile: Record<string, unknown> };

  it('survives proto serialization exactly, 64-bit sizes as decimal strings', () => {
    const wire = profileToWire(profile);
    expect(wire.memoryBytes).toBe('206158430208');
    const back = roundTrip(wire);
    expect(back.profile.budgetBytes).toBe('9007199254740991');
    expect(profileFromWire(back.profile)).toEqual(profile);
  });

  it('puts only the message fields on the wire, whatever else the object carries', () => {
    const extra = { ...profile, secret: 'x', interfaces: [{ ...profile.interfaces[0]!, driver: 'bridge' }] } as unknown as HardwareProfile;
    const wire = profileToWire(extra);
    expect(Object.keys(wire).sort()).toEqual(Object.keys(profile).sort());
    expect(Object.keys((wire.interfaces as object[])[0]!).sort()).toEqual(['addresses', 'name', 'rdma', 'thunderbolt']);
  });

  it('no metrics port yet travels as 0 and reads back as absent', () => {
    const { metricsPort: _, ...without } = profile;
    expect(profileToWire(without).metricsPort).toBe(0);
    expect(profileFromWire(roundTrip(profileToWire(without)).profile)).toEqual({ ...without, metricsPort: undefined });
  });

  it('an uncalibrated node travels as 0 and reads back as not measured', () => {
    const { effectiveBandwidthBytesPerSecond: _, prefillFlopsPerSecond: __, decodeFixedSecondsPerToken: ___, ...without } = profile;
    const back = profileFromWire(roundTrip(profileToWire(without)).profile);
    expect(back.effectiveBandwidthBytesPerSecond).toBeUndefined();
    expect(back.prefillFlopsPerSecond).toBeUndefined();
    expect(back.decodeFixedSecondsPerToken).toBeUndefined();
    // an overhead or an attention rate without a calibration beside it is not a measurement
    expect(back.boundaryOverheadSeconds).toBeUndefined();
    expect(back.decodeAttentionFlopsPerSecond).toBeUndefined();
  });

  it('a calibration without an attention rate (the longer context measured no slower) reads back as not measured', () => {
    const { decodeAttentionFlopsPerSecond: _, ...without } = profile;
    expect(profileToWire(without).decodeAttentionFlopsPerSecond).toBe(0);
    expect(profileFromWire(roundTrip(profileToWire(without)).profile)).toEqual({ ...without, decodeAttentionFlopsPerSecond: undefined });
  });

  it('a calibration without a boundary measurement (macOS) reads back as not measured, which the planner prices as 0', () => {
    const { boundaryOverheadSeconds: _, ...without } = profile;
    expect(profileToWire(without).boundaryOverheadSeconds).toBe(0);
    expect(profileFromWire(roundTrip(profileToWire(without)).profile)).toEqual({ ...without, boundaryOverheadSeconds: undefined });
  });

  it('a calibrated node whose fit found no fixed part travels as a measured 0', () => {
    const back = profileFromWire(roundTrip(profileToWire({ ...profile, decodeFixedSecondsPerToken: 0 })).profile);
    expect(back.decodeFixedSecondsPerToken).toBe(0);
  });

  it('no tunnel (a node without cluster credentials) travels as 0 and reads back as absent', () => {
    const { tunnelPort: _, ...without } = profile;
    expect(profileToWire(without).tunnelPort).toBe(0);
    expect(profileFromWire(roundTrip(profileToWire(without)).profile)).toEqual({ ...without, tunnelPort: undefined });
  });

  it('the engine port range round-trips; an older agent (none sent) and a nonsense range read back as absent', () => {
    expect(profileFromWire(roundTrip(profileToWire(profile)).profile).enginePorts).toEqual([20000, 32767]);
    const { enginePorts: _, ...without } = profile;
    expect(profileToWire(without).enginePorts).toBeNull();
    expect(profileFromWire(roundTrip(profileToWire(without)).profile)).toEqual({ ...without, enginePorts: undefined });
    expect(profileFromWire({ ...profileToWire(profile), enginePorts: { first: 40000, last: 30000 } }).enginePorts).toBeUndefined();
  });

  it('live stats round-trip through NodeAgent.Describe', () => {
    const live: LiveStats = { availableBytes: 68_719_476_736, memoryPressure: 'warn', thermalState: 'fair', timestampSeconds: 1_700_000_000.5 };
    const back = describe_.responseDeserialize(describe_.responseSerialize({ live: liveToWire(live) })) as { live: Record<string, unknown> };
    expect(liveFromWire(back.live)).toEqual(live);
  });
});
