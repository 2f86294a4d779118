import { expect } from 'vitest';
import { type InstanceRecord, type InstanceStore, StoreConflict } from '../../src/coordinator/state/instance-store.ts';

/** A stored instance as the runtime writes it: two stages, an rpc-server and a head. */
export function sampleRecord(name = 'm8:q4', over: Partial<InstanceRecord> = {}): InstanceRecord {
  const bytes = { weights: 100, kv: 10, compute: 5, overhead: 1, total: 116 };
  return {
    name,
    id: 'ab12cd34',
    path: '/models/m8.gguf',
    family: 'llama',
    options: { ctx: 2048, cacheType: 'f16', parallel: 1, pin: [], parallelism: 'auto' },
    stages: [
      { nodeId: 'n-a', nodeName: 'alpha', firstLayer: 0, lastLayer: 3, bytes, budgetBytes: 200 },
      { nodeId: 'n-b', nodeName: 'bravo', firstLayer: 4, lastLayer: 7, bytes, budgetBytes: 200 },
    ],
    endpoints: ['127.0.0.1:5001', ''],
    engines: [
      { nodeId: 'n-a', engineId: 'oc0ffee00-ab12cd34-s0-rpc', label: 'rpc-server', head: false, kind: 'ENGINE_KIND_RPC_SERVER', pid: 101, port: 5001, argv: ['rpc-server', '-p', '5001'] },
      { nodeId: 'n-b', engineId: 'oc0ffee00-ab12cd34-head', label: 'llama-server', head: true, kind: 'ENGINE_KIND_LLAMA_SERVER', pid: 202, port: 5002, argv: ['llama-server', '--rpc', '127.0.0.1:5001'] },
    ],
    predictedTokensPerSecond: 12.5,
    loadedAtMs: 1_700_000_000_000,
    ...over,
  };
}

/**
 * What every backend of the instance store promises (file and JetStream KV alike): records round
 * trip, writes are compare-and-set on the revision, a stale writer is refused with StoreConflict,
 * deletes too, and node records are last-writer-wins. `other` is a second handle on the same
 * storage (another coordinator, or the same one after a restart).
 */
export async function checkStoreContract(store: InstanceStore, other: () => Promise<InstanceStore>): Promise<void> {
  expect(await store.instances()).toEqual([]);
  const rec = sampleRecord();
  const r1 = await store.putInstance(rec, 0);
  expect(r1).toBeGreaterThan(0);
  await expect(store.putInstance(rec, 0), 'a second create must be refused').rejects.toBeInstanceOf(StoreConflict);
  const r2 = await store.putInstance({ ...rec, predictedTokensPerSecond: 13 }, r1);
  expect(r2).toBeGreaterThan(r1);
  await expect(store.putInstance(rec, r1), 'a writer on a stale revision must be refused').rejects.toBeInstanceOf(StoreConflict);
  // An MLX instance keeps the layout its plan chose (auto resolved) and why.
  const mlx = sampleRecord('second', { family: 'mlx', options: { ...rec.options, parallelism: 'auto' }, parallelism: { mode: 'tensor', reason: 'auto: tensor, predicted 1.00 ms/token pipeline vs 0.60 ms/token tensor' } });
  await store.putInstance(mlx, 0);

  const again = await other();
  const seen = await again.instances();
  expect(seen.map((v) => v.value.name).sort()).toEqual(['m8:q4', 'second']);
  const mine = seen.find((v) => v.value.name === 'm8:q4')!;
  expect(mine.revision).toBe(r2);
  expect(mine.value).toEqual({ ...rec, predictedTokensPerSecond: 13 });
  expect(seen.find((v) => v.value.name === 'second')!.value).toEqual(mlx);

  await expect(store.deleteInstance('m8:q4', r1), 'a delete on a stale revision must be refused').rejects.toBeInstanceOf(StoreConflict);
  await store.deleteInstance('m8:q4', r2);
  await store.deleteInstance('second');
  expect(await (await other()).instances()).toEqual([]);
  // A deleted name can be created again from revision 0.
  expect(await store.putInstance(rec, 0)).toBeGreaterThan(0);

  await store.putNode({ nodeId: 'n-a', name: 'alpha', address: '127.0.0.1:7000', profile: { chip: 'M2' }, lastSeenMs: 1 });
  await store.putNode({ nodeId: 'n-a', name: 'alpha', address: '127.0.0.1:7001', profile: { chip: 'M2' }, lastSeenMs: 2 });
  expect(await (await other()).nodes()).toEqual([{ nodeId: 'n-a', name: 'alpha', address: '127.0.0.1:7001', profile: { chip: 'M2' }, lastSeenMs: 2 }]);
}
