import { Kvm } from '@nats-io/kv';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { afterAll, beforeAll, expect } from 'vitest';
import { bucketName, KvInstanceStore } from '../../src/coordinator/state/kv-instance-store.ts';
import { checkStoreContract, sampleRecord } from '../helpers/instance-store-contract.ts';
import { testNats } from '../helpers/nats.ts';
import { describeWith, itWith, natsServer } from '../helpers/needs.ts';

/*
 * The JetStream KV backend of the instance store against a real nats-server -js: the same
 * contract as the file store (compare-and-set on the KV revision), seen from a second connection
 * (another coordinator), and a record that does not parse is skipped and named.
 */

const nats = natsServer();

describeWith([nats], 'KvInstanceStore on a real nats-server', () => {
  let server: Awaited<ReturnType<typeof testNats>>;
  const conns: NatsConnection[] = [];
  const open = async (clusterId: string, onInvalid?: (key: string) => void) => {
    const nc = await connect({ servers: server.url });
    conns.push(nc);
    return KvInstanceStore.open(nc, { clusterId, onInvalid });
  };

  beforeAll(async () => {
    server = await testNats((nats as { value: string }).value);
  });
  afterAll(async () => {
    await Promise.all(conns.map((c) => c.close()));
    await server?.stop();
  });

  itWith([nats], 'keeps the store contract across two connections', async () => {
    await checkStoreContract(await open('c0ffee00-1111'), () => open('c0ffee00-1111'));
  });

  itWith([nats], 'clusters do not see each other’s records; a record that does not parse is skipped and named', async () => {
    const a = await open('aaaa0000-2222');
    await a.putInstance(sampleRecord('only-a'), 0);
    expect(await (await open('bbbb0000-3333')).instances()).toEqual([]);
    const kv = await new Kvm(conns[0]!).open(bucketName('aaaa0000-2222', 'instances'));
    await kv.put('broken', '{"name":"broken"}');
    const invalid: string[] = [];
    const seen = await (await open('aaaa0000-2222', (k) => invalid.push(k))).instances();
    expect(seen.map((v) => v.value.name)).toEqual(['only-a']);
    expect(invalid).toEqual(['instances/broken']);
  });
});
