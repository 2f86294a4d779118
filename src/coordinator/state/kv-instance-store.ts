import { JetStreamApiCodes, JetStreamApiError } from '@nats-io/jetstream';
import { type KV, Kvm } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { type InstanceRecord, InstanceRecord as InstanceRecordSchema, type InstanceStore, type NodeRecord, NodeRecord as NodeRecordSchema, StoreConflict, type Versioned } from './instance-store.ts';

/**
 * The NATS backend of the instance store: two JetStream KV buckets per cluster,
 * `orchard_<cluster>_instances` (key = model name) and `orchard_<cluster>_nodes` (key = node id).
 * A KV revision is the stream sequence of the key's last write; `update(key, value, revision)`
 * and `delete(key, { previousSeq })` are the compare-and-set the interface promises. Replicas:
 * 1 on a single server, 3 on a three-server cluster (JetStream keeps the bucket through the loss
 * of one server).
 */
export interface KvStoreOptions {
  readonly clusterId: string;
  /** JetStream replicas of each bucket (1, 3 or 5; at most the servers in the NATS cluster). */
  readonly replicas?: number | undefined;
  readonly onInvalid?: ((key: string, problem: string) => void) | undefined;
}

/** Bucket names take [A-Za-z0-9_-]; cluster ids are uuids. */
export function bucketName(clusterId: string, what: 'instances' | 'nodes' | 'leader'): string {
  return `orchard_${clusterId.replace(/[^A-Za-z0-9_-]/g, '')}_${what}`;
}

/** KV keys take [-/_=.A-Za-z0-9]; model names may hold ':', which names never use as '='. */
export function kvKey(name: string): string {
  return name.replace(/:/g, '=');
}

function isConflict(err: unknown): boolean {
  return err instanceof JetStreamApiError && (err.code === JetStreamApiCodes.StreamWrongLastSequence || err.code === 10164);
}

export class KvInstanceStore implements InstanceStore {
  readonly backend = 'nats';

  private constructor(
    private readonly instancesKv: KV,
    private readonly nodesKv: KV,
    private readonly onInvalid: (key: string, problem: string) => void,
  ) {}

  static async open(nc: NatsConnection, o: KvStoreOptions): Promise<KvInstanceStore> {
    const kvm = new Kvm(nc);
    const replicas = o.replicas ?? 1;
    const [instances, nodes] = await Promise.all([
      kvm.create(bucketName(o.clusterId, 'instances'), { history: 1, replicas }),
      kvm.create(bucketName(o.clusterId, 'nodes'), { history: 1, replicas }),
    ]);
    return new KvInstanceStore(instances, nodes, o.onInvalid ?? (() => {}));
  }

  async instances(): Promise<Versioned<InstanceRecord>[]> {
    const out: Versioned<InstanceRecord>[] = [];
    for (const key of await collect(await this.instancesKv.keys())) {
      const e = await this.instancesKv.get(key);
      if (e?.operation !== 'PUT') continue;
      const r = InstanceRecordSchema.safeParse(parseJson(e.string()));
      if (r.success) out.push({ value: r.data, revision: e.revision });
      else this.onInvalid(`instances/${key}`, r.error.issues[0]?.message ?? 'invalid');
    }
    return out;
  }

  async putInstance(rec: InstanceRecord, revision: number): Promise<number> {
    const key = kvKey(rec.name);
    const data = JSON.stringify(InstanceRecordSchema.parse(rec));
    try {
      return revision === 0 ? await this.instancesKv.create(key, data) : await this.instancesKv.update(key, data, revision);
    } catch (err) {
      if (isConflict(err)) throw new StoreConflict(`instances/${rec.name}`, revision);
      throw err;
    }
  }

  async deleteInstance(name: string, revision?: number): Promise<void> {
    try {
      await this.instancesKv.delete(kvKey(name), revision === undefined ? {} : { previousSeq: revision });
    } catch (err) {
      if (isConflict(err)) throw new StoreConflict(`instances/${name}`, revision ?? 0);
      throw err;
    }
  }

  async nodes(): Promise<NodeRecord[]> {
    const out: NodeRecord[] = [];
    for (const key of await collect(await this.nodesKv.keys())) {
      const e = await this.nodesKv.get(key);
      if (e?.operation !== 'PUT') continue;
      const r = NodeRecordSchema.safeParse(parseJson(e.string()));
      if (r.success) out.push(r.data);
      else this.onInvalid(`nodes/${key}`, r.error.issues[0]?.message ?? 'invalid');
    }
    return out;
  }

  async putNode(rec: NodeRecord): Promise<void> {
    await this.nodesKv.put(kvKey(rec.nodeId), JSON.stringify(NodeRecordSchema.parse(rec)));
  }

  async close(): Promise<void> {
    // The connection belongs to whoever opened it (the coordinator's NATS link).
  }
}

async function collect(it: AsyncIterable<string>): Promise<string[]> {
  const out: string[] = [];
  for await (const k of it) out.push(k);
  return out;
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}
