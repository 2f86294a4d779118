import { errorMessage } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import { LinkMatrix } from '../../shared/placement/links.ts';
import { hostOf } from '../instances/llama/driver.ts';
import type { Membership } from './membership.ts';

export interface LinkProberOptions {
  /** A good measurement is renewed after this long (links change rarely; probes cost bandwidth). */
  readonly maxAgeSeconds?: number;
  /** A failed probe is tried again after this long. */
  readonly retrySeconds?: number;
  /** How often to look for due pairs (cheap: no probe runs unless one is due). */
  readonly tickMs?: number;
}

/**
 * The I/O around the pure LinkMatrix: asks agents that run a tunnel to probe the tunnels of the
 * other up nodes — every ordered pair, since any node may become a head — when a node comes up,
 * then every `maxAgeSeconds`. One agent at a time, so probes never compete for the same links.
 * A node that is removed takes its links with it.
 */
export class LinkProber {
  readonly matrix = new LinkMatrix();
  readonly #membership: Membership;
  readonly #log: Logger;
  readonly #o: Required<LinkProberOptions>;
  #timer: NodeJS.Timeout | undefined;
  #soon: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #closed = false;

  constructor(membership: Membership, log: Logger, o: LinkProberOptions = {}) {
    this.#membership = membership;
    this.#log = log;
    this.#o = { maxAgeSeconds: o.maxAgeSeconds ?? 600, retrySeconds: o.retrySeconds ?? 30, tickMs: o.tickMs ?? 5000 };
    membership.on('change', (c) => {
      if (c.kind === 'removed') this.matrix.forget(c.node.nodeId);
      else if (c.kind === 'replaced') this.matrix.forget(c.previous.nodeId);
      // a node that just came up is probed within a second (others joining at once share the round)
      if (c.kind !== 'removed' && c.node.state === 'up') this.#schedule(1000);
    });
    this.#timer = setInterval(() => void this.probeDue(), this.#o.tickMs);
    this.#timer.unref();
  }

  #schedule(ms: number): void {
    if (this.#soon || this.#closed) return;
    this.#soon = setTimeout(() => {
      this.#soon = undefined;
      void this.probeDue();
    }, ms);
    this.#soon.unref();
  }

  /** Probe every due pair now (one round at a time); resolves when the round is done. */
  probeDue(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    if (this.#running) return this.#running;
    this.#running = this.#round().finally(() => {
      this.#running = undefined;
    });
    return this.#running;
  }

  async #round(): Promise<void> {
    const up = this.#membership.registry.nodes().filter((n) => n.state === 'up' && (n.profile.tunnelPort ?? 0) > 0);
    const byId = new Map(up.map((n) => [n.nodeId, n]));
    const due = this.matrix.due([...byId.keys()], Date.now() / 1000, this.#o.maxAgeSeconds, this.#o.retrySeconds);
    const byFrom = new Map<string, string[]>();
    for (const [from, to] of due) byFrom.set(from, [...(byFrom.get(from) ?? []), to]);
    for (const [from, tos] of byFrom) {
      if (this.#closed) return;
      const client = this.#membership.client(from);
      if (!client) continue;
      const peers = tos.map((id) => byId.get(id)!).map((n) => ({ nodeId: n.nodeId, host: hostOf(n.address), tunnelPort: n.profile.tunnelPort ?? 0 }));
      try {
        for (const m of await client.measureLinks(peers)) this.matrix.record(m);
        this.#log.debug({ from, links: this.matrix.list().filter((l) => l.from === from) }, 'links measured');
      } catch (err) {
        // an agent without MeasureLinks (older version) or gone: try again later
        const attempted = Date.now() / 1000;
        for (const to of tos) this.matrix.record({ from, to, rttSeconds: 0, bytesPerSecond: 0, measuredAtSeconds: attempted, error: errorMessage(err) });
        this.#log.warn({ from, err: errorMessage(err) }, 'link measurement failed');
      }
    }
  }

  close(): void {
    this.#closed = true;
    if (this.#timer) clearInterval(this.#timer);
    if (this.#soon) clearTimeout(this.#soon);
  }
}
