import { UsageError } from './errors.ts';

const SIZE_UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  kb: 1e3,
  mb: 1e6,
  gb: 1e9,
  tb: 1e12,
  kib: 2 ** 10,
  mib: 2 ** 20,
  gib: 2 ** 30,
  tib: 2 ** 40,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
};

/**
 * Parse a byte size: `512MiB`, `8GiB`, `1.5GB`, `1073741824`. Decimal units (GB) are powers of
 * ten, binary units (GiB) and bare letters (G) powers of two, as macOS and most CLIs use them.
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? SIZE_UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new UsageError(`invalid ${what} "${text}": use bytes or a unit like 512MiB, 8GiB, 16GB`);
  }
  const bytes = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`invalid ${what} "${text}": too large`);
  return bytes;
}

/** Parse a bandwidth in GB/s (decimal, as Apple quotes it), e.g. `819` or `819GB/s`. */
export function parseBandwidth(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(?:GB\/s|GBps|G)?\s*$/i.exec(text);
  if (!m || Number(m[1]) <= 0) {
    throw new UsageError(`invalid bandwidth "${text}": give GB/s as a positive number, e.g. 400`);
  }
  return Math.round(Number(m[1]) * 1e9);
}

/** Parse a positive or non-negative integer flag with a clear message. */
export function parseInteger(text: string, what: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^\s*-?\d+\s*$/.test(text)) throw new UsageError(`invalid ${what} "${text}": expected an integer`);
  const n = Number(text);
  if (n < min || n > max) throw new UsageError(`invalid ${what} ${n}: must be between ${min} and ${max}`);
  return n;
}

export function parsePort(text: string, what = 'port'): number {
  return parseInteger(text, what, 0, 65535);
}

/** 1.5 GiB, 300 MiB, 12 KiB — binary units, as memory is counted. */
export function formatBytes(bytes: number): string {
  const abs = Math.abs(bytes);
  if (abs >= 2 ** 40) return `${(bytes / 2 ** 40).toFixed(2)} TiB`;
  if (abs >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
  if (abs >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  if (abs >= 2 ** 10) return `${(bytes / 2 ** 10).toFixed(1)} KiB`;
  return `${bytes} B`;
}

/** 819 GB/s — decimal, as bandwidth is quoted. */
export function formatBandwidth(bytesPerSecond: number): string {
  return `${(bytesPerSecond / 1e9).toFixed(bytesPerSecond >= 1e11 ? 0 : 1)} GB/s`;
}
