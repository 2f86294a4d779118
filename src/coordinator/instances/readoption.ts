import { errorMessage } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import type { Membership } from '../membership/membership.ts';
import type { RegistryChange } from '../membership/registry.ts';
import type { EngineInfo } from '../membership/wire.ts';
import type { InstanceRecord, InstanceStore, StoredEngine, Versioned } from '../state/instance-store.ts';
import { adoptionProblems, type LiveEngines, orphanEngines } from './adoption.ts';
import { enginePrefix, type InstanceSnapshot, type ModelStatus, type Runtime } from './runtime.ts';

/**
 * Keeps the instance store in step with the runtime, and brings stored instances back after a
 * coordinator restart (or on a new leader) without reloading them.
 *
 *   persist  an instance that turns ready is stored with each engine's pid, port and command line
 *            as its agent reports them; an unloaded or failed one is deleted. Writes per model are
 *            serialised and compare-and-set on the revision this coordinator last wrote.
 *   adopt    on start, every stored instance waits (claiming its engines, so the runtime's orphan
 *            clean-up leaves them alone) until all its nodes are up, then is matched against what
 *            their agents run (adoption.ts). A match is served again at once (`runtime.adopt`); a
 *            mismatch, or nodes still missing after the grace period, stops whatever is left of
 *            it and deletes the record. Nothing is ever reloaded here: healing is the runtime's.
 *   clean up when an agent connects (or comes back), its engines with this cluster's prefix that no
 *            live instance owns and no stored instance claims are stopped (a crashed load, a
 *            record that did not match, a lost store).
 */
export interface ReadoptionOptions {
  readonly runtime: Runtime;
  readonly membership: Membership;
  readonly store: InstanceStore;
  /** The cluster id: the owner the agents check before they stop an engine. */
  readonly clusterId: string;
  readonly log: Logger;
  /** How long a stored instance waits for its nodes before its engines are given up (default 30 s). */
  readonly graceMs?: number | undefined;
  /**
   * Checked right before every store write: a coordinator that no longer leads writes nothing
   * (several coordinators on NATS; the revision compare-and-set fences a write already sent).
   */
  readonly mayWrite?: (() => boolean) | undefined;
}

export class Readoption {
  readonly #o: ReadoptionOptions;
  readonly #log: Logger;
  /** Stored instances not adopted or given up yet, by name. */
  readonly #pending = new Map<string, Versioned<InstanceRecord>>();
  /** The revision this coordinator last wrote per model (0 = nothing stored). */
  readonly #revisions = new Map<string, number>();
  readonly #writes = new Map<string, Promise<void>>();
  #adopting = new Set<string>();
  #grace: NodeJS.Timeout | undefined;
  #closed = false;

  private constructor(o: ReadoptionOptions) {
    this.#o = o;
    this.#log = o.log.child({ part: 'readoption' });
  }

  /**
   * Read the store and start listening. Call before the agents are dialled: the claims must be
   * in place before the first agent connects and the orphan clean-up looks at its engines.
   */
  static async open(o: ReadoptionOptions): Promise<Readoption> {
    const r = new Readoption(o);
    for (const rec of await o.store.instances()) {
      r.#pending.set(rec.value.name, rec);
      r.#revisions.set(rec.value.name, rec.revision);
      o.runtime.adoptionWaits.expect(rec.value.name);
    }
    if (r.#pending.size > 0) r.#log.info({ models: [...r.#pending.keys()], store: o.store.backend }, 'stored instances waiting for their nodes');
    o.membership.on('change', (c) => r.#onMembership(c));
    o.runtime.on('model', (m) => r.#onModel(m));
    r.#grace = setTimeout(() => r.#giveUpWaiting(), o.graceMs ?? 30_000);
    r.#grace.unref();
    return r;
  }

  /** Whether a stored instance still waiting for adoption claims this engine. */
  claimed(engineId: string): boolean {
    for (const p of this.#pending.values()) if (p.value.engines.some((e) => e.engineId === engineId)) return true;
    return false;
  }

  /** Stored instances still waiting (names). */
  pending(): string[] {
    return [...this.#pending.keys()];
  }

  /** Resolves once every write queued so far is done (tests, shutdown). */
  async settled(): Promise<void> {
    await Promise.all([...this.#writes.values()]);
  }

  #onMembership(c: RegistryChange): void {
    if (this.#closed) return;
    if (c.kind === 'added' || c.kind === 'replaced' || (c.kind === 'state' && c.to === 'up')) {
      const n = c.node;
      this.#o.store
        .putNode({ nodeId: n.nodeId, name: n.profile.name, address: n.address, profile: { ...n.profile }, lastSeenMs: Date.now() })
        .catch((err: unknown) => this.#log.warn({ node: n.profile.name, err: errorMessage(err) }, 'could not store the node'));
      for (const p of this.#pending.values()) if (this.#nodesUp(p.value)) void this.#tryAdopt(p.value.name);
      void this.#cleanUpOrphans(n.nodeId);
    }
  }

  /** Stop engines of this cluster on the node that nothing owns or claims. */
  async #cleanUpOrphans(nodeId: string): Promise<void> {
    const client = this.#o.membership.client(nodeId);
    if (!client) return;
    try {
      const d = await client.describe();
      for (const e of orphanEngines(d.engines, enginePrefix(this.#o.clusterId), (id) => this.#o.runtime.ownsEngine(id) || this.claimed(id))) {
        this.#log.warn({ node: d.profile.name, engineId: e.engineId }, 'stopping an engine no model owns (left by a previous coordinator)');
        await client.stopEngine(e.engineId, this.#o.clusterId).catch(() => {});
      }
    } catch (err) {
      this.#log.debug({ nodeId, err: errorMessage(err) }, 'orphan check failed');
    }
  }

  #nodesUp(rec: InstanceRecord): boolean {
    return rec.engines.every((e) => this.#o.membership.registry.get(e.nodeId)?.state === 'up' && this.#o.membership.client(e.nodeId) !== undefined);
  }

  async #tryAdopt(name: string): Promise<void> {
    const p = this.#pending.get(name);
    if (!p || this.#adopting.has(name)) return;
    this.#adopting.add(name);
    try {
      const live = await this.#describe([...new Set(p.value.engines.map((e) => e.nodeId))]);
      if (this.#pending.get(name) !== p) return;
      const problems = adoptionProblems(p.value, live);
      if (problems.length === 0) {
        this.#pending.delete(name);
        this.#o.runtime.adopt(p.value);
        this.#o.runtime.adoptionWaits.settle(name);
        return;
      }
      this.#log.warn({ model: name, problems }, 'stored instance does not match what the agents run: stopping what is left of it');
      await this.#discard(p);
    } catch (err) {
      this.#log.warn({ model: name, err: errorMessage(err) }, 're-adoption failed: stopping what is left of the instance');
      await this.#discard(p);
    } finally {
      this.#adopting.delete(name);
    }
  }

  /** Each node's engines as its agent reports them now (a node that does not answer is absent). */
  async #describe(nodeIds: readonly string[]): Promise<Map<string, readonly EngineInfo[]>> {
    const live = new Map<string, readonly EngineInfo[]>();
    await Promise.all(
      nodeIds.map(async (id) => {
        const client = this.#o.membership.client(id);
        if (!client) return;
        try {
          live.set(id, (await client.describe()).engines);
        } catch (err) {
          this.#log.debug({ nodeId: id, err: errorMessage(err) }, 'describe failed');
        }
      }),
    );
    return live;
  }

  /** Give a stored instance up: stop its engines that still run, forget the record. */
  async #discard(p: Versioned<InstanceRecord>): Promise<void> {
    if (this.#pending.get(p.value.name) === p) this.#pending.delete(p.value.name);
    this.#o.runtime.adoptionWaits.settle(p.value.name);
    await Promise.all(
      p.value.engines.map(async (e) => {
        const client = this.#o.membership.client(e.nodeId);
        await client?.stopEngine(e.engineId, this.#o.clusterId, 8000).catch(() => {});
      }),
    );
    // A model loaded again under the same name meanwhile has its own record: leave that one.
    if (!this.#o.runtime.model(p.value.name)) this.#queue(p.value.name, () => this.#delete(p.value.name));
  }

  #giveUpWaiting(): void {
    for (const p of [...this.#pending.values()]) {
      if (this.#adopting.has(p.value.name)) continue;
      const missing = p.value.engines.filter((e) => this.#o.membership.registry.get(e.nodeId)?.state !== 'up').map((e) => e.nodeId);
      this.#log.warn({ model: p.value.name, missingNodes: [...new Set(missing)] }, 'stored instance: its nodes did not come back in time; giving it up');
      void this.#discard(p);
    }
  }

  #onModel(m: ModelStatus): void {
    if (this.#closed) return;
    if (m.state === 'ready') {
      const snap = this.#o.runtime.snapshot(m.name);
      if (snap) this.#queue(m.name, () => this.#persist(snap));
    } else if (m.state === 'failed' || m.state === 'unloading') {
      if (!this.#pending.has(m.name)) this.#queue(m.name, () => this.#delete(m.name));
    }
  }

  #queue(name: string, write: () => Promise<void>): void {
    const next = (this.#writes.get(name) ?? Promise.resolve())
      .then(write)
      .catch((err: unknown) => this.#log.error({ model: name, err: errorMessage(err) }, 'instance store write failed: a coordinator restart would not find this model'));
    this.#writes.set(name, next);
  }

  #fenced(name: string): boolean {
    if (this.#o.mayWrite?.() ?? true) return false;
    this.#log.warn({ model: name }, 'not writing the instance store: this coordinator no longer leads');
    return true;
  }

  async #persist(snap: InstanceSnapshot): Promise<void> {
    const live: LiveEngines = await this.#describe([...new Set(snap.engines.map((e) => e.nodeId))]);
    const engines: StoredEngine[] = snap.engines.map((e) => {
      const now = live.get(e.nodeId)?.find((x) => x.engineId === e.engineId);
      return { ...e, kind: now?.kind ?? '', pid: now?.pid ?? 0, port: now?.port ?? 0, argv: [...(now?.argv ?? [])] };
    });
    const rec: InstanceRecord = { ...snap, stages: [...snap.stages], endpoints: [...snap.endpoints], engines, options: { ...snap.options, pin: [...snap.options.pin] } };
    if (this.#fenced(snap.name)) return;
    const revision = await this.#o.store.putInstance(rec, this.#revisions.get(snap.name) ?? 0);
    this.#revisions.set(snap.name, revision);
  }

  async #delete(name: string): Promise<void> {
    const revision = this.#revisions.get(name);
    if (revision === undefined || this.#fenced(name)) return;
    await this.#o.store.deleteInstance(name, revision);
    this.#revisions.delete(name);
  }

  async close(): Promise<void> {
    if (this.#grace) clearTimeout(this.#grace);
    for (const name of this.#pending.keys()) this.#o.runtime.adoptionWaits.settle(name);
    await this.settled();
    this.#closed = true;
  }
}
