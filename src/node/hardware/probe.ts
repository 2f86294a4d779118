/**
 * The hardware probe: runs the platform's commands / reads /proc, hands the text to the pure
 * builders in profile.ts. Thin on purpose — everything that can be wrong about parsing is tested
 * with recorded output; this file only decides what to run and never throws because a command is
 * missing, slow or failing (the fact is then unknown and the profile says so in its notes).
 *
 * macOS paths cannot run on the Linux CI machine; they are exercised through fixtures of the
 * same commands' output (test/fixtures/hardware/).
 */
import { findMlxEnv } from '../mlx/env.ts';
import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import os from 'node:os';
import type { HardwareProfile, LiveStats } from '../../shared/hardware.ts';
import { findLlamaBinaries } from '../llama/binaries.ts';
import {
  buildLinuxProfile,
  buildMacProfile,
  type LinuxInputs,
  linuxLiveStats,
  type MacOutputs,
  macLiveStats,
  type ProbeResult,
} from './profile.ts';

/** Options of the hardware probe; every override wins over what the machine reports. */
export interface ProbeOptions {
  /** Stable node id (persisted by the agent's identity module). */
  readonly nodeId: string;
  /** Human name (Bonjour instance name); default: the hostname. */
  readonly name?: string;
  /** Pretend total RAM (for tests and odd hardware). */
  readonly memoryLimitBytes?: number;
  /** Usable model-memory budget, set directly (skips the computation). */
  readonly budgetBytes?: number;
  /** Memory bandwidth override (bytes/s). */
  readonly bandwidthBytesPerSecond?: number;
  /**
   * Engines available ("rpc-server", "llama-server", "mlx"). When omitted the probe reports the
   * llama.cpp engines if `findLlamaBinaries()` finds them; MLX detection belongs to the MLX work.
   */
  readonly engines?: readonly string[];
  /** Default: this package's version. */
  readonly agentVersion?: string;
}

export interface CommandOptions {
  readonly timeoutMs?: number;
}

/**
 * Run a command and return its stdout, or undefined when it is missing, times out or prints
 * nothing. A non-zero exit still returns stdout: `sysctl a b` exits 1 when one name is unknown
 * (older macOS lacks `iogpu.wired_limit_mb`) but prints the others.
 */
export function runCommand(file: string, args: readonly string[], opts: CommandOptions = {}): Promise<string | undefined> {
  return new Promise((resolve) => {
    execFile(
      file,
      [...args],
      { timeout: opts.timeoutMs ?? 5000, killSignal: 'SIGKILL', maxBuffer: 16 * 2 ** 20, encoding: 'utf8' },
      (err, stdout) => {
        const timedOut = err !== null && (err as NodeJS.ErrnoException & { killed?: boolean }).killed === true;
        if (timedOut || (err !== null && typeof (err as NodeJS.ErrnoException).code === 'string')) {
          resolve(undefined); // ENOENT / EACCES / killed on timeout
          return;
        }
        resolve(stdout.trim() === '' ? undefined : stdout);
      },
    );
  });
}

async function readText(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch {
    return undefined;
  }
}

const SYSCTL_NAMES = [
  'hw.memsize',
  'machdep.cpu.brand_string',
  'hw.perflevel0.physicalcpu',
  'hw.perflevel1.physicalcpu',
  'hw.logicalcpu',
  'hw.model',
  'iogpu.wired_limit_mb',
  'debug.iogpu.wired_limit',
  'kern.osproductversion',
  'kern.hostname',
  'kern.memorystatus_vm_pressure_level',
];

/** Gather every macOS command's output in parallel. */
export async function gatherMacOutputs(): Promise<MacOutputs> {
  const [sysctl, vmStat, memoryPressure, systemProfiler, ifconfig, hardwarePorts, pmsetTherm, ibvDevices, rdmaCtl] =
    await Promise.all([
      runCommand('/usr/sbin/sysctl', SYSCTL_NAMES),
      runCommand('/usr/bin/vm_stat', []),
      runCommand('/usr/bin/memory_pressure', ['-Q']),
      // system_profiler is slow (1–3 s, more with many Thunderbolt devices).
      runCommand('/usr/sbin/system_profiler', ['SPDisplaysDataType', 'SPHardwareDataType', 'SPThunderboltDataType', '-json'], {
        timeoutMs: 20000,
      }),
      runCommand('/sbin/ifconfig', []),
      runCommand('/usr/sbin/networksetup', ['-listallhardwareports']),
      runCommand('/usr/bin/pmset', ['-g', 'therm']),
      runCommand('ibv_devices', []),
      runCommand('rdma_ctl', ['status']),
    ]);
  return { sysctl, vmStat, memoryPressure, systemProfiler, ifconfig, hardwarePorts, pmsetTherm, ibvDevices, rdmaCtl };
}

/** Interfaces that carry an RDMA device: /sys/class/infiniband/<dev>/device/net/<if>. */
async function linuxRdmaInterfaces(): Promise<string[]> {
  const out: string[] = [];
  let devs: string[];
  try {
    devs = await readdir('/sys/class/infiniband');
  } catch {
    return out;
  }
  for (const dev of devs) {
    try {
      out.push(...(await readdir(`/sys/class/infiniband/${dev}/device/net`)));
    } catch {
      // a device without a net interface (pure InfiniBand) — not an IP path
    }
  }
  return out;
}

async function linuxOsVersion(): Promise<string> {
  const release = await readText('/etc/os-release');
  const pretty = release ? /^PRETTY_NAME="?([^"\n]*)"?$/m.exec(release)?.[1] : undefined;
  return pretty ? `${pretty} (kernel ${os.release()})` : os.release();
}

export async function gatherLinuxInputs(): Promise<LinuxInputs> {
  const [meminfo, cpuinfo, psiMemory, osVersion, rdmaInterfaces] = await Promise.all([
    readText('/proc/meminfo'),
    readText('/proc/cpuinfo'),
    readText('/proc/pressure/memory'),
    linuxOsVersion(),
    linuxRdmaInterfaces(),
  ]);
  return {
    meminfo,
    cpuinfo,
    psiMemory,
    osVersion,
    hostname: os.hostname(),
    cpuModel: os.cpus()[0]?.model,
    totalMemBytes: os.totalmem(),
    interfaces: os.networkInterfaces(),
    rdmaInterfaces,
  };
}

let cachedVersion: string | undefined;
async function packageVersion(): Promise<string> {
  if (cachedVersion) return cachedVersion;
  const text = await readText(new URL('../../../package.json', import.meta.url).pathname);
  cachedVersion = (text ? (JSON.parse(text) as { version?: string }).version : undefined) ?? '0.0.0';
  return cachedVersion;
}

async function detectEngines(): Promise<string[]> {
  const engines: string[] = [];
  try {
    await findLlamaBinaries();
    engines.push('rpc-server', 'llama-server');
  } catch {
    // no llama.cpp binaries with RPC here
  }
  // MLX: the project venv (orchard setup --mlx) or ORCHARD_MLX_PYTHON; ring needs distributed.
  const mlx = await findMlxEnv().catch(() => undefined);
  if (mlx) engines.push(mlx.distributed ? 'mlx' : 'mlx-single');
  return engines;
}

/** Profile, first live sample and how every number was derived (notes for the start-up summary). */
export async function probeHardwareDetailed(opts: ProbeOptions): Promise<ProbeResult> {
  const [agentVersion, engines] = await Promise.all([
    opts.agentVersion ?? packageVersion(),
    opts.engines ?? detectEngines(),
  ]);
  const ctx = {
    nodeId: opts.nodeId,
    name: opts.name,
    hostname: os.hostname(),
    memoryLimitBytes: opts.memoryLimitBytes,
    budgetBytes: opts.budgetBytes,
    bandwidthBytesPerSecond: opts.bandwidthBytesPerSecond,
    engines,
    agentVersion,
  };
  const now = Date.now() / 1000;
  if (process.platform === 'darwin') return buildMacProfile(await gatherMacOutputs(), ctx, now);
  return buildLinuxProfile(await gatherLinuxInputs(), ctx, now);
}

/** Probe the machine once (macOS or Linux). Never throws because a command is missing. */
export async function probeHardware(opts: ProbeOptions): Promise<HardwareProfile> {
  return (await probeHardwareDetailed(opts)).profile;
}

export interface LiveStatsOptions {
  /** The profile's total RAM (pass `profile.memoryBytes` so --memory-limit clamps availability). */
  readonly memoryBytes?: number;
}

/**
 * Cheap live sample: available memory, memory pressure, thermal state. On macOS this runs
 * vm_stat, memory_pressure -Q, two sysctls and pmset (tens of ms); on Linux it reads /proc.
 */
export async function readLiveStats(opts: LiveStatsOptions = {}): Promise<LiveStats> {
  const now = Date.now() / 1000;
  if (process.platform === 'darwin') {
    const [sysctl, vmStat, memoryPressure, pmsetTherm] = await Promise.all([
      runCommand('/usr/sbin/sysctl', ['hw.memsize', 'kern.memorystatus_vm_pressure_level']),
      runCommand('/usr/bin/vm_stat', []),
      runCommand('/usr/bin/memory_pressure', ['-Q']),
      runCommand('/usr/bin/pmset', ['-g', 'therm']),
    ]);
    const out = { sysctl, vmStat, memoryPressure, pmsetTherm };
    return macLiveStats(out, opts.memoryBytes ?? Number.MAX_SAFE_INTEGER, now);
  }
  const [meminfo, psiMemory] = await Promise.all([readText('/proc/meminfo'), readText('/proc/pressure/memory')]);
  return linuxLiveStats({ meminfo, psiMemory }, opts.memoryBytes ?? Number.MAX_SAFE_INTEGER, now);
}
