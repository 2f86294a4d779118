import type { CoordinatorMetricSet } from '../../../shared/metrics/factories.ts';
import type { Membership } from '../../membership/membership.ts';
import type { RegistryChange } from '../../membership/registry.ts';
import type { LoadProgress, Runtime } from '../../instances/runtime.ts';
import { type ConsoleEvent, EventRing, type ModelSighting, membershipEvent, modelTransitions, progressEvent } from './events.ts';
import { type Bucket, type ConsoleSnapshot, consoleDiscovered, consoleModel, consoleNode, histogramQuantile, type ModelStats, tokensPerSecondFromItl, usedByEngines } from './snapshot.ts';

/**
 * The console's live feed: one per coordinator, shared by every open page. It keeps the event
 * ring, watches the membership and the runtime, and pushes a new snapshot to subscribers only
 * when it differs from the last one sent — so N open consoles cost one snapshot computation per
 * change, and the browsers never poll.
 *
 * Changes arrive two ways: membership changes and runtime `model`/`progress` events schedule a
 * refresh at once (a node going down reaches the page within one event-loop turn); a short tick catches
 * what nobody announces (a load that starts, live memory stats, request counts).
 */

export interface FeedSubscriber {
  snapshot(s: ConsoleSnapshot): void;
  event(e: ConsoleEvent): void;
}

export interface FeedOptions {
  readonly membership: Membership;
  readonly runtime: Runtime;
  readonly clusterId: string;
  /** The coordinator's metric set: TTFT and inter-token latency per model. */
  readonly metrics: CoordinatorMetricSet;
  readonly tickMs?: number | undefined;
  readonly eventCapacity?: number | undefined;
}

type Values = Awaited<ReturnType<CoordinatorMetricSet['timeToFirstTokenSeconds']['get']>>['values'];

export class ConsoleFeed {
  readonly events: EventRing;
  readonly #o: FeedOptions;
  readonly #subscribers = new Set<FeedSubscriber>();
  readonly #progress = new Map<string, LoadProgress>();
  readonly #timer: NodeJS.Timeout;
  #models = new Map<string, ModelSighting>();
  #lastJson = '';
  #last: ConsoleSnapshot | undefined;
  #refreshing: Promise<void> | undefined;
  #again = false;
  #closed = false;
  readonly #onChange: (c: RegistryChange) => void;
  readonly #onModel: () => void;
  readonly #onProgress: (model: string, p: LoadProgress) => void;

  constructor(o: FeedOptions) {
    this.#o = o;
    this.events = new EventRing(o.eventCapacity);
    this.#onChange = (c) => {
      this.#emit(membershipEvent(c));
      this.refresh();
    };
    this.#onModel = () => this.refresh();
    this.#onProgress = (model, p) => this.#recordProgress(model, p);
    o.membership.on('change', this.#onChange);
    o.runtime.on('model', this.#onModel);
    o.runtime.on('progress', this.#onProgress);
    this.#timer = setInterval(() => this.refresh(), o.tickMs ?? 250);
    this.#timer.unref();
  }

  /** Add a subscriber; it gets the current snapshot at once. Returns the unsubscribe function. */
  async subscribe(s: FeedSubscriber): Promise<() => void> {
    this.#subscribers.add(s);
    // Without subscribers the snapshot is not kept current: bring it up to date first. A refresh
    // that found a change has already sent it; a second copy of the same snapshot is harmless.
    await this.refresh();
    if (this.#last) s.snapshot(this.#last);
    return () => this.#subscribers.delete(s);
  }

  get subscriberCount(): number {
    return this.#subscribers.size;
  }

  /** A load's progress (any load: CLI, API or console): shown on the model and in the events. */
  #recordProgress(model: string, p: LoadProgress): void {
    const prev = this.#progress.get(model);
    this.#progress.set(model, p);
    // "ready" and "failed" are announced by the model's own transition (modelTransitions).
    if (prev?.phase !== p.phase && p.phase !== 'ready' && p.phase !== 'failed') this.#emit(progressEvent(model, p));
    this.refresh();
  }

  /** Recompute now (coalesced: a refresh in flight is followed by exactly one more). */
  refresh(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    if (this.#refreshing) {
      this.#again = true;
      return this.#refreshing;
    }
    this.#refreshing = this.#refresh().finally(() => {
      this.#refreshing = undefined;
      if (this.#again) {
        this.#again = false;
        void this.refresh();
      }
    });
    return this.#refreshing;
  }

  close(): void {
    this.#closed = true;
    clearInterval(this.#timer);
    this.#o.membership.off('change', this.#onChange);
    this.#o.runtime.off('model', this.#onModel);
    this.#o.runtime.off('progress', this.#onProgress);
    this.#subscribers.clear();
  }

  async #refresh(): Promise<void> {
    const models = this.#o.runtime.models();
    // Model transitions are tracked even with no page open: the event list must be complete.
    const seen = new Map(models.map((m) => [m.name, { name: m.name, state: m.state, error: m.error }]));
    for (const e of modelTransitions(this.#models, seen)) this.#emit(e);
    this.#models = seen;
    for (const name of this.#progress.keys()) if (seen.get(name)?.state !== 'loading' && seen.get(name)?.state !== 'recovering') this.#progress.delete(name);
    if (this.#subscribers.size === 0 && this.#last) return;
    const stats = await this.#stats();
    const used = usedByEngines(models);
    const snapshot: ConsoleSnapshot = {
      clusterId: this.#o.clusterId,
      nodes: this.#o.membership.registry.nodes().map((n) => consoleNode(n, used.get(n.nodeId) ?? 0)),
      discovered: this.#o.membership.discovered().map(consoleDiscovered),
      models: models.map((m) => consoleModel(m, stats(m.name), this.#progress.get(m.name))),
    };
    const json = JSON.stringify(snapshot);
    if (json === this.#lastJson) return;
    this.#lastJson = json;
    this.#last = snapshot;
    for (const s of this.#subscribers) s.snapshot(snapshot);
  }

  async #stats(): Promise<(model: string) => ModelStats> {
    const m = this.#o.metrics;
    const [ttft, itl] = await Promise.all([m.timeToFirstTokenSeconds.get(), m.interTokenLatencySeconds.get()]);
    const slots = new Map(this.#o.runtime.slotUsage().map((u) => [u.model, u]));
    return (model) => ({
      ttftP50Seconds: histogramQuantile(0.5, bucketsOf(ttft.values, model)),
      measuredTokensPerSecond: tokensPerSecondFromItl(sampleOf(itl.values, model, '_sum'), sampleOf(itl.values, model, '_count')),
      running: slots.get(model)?.running ?? 0,
      queued: slots.get(model)?.queued ?? 0,
    });
  }

  #emit(e: Parameters<EventRing['push']>[0]): void {
    const event = this.events.push(e);
    for (const s of this.#subscribers) s.event(event);
  }
}

type Sample = { readonly value: number; readonly metricName?: string; readonly labels: Readonly<Record<string, string | number | undefined>> };

function bucketsOf(values: Values, model: string): Bucket[] {
  return (values as readonly Sample[])
    .filter((v) => v.metricName?.endsWith('_bucket') && v.labels.model === model)
    .map((v) => ({ le: v.labels.le === '+Inf' ? Number.POSITIVE_INFINITY : Number(v.labels.le), count: v.value }));
}

function sampleOf(values: Values, model: string, suffix: string): number {
  return (values as readonly Sample[]).find((v) => v.metricName?.endsWith(suffix) && v.labels.model === model)?.value ?? 0;
}
