import { readFileSync } from 'node:fs';
import type { NetworkInterfaceInfo } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseCpuinfo, parseMeminfo, parsePsiMemory } from '../../src/node/hardware/linux.ts';
import { buildLinuxProfile, DEFAULT_BANDWIDTH_BYTES_PER_SECOND, linuxInterfaces } from '../../src/node/hardware/profile.ts';

const GiB = 2 ** 30;
const DIR = join(import.meta.dirname, '..', 'fixtures', 'hardware');
const read = (machine: string, file: string) => readFileSync(join(DIR, machine, file), 'utf8');
const ctx = { nodeId: 'n1', hostname: 'ci', agentVersion: '0.1.0' };

const iface = (address: string, family: 'IPv4' | 'IPv6', internal = false): NetworkInterfaceInfo =>
  ({ address, family, internal, netmask: '', mac: '00:00:00:00:00:00', cidr: null, ...(family === 'IPv6' ? { scopeid: 0 } : {}) }) as NetworkInterfaceInfo;

describe('Linux parsers', () => {
  it('meminfo in bytes (kB are KiB), unitless HugePages counts kept as-is', () => {
    const m = parseMeminfo(read('linux-arm-pi5', 'meminfo.txt'));
    expect(m.get('MemTotal')).toBe(8245408 * 1024);
    expect(m.get('MemAvailable')).toBe(7462304 * 1024);
    expect(m.get('Active(anon)')).toBe(424560 * 1024);
    expect(m.get('HugePages_Total')).toBe(0);
  });

  it('cpuinfo: x86 model and physical cores, ARM model from the trailing block', () => {
    const x86 = parseCpuinfo(read('linux-x86-vm', 'cpuinfo.txt'));
    expect(x86).toEqual({ model: 'AMD EPYC', logicalCpus: 2, physicalCores: 2 });
    const arm = parseCpuinfo(read('linux-arm-pi5', 'cpuinfo.txt'));
    expect(arm).toEqual({ model: 'Raspberry Pi 5 Model B Rev 1.0', logicalCpus: 4, physicalCores: 4 });
    const smt = 'processor\t: 0\nphysical id\t: 0\ncore id\t: 0\n\nprocessor\t: 1\nphysical id\t: 0\ncore id\t: 0\n';
    expect(parseCpuinfo(smt)).toMatchObject({ logicalCpus: 2, physicalCores: 1 });
  });

  it('PSI memory pressure', () => {
    expect(parsePsiMemory(read('linux-x86-vm', 'pressure_memory.txt'))).toBe('normal');
    expect(parsePsiMemory(read('linux-arm-pi5', 'pressure_memory.txt'))).toBe('warn');
    expect(parsePsiMemory('some avg10=55.00 avg60=1 avg300=0 total=1')).toBe('critical');
    expect(parsePsiMemory('')).toBe('unknown');
  });
});

describe('Linux profile', () => {
  const inputs = {
    meminfo: read('linux-arm-pi5', 'meminfo.txt'),
    cpuinfo: read('linux-arm-pi5', 'cpuinfo.txt'),
    psiMemory: read('linux-arm-pi5', 'pressure_memory.txt'),
    osVersion: 'Debian GNU/Linux 12 (bookworm)',
    hostname: 'pi5',
    interfaces: {
      lo: [iface('127.0.0.1', 'IPv4', true)],
      eth0: [iface('192.168.1.9', 'IPv4'), iface('fe80::1', 'IPv6')],
      thunderbolt0: [iface('fe80::2', 'IPv6')],
      wlan0: [iface('fe80::3', 'IPv6')],
      ib0: [iface('10.1.0.2', 'IPv4')],
    },
    rdmaInterfaces: ['ib0'],
  };

  it('RAM from meminfo, budget RAM − reserve − others − margin, conservative default bandwidth', () => {
    const { profile, live, details } = buildLinuxProfile(inputs, ctx, 5);
    const total = 8245408 * 1024;
    const available = 7462304 * 1024;
    expect(profile).toMatchObject({ os: 'linux', chip: 'Raspberry Pi 5 Model B Rev 1.0', performanceCores: 4, efficiencyCores: 0, gpuCores: 0 });
    expect(profile.memoryBytes).toBe(total);
    expect(profile.wiredLimitBytes).toBe(total);
    expect(profile.bandwidthBytesPerSecond).toBe(DEFAULT_BANDWIDTH_BYTES_PER_SECOND);
    expect(details.bandwidthSource).toBe('default');
    expect(details.notes.join(' ')).toMatch(/conservative 20 GB\/s/);
    // in use (0.75 GiB) is under the 3 GiB reserve, so others = 0 and room = RAM − 3 GiB.
    expect(details.budget?.othersBytes).toBe(0);
    const room = total - 3 * GiB;
    expect(profile.budgetBytes).toBe(room - 512 * 2 ** 20);
    expect(live).toEqual({ availableBytes: available, memoryPressure: 'warn', thermalState: 'unknown', timestampSeconds: 5 });
  });

  it('overrides: memory limit, budget, bandwidth, name', () => {
    const { profile } = buildLinuxProfile(inputs, { ...ctx, memoryLimitBytes: 4 * GiB, bandwidthBytesPerSecond: 50e9, name: 'w1' }, 0);
    expect(profile.memoryBytes).toBe(4 * GiB);
    expect(profile.budgetBytes).toBe(GiB - 512 * 2 ** 20);
    expect(profile.bandwidthBytesPerSecond).toBe(50e9);
    expect(profile.name).toBe('w1');
    expect(buildLinuxProfile(inputs, { ...ctx, budgetBytes: 2 * GiB }, 0).profile.budgetBytes).toBe(2 * GiB);
  });

  it('interfaces: skip internal and link-local-only, keep thunderbolt-net, flag RDMA', () => {
    expect(linuxInterfaces(inputs)).toEqual([
      { name: 'eth0', addresses: ['192.168.1.9'], thunderbolt: false, rdma: false },
      { name: 'thunderbolt0', addresses: [], thunderbolt: true, rdma: false },
      { name: 'ib0', addresses: ['10.1.0.2'], thunderbolt: false, rdma: true },
    ]);
  });

  it('unreadable /proc falls back to os.totalmem and os.cpus model', () => {
    const { profile, live } = buildLinuxProfile({ osVersion: 'x', hostname: 'h', interfaces: {}, totalMemBytes: 2 * GiB, cpuModel: 'Neoverse' }, ctx, 0);
    expect(profile.memoryBytes).toBe(2 * GiB);
    expect(profile.chip).toBe('Neoverse');
    expect(profile.budgetBytes).toBe(0); // 2 GiB is all reserve
    expect(live.availableBytes).toBe(0);
  });
});
