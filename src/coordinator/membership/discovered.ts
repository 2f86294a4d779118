/**
 * An agent Bonjour announced that is not a member: it could not be dialled over mutual TLS (it
 * holds no certificate of this cluster yet, or answers with another cluster's). What is shown is
 * what its TXT record claims (unproven); nothing is sent to it but TLS handshakes, which carry no
 * secret. It becomes a member, and leaves this list, once a dial succeeds.
 */
export interface DiscoveredAgent {
  readonly address: string;
  /** As announced (TXT `id`), not proven. */
  readonly nodeId: string;
  readonly name: string;
  readonly chip: string;
  readonly memoryBytes: number;
  readonly firstSeenMs: number;
  /** The last Bonjour sighting (the browser asks again every DISCOVERY_REFRESH_MS). */
  readonly lastSeenMs: number;
  /** Why it is not a member: the last dial's error. */
  readonly reason: string;
}

/** What a Bonjour record claims about an agent (TXT `id`, instance name, `chip`, `ram`). */
export interface Announced {
  readonly nodeId?: string | undefined;
  readonly name?: string | undefined;
  readonly chip?: string | undefined;
  readonly memoryBytes?: number | undefined;
}

/**
 * How long a discovered agent stays listed (and re-dialled) after its last sighting. Bonjour
 * drops a record at once on a goodbye, but an agent that vanished without one (power off, a
 * SIGKILL, another network) sends nothing: its record would otherwise stay for the PTR's 8-hour
 * TTL, and the coordinator would dial it every 2 s all that time. Three refreshes: one lost
 * answer to a multicast query does not drop it.
 */
export const DISCOVERED_TTL_MS = 3 * 60_000;

/**
 * The discovered list (pure: the caller passes the time). An entry is recorded when a sighting's
 * dial fails, refreshed by every later sighting, removed when the address becomes a member, its
 * advertisement goes away, or it has not been sighted for `ttlMs`.
 */
export class DiscoveredList {
  readonly #entries = new Map<string, DiscoveredAgent>();
  readonly #ttlMs: number;

  constructor(ttlMs = DISCOVERED_TTL_MS) {
    this.#ttlMs = ttlMs;
  }

  /** A sighting at `sightedMs` whose dial failed with `reason`. */
  record(address: string, announced: Announced, reason: string, sightedMs: number): void {
    const previous = this.#entries.get(address);
    this.#entries.set(address, {
      address,
      nodeId: announced.nodeId ?? '',
      name: announced.name ?? address,
      chip: announced.chip ?? '',
      memoryBytes: announced.memoryBytes ?? 0,
      firstSeenMs: previous?.firstSeenMs ?? sightedMs,
      lastSeenMs: Math.max(previous?.lastSeenMs ?? 0, sightedMs),
      reason,
    });
  }

  delete(address: string): boolean {
    return this.#entries.delete(address);
  }

  has(address: string): boolean {
    return this.#entries.has(address);
  }

  /** Remove and return the addresses not sighted for the TTL. */
  expire(nowMs: number): string[] {
    const gone = [...this.#entries.values()].filter((d) => nowMs - d.lastSeenMs >= this.#ttlMs).map((d) => d.address);
    for (const a of gone) this.#entries.delete(a);
    return gone;
  }

  /** By name, then address. */
  list(): DiscoveredAgent[] {
    return [...this.#entries.values()].sort((a, b) => a.name.localeCompare(b.name) || a.address.localeCompare(b.address));
  }
}
