import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildMacProfile, type MacOutputs, macInterfaces } from '../../src/node/hardware/profile.ts';
import {
  parseHardwarePorts,
  parseIbvDevices,
  parseIfconfig,
  parseMemoryPressureFreePercent,
  parsePmsetTherm,
  parseRdmaCtlStatus,
  parseSysctl,
  parseSystemProfiler,
  parseVmStat,
  pressureState,
  sysctlFacts,
  vmAvailableBytes,
} from '../../src/node/hardware/macos.ts';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const GBps = 1e9;
const DIR = join(import.meta.dirname, '..', 'fixtures', 'hardware');

function read(machine: string, file: string): string | undefined {
  try {
    return readFileSync(join(DIR, machine, file), 'utf8');
  } catch {
    return undefined;
  }
}

function outputs(machine: string): MacOutputs {
  return {
    sysctl: read(machine, 'sysctl.txt'),
    vmStat: read(machine, 'vm_stat.txt'),
    memoryPressure: read(machine, 'memory_pressure.txt'),
    systemProfiler: read(machine, 'system_profiler.json'),
    ifconfig: read(machine, 'ifconfig.txt'),
    hardwarePorts: read(machine, 'networksetup.txt'),
    pmsetTherm: read(machine, 'pmset_therm.txt'),
    ibvDevices: read(machine, 'ibv_devices.txt'),
    rdmaCtl: read(machine, 'rdma_ctl.txt'),
  };
}

const ctx = { nodeId: 'n1', hostname: 'probe-host', agentVersion: '0.1.0' };

// Expected values come from Apple's published specs for each machine, not from the code under test.
const MACHINES = [
  // machine, chip, P, E, GPU, RAM, GB/s, wired limit, wired source, macOS
  ['m1-air-8gb', 'Apple M1', 4, 4, 7, 8 * GiB, 68.25, Math.floor((8 * GiB * 2) / 3), 'modelled-default', '13.6.7'],
  ['m2-pro-32gb', 'Apple M2 Pro', 8, 4, 19, 32 * GiB, 200, Math.floor((32 * GiB * 2) / 3), 'modelled-default', '14.5'],
  ['m3-max-14c-36gb', 'Apple M3 Max', 10, 4, 30, 36 * GiB, 300, 24 * GiB, 'modelled-default', '14.6.1'],
  ['m3-max-16c-128gb', 'Apple M3 Max', 12, 4, 40, 128 * GiB, 400, 112 * GiB, 'sysctl', '15.3.1'],
  ['m4-max-14c-36gb', 'Apple M4 Max', 10, 4, 32, 36 * GiB, 410, 24 * GiB, 'modelled-default', '15.4'],
  ['m4-max-16c-128gb', 'Apple M4 Max', 12, 4, 40, 128 * GiB, 546, 96 * GiB, 'modelled-default', '15.5'],
  ['m2-ultra-192gb', 'Apple M2 Ultra', 16, 8, 76, 192 * GiB, 800, 144 * GiB, 'modelled-default', '14.7.6'],
  ['m3-ultra-512gb', 'Apple M3 Ultra', 24, 8, 80, 512 * GiB, 819, 480 * GiB, 'sysctl', '26.2'],
  ['m4-mini-16gb', 'Apple M4', 4, 6, 10, 16 * GiB, 120, Math.floor((16 * GiB * 2) / 3), 'modelled-default', '15.2'],
] as const;

describe('macOS profile from recorded command output', () => {
  it.each(MACHINES)('%s', (machine, chip, p, e, gpu, ram, gbps, wired, wiredSource, osVersion) => {
    const { profile, details } = buildMacProfile(outputs(machine), ctx, 1000);
    expect(profile.os).toBe('macos');
    expect(profile.osVersion).toBe(osVersion);
    expect(profile.chip).toBe(chip);
    expect(profile.performanceCores).toBe(p);
    expect(profile.efficiencyCores).toBe(e);
    expect(profile.gpuCores).toBe(gpu);
    expect(profile.memoryBytes).toBe(ram);
    expect(profile.bandwidthBytesPerSecond).toBe(gbps * GBps);
    expect(profile.wiredLimitBytes).toBe(wired);
    expect(details.wiredLimitSource).toBe(wiredSource);
    expect(details.bandwidthSource).toBe('chip-table');
    expect(details.notes).toEqual([]);
    expect(profile.budgetBytes).toBeGreaterThan(0);
    expect(profile.budgetBytes).toBeLessThanOrEqual(wired);
    expect(profile.budgetBytes).toBe(details.budget!.budgetBytes);
  });

  it('M1 Air 8 GB: available memory as Activity Monitor counts it, budget bound by it', () => {
    const { live, profile, details } = buildMacProfile(outputs('m1-air-8gb'), ctx, 1000);
    // vm_stat fixture: anonymous 199229, purgeable 5242, wired 115343, compressor 73400 pages of 16 KiB.
    const available = 8 * GiB - (199229 - 5242 + 115343 + 73400) * 16384;
    expect(live.availableBytes).toBe(available);
    expect(live.memoryPressure).toBe('warn'); // kern.memorystatus_vm_pressure_level: 2
    expect(live.thermalState).toBe('serious'); // CPU_Speed_Limit = 78 (fanless Air throttling)
    expect(live.timestampSeconds).toBe(1000);
    // In use (8 GiB − available) exceeds the 3 GiB reserve; the excess, rounded up to 512 MiB, is
    // "others"; the room left (below the 5.33 GiB wired limit) binds; the margin is the 512 MiB floor.
    const others = Math.ceil((8 * GiB - available - 3 * GiB) / (512 * MiB)) * 512 * MiB;
    expect(details.budget).toMatchObject({ limitedBy: 'ram', reserveBytes: 3 * GiB, marginBytes: 512 * MiB, othersBytes: others });
    expect(profile.budgetBytes).toBe(8 * GiB - 3 * GiB - others - 512 * MiB);
    expect(profile.budgetBytes).toBeLessThanOrEqual(available - 512 * MiB);
  });

  it('M3 Ultra 512 GB: sysctl wired limit binds, Thunderbolt 5 RDMA ports flagged', () => {
    const { profile, details } = buildMacProfile(outputs('m3-ultra-512gb'), ctx, 1000);
    // 40.4 GiB in use (anonymous 1342177 − purgeable 33554 + wired 1342177 pages) is above the
    // 32 GiB reserve (1/16 of 512 GiB), so the room is about the available memory, just under the
    // 480 GiB wired limit set by sysctl; margin 5%.
    const inUse = (1342177 - 33554 + 1342177) * 16384;
    const others = Math.ceil((inUse - 32 * GiB) / (512 * MiB)) * 512 * MiB;
    const room = 512 * GiB - 32 * GiB - others;
    expect(details.budget).toMatchObject({ limitedBy: 'ram', reserveBytes: 32 * GiB, othersBytes: others });
    expect(profile.budgetBytes).toBe(room - Math.floor(room * 0.05));
    const rdma = profile.interfaces.filter((i) => i.rdma).map((i) => i.name);
    expect(rdma).toEqual(['en2', 'en3', 'en4', 'en5', 'en6', 'en7']);
    const bridge = profile.interfaces.find((i) => i.name === 'bridge0');
    expect(bridge).toEqual({ name: 'bridge0', addresses: ['169.254.40.2'], thunderbolt: true, rdma: false });
    expect(details.thunderbolt.filter((b) => b.connected.length > 0)).toHaveLength(2);
    expect(details.thunderbolt.every((b) => b.speedGbps === 80)).toBe(true);
    expect(details.machine).toBe('Mac Studio (Mac15,14)');
  });

  it('interfaces: keeps LAN and Thunderbolt, drops loopback and link-local-only virtual ones', () => {
    const ifs = macInterfaces(outputs('m3-max-16c-128gb'));
    expect(ifs.map((i) => [i.name, i.thunderbolt])).toEqual([
      ['en0', false],
      ['en1', true],
      ['en2', true],
      ['en3', true],
      ['bridge0', true],
    ]);
    const en0 = ifs[0]!;
    expect(en0.addresses[0]).toBe('192.168.178.41');
    expect(en0.addresses.some((a) => a.startsWith('fe80'))).toBe(false);
    expect(en0.addresses).toHaveLength(2); // IPv4 + global IPv6
    expect(ifs.every((i) => !i.rdma)).toBe(true);
  });

  it('RDMA devices are ignored when rdma_ctl says disabled', () => {
    const out = { ...outputs('m3-ultra-512gb'), rdmaCtl: 'disabled\n' };
    expect(macInterfaces(out).some((i) => i.rdma)).toBe(false);
  });
});

describe('macOS overrides', () => {
  const out = outputs('m4-max-16c-128gb');

  it('--memory-limit pretends a smaller machine: wired default and budget follow it', () => {
    const { profile, details, live } = buildMacProfile(out, { ...ctx, memoryLimitBytes: 16 * GiB }, 0);
    expect(profile.memoryBytes).toBe(16 * GiB);
    expect(profile.wiredLimitBytes).toBe(Math.floor((16 * GiB * 2) / 3));
    expect(details.realMemoryBytes).toBe(128 * GiB);
    expect(details.budget?.othersBytes).toBe(0); // real machine's usage says nothing about the pretend one
    const wired = Math.floor((16 * GiB * 2) / 3);
    expect(profile.budgetBytes).toBe(wired - Math.floor(wired * 0.05)); // margin 5% (> 512 MiB floor)
    expect(live.availableBytes).toBeLessThanOrEqual(16 * GiB);
  });

  it('--budget sets usable directly; above the wired limit it is kept but noted', () => {
    expect(buildMacProfile(out, { ...ctx, budgetBytes: 8 * GiB }, 0).profile.budgetBytes).toBe(8 * GiB);
    const over = buildMacProfile(out, { ...ctx, budgetBytes: 120 * GiB }, 0);
    expect(over.profile.budgetBytes).toBe(120 * GiB);
    expect(over.details.budget).toBeUndefined();
    expect(over.details.notes.join(' ')).toMatch(/above the GPU wired limit/);
  });

  it('--bandwidth and --name win', () => {
    const { profile, details } = buildMacProfile(out, { ...ctx, bandwidthBytesPerSecond: 500 * GBps, name: 'studio-a' }, 0);
    expect(profile.bandwidthBytesPerSecond).toBe(500 * GBps);
    expect(details.bandwidthSource).toBe('override');
    expect(profile.name).toBe('studio-a');
    expect(profile.hostname).toBe('studio-m4max.local');
    expect(buildMacProfile(out, ctx, 0).profile.name).toBe('studio-m4max');
  });

  it('--memory-limit above the real RAM is kept but noted', () => {
    const { profile, details } = buildMacProfile(out, { ...ctx, memoryLimitBytes: 256 * GiB }, 0);
    expect(profile.memoryBytes).toBe(256 * GiB);
    expect(details.notes.join(' ')).toMatch(/above the real RAM/);
  });
});

describe('macOS probe degrades when commands are missing', () => {
  it('sysctl only: the perf-core count identifies the 16-core M3 Max (400 GB/s, 40 GPU cores)', () => {
    const { profile, details, live } = buildMacProfile({ sysctl: read('m3-max-16c-128gb', 'sysctl.txt') }, ctx, 0);
    expect(profile.chip).toBe('Apple M3 Max');
    expect(profile.performanceCores).toBe(12);
    expect(profile.bandwidthBytesPerSecond).toBe(400 * GBps);
    expect(profile.gpuCores).toBe(40);
    expect(live).toMatchObject({ availableBytes: 0, thermalState: 'unknown', memoryPressure: 'normal' });
    expect(details.budget?.othersBytes).toBe(0);
  });

  it('nothing at all: zeros and notes, never a throw', () => {
    const { profile, details } = buildMacProfile({}, ctx, 0);
    expect(profile).toMatchObject({ chip: 'unknown', memoryBytes: 0, budgetBytes: 0, osVersion: 'unknown', name: 'probe-host' });
    expect(details.bandwidthSource).toBe('default');
    expect(details.notes.join(' ')).toMatch(/RAM size unknown/);
  });

  it('garbage system_profiler output is a note, not a crash', () => {
    const { profile, details } = buildMacProfile({ sysctl: read('m4-mini-16gb', 'sysctl.txt'), systemProfiler: 'error: timed out' }, ctx, 0);
    expect(profile.gpuCores).toBe(0); // M4 ships with 8 or 10 GPU cores: unknown without system_profiler
    expect(details.notes.join(' ')).toMatch(/system_profiler/);
  });

  it('unknown future Apple chip: tier estimate, flagged', () => {
    const sysctl = 'hw.memsize: 68719476736\nmachdep.cpu.brand_string: Apple M6 Pro\nhw.perflevel0.physicalcpu: 6\n';
    const { profile, details } = buildMacProfile({ sysctl }, ctx, 0);
    expect(profile.bandwidthBytesPerSecond).toBe(307 * GBps);
    expect(details.bandwidthSource).toBe('estimate');
    expect(profile.wiredLimitBytes).toBe(48 * GiB);
  });
});

describe('macOS parsers', () => {
  it('sysctl: colon and equals forms, values containing colons, wired limit in MiB or legacy bytes', () => {
    const map = parseSysctl('kern.version: Darwin Kernel Version 23.5.0: Wed May  1 20:12:58 PDT 2024\nhw.memsize=17179869184\nsysctl: unknown oid \'iogpu.wired_limit_mb\'\n');
    expect(map.get('kern.version')).toBe('Darwin Kernel Version 23.5.0: Wed May  1 20:12:58 PDT 2024');
    expect(sysctlFacts(map).memoryBytes).toBe(16 * GiB);
    expect(sysctlFacts(map).wiredLimitSettingBytes).toBeUndefined();
    expect(sysctlFacts(parseSysctl('iogpu.wired_limit_mb: 12288')).wiredLimitSettingBytes).toBe(12 * GiB);
    expect(sysctlFacts(parseSysctl('debug.iogpu.wired_limit: 12884901888')).wiredLimitSettingBytes).toBe(12 * GiB);
    expect(sysctlFacts(parseSysctl('hw.memsize: lots')).memoryBytes).toBeUndefined();
  });

  it('full sysctl -a excerpt (M2 Ultra) parses the same facts as the short form', () => {
    const facts = sysctlFacts(parseSysctl(read('m2-ultra-192gb', 'sysctl.txt')!));
    expect(facts).toMatchObject({ memoryBytes: 192 * GiB, brand: 'Apple M2 Ultra', perfCores: 16, effCores: 8, wiredLimitSettingBytes: 0, pressureLevel: 1 });
  });

  it('vm_stat: page size, quoted labels, fallback without anonymous pages', () => {
    const vm = parseVmStat(read('m4-mini-16gb', 'vm_stat.txt')!)!;
    expect(vm.pageSize).toBe(16384);
    expect(vm.pages.get('Translation faults')).toBeGreaterThan(0);
    expect(vm.pages.get('Pages wired down')).toBe(188743);
    const old = parseVmStat('Mach Virtual Memory Statistics: (page size of 4096 bytes)\nPages free:   1000.\nPages inactive:  500.\nPages speculative:  24.\n')!;
    expect(vmAvailableBytes(old, 8 * GiB)).toBe(1524 * 4096);
    expect(parseVmStat('not vm_stat')).toBeUndefined();
  });

  it('memory_pressure: full and -Q forms', () => {
    expect(parseMemoryPressureFreePercent(read('m2-ultra-192gb', 'memory_pressure.txt')!)).toBe(88);
    expect(parseMemoryPressureFreePercent(read('m1-air-8gb', 'memory_pressure.txt')!)).toBe(19);
    expect(parseMemoryPressureFreePercent('')).toBeUndefined();
  });

  it('pressure state: kernel level wins, free percentage as fallback', () => {
    expect(pressureState(1, 3)).toBe('normal');
    expect(pressureState(2, 90)).toBe('warn');
    expect(pressureState(4, undefined)).toBe('critical');
    expect(pressureState(undefined, 9)).toBe('critical');
    expect(pressureState(undefined, 24)).toBe('warn');
    expect(pressureState(undefined, 25)).toBe('normal');
    expect(pressureState(undefined, undefined)).toBe('unknown');
  });

  it('pmset -g therm', () => {
    expect(parsePmsetTherm(read('m4-mini-16gb', 'pmset_therm.txt')!)).toBe('nominal');
    expect(parsePmsetTherm(read('m1-air-8gb', 'pmset_therm.txt')!)).toBe('serious');
    expect(parsePmsetTherm('Thermal warning level set to 0.\nPerformance warning level set to 100.\n')).toBe('serious');
    expect(parsePmsetTherm('Thermal warning level set to 5.\nPerformance warning level set to 0.\n')).toBe('fair');
    expect(parsePmsetTherm('CPU Power notify\n\tCPU_Speed_Limit \t= 40\n')).toBe('critical');
    expect(parsePmsetTherm('')).toBe('unknown');
  });

  it('system_profiler: GPU cores, proc split, RAM, Thunderbolt buses', () => {
    const sp = parseSystemProfiler(read('m4-max-16c-128gb', 'system_profiler.json')!);
    expect(sp).toMatchObject({ gpuCores: 40, chip: 'Apple M4 Max', perfCores: 12, effCores: 4, memoryBytes: 128 * GiB, machineModel: 'Mac16,9' });
    expect(sp.thunderbolt.map((b) => b.connected)).toEqual([['MacBook Pro'], [], [], []]);
    expect(() => parseSystemProfiler('not json')).toThrow(SyntaxError);
    expect(parseSystemProfiler('[]')).toEqual({ thunderbolt: [] });
  });

  it('ifconfig, networksetup, ibv_devices, rdma_ctl', () => {
    const ifs = parseIfconfig(read('m3-max-16c-128gb', 'ifconfig.txt')!);
    const bridge = ifs.find((i) => i.name === 'bridge0')!;
    expect(bridge.members).toEqual(['en1', 'en2', 'en3']);
    expect(bridge.ipv4).toEqual(['169.254.12.7']);
    expect(ifs.find((i) => i.name === 'lo0')!.flags).toContain('LOOPBACK');
    const ports = parseHardwarePorts(read('m3-ultra-512gb', 'networksetup.txt')!);
    expect(ports.get('en0')).toBe('Ethernet');
    expect(ports.get('en7')).toBe('Thunderbolt 6');
    expect(ports.get('bridge0')).toBe('Thunderbolt Bridge');
    expect([...parseIbvDevices(read('m3-ultra-512gb', 'ibv_devices.txt')!)]).toEqual(['en2', 'en3', 'en4', 'en5', 'en6', 'en7']);
    expect(parseRdmaCtlStatus('enabled\n')).toBe(true);
    expect(parseRdmaCtlStatus('RDMA is disabled')).toBe(false);
    expect(parseRdmaCtlStatus('')).toBeUndefined();
  });
});

describe('binned M3 Max without system_profiler', () => {
  it('brand alone (no core counts) assumes the slower 14-core die', () => {
    const { profile } = buildMacProfile({ sysctl: 'hw.memsize: 38654705664\nmachdep.cpu.brand_string: Apple M3 Max\n' }, ctx, 0);
    expect(profile.bandwidthBytesPerSecond).toBe(300 * GBps);
    expect(profile.gpuCores).toBe(0);
  });
});
