/**
 * Pure parsers for the output of macOS commands, exactly as they print it. No I/O here: the probe
 * runs the commands, these functions turn text into facts, and test fixtures feed recorded output.
 * Every parser tolerates missing lines (older macOS, Intel Macs, redacted output) by leaving the
 * fact undefined rather than guessing.
 */

/** `sysctl -a` (or `sysctl name…`) lines `name: value` into a map. Unknown-oid noise is skipped. */
export function parseSysctl(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    // `sysctl -a` prints "name: value"; `sysctl -e`/BSD style prints "name=value".
    const m = /^([a-zA-Z0-9_.]+)(?::\s?|=)(.*)$/.exec(line.trimEnd());
    if (m) out.set(m[1]!, m[2]!.trim());
  }
  return out;
}

export interface SysctlFacts {
  readonly memoryBytes?: number;
  readonly brand?: string;
  readonly perfCores?: number;
  readonly effCores?: number;
  readonly logicalCpus?: number;
  /** `iogpu.wired_limit_mb` (Sonoma+) or `debug.iogpu.wired_limit` (Ventura, bytes), in bytes; 0 = OS default. */
  readonly wiredLimitSettingBytes?: number;
  readonly osVersion?: string;
  readonly hostname?: string;
  readonly model?: string;
  /** `kern.memorystatus_vm_pressure_level`: 1 normal, 2 warn, 4 critical. */
  readonly pressureLevel?: number;
}

function int(map: Map<string, string>, key: string): number | undefined {
  const v = map.get(key);
  if (v === undefined || !/^\d+$/.test(v)) return undefined;
  const n = Number(v);
  return Number.isSafeInteger(n) ? n : undefined;
}

export function sysctlFacts(map: Map<string, string>): SysctlFacts {
  const wiredMb = int(map, 'iogpu.wired_limit_mb');
  const legacyWired = int(map, 'debug.iogpu.wired_limit');
  return {
    memoryBytes: int(map, 'hw.memsize'),
    brand: map.get('machdep.cpu.brand_string') || undefined,
    perfCores: int(map, 'hw.perflevel0.physicalcpu'),
    effCores: int(map, 'hw.perflevel1.physicalcpu'),
    logicalCpus: int(map, 'hw.logicalcpu') ?? int(map, 'hw.ncpu'),
    wiredLimitSettingBytes: wiredMb !== undefined ? wiredMb * 2 ** 20 : legacyWired,
    osVersion: map.get('kern.osproductversion') || undefined,
    hostname: map.get('kern.hostname') || undefined,
    model: map.get('hw.model') || undefined,
    pressureLevel: int(map, 'kern.memorystatus_vm_pressure_level'),
  };
}

/** `vm_stat`: page size and the page counts, keyed by their label ("Pages free", "Anonymous pages"). */
export interface VmStat {
  readonly pageSize: number;
  readonly pages: ReadonlyMap<string, number>;
}

export function parseVmStat(text: string): VmStat | undefined {
  const header = /page size of (\d+) bytes/.exec(text);
  if (!header) return undefined;
  const pages = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^"?([^":]+?)"?:\s+(\d+)\.?\s*$/.exec(line);
    if (m) pages.set(m[1]!, Number(m[2]));
  }
  return { pageSize: Number(header[1]), pages };
}

/**
 * Available memory from `vm_stat`, the way Activity Monitor counts it: everything except
 * "Memory Used" = app memory (anonymous − purgeable) + wired + compressed. File cache counts as
 * available because the kernel drops it on demand. Falls back to free + inactive + speculative
 * (psutil's rule plus read-ahead) when the anonymous count is missing (older macOS).
 */
export function vmAvailableBytes(vm: VmStat, totalBytes: number): number | undefined {
  const p = (k: string) => vm.pages.get(k);
  const wired = p('Pages wired down');
  const anonymous = p('Anonymous pages');
  const compressor = p('Pages occupied by compressor');
  let bytes: number;
  if (wired !== undefined && anonymous !== undefined && compressor !== undefined) {
    const used = (anonymous - (p('Pages purgeable') ?? 0) + wired + compressor) * vm.pageSize;
    bytes = totalBytes - used;
  } else {
    const free = p('Pages free');
    if (free === undefined) return undefined;
    bytes = (free + (p('Pages inactive') ?? 0) + (p('Pages speculative') ?? 0)) * vm.pageSize;
  }
  return Math.max(0, Math.min(totalBytes, bytes));
}

/** `memory_pressure` (full or `-Q`): the kernel's "System-wide memory free percentage". */
export function parseMemoryPressureFreePercent(text: string): number | undefined {
  const m = /System-wide memory free percentage:\s*(\d+)%/.exec(text);
  return m ? Number(m[1]) : undefined;
}

export type PressureState = 'normal' | 'warn' | 'critical' | 'unknown';

/**
 * Pressure state. The kernel's own level (`kern.memorystatus_vm_pressure_level`, the value behind
 * DISPATCH_SOURCE_TYPE_MEMORYPRESSURE: 1 normal, 2 warn, 4 critical) is authoritative. Without it
 * we fall back to the free percentage `memory_pressure` prints, with thresholds that are our own
 * heuristic (not Apple's): < 10% critical, < 25% warn.
 */
export function pressureState(level: number | undefined, freePercent: number | undefined): PressureState {
  if (level === 1) return 'normal';
  if (level === 2) return 'warn';
  if (level === 4) return 'critical';
  if (freePercent === undefined) return 'unknown';
  if (freePercent < 10) return 'critical';
  if (freePercent < 25) return 'warn';
  return 'normal';
}

export type ThermalState = 'nominal' | 'fair' | 'serious' | 'critical' | 'unknown';

/**
 * `pmset -g therm`. Apple Silicon Macs usually print "No thermal warning level has been recorded"
 * (= nominal). Levels follow IOPMLib: thermal warning 0 normal, 5 danger, ≥10 critical/trap;
 * performance warning 100 = the OS is throttling; CPU_Speed_Limit < 100 = throttled.
 * Mapping to ProcessInfo-style states is ours: throttling → serious, speed limit < 50 or thermal
 * level ≥ 10 → critical, thermal level 5 without throttling → fair.
 */
export function parsePmsetTherm(text: string): ThermalState {
  if (!/thermal warning level|performance warning level|CPU_Speed_Limit/i.test(text)) return 'unknown';
  const thermal = Number(/Thermal warning level set to (\d+)/i.exec(text)?.[1] ?? 0);
  const perf = Number(/Performance warning level set to (\d+)/i.exec(text)?.[1] ?? 0);
  const speed = Number(/CPU_Speed_Limit\s*=\s*(\d+)/.exec(text)?.[1] ?? 100);
  if (thermal >= 10 || speed < 50) return 'critical';
  if (perf > 0 || speed < 100) return 'serious';
  if (thermal > 0) return 'fair';
  return 'nominal';
}

/** What `system_profiler SPDisplaysDataType SPHardwareDataType SPThunderboltDataType -json` tells us. */
export interface SystemProfilerFacts {
  readonly gpuCores?: number;
  readonly chip?: string;
  readonly machineName?: string;
  readonly machineModel?: string;
  readonly memoryBytes?: number;
  /** From "proc 16:12:4" (total:performance:efficiency). */
  readonly perfCores?: number;
  readonly effCores?: number;
  /** Thunderbolt buses with their receptacle speed ("Up to 40 Gb/s") and connected device names. */
  readonly thunderbolt: readonly { bus: string; speedGbps?: number; connected: readonly string[] }[];
}

type Json = Record<string, unknown>;
const isObj = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);
const list = (v: unknown): Json[] => (Array.isArray(v) ? v.filter(isObj) : []);
const str = (v: unknown): string | undefined => (typeof v === 'string' && v !== '' ? v : undefined);

/** Throws SyntaxError on text that is not JSON (the probe treats that as "no facts"). */
export function parseSystemProfiler(text: string): SystemProfilerFacts {
  const root: unknown = JSON.parse(text);
  if (!isObj(root)) return { thunderbolt: [] };
  // The Apple GPU is the display entry with sppci_cores; eGPUs/Intel GPUs have none.
  const gpu = list(root['SPDisplaysDataType']).find((d) => str(d['sppci_cores']) !== undefined);
  const hw = list(root['SPHardwareDataType'])[0] ?? {};
  const procs = /^proc (\d+):(\d+):(\d+)/.exec(str(hw['number_processors']) ?? '');
  const thunderbolt = list(root['SPThunderboltDataType']).map((bus) => {
    let speedGbps: number | undefined;
    const connected: string[] = [];
    for (const [key, value] of Object.entries(bus)) {
      if (!key.startsWith('receptacle_') || !isObj(value)) continue;
      const speed = /(\d+)\s*Gb\/s/.exec(str(value['current_speed_key']) ?? '');
      if (speed) speedGbps = Math.max(speedGbps ?? 0, Number(speed[1]));
    }
    for (const item of list(bus['_items'])) {
      const name = str(item['_name']) ?? str(item['device_name_key']);
      if (name) connected.push(name);
    }
    return { bus: str(bus['_name']) ?? 'thunderbolt', speedGbps, connected };
  });
  return {
    gpuCores: gpu ? Number(str(gpu['sppci_cores'])) || undefined : undefined,
    chip: str(hw['chip_type']) ?? (gpu ? str(gpu['sppci_model']) : undefined),
    machineName: str(hw['machine_name']),
    machineModel: str(hw['machine_model']),
    memoryBytes: parsePhysicalMemory(str(hw['physical_memory'])),
    perfCores: procs ? Number(procs[2]) : undefined,
    effCores: procs ? Number(procs[3]) : undefined,
    thunderbolt,
  };
}

/** "48 GB" (system_profiler counts binary gigabytes as "GB"). */
function parsePhysicalMemory(text: string | undefined): number | undefined {
  const m = /^(\d+)\s*(GB|TB|MB)$/.exec(text ?? '');
  if (!m) return undefined;
  const unit = m[2] === 'TB' ? 2 ** 40 : m[2] === 'GB' ? 2 ** 30 : 2 ** 20;
  return Number(m[1]) * unit;
}

/** One interface block of `ifconfig` output. */
export interface IfconfigInterface {
  readonly name: string;
  readonly flags: readonly string[];
  readonly ipv4: readonly string[];
  readonly ipv6: readonly string[];
  /** Members of a bridge (bridge0 is the Thunderbolt Bridge on macOS). */
  readonly members: readonly string[];
  readonly status?: string;
  readonly media?: string;
}

export function parseIfconfig(text: string): IfconfigInterface[] {
  const out: IfconfigInterface[] = [];
  let cur: { name: string; flags: string[]; ipv4: string[]; ipv6: string[]; members: string[]; status?: string; media?: string } | undefined;
  for (const line of text.split('\n')) {
    const head = /^([a-zA-Z0-9_.-]+): flags=[0-9a-f]+<([^>]*)>/.exec(line);
    if (head) {
      cur = { name: head[1]!, flags: head[2]!.split(',').filter(Boolean), ipv4: [], ipv6: [], members: [] };
      out.push(cur);
      continue;
    }
    if (!cur) continue;
    const t = line.trim();
    const inet = /^inet (\d+\.\d+\.\d+\.\d+)/.exec(t);
    const inet6 = /^inet6 ([0-9a-fA-F:]+)(%\S+)?/.exec(t);
    const member = /^member: (\S+)/.exec(t);
    const status = /^status: (.+)$/.exec(t);
    const media = /^media: (.+)$/.exec(t);
    if (inet) cur.ipv4.push(inet[1]!);
    else if (inet6) cur.ipv6.push(inet6[1]!);
    else if (member) cur.members.push(member[1]!);
    else if (status) cur.status = status[1]!;
    else if (media) cur.media = media[1]!;
  }
  return out;
}

/** `networksetup -listallhardwareports`: device → hardware port name ("en2" → "Thunderbolt 2"). */
export function parseHardwarePorts(text: string): Map<string, string> {
  const out = new Map<string, string>();
  let port: string | undefined;
  for (const line of text.split('\n')) {
    const p = /^Hardware Port: (.+)$/.exec(line.trim());
    if (p) {
      port = p[1]!;
      continue;
    }
    const d = /^Device: (\S+)$/.exec(line.trim());
    if (d && port !== undefined) {
      out.set(d[1]!, port);
      port = undefined;
    }
  }
  return out;
}

/**
 * RDMA devices from `ibv_devices` (macOS 26.2+ exposes Thunderbolt 5 RDMA as `rdma_enN`, one per
 * Thunderbolt port, used by MLX's JACCL backend). Returns the network interfaces they sit on.
 */
export function parseIbvDevices(text: string): Set<string> {
  const out = new Set<string>();
  for (const line of text.split('\n')) {
    const m = /^\s*rdma_(\S+)\s/.exec(`${line} `);
    if (m) out.add(m[1]!);
  }
  return out;
}

/** `rdma_ctl status`: true when RDMA is enabled (it must be enabled from Recovery). */
export function parseRdmaCtlStatus(text: string): boolean | undefined {
  const t = text.trim().toLowerCase();
  if (t === '') return undefined;
  if (/\bdisabled\b/.test(t)) return false;
  if (/\benabled\b/.test(t)) return true;
  return undefined;
}
