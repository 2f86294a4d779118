import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { probeHardwareDetailed, readLiveStats, runCommand } from '../../src/node/hardware/probe.ts';

describe('runCommand', () => {
  it('returns stdout, also when the command exits non-zero after printing', async () => {
    expect(await runCommand('/bin/sh', ['-c', 'echo hw.memsize: 1'])).toBe('hw.memsize: 1\n');
    expect(await runCommand('/bin/sh', ['-c', 'echo partial; echo "unknown oid" >&2; exit 1'])).toBe('partial\n');
  });

  it('missing command, empty output and timeout all give undefined', async () => {
    expect(await runCommand('/nonexistent/system_profiler', [])).toBeUndefined();
    expect(await runCommand('/bin/sh', ['-c', 'exit 0'])).toBeUndefined();
    const t0 = Date.now();
    expect(await runCommand('/bin/sh', ['-c', 'echo early; exec sleep 30'], { timeoutMs: 200 })).toBeUndefined();
    expect(Date.now() - t0).toBeLessThan(10_000); // killed, not waited for
  });
});

// Runs the real probe on this (Linux) machine and checks it against /proc directly.
describe.runIf(process.platform === 'linux')('probe on this Linux machine', () => {
  it('reports RAM from /proc/meminfo, overrides and engines as given', async () => {
    const memTotal = Number(/^MemTotal:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'))![1]) * 1024;
    const r = await probeHardwareDetailed({ nodeId: 'id-1', name: 'ci-node', engines: ['rpc-server'], bandwidthBytesPerSecond: 30e9 });
    expect(r.profile).toMatchObject({ nodeId: 'id-1', name: 'ci-node', os: 'linux', memoryBytes: memTotal, engines: ['rpc-server'], bandwidthBytesPerSecond: 30e9 });
    expect(r.profile.budgetBytes).toBeGreaterThan(0);
    expect(r.profile.budgetBytes).toBeLessThan(memTotal);
    expect(r.profile.agentVersion).toMatch(/^\d+\.\d+\.\d+/);
    expect(r.live.availableBytes).toBeGreaterThan(0);
    expect(r.live.availableBytes).toBeLessThanOrEqual(memTotal);
  });

  it('readLiveStats clamps available memory to the profile total', async () => {
    const live = await readLiveStats({ memoryBytes: 2 ** 20 });
    expect(live.availableBytes).toBe(2 ** 20);
    expect(['normal', 'warn', 'critical', 'unknown']).toContain(live.memoryPressure);
    expect(Math.abs(live.timestampSeconds - Date.now() / 1000)).toBeLessThan(60);
  });
});
