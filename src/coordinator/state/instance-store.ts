import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { OrchardError } from '../../shared/errors.ts';
import { PARALLELISMS } from '../../shared/placement/parallelism.ts';
import { readIfExists, writeFileAtomic } from '../../shared/pki/files.ts';

/**
 * What a coordinator needs to resume the cluster without reloading anything: every model
 * instance it runs (model, options, plan, the engines per node with the ids it gave them) and
 * every node it knew (profile, address, last seen). One interface, two backends:
 *   file  `instances.json` in the coordinator's state dir, written atomically (tmp + rename);
 *         the embedded default, one coordinator
 *   nats  JetStream KV buckets (kv-instance-store.ts); any coordinator of the cluster reads them
 * Writes are compare-and-set on a per-key revision in both, so two writers never silently
 * overwrite each other (with one coordinator that never fires; with several it is the rule).
 */

const StoredEngine = z.object({
  nodeId: z.string().min(1),
  engineId: z.string().min(1),
  /** How messages name it ("rpc-server", "llama-server", "MLX rank 1"). */
  label: z.string(),
  head: z.boolean(),
  kind: z.string(),
  /** What the agent reported once the instance was ready: re-adoption wants the same process. */
  pid: z.number().int().nonnegative(),
  port: z.number().int().nonnegative(),
  argv: z.array(z.string()),
});
export type StoredEngine = z.infer<typeof StoredEngine>;

const Bytes = z.object({ weights: z.number(), kv: z.number(), compute: z.number(), overhead: z.number(), total: z.number() });
const StoredStage = z.object({
  nodeId: z.string(),
  nodeName: z.string(),
  firstLayer: z.number().int(),
  lastLayer: z.number().int(),
  bytes: Bytes,
  budgetBytes: z.number(),
  device: z.object({ model: z.number(), kv: z.number(), compute: z.number() }).optional(),
});

export const InstanceRecord = z.object({
  name: z.string().min(1),
  /** The instance id in its engine ids (`<cluster prefix><id>-<role>`). */
  id: z.string().min(1),
  path: z.string().min(1),
  family: z.enum(['llama', 'mlx']),
  options: z.object({
    ctx: z.number().int(),
    cacheType: z.string(),
    parallel: z.number().int(),
    pin: z.array(z.string()),
    // Records written before the option existed meant the default.
    parallelism: z.enum(PARALLELISMS).default('auto'),
    allowUntunnelledRdma: z.boolean().optional(),
  }),
  stages: z.array(StoredStage),
  /** How each stage is reached, in stage order ('' when it has no endpoint of its own). */
  endpoints: z.array(z.string()),
  engines: z.array(StoredEngine).min(1),
  predictedTokensPerSecond: z.number(),
  /** MLX over several ranks: the layout the plan chose and why (`auto` resolved), kept across restarts. */
  parallelism: z.object({ mode: z.enum(['pipeline', 'tensor']), reason: z.string() }).optional(),
  /** The engine's own report against the plan at load (llama.cpp), shown again after re-adoption. */
  verification: z.unknown().optional(),
  loadedAtMs: z.number().optional(),
});
export type InstanceRecord = z.infer<typeof InstanceRecord>;

export const NodeRecord = z.object({
  nodeId: z.string().min(1),
  name: z.string(),
  /** The agent's gRPC address: a restarted coordinator dials it without waiting for Bonjour. */
  address: z.string().min(1),
  profile: z.record(z.string(), z.unknown()),
  lastSeenMs: z.number(),
});
export type NodeRecord = z.infer<typeof NodeRecord>;

export interface Versioned<T> {
  readonly value: T;
  /** The key's revision; 0 = absent. Pass it back to write over exactly this version. */
  readonly revision: number;
}

/** Someone else wrote (or deleted) the key since the revision the writer read. */
export class StoreConflict extends OrchardError {
  constructor(key: string, expected: number) {
    super(`state "${key}" changed since revision ${expected}: another coordinator wrote it`);
  }
}

export type StoreBackend = 'file' | 'nats';

export interface InstanceStore {
  readonly backend: StoreBackend;
  instances(): Promise<Versioned<InstanceRecord>[]>;
  /** Create (`revision` 0) or replace the record read at `revision`; resolves with the new revision. Throws StoreConflict. */
  putInstance(rec: InstanceRecord, revision: number): Promise<number>;
  /** Remove the record (any revision when `revision` is undefined). */
  deleteInstance(name: string, revision?: number): Promise<void>;
  nodes(): Promise<NodeRecord[]>;
  /** Last writer wins: a node record is what its latest sighting said. */
  putNode(rec: NodeRecord): Promise<void>;
  close(): Promise<void>;
}

const FileState = z.object({
  version: z.literal(1),
  instances: z.record(z.string(), z.object({ revision: z.number().int().positive(), value: z.unknown() })).default({}),
  nodes: z.record(z.string(), z.unknown()).default({}),
});
type FileState = z.infer<typeof FileState>;

/**
 * The file backend: the whole state in one JSON file, rewritten atomically on every change (a
 * crash leaves the old or the new file, never half of one). Writes queue behind each other in
 * this process; one coordinator owns a state dir. A record that no longer parses is skipped with
 * its key named, not fatal: the engines it described are then cleaned up as orphans.
 */
export class FileInstanceStore implements InstanceStore {
  readonly backend = 'file';
  readonly path: string;
  #state: FileState | undefined;
  #queue: Promise<unknown> = Promise.resolve();

  constructor(
    readonly dir: string,
    private readonly onInvalid: (key: string, problem: string) => void = () => {},
  ) {
    this.path = join(dir, 'instances.json');
  }

  async #read(): Promise<FileState> {
    if (this.#state) return this.#state;
    const text = await readIfExists(this.path);
    if (text === undefined) {
      this.#state = { version: 1, instances: {}, nodes: {} };
      return this.#state;
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (err) {
      throw new OrchardError(`${this.path} is not valid JSON (${(err as Error).message}): move it away to start without the saved instances`);
    }
    const r = FileState.safeParse(parsed);
    if (!r.success) throw new OrchardError(`${this.path}: ${r.error.issues[0]?.message ?? 'invalid'}: move it away to start without the saved instances`);
    this.#state = r.data;
    return r.data;
  }

  /** Serialise every read-modify-write of this process. */
  #exclusive<T>(fn: (s: FileState) => Promise<T> | T): Promise<T> {
    const next = this.#queue.then(async () => fn(await this.#read()));
    this.#queue = next.catch(() => {});
    return next;
  }

  async #write(s: FileState): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(this.path, `${JSON.stringify(s, null, 2)}\n`, 0o600);
  }

  instances(): Promise<Versioned<InstanceRecord>[]> {
    return this.#exclusive((s) =>
      Object.entries(s.instances).flatMap(([key, e]) => {
        const r = InstanceRecord.safeParse(e.value);
        if (r.success) return [{ value: r.data, revision: e.revision }];
        this.onInvalid(`instances/${key}`, r.error.issues[0]?.message ?? 'invalid');
        return [];
      }),
    );
  }

  putInstance(rec: InstanceRecord, revision: number): Promise<number> {
    const value = InstanceRecord.parse(rec);
    return this.#exclusive(async (s) => {
      const current = s.instances[rec.name]?.revision ?? 0;
      if (current !== revision) throw new StoreConflict(`instances/${rec.name}`, revision);
      const next = { ...s, instances: { ...s.instances, [rec.name]: { revision: current + 1, value } } };
      await this.#write(next);
      this.#state = next;
      return current + 1;
    });
  }

  deleteInstance(name: string, revision?: number): Promise<void> {
    return this.#exclusive(async (s) => {
      const current = s.instances[name]?.revision ?? 0;
      if (current === 0) return;
      if (revision !== undefined && current !== revision) throw new StoreConflict(`instances/${name}`, revision);
      const { [name]: _gone, ...rest } = s.instances;
      const next = { ...s, instances: rest };
      await this.#write(next);
      this.#state = next;
    });
  }

  nodes(): Promise<NodeRecord[]> {
    return this.#exclusive((s) =>
      Object.entries(s.nodes).flatMap(([key, v]) => {
        const r = NodeRecord.safeParse(v);
        if (r.success) return [r.data];
        this.onInvalid(`nodes/${key}`, r.error.issues[0]?.message ?? 'invalid');
        return [];
      }),
    );
  }

  putNode(rec: NodeRecord): Promise<void> {
    const value = NodeRecord.parse(rec);
    return this.#exclusive(async (s) => {
      const next = { ...s, nodes: { ...s.nodes, [rec.nodeId]: value } };
      await this.#write(next);
      this.#state = next;
    });
  }

  async close(): Promise<void> {
    await this.#queue;
  }
}
