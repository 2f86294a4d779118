// Human units, as the CLI prints them (binary bytes, decimal bandwidth), and node colours.

export function bytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export const bandwidth = (bps) => (bps > 0 ? `${(bps / 1e9).toFixed(0)} GB/s` : '—');

export const tokPerSec = (v) => (v === null || v === undefined || !Number.isFinite(v) ? '—' : `${v.toFixed(1)} tok/s`);

export const seconds = (s) => (s === null || s === undefined ? '—' : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`);

export const layers = (first, last) => (last >= first ? `${first}–${last}` : '—');

export const clockTime = (ms) => new Date(ms).toLocaleTimeString();

// Dark enough for white text at ≥ 4.5:1; a node keeps its colour across views (by name order).
const PALETTE = ['#1f4e9c', '#8a3b12', '#2e6b30', '#6b2e83', '#9c1f4e', '#0f5e63', '#5c5c0f', '#3d3d99'];

export function nodeColours(names) {
  const sorted = [...new Set(names)].sort();
  return new Map(sorted.map((n, i) => [n, PALETTE[i % PALETTE.length]]));
}
