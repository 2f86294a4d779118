import { UsageError } from './errors.ts';

/**
 * The engine port range: the ports an agent hands its engines (llama.cpp rpc-servers and
 * llama-servers, MLX ring ranks) — every one bound on 127.0.0.1 only. An engine takes its port on
 * its command line, so a port is chosen first and bound by the engine a moment later. Port 0's
 * answer comes from the kernel's ephemeral range, which every outgoing connection on the machine
 * also draws from: any connection could take the port in that moment ("[ring] Couldn't bind
 * socket (error: 98)" on a CI box running four agents and their relays). Ports outside the
 * ephemeral range are taken only by something that binds them on purpose, and are checked free
 * by a bind before they are handed out.
 *
 * Default 20000–32767: below Linux's default ephemeral range (32768–60999) and macOS's
 * (49152–65535). Set with `--engine-ports` / ORCHARD_ENGINE_PORTS; the part that overlaps the
 * machine's own ephemeral range is cut off (ephemeralRange: /proc/sys/net/ipv4/ip_local_port_range,
 * sysctl net.inet.ip.portrange.first/last).
 */
export type PortRange = readonly [first: number, last: number];

export const DEFAULT_ENGINE_PORT_RANGE: PortRange = [20000, 32767];

/** Fewer usable ports than this is a configuration mistake, not a range. */
export const MIN_ENGINE_PORTS = 16;

/** "FIRST-LAST" (also "FIRST–LAST") → the range; UsageError names `what` on anything else. */
export function parsePortRange(text: string, what = '--engine-ports'): PortRange {
  const m = /^\s*(\d{1,5})\s*[-–]\s*(\d{1,5})\s*$/.exec(text);
  const first = Number(m?.[1]);
  const last = Number(m?.[2]);
  if (!m || first < 1024 || last > 65535 || first > last) throw new UsageError(`${what} must be FIRST-LAST with 1024 ≤ FIRST ≤ LAST ≤ 65535, got "${text}"`);
  return [first, last];
}

/** Two port numbers separated by white space (Linux ip_local_port_range, `sysctl -n first last`). */
export function parseEphemeralRange(text: string): PortRange | undefined {
  const nums = text.trim().split(/\s+/).map(Number);
  if (nums.length !== 2 || !nums.every((n) => Number.isInteger(n) && n >= 1 && n <= 65535)) return undefined;
  const [first, last] = nums as [number, number];
  return first <= last ? [first, last] : undefined;
}

/**
 * The largest part of `range` outside `ephemeral` (none known: all of it). UsageError when fewer
 * than MIN_ENGINE_PORTS ports are left: the user must move the range.
 */
export function usableEngineRange(range: PortRange, ephemeral: PortRange | undefined): PortRange {
  const [lo, hi] = range;
  const pieces: PortRange[] = !ephemeral || ephemeral[1] < lo || ephemeral[0] > hi ? [range] : [];
  if (ephemeral && pieces.length === 0) {
    if (ephemeral[0] > lo) pieces.push([lo, ephemeral[0] - 1]);
    if (ephemeral[1] < hi) pieces.push([ephemeral[1] + 1, hi]);
  }
  const best = pieces.sort((a, b) => b[1] - b[0] - (a[1] - a[0]))[0];
  if (!best || best[1] - best[0] + 1 < MIN_ENGINE_PORTS) {
    const eph = ephemeral ? `${ephemeral[0]}-${ephemeral[1]}` : '?';
    throw new UsageError(`the engine port range ${lo}-${hi} lies (almost) inside this machine's ephemeral port range ${eph}: set --engine-ports / ORCHARD_ENGINE_PORTS to a range outside it`);
  }
  return best;
}

/**
 * `count` distinct ports of `range`, drawn at random (so agents sharing a machine rarely try the
 * same one), none of which `taken` refuses. UsageError when the range cannot hold them.
 */
export function drawPorts(count: number, range: PortRange, random: () => number, taken: (port: number) => boolean = () => false): number[] {
  const [lo, hi] = range;
  const size = hi - lo + 1;
  const out = new Set<number>();
  // Random draws while the range is mostly free; a full scan from a random start once they miss a lot.
  for (let tries = 0; out.size < count && tries < 8 * count + 64; tries++) {
    const p = lo + Math.floor(random() * size);
    if (!taken(p)) out.add(p);
  }
  const start = Math.floor(random() * size);
  for (let i = 0; out.size < count && i < size; i++) {
    const p = lo + ((start + i) % size);
    if (!taken(p)) out.add(p);
  }
  if (out.size < count) throw new UsageError(`the engine port range ${lo}-${hi} has no ${count} free port(s) left`);
  return [...out];
}

/** Whether an engine's failure says its port was taken (EADDRINUSE: 98 on Linux, 48 on macOS). */
export function portWasTaken(message: string): boolean {
  return /Couldn't bind socket \(error: (98|48)\)|address already in use|EADDRINUSE|port \d+ on [\d.]+ is already in use/i.test(message);
}
