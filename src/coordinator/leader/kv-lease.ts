import { JetStreamApiCodes, JetStreamApiError, jetstream } from '@nats-io/jetstream';
import { type KV, Kvm } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { bucketName } from '../state/kv-instance-store.ts';
import { initialLease, type LeaseConfig, LeaseHolder, type LeaseOutcome, type LeaseState, type LeaseStep, leaseConfig, leaseOutcome, nextStep } from './lease.ts';

/**
 * The NATS edge of the leader lease (lease.ts holds the rules). The bucket
 * `orchard_<cluster>_leader` keeps one key, `lease`, and its max age is the lease TTL, so a key
 * nobody renews ages out on the server. This needs only stream max_age and expected-last-subject
 * -sequence, both in nats-server 2.9 (no per-message TTL).
 */
export interface KvLeaseOptions {
  readonly clusterId: string;
  readonly self: LeaseHolder;
  readonly ttlMs: number;
  readonly replicas?: number | undefined;
  /** Called on every change of role, and when a standby learns of a new leader. */
  readonly onChange?: ((view: LeaseView) => void) | undefined;
  readonly onError?: ((err: Error) => void) | undefined;
  readonly now?: (() => number) | undefined;
}

export type LeaseView = { readonly role: 'leader' } | { readonly role: 'standby'; readonly leader: LeaseHolder | null };

const KEY = 'lease';

function isConflict(err: unknown): boolean {
  return err instanceof JetStreamApiError && (err.code === JetStreamApiCodes.StreamWrongLastSequence || err.code === 10164);
}

export class KvLeaderLease {
  private state: LeaseState;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private last: string | undefined;
  private readonly now: () => number;
  private readonly config: LeaseConfig;

  private constructor(
    private readonly kv: KV,
    private readonly o: KvLeaseOptions,
  ) {
    this.now = o.now ?? (() => performance.now());
    this.config = leaseConfig(o.ttlMs);
    this.state = initialLease(this.now());
  }

  /**
   * Creates the lease bucket if need be (with JetStream's default timeout: a replicated stream can
   * take seconds to create) and starts contending at once. Every lease operation after that gives
   * up after a third of the TTL: a renewal lost with the NATS server it was sent to would
   * otherwise wait out JetStream's 5 s default — longer than the term — while the retry that a
   * reconnected client could make in time waits behind it. Reads go to the stream leader (no
   * direct get), so a replica that lags never shows a vacant lease.
   */
  static async start(nc: NatsConnection, o: KvLeaseOptions): Promise<KvLeaderLease> {
    const name = bucketName(o.clusterId, 'leader');
    await new Kvm(nc).create(name, { history: 1, replicas: o.replicas ?? 1, ttl: o.ttlMs });
    const kv = await new Kvm(jetstream(nc, { timeout: Math.round(o.ttlMs / 3) })).open(name);
    const lease = new KvLeaderLease(kv, { ...o, self: LeaseHolder.parse(o.self) });
    lease.schedule(0);
    return lease;
  }

  /** The role now; a leader whose term ran out reads as standby even before the next step runs. */
  view(): LeaseView {
    const s = nextStep(this.state, this.config, this.now()).state;
    return s.role === 'leader' ? { role: 'leader' } : { role: 'standby', leader: s.leader };
  }

  isLeader(): boolean {
    return this.view().role === 'leader';
  }

  /** Stops contending; a leader deletes its key (compare-and-set) so a standby takes over at once. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    const s = this.state;
    this.state = initialLease(this.now());
    if (s.role === 'leader') await this.kv.delete(KEY, { previousSeq: s.revision }).catch(() => {});
  }

  private schedule(delayMs: number): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => void this.run(), Math.max(0, delayMs));
  }

  private async run(): Promise<void> {
    const { state, step } = nextStep(this.state, this.config, this.now());
    this.state = state;
    this.report();
    if (step.kind === 'wait') return this.schedule(step.untilMs - this.now());
    const outcome = await this.perform(step);
    if (this.stopped) return;
    this.state = leaseOutcome(this.state, outcome, this.config);
    this.report();
    this.schedule(0);
  }

  private async perform(step: Exclude<LeaseStep, { kind: 'wait' }>): Promise<LeaseOutcome> {
    const sentAt = this.now();
    try {
      if (step.kind === 'read') {
        const e = await this.kv.get(KEY);
        if (e === null || e.operation !== 'PUT') return { kind: 'read', entry: null, at: this.now() };
        const holder = LeaseHolder.safeParse(parseJson(e.string()));
        return { kind: 'read', entry: { holder: holder.success ? holder.data : null, revision: e.revision }, at: this.now() };
      }
      const data = JSON.stringify(this.o.self);
      const revision = step.kind === 'create' ? await this.kv.create(KEY, data) : await this.kv.update(KEY, data, step.revision);
      return { kind: 'written', revision, sentAt };
    } catch (err) {
      if (isConflict(err)) return { kind: 'conflict', at: this.now() };
      this.o.onError?.(err as Error);
      return { kind: 'failed', at: this.now() };
    }
  }

  private report(): void {
    const view = this.view();
    const key = JSON.stringify(view);
    if (key === this.last) return;
    this.last = key;
    this.o.onChange?.(view);
  }
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}
