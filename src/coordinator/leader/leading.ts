import { errorMessage } from '../../shared/errors.ts';
import { Readoption, type ReadoptionOptions } from '../instances/readoption.ts';
import { Discovery } from '../membership/discovery.ts';
import type { NodeRecord } from '../state/instance-store.ts';

/**
 * What only the coordinator that drives the cluster does (roles.ts decides which one): re-adopt
 * the stored instances, then dial every agent it can know of — the ones that joined it
 * statically (its state dir), the nodes bucket (every agent any leader had, so a new leader
 * reaches agents that joined another coordinator) and Bonjour. A standby does none of it, so its
 * runtime and membership stay empty and it never starts, stops or adopts an engine.
 */
export interface LeaderWorkOptions extends ReadoptionOptions {
  /** Agents remembered in the state dir (static joins). */
  readonly remembered: () => readonly string[];
  readonly mdns?: { readonly interface?: string | undefined } | undefined;
  /** Dial the nodes bucket's agents too (NATS: they may have joined another coordinator). */
  readonly dialStoredNodes: boolean;
  /** Checked right before every instance store write (the fence beside the revision compare-and-set). */
  readonly mayWrite: () => boolean;
}

export class LeaderWork {
  #readoption: Readoption | undefined;
  #discovery: Discovery | undefined;
  #closed = false;

  constructor(private readonly o: LeaderWorkOptions) {}

  /** The re-adoption of stored instances, once this coordinator leads. */
  get readoption(): Readoption | undefined {
    return this.#readoption;
  }

  async start(): Promise<void> {
    const { o } = this;
    // Before any agent is dialled: stored instances claim their engines before the orphan clean-up looks.
    this.#readoption = await Readoption.open(o);
    if (this.#closed) return;
    const addresses = new Set(o.remembered());
    if (o.dialStoredNodes) for (const n of await this.#storedNodes()) addresses.add(n.address);
    for (const a of addresses) {
      o.membership.add(a, 'join', true).catch((err: unknown) => o.log.warn({ address: a, err: errorMessage(err) }, 'known agent not reachable yet; retrying'));
    }
    if (!o.mdns) return;
    this.#discovery = new Discovery(
      // the TXT record (advertise.ts) is what the agent claims: shown for a discovered agent, never trusted
      (address, txt, name) => o.membership.sighted(address, { nodeId: txt.id, name, chip: txt.chip, memoryBytes: /^\d+$/.test(txt.ram ?? '') ? Number(txt.ram) : undefined }),
      o.log,
      { interface: o.mdns.interface, onGone: (address) => o.membership.unsighted(address) },
    );
  }

  async #storedNodes(): Promise<NodeRecord[]> {
    try {
      return await this.o.store.nodes();
    } catch (err) {
      this.o.log.warn({ err: errorMessage(err) }, 'could not read the nodes bucket: only remembered agents are dialled');
      return [];
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#readoption?.close();
    await this.#discovery?.close();
  }
}
