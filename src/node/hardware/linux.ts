/**
 * Pure parsers for Linux `/proc` files (CI and non-Mac nodes). No I/O here.
 */

/** `/proc/meminfo` values in bytes, keyed by field ("MemTotal", "MemAvailable"). */
export function parseMeminfo(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z0-9_()]+):\s+(\d+)(?:\s+kB)?\s*$/.exec(line);
    if (m) out.set(m[1]!, Number(m[2]) * (line.trimEnd().endsWith('kB') ? 1024 : 1));
  }
  return out;
}

export interface CpuinfoFacts {
  readonly model?: string;
  /** Logical CPUs (processor entries). */
  readonly logicalCpus: number;
  /** Physical cores: distinct (physical id, core id) pairs, or logical CPUs when not reported (ARM). */
  readonly physicalCores: number;
}

export function parseCpuinfo(text: string): CpuinfoFacts {
  let model: string | undefined;
  let logical = 0;
  const cores = new Set<string>();
  for (const block of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    for (const line of block.split('\n')) {
      const i = line.indexOf(':');
      if (i > 0) fields.set(line.slice(0, i).trim(), line.slice(i + 1).trim());
    }
    if (fields.has('processor')) logical++;
    // x86 has "model name"; some ARM kernels put the SoC in "Hardware" or "Model".
    model ??= fields.get('model name') || fields.get('Hardware') || fields.get('Model') || undefined;
    const phys = fields.get('physical id');
    const core = fields.get('core id');
    if (phys !== undefined && core !== undefined) cores.add(`${phys}/${core}`);
  }
  return { model, logicalCpus: logical, physicalCores: cores.size > 0 ? cores.size : logical };
}

/**
 * `/proc/pressure/memory` (PSI): share of time some task stalled on memory in the last 10 s.
 * Thresholds are our heuristic (Linux has no named levels): ≥ 40% critical, ≥ 10% warn.
 */
export function parsePsiMemory(text: string): 'normal' | 'warn' | 'critical' | 'unknown' {
  const m = /^some avg10=(\d+(?:\.\d+)?)/m.exec(text);
  if (!m) return 'unknown';
  const avg10 = Number(m[1]);
  if (avg10 >= 40) return 'critical';
  if (avg10 >= 10) return 'warn';
  return 'normal';
}
