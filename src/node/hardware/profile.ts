/**
 * Assemble a HardwareProfile and LiveStats from recorded command output — pure, so every macOS
 * path is tested on Linux with fixtures. The probe (probe.ts) only gathers the text.
 */
import type { NetworkInterfaceInfo as OsInterfaceInfo } from 'node:os';
import { type ChipVariant, chipVariants, estimateUnknownChipBandwidth, lookupChip } from '../../shared/chips.ts';
import { type HardwareProfile, type LiveStats, type NetworkInterfaceInfo, PROTOCOL_VERSION } from '../../shared/hardware.ts';
import { type Budget, usableBudget, wiredLimitBytes } from '../../shared/budget.ts';
import { parseCpuinfo, parseMeminfo, parsePsiMemory } from './linux.ts';
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
  type SystemProfilerFacts,
  sysctlFacts,
  vmAvailableBytes,
} from './macos.ts';

/**
 * Bandwidth assumed when nothing better is known (Linux, Intel Macs): 20 GB/s, about one channel
 * of DDR4-3200 after real-world efficiency. Deliberately low so such a node never looks faster
 * than it is; pass `--bandwidth` (or measure) for a real figure.
 */
export const DEFAULT_BANDWIDTH_BYTES_PER_SECOND = 20e9;

/** Raw text of the macOS commands; any may be missing (command absent, timed out, failed). */
export interface MacOutputs {
  /** `sysctl hw kern.osproductversion …` or `sysctl -a`. */
  readonly sysctl?: string;
  readonly vmStat?: string;
  /** `memory_pressure -Q` (or full). */
  readonly memoryPressure?: string;
  /** `system_profiler SPDisplaysDataType SPHardwareDataType SPThunderboltDataType -json`. */
  readonly systemProfiler?: string;
  readonly ifconfig?: string;
  /** `networksetup -listallhardwareports`. */
  readonly hardwarePorts?: string;
  /** `pmset -g therm`. */
  readonly pmsetTherm?: string;
  /** `ibv_devices` (macOS 26.2+ with RDMA over Thunderbolt 5). */
  readonly ibvDevices?: string;
  /** `rdma_ctl status`. */
  readonly rdmaCtl?: string;
}

export interface LinuxInputs {
  readonly meminfo?: string;
  readonly cpuinfo?: string;
  /** `/proc/pressure/memory`. */
  readonly psiMemory?: string;
  /** PRETTY_NAME from /etc/os-release, else `os.release()`. */
  readonly osVersion: string;
  readonly hostname: string;
  /** `os.cpus()[0].model`, used when /proc/cpuinfo names no model. */
  readonly cpuModel?: string;
  /** `os.totalmem()`, used when /proc/meminfo is unreadable. */
  readonly totalMemBytes?: number;
  readonly interfaces: Readonly<Record<string, readonly OsInterfaceInfo[] | undefined>>;
  /** Network interfaces with an RDMA device (/sys/class/infiniband/<dev>/device/net/<if>). */
  readonly rdmaInterfaces?: readonly string[];
}

/** Identity and overrides, as given by the agent's flags/config. */
export interface ProfileContext {
  readonly nodeId: string;
  readonly name?: string;
  readonly hostname: string;
  readonly memoryLimitBytes?: number;
  readonly budgetBytes?: number;
  readonly bandwidthBytesPerSecond?: number;
  readonly engines?: readonly string[];
  readonly agentVersion: string;
}

export type BandwidthSource = 'override' | 'chip-table' | 'estimate' | 'default';

/** How each number was arrived at — for the start-up summary, logs and debugging odd hardware. */
export interface ProbeDetails {
  readonly bandwidthSource: BandwidthSource;
  readonly wiredLimitSource: 'sysctl' | 'modelled-default' | 'not-applicable';
  /** Undefined when the budget was given directly (`--budget`). */
  readonly budget?: Budget;
  readonly chipVariant?: ChipVariant;
  readonly machine?: string;
  readonly realMemoryBytes?: number;
  readonly thunderbolt: SystemProfilerFacts['thunderbolt'];
  /** Human-readable caveats ("bandwidth estimated", "budget above wired limit", …). */
  readonly notes: readonly string[];
}

export interface ProbeResult {
  readonly profile: HardwareProfile;
  readonly live: LiveStats;
  readonly details: ProbeDetails;
}

function safe<T>(f: () => T): T | undefined {
  try {
    return f();
  } catch {
    return undefined;
  }
}

export function buildMacProfile(out: MacOutputs, ctx: ProfileContext, nowSeconds: number): ProbeResult {
  const notes: string[] = [];
  const sys = sysctlFacts(parseSysctl(out.sysctl ?? ''));
  const sp = out.systemProfiler ? safe(() => parseSystemProfiler(out.systemProfiler!)) : undefined;
  if (out.systemProfiler && !sp) notes.push('system_profiler output was not JSON; GPU cores unknown');

  const chip = sys.brand ?? sp?.chip ?? 'unknown';
  const perfCores = sys.perfCores ?? sp?.perfCores;
  const variant = lookupChip(chip, { gpuCores: sp?.gpuCores, perfCores });
  const realMemory = sys.memoryBytes ?? sp?.memoryBytes;
  if (realMemory === undefined) notes.push('RAM size unknown (no hw.memsize); pass --memory-limit');
  const memoryBytes = ctx.memoryLimitBytes ?? realMemory ?? 0;
  if (ctx.memoryLimitBytes !== undefined && realMemory !== undefined && ctx.memoryLimitBytes > realMemory) {
    notes.push('--memory-limit is above the real RAM; the budget may promise memory this machine does not have');
  }

  const wiredFromSysctl = sys.wiredLimitSettingBytes !== undefined && sys.wiredLimitSettingBytes > 0;
  const wired = wiredLimitBytes(memoryBytes, sys.wiredLimitSettingBytes);

  const live = macLiveStats(out, memoryBytes, nowSeconds);
  const realAvailable = realMemory === undefined ? undefined : macAvailableBytes(out, realMemory);
  // With --memory-limit the machine is pretend: what other programs use on the real one says
  // nothing about it, so only the reserve is taken off.
  const inUse = ctx.memoryLimitBytes === undefined && realMemory !== undefined && realAvailable !== undefined ? realMemory - realAvailable : undefined;
  const { bandwidth, source } = chooseBandwidth(ctx, chip, variant, notes);

  const gpuCores = sp?.gpuCores ?? gpuCoresFromCpu(chip, perfCores, sys.effCores ?? sp?.effCores);
  const result = finish(ctx, notes, memoryBytes, wired, inUse);
  return {
    profile: {
      nodeId: ctx.nodeId,
      name: ctx.name ?? defaultName(sys.hostname ?? ctx.hostname),
      hostname: sys.hostname ?? ctx.hostname,
      os: 'macos',
      osVersion: sys.osVersion ?? 'unknown',
      chip,
      performanceCores: perfCores ?? variant?.perfCores ?? sys.logicalCpus ?? 0,
      efficiencyCores: sys.effCores ?? sp?.effCores ?? variant?.effCores ?? 0,
      gpuCores: gpuCores ?? 0,
      memoryBytes,
      bandwidthBytesPerSecond: bandwidth,
      wiredLimitBytes: wired,
      budgetBytes: result.budgetBytes,
      engines: [...(ctx.engines ?? [])],
      interfaces: macInterfaces(out),
      protocolVersion: PROTOCOL_VERSION,
      agentVersion: ctx.agentVersion,
    },
    live,
    details: {
      bandwidthSource: source,
      wiredLimitSource: wiredFromSysctl ? 'sysctl' : 'modelled-default',
      budget: result.budget,
      chipVariant: variant,
      machine: sp?.machineName && sp.machineModel ? `${sp.machineName} (${sp.machineModel})` : (sp?.machineName ?? sys.model),
      realMemoryBytes: realMemory,
      thunderbolt: sp?.thunderbolt ?? [],
      notes,
    },
  };
}

/** Default node name: the hostname without macOS's ".local" (the Bonjour domain is added back by mDNS). */
export function defaultName(hostname: string): string {
  return hostname.replace(/\.local\.?$/i, '') || hostname;
}

/**
 * GPU cores when system_profiler is missing: known only when every configuration of the chip with
 * these CPU core counts ships with one GPU count (16-core M3 Max → 40; M4 4P+6E → 8 or 10: unknown).
 */
function gpuCoresFromCpu(chip: string, perfCores: number | undefined, effCores: number | undefined): number | undefined {
  const matching = chipVariants(chip).filter(
    (v) => (perfCores === undefined || v.perfCores === perfCores) && (effCores === undefined || v.effCores === effCores),
  );
  const counts = new Set(matching.flatMap((v) => v.gpuCores));
  return counts.size === 1 ? [...counts][0] : undefined;
}

function chooseBandwidth(
  ctx: ProfileContext,
  chip: string,
  variant: ChipVariant | undefined,
  notes: string[],
): { bandwidth: number; source: BandwidthSource } {
  if (ctx.bandwidthBytesPerSecond !== undefined) return { bandwidth: ctx.bandwidthBytesPerSecond, source: 'override' };
  if (variant) {
    if (variant.approximate) notes.push(`${variant.name} bandwidth is not cross-checked against Apple's specs; pass --bandwidth to be sure`);
    return { bandwidth: variant.bandwidthBytesPerSecond, source: 'chip-table' };
  }
  const estimate = estimateUnknownChipBandwidth(chip);
  if (estimate !== undefined) {
    notes.push(`chip "${chip}" is not in the chip table; bandwidth estimated from its tier; pass --bandwidth`);
    return { bandwidth: estimate, source: 'estimate' };
  }
  notes.push(`no bandwidth figure for "${chip}"; assuming a conservative ${DEFAULT_BANDWIDTH_BYTES_PER_SECOND / 1e9} GB/s; pass --bandwidth`);
  return { bandwidth: DEFAULT_BANDWIDTH_BYTES_PER_SECOND, source: 'default' };
}

function finish(
  ctx: ProfileContext,
  notes: string[],
  memoryBytes: number,
  wired: number,
  inUseBytes: number | undefined,
): { budgetBytes: number; budget?: Budget } {
  if (ctx.budgetBytes !== undefined) {
    if (ctx.budgetBytes > wired) notes.push('--budget is above the GPU wired limit; allocations beyond it may fail or swap');
    return { budgetBytes: ctx.budgetBytes };
  }
  const budget = usableBudget({ memoryBytes, wiredLimitBytes: wired, inUseBytes });
  return { budgetBytes: budget.budgetBytes, budget };
}

/** Available bytes on the real machine: vm_stat first, else memory_pressure's free percentage. */
function macAvailableBytes(out: MacOutputs, totalBytes: number): number | undefined {
  const vm = out.vmStat ? parseVmStat(out.vmStat) : undefined;
  const fromVm = vm ? vmAvailableBytes(vm, totalBytes) : undefined;
  if (fromVm !== undefined) return fromVm;
  const freePercent = out.memoryPressure ? parseMemoryPressureFreePercent(out.memoryPressure) : undefined;
  return freePercent === undefined ? undefined : Math.floor((totalBytes * freePercent) / 100);
}

/**
 * Live sample. `memoryBytes` is the profile's total (possibly the --memory-limit pretend size);
 * vm_stat counts the real machine, so the arithmetic uses the real total and the result is
 * clamped to the pretend size. Unknown available memory is reported as 0 (never over-promise).
 */
export function macLiveStats(out: MacOutputs, memoryBytes: number, nowSeconds: number): LiveStats {
  const sys = sysctlFacts(parseSysctl(out.sysctl ?? ''));
  const total = sys.memoryBytes ?? memoryBytes;
  const available = macAvailableBytes(out, total);
  const freePercent = out.memoryPressure ? parseMemoryPressureFreePercent(out.memoryPressure) : undefined;
  return {
    availableBytes: Math.min(memoryBytes, available ?? 0),
    memoryPressure: pressureState(sys.pressureLevel, freePercent),
    thermalState: out.pmsetTherm ? parsePmsetTherm(out.pmsetTherm) : 'unknown',
    timestampSeconds: nowSeconds,
  };
}

const isLinkLocal6 = (a: string) => /^fe80:/i.test(a);

export function macInterfaces(out: MacOutputs): NetworkInterfaceInfo[] {
  const ifaces = parseIfconfig(out.ifconfig ?? '');
  const ports = parseHardwarePorts(out.hardwarePorts ?? '');
  const rdmaDevs = parseIbvDevices(out.ibvDevices ?? '');
  const rdmaEnabled = parseRdmaCtlStatus(out.rdmaCtl ?? '') !== false;
  const isTbPort = (dev: string) => /^Thunderbolt/i.test(ports.get(dev) ?? '');
  const result: NetworkInterfaceInfo[] = [];
  for (const i of ifaces) {
    if (i.flags.includes('LOOPBACK') || !i.flags.includes('UP')) continue;
    const thunderbolt = isTbPort(i.name) || (i.members.length > 0 && i.members.every(isTbPort));
    const addresses = [...i.ipv4, ...i.ipv6.filter((a) => !isLinkLocal6(a))];
    if (addresses.length === 0 && !thunderbolt) continue;
    // RDMA is per Thunderbolt port (rdma_enN); the bridge over those ports only carries TCP.
    const rdma = rdmaEnabled && rdmaDevs.has(i.name);
    result.push({ name: i.name, addresses, thunderbolt, rdma });
  }
  return result;
}

export function buildLinuxProfile(inp: LinuxInputs, ctx: ProfileContext, nowSeconds: number): ProbeResult {
  const notes: string[] = [];
  const mem = parseMeminfo(inp.meminfo ?? '');
  const cpu = parseCpuinfo(inp.cpuinfo ?? '');
  const realMemory = mem.get('MemTotal') ?? inp.totalMemBytes;
  if (realMemory === undefined) notes.push('RAM size unknown (/proc/meminfo unreadable); pass --memory-limit');
  const memoryBytes = ctx.memoryLimitBytes ?? realMemory ?? 0;
  const live = linuxLiveStats(inp, memoryBytes, nowSeconds);
  const available = mem.get('MemAvailable');
  const inUse = ctx.memoryLimitBytes === undefined && realMemory !== undefined && available !== undefined ? realMemory - available : undefined;
  const chip = cpu.model ?? inp.cpuModel ?? 'unknown';
  const { bandwidth, source } = chooseBandwidth(ctx, chip, undefined, notes);
  // No GPU wired limit on Linux (CPU inference uses ordinary RAM): the limit is RAM itself, so the
  // budget reduces to RAM − reserve − others − margin.
  const result = finish(ctx, notes, memoryBytes, memoryBytes, inUse);
  return {
    profile: {
      nodeId: ctx.nodeId,
      name: ctx.name ?? defaultName(inp.hostname),
      hostname: inp.hostname,
      os: 'linux',
      osVersion: inp.osVersion,
      chip,
      performanceCores: cpu.physicalCores,
      efficiencyCores: 0,
      gpuCores: 0,
      memoryBytes,
      bandwidthBytesPerSecond: bandwidth,
      wiredLimitBytes: memoryBytes,
      budgetBytes: result.budgetBytes,
      engines: [...(ctx.engines ?? [])],
      interfaces: linuxInterfaces(inp),
      protocolVersion: PROTOCOL_VERSION,
      agentVersion: ctx.agentVersion,
    },
    live,
    details: {
      bandwidthSource: source,
      wiredLimitSource: 'not-applicable',
      budget: result.budget,
      realMemoryBytes: realMemory,
      thunderbolt: [],
      notes,
    },
  };
}

export function linuxLiveStats(
  inp: Pick<LinuxInputs, 'meminfo' | 'psiMemory'>,
  memoryBytes: number,
  nowSeconds: number,
): LiveStats {
  const mem = parseMeminfo(inp.meminfo ?? '');
  // MemAvailable is the kernel's own estimate (since 3.14); older kernels: free + cached.
  const available = mem.get('MemAvailable') ?? (mem.get('MemFree') ?? 0) + (mem.get('Cached') ?? 0);
  return {
    availableBytes: Math.min(memoryBytes, available),
    memoryPressure: inp.psiMemory ? parsePsiMemory(inp.psiMemory) : 'unknown',
    // Linux exposes thermal zones but no throttling verdict comparable to macOS; not modelled.
    thermalState: 'unknown',
    timestampSeconds: nowSeconds,
  };
}

export function linuxInterfaces(inp: Pick<LinuxInputs, 'interfaces' | 'rdmaInterfaces'>): NetworkInterfaceInfo[] {
  const rdma = new Set(inp.rdmaInterfaces ?? []);
  const result: NetworkInterfaceInfo[] = [];
  for (const [name, infos] of Object.entries(inp.interfaces)) {
    if (!infos || infos.some((i) => i.internal)) continue;
    const addresses = infos.map((i) => i.address).filter((a) => !isLinkLocal6(a));
    // thunderbolt-net names its interfaces thunderbolt0…
    const thunderbolt = name.startsWith('thunderbolt');
    if (addresses.length === 0 && !thunderbolt) continue;
    result.push({ name, addresses, thunderbolt, rdma: rdma.has(name) });
  }
  return result;
}
