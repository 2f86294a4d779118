/**
 * The link matrix: what nodes measured of the links between them (round trip and payload
 * throughput over the tunnel path engines use, `orchard status --links`). Pure: the coordinator
 * feeds it probe results and asks it which pairs are due; the planner reads the links of the
 * nodes it plans for. Keys are node ids.
 */

export interface LinkMeasurement {
  readonly from: string;
  readonly to: string;
  readonly rttSeconds: number;
  readonly bytesPerSecond: number;
  readonly measuredAtSeconds: number;
  /** The last probe failed; rtt and throughput then hold the last good sample, if any (else 0). */
  readonly error?: string;
}

/** What a stage boundary costs on one link (the planner's per-hop term). */
export interface LinkCost {
  readonly rttSeconds: number;
  readonly bytesPerSecond: number;
}

const key = (from: string, to: string) => `${from}\u0000${to}`;

export class LinkMatrix {
  readonly #m = new Map<string, LinkMeasurement>();
  /** When each pair was last probed, good or not (a failure keeps the older sample's time). */
  readonly #attempts = new Map<string, number>();

  /** Record a probe; a failure keeps the last good sample's numbers and says why it is stale. */
  record(m: LinkMeasurement): void {
    const k = key(m.from, m.to);
    const prev = this.#m.get(k);
    this.#attempts.set(k, m.measuredAtSeconds);
    if (m.error !== undefined && prev && !prev.error) {
      this.#m.set(k, { ...prev, error: m.error });
      return;
    }
    this.#m.set(k, m);
  }

  get(from: string, to: string): LinkMeasurement | undefined {
    return this.#m.get(key(from, to));
  }

  /**
   * The link as a pipeline boundary uses it: activations cross both ways (llama.cpp RPC: the head
   * sends a stage its input and reads its output), so the slower measured direction and the longer
   * round trip count. Undefined until one direction has a good sample.
   */
  between(a: string, b: string): LinkCost | undefined {
    const good = [this.get(a, b), this.get(b, a)].filter((m): m is LinkMeasurement => m !== undefined && m.bytesPerSecond > 0 && m.rttSeconds > 0);
    if (good.length === 0) return undefined;
    return { rttSeconds: Math.max(...good.map((m) => m.rttSeconds)), bytesPerSecond: Math.min(...good.map((m) => m.bytesPerSecond)) };
  }

  /**
   * Ordered pairs among `nodes` (ids that run a tunnel) never measured, or last measured more than
   * `maxAgeSeconds` ago — failed probes are retried after `retrySeconds`.
   */
  due(nodes: readonly string[], nowSeconds: number, maxAgeSeconds: number, retrySeconds = 30): [string, string][] {
    const out: [string, string][] = [];
    for (const from of nodes) {
      for (const to of nodes) {
        if (from === to) continue;
        const m = this.get(from, to);
        const attempted = this.#attempts.get(key(from, to));
        const age = m && attempted !== undefined ? nowSeconds - attempted : Number.POSITIVE_INFINITY;
        if (age > (m?.error ? retrySeconds : maxAgeSeconds)) out.push([from, to]);
      }
    }
    return out;
  }

  /** Drop every link of a node (it left or was revoked; a returning node is measured again). */
  forget(node: string): void {
    for (const [k, m] of this.#m) {
      if (m.from !== node && m.to !== node) continue;
      this.#m.delete(k);
      this.#attempts.delete(k);
    }
  }

  list(): LinkMeasurement[] {
    return [...this.#m.values()].sort((x, y) => (x.from === y.from ? (x.to < y.to ? -1 : 1) : x.from < y.from ? -1 : 1));
  }
}

/**
 * The measured links of each planned node to every other, keyed by planner name, for
 * `PlacementNode.links`. `names` maps planner names to node ids.
 */
export function linksByName(matrix: LinkMatrix, names: ReadonlyMap<string, string>): Map<string, Record<string, LinkCost>> {
  const out = new Map<string, Record<string, LinkCost>>();
  for (const [a, idA] of names) {
    const row: Record<string, LinkCost> = {};
    for (const [b, idB] of names) {
      if (a === b) continue;
      const c = matrix.between(idA, idB);
      if (c) row[b] = c;
    }
    out.set(a, row);
  }
  return out;
}
